"""Prometheus metrics for `nanoseek serve`, named as vLLM names them (`vllm:...`, label `model_name`), so the
dashboards and alerts people already have for vLLM work unchanged."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from nanoseek.infer.engine_loop import Update

# seconds; the same spirit as vLLM's buckets: fine below 100 ms, coarse up to minutes
LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = r = CollectorRegistry()
        label = ["model_name"]
        self.running = Gauge("vllm:num_requests_running", "Sequences in the running batch.", label, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Sequences waiting for a slot.", label, registry=r)
        self.cache_usage = Gauge(
            "vllm:kv_cache_usage_perc", "Share of latent-cache slots in use (0-1).", label, registry=r
        )
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed.", label, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", label, registry=r)
        self.prefix_queries = Counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", label, registry=r
        )
        self.prefix_hits = Counter(
            "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", label, registry=r
        )
        self.prefix_seen = (0, 0)  # the engine's (queries, hits) already counted
        self.success = Counter(
            "vllm:request_success", "Finished requests by finish reason.", [*label, "finished_reason"], registry=r
        )
        seconds = {"buckets": LATENCY_BUCKETS, "registry": r}
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", label, **seconds)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between output tokens.", label, **seconds)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request latency, end to end.", label, **seconds)
        self.queue_time = Histogram("vllm:request_queue_time_seconds", "Time waiting for a slot.", label, **seconds)
        tokens = {"buckets": TOKEN_BUCKETS, "registry": r}
        self.request_prompt = Histogram("vllm:request_prompt_tokens", "Prompt tokens per request.", label, **tokens)
        self.request_generation = Histogram(
            "vllm:request_generation_tokens", "Generated tokens per request.", label, **tokens
        )
        self.model_name = model_name
        for metric in r._collector_to_names:  # every series exists (at zero) before the first request
            if metric is self.success:
                for reason in ("stop", "length", "abort"):
                    metric.labels(model_name=model_name, finished_reason=reason)
            else:
                self.of(metric)

    def of(self, metric):
        """The metric's child for this server's model name."""
        return metric.labels(model_name=self.model_name)

    def finished(self, reason: str, n: int = 1) -> None:
        """Count n sequences that ended with `reason` ("stop", "length" or "abort")."""
        self.success.labels(model_name=self.model_name, finished_reason=reason).inc(n)

    def update_prefix(self, queries: int, hits: int) -> None:
        """Catch the counters up with the engine's prefix cache totals."""
        q0, h0 = self.prefix_seen
        self.of(self.prefix_queries).inc(queries - q0)
        self.of(self.prefix_hits).inc(hits - h0)
        self.prefix_seen = (queries, hits)

    def update_load(self, running: int, waiting: int, slots: int) -> None:
        self.of(self.running).set(running)
        self.of(self.waiting).set(waiting)
        self.of(self.cache_usage).set(running / slots if slots else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Timing:
    """One request's latency metrics: time to first token, inter-token latency, queue time, end to end."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.m, self.start, self.last = metrics, time.perf_counter(), None

    def on_update(self, up: Update) -> None:
        m, now, n = self.m, time.perf_counter(), len(up.token_ids)
        if up.queue_time is not None:
            m.of(m.queue_time).observe(up.queue_time)
        if not n:
            return
        m.of(m.generation_tokens).inc(n)
        if self.last is None:
            m.of(m.ttft).observe(now - self.start)
            gaps, gap = n - 1, 0.0  # tokens that came with the first (an accepted MTP draft)
        else:
            gaps, gap = n, (now - self.last) / n
        for _ in range(gaps):
            m.of(m.itl).observe(gap)
        self.last = now

    def on_finish(self, finished: list[tuple[str | None, int]]) -> None:
        """The request is done: (finish reason, tokens generated) of each of its sequences."""
        m = self.m
        m.of(m.e2e).observe(time.perf_counter() - self.start)
        for reason, tokens in finished:
            if reason in ("stop", "length"):
                m.finished(reason)
            m.of(m.request_generation).observe(tokens)
