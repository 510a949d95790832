"""Distillation by rejection sampling (`nanoseek distill`): teacher traces -> verified-correct ones -> SFT a student.

1. Prompts: a built-in task (`--task arithmetic|countdown`: distinct RL prompts of `--split`, spread over the
   levels) or a `.jsonl` of `{prompt, answer}` lines, the same prompts and checks GRPO trains on.
2. Teacher: a nanoseek model dir sampled with the Engine (`--samples K` completions per prompt at `--temperature`,
   sample k of a prompt seeded by (seed, prompt, k), so the traces do not depend on batching), or any
   OpenAI-compatible server (`--teacher-url`, `/v1/chat/completions`, standard library only). A server's separate
   reasoning field (`reasoning_content`, DeepSeek / vLLM) is put back as `<think>reasoning</think> answer`.
3. Rejection sampling: a completion is kept when it ended by itself (not cut at `--max-tokens`), is
   `<think>reasoning</think> answer` with non-empty reasoning (GRPO's `format_reward` and `has_reasoning`; off
   with `--no-require-think`) and its answer passes GRPO's `accuracy_reward` (the task verifier, or the
   exact-value check for `{prompt, answer}` lines). Identical
   (prompt, completion) pairs are kept once, and at most `--keep-per-prompt` per prompt, in sample order.
4. `OUT/traces.jsonl` (one `{"messages": [user, assistant]}` per line, what `nanoseek sft --data` reads),
   `OUT/distill.json` (counts, acceptance rate, rejections by reason, per level), then SFT (`run_sft`) of the
   student on the traces into `OUT/sft/` (skipped with `--no-sft`). The student defaults to a local teacher
   itself (rejection-sampling fine-tuning, R1 sec. 2.3.3); it must share a local teacher's tokenizer.
"""

from __future__ import annotations

import json
import random
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from nanoseek.checkpoint.run import resolve_model_dir, resume_point
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.io import atomic_write_text
from nanoseek.tasks.problems import LEVELS, THINK_END, THINK_START
from nanoseek.tasks.rewards import accuracy_reward, format_reward, has_reasoning
from nanoseek.tasks.sources import prompt_ids, read_prompt_file, task_eval_examples
from nanoseek.tasks.verify import NO_LEVEL
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.config import TrainConfig
from nanoseek.train.run import resolve_device
from nanoseek.train.sft import SFT_DEFAULTS, SFTJob, run_sft

DEFAULT_N = 1000  # built-in prompts when --n is not given


@dataclass
class Sample:
    """One teacher completion; finished is False when it was cut off at the token limit."""

    text: str
    finished: bool = True


Teacher = Callable[[list[str]], list[list[Sample]]]  # prompts -> samples per prompt


# ================================================================================================= teachers
class EngineTeacher:
    """A local model sampled with the Engine: `samples` completions per prompt, in the chat format."""

    def __init__(self, engine: Engine, samples: int, temperature: float, max_tokens: int, seed: int = 0) -> None:
        if engine.tokenizer is None:
            raise ValueError("the teacher needs its tokenizer (tokenizer.json in the model dir)")
        self.engine, self.samples, self.seed = engine, samples, seed
        self.temperature, self.max_tokens = temperature, max_tokens

    def __call__(self, prompts: list[str]) -> list[list[Sample]]:
        K = self.samples
        ids = [prompt_ids(self.engine.tokenizer, p) for p in prompts]
        params = [
            SamplingParams(
                temperature=self.temperature,
                max_tokens=self.max_tokens,
                seed=random.Random(f"distill:{self.seed}:{p}:{k}").randrange(2**62),
            )
            for p in prompts
            for k in range(K)
        ]
        outs = self.engine.generate([x for x in ids for _ in range(K)], params)
        samples = [Sample(c.text, c.finish_reason == "stop") for c in outs]
        return [samples[i * K : (i + 1) * K] for i in range(len(prompts))]


def chat_completions_url(url: str) -> str:
    """The chat-completions endpoint of a server URL: `http://host:8000`, `.../v1` or the full endpoint."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


class URLTeacher:
    """An OpenAI-compatible server: one POST per prompt with `n` samples (asked again if it returns fewer)."""

    def __init__(
        self,
        url: str,
        model: str,
        samples: int,
        temperature: float,
        max_tokens: int,
        api_key: str | None = None,
        concurrency: int = 4,
        timeout: float = 600.0,
    ) -> None:
        self.url, self.model, self.samples = chat_completions_url(url), model, samples
        self.temperature, self.max_tokens = temperature, max_tokens
        self.api_key, self.concurrency, self.timeout = api_key, concurrency, timeout

    def _post(self, prompt: str, n: int) -> list[Sample]:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "n": n,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode("utf-8"), headers, method="POST")
        fix = (
            "check --teacher-url (an OpenAI-compatible server's base URL, e.g. http://localhost:8000/v1) and "
            "--teacher-model (a name the server lists at /v1/models)"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                reply = json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace").strip()[:300]
            if e.code in (401, 403):
                fix = "the server wants an API key: put it in $OPENAI_API_KEY (or the variable --api-key-env names)"
            raise ValueError(f"teacher {self.url} answered HTTP {e.code} {e.reason} ({detail}): {fix}") from None
        except OSError as e:  # URLError (refused, unknown host) or a timeout
            reason = getattr(e, "reason", e)
            raise ValueError(f"cannot reach teacher {self.url} ({reason}): is the server running? {fix}") from None
        except ValueError as e:  # not JSON
            raise ValueError(f"teacher {self.url} did not answer JSON ({e}): {fix}") from None
        choices = reply.get("choices") if isinstance(reply, dict) else None
        if not choices:
            raise ValueError(f"teacher {self.url} answered without choices: {str(reply)[:300]}")
        return [Sample(_choice_text(c), c.get("finish_reason") != "length") for c in choices]

    def request(self, prompt: str) -> list[Sample]:
        """`samples` completions of one prompt (servers that ignore `n` are asked again for the rest)."""
        out: list[Sample] = []
        while len(out) < self.samples:
            out += self._post(prompt, self.samples - len(out))
        return out[: self.samples]

    def __call__(self, prompts: list[str]) -> list[list[Sample]]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self.request, prompts))


def _choice_text(choice: dict) -> str:
    """A chat choice's text; a separate reasoning field becomes the think block."""
    message = choice.get("message") or {}
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if reasoning and THINK_START not in content:
        return f"{THINK_START}{reasoning.strip()}{THINK_END} {content.strip()}"
    return content


# ======================================================================================= rejection sampling
def judge(example: dict, sample: Sample, require_think: bool = True) -> str:
    """Why a sample is rejected ("truncated", "bad_format", "wrong"), or "correct"."""
    if not sample.finished:
        return "truncated"
    if require_think and not (format_reward(example["prompt"], sample.text, example) and has_reasoning(sample.text)):
        return "bad_format"  # a reasoning trace: one non-empty <think> block, then the answer
    return "correct" if accuracy_reward(example["prompt"], sample.text, example) else "wrong"


def _counts(c: Counter) -> dict[str, Any]:
    return {
        "prompts": c["prompts"],
        "prompts_with_trace": c["prompts_with_trace"],
        "samples": c["samples"],
        "correct": c["correct"],
        "kept": c["kept"],
        "acceptance_rate": c["correct"] / c["samples"] if c["samples"] else 0.0,
        "rejected": {k: c[k] for k in ("truncated", "bad_format", "wrong")},
    }


def rejection_sample(
    teacher: Teacher,
    examples: list[dict],
    keep_per_prompt: int = 1,
    require_think: bool = True,
    chunk: int = 64,
) -> tuple[list[dict], dict[str, Any]]:
    """Sample the teacher on every example (`chunk` prompts per call) and keep the verified-correct completions.

    Returns (traces: `{"messages": [user, assistant]}` in prompt order, counts: total and per level)."""
    traces: list[dict] = []
    seen: set[tuple[str, str]] = set()
    kept_for: Counter = Counter()
    total: Counter = Counter()
    levels: dict[str, Counter] = defaultdict(Counter)
    with tqdm(total=len(examples), unit="prompt", desc="distill") as bar:
        for lo in range(0, len(examples), chunk):
            batch = examples[lo : lo + chunk]
            for ex, samples in zip(batch, teacher([ex["prompt"] for ex in batch])):
                prompt = ex["prompt"]
                counts = [total, levels[str(ex.get("level") or NO_LEVEL)]]
                had_trace = kept_for[prompt] > 0
                for c in counts:
                    c["prompts"] += 1
                for s in samples:
                    verdict = judge(ex, s, require_think)
                    text = s.text.strip()
                    keep = verdict == "correct" and (prompt, text) not in seen and kept_for[prompt] < keep_per_prompt
                    for c in counts:
                        c["samples"] += 1
                        c[verdict] += 1
                        c["kept"] += keep
                    if keep:
                        seen.add((prompt, text))
                        kept_for[prompt] += 1
                        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]
                        traces.append({"messages": messages})
                for c in counts:
                    c["prompts_with_trace"] += kept_for[prompt] > 0 and not had_trace
            bar.update(len(batch))
            bar.set_postfix(kept=total["kept"], refresh=False)
    stats = _counts(total)
    if set(levels) != {NO_LEVEL}:
        stats["by_level"] = {name: _counts(c) for name, c in sorted(levels.items())}
    return traces, stats


def write_traces(path: str | Path, traces: list[dict]) -> None:
    """The traces as SFT .jsonl, written atomically."""
    atomic_write_text(Path(path), "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in traces))


# ================================================================================================ the stage
def load_prompts(task: str, levels: list[str] | None, n: int | None, split: str, seed: int) -> list[dict]:
    """Distinct built-in RL prompts (n, spread over the levels), or the first n lines of a {prompt, answer} .jsonl."""
    if task in LEVELS:
        examples = task_eval_examples(task, levels, n or DEFAULT_N, split, seed)
    else:
        if levels:
            raise ValueError("--levels applies to the built-in tasks; a .jsonl line may carry a 'level' field")
        if not Path(task).is_file():
            raise FileNotFoundError(f"--task {task}: no such file (arithmetic, countdown, or a .jsonl of prompts)")
        examples = read_prompt_file(task)[:n]
    if not examples:
        raise ValueError(f"--task {task}: no prompts (each line of the file is {{prompt, answer}})")
    return examples


def _model_dir(path: str, flag: str) -> str:
    """A model dir, or a run folder's latest checkpoint; errors name the option."""
    try:
        return str(resolve_model_dir(path))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{flag} {path}: not a model dir ({e})") from None


def model_tokenizer(path: str, flag: str) -> Tokenizer:
    """The tokenizer of a model dir, with errors that name the option."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{flag} {path}: not a model dir (no config.json)")
    if not (p / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{flag} {path}: no tokenizer.json (its chat template renders the traces)")
    return Tokenizer.from_pretrained(p)


@dataclass
class DistillJob:
    """One distillation: prompts of `task` -> `samples` completions each from the teacher (a local model dir or
    run folder, or an OpenAI-compatible server) -> the verified-correct ones into OUT/traces.jsonl, counts into
    OUT/distill.json -> SFT of the student (default: a local teacher itself) into OUT/sft unless sft is False."""

    out: str
    task: str  # arithmetic | countdown | a .jsonl of {prompt, answer}
    teacher: str | None = None
    teacher_url: str | None = None
    teacher_model: str | None = None  # with teacher_url: the model name to request
    api_key: str | None = None  # with teacher_url
    concurrency: int = 4  # with teacher_url: requests in flight
    gen_batch: int = 64  # with teacher: sequences decoded together
    levels: list[str] | None = None  # built-in task levels (None: all)
    split: str = "train"  # built-in split to draw prompts from
    n: int | None = None  # built-in: distinct problems (DEFAULT_N); file: the first n lines (None: all)
    seed: int = 0  # prompts and sampling
    samples: int = 4  # completions per prompt
    temperature: float = 0.7
    max_tokens: int = 256  # completion length cap; cut completions are rejected
    keep_per_prompt: int = 1
    require_think: bool = True  # keep only `<think>reasoning</think> answer` completions
    sft: bool = True  # fine-tune the student on the traces (False: only write them)
    student: str | None = None  # default: a local teacher itself
    device: str = "auto"  # the local teacher's (the student's: train.device)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**SFT_DEFAULTS))  # the student's SFT


def run_distill(job: DistillJob) -> dict[str, Any]:
    """Rejection-sample the teacher, write the traces and their counts, then SFT the student on them.

    Returns {"traces": path, "stats": counts (as in distill.json), "sft": run_sft's summary or None}. Every
    setting is checked before any generation (ValueError / FileNotFoundError); no trace kept is a ValueError
    (no SFT starts). KeyboardInterrupt passes through: while sampling, nothing is written.
    """
    out = Path(job.out)
    teacher_dir, student = _check(job)
    examples = load_prompts(job.task, job.levels, job.n, job.split, job.seed)
    teacher = make_teacher(job, teacher_dir)
    source = teacher_dir or f"{job.teacher_url} ({job.teacher_model})"
    print(f"distill: {len(examples)} prompts from {job.task}, {job.samples} samples each from {source}")
    chunk = job.concurrency if job.teacher_url else max(1, 4 * job.gen_batch // job.samples)  # keep slots busy
    traces, stats = rejection_sample(teacher, examples, job.keep_per_prompt, job.require_think, chunk)
    del teacher  # free the teacher's memory before the student loads
    settings = {k: getattr(job, k) for k in ("teacher_url", "teacher_model", "task", "levels", "split", "seed")}
    settings |= {k: getattr(job, k) for k in ("samples", "temperature", "max_tokens", "keep_per_prompt")}
    settings |= {"teacher": teacher_dir, "require_think": job.require_think}
    atomic_write_text(out / "distill.json", json.dumps({**settings, **stats}, indent=2) + "\n")
    rej = stats["rejected"]
    why = (
        f"{rej['truncated']} cut at --max-tokens {job.max_tokens}, {rej['bad_format']} not <think>...</think> "
        f"answer, {rej['wrong']} wrong"
    )
    if not traces:
        raise ValueError(
            f"no trace kept: none of {stats['samples']} samples was verified correct ({why}); try more --samples, "
            f"a higher --temperature, a larger --max-tokens or --no-require-think, or a stronger teacher"
        )
    write_traces(out / "traces.jsonl", traces)
    print(
        f"distill: kept {stats['kept']} traces for {stats['prompts_with_trace']}/{stats['prompts']} prompts; "
        f"{100 * stats['acceptance_rate']:.1f}% of {stats['samples']} samples correct ({why}) -> {out / 'traces.jsonl'}"
    )
    result: dict[str, Any] = {"traces": str(out / "traces.jsonl"), "stats": stats, "sft": None}
    if student is not None:
        print(f"distill: fine-tuning the student {student} on the traces -> {out / 'sft'}")
        result["sft"] = run_sft(SFTJob(model=student, data=result["traces"], out=str(out / "sft"), train=job.train))
    return result


def make_teacher(job: DistillJob, teacher_dir: str | None) -> Teacher:
    """The job's teacher: a local model dir (sampled with the Engine) or an OpenAI-compatible URL."""
    if job.teacher_url:
        return URLTeacher(
            job.teacher_url, job.teacher_model, job.samples, job.temperature, job.max_tokens, job.api_key,
            job.concurrency,
        )  # fmt: skip
    engine = Engine.from_pretrained(teacher_dir, device=resolve_device(job.device), max_batch_size=job.gen_batch)
    return EngineTeacher(engine, job.samples, job.temperature, job.max_tokens, job.seed)


def _check(job: DistillJob) -> tuple[str | None, str | None]:
    """Validate the job before any generation; returns (the teacher's model dir, the student's: None without SFT)."""
    if bool(job.teacher) == bool(job.teacher_url):
        raise ValueError("pass one teacher: --teacher MODEL_DIR, or --teacher-url URL --teacher-model NAME")
    if job.teacher_url and not job.teacher_model:
        raise ValueError("--teacher-url needs --teacher-model NAME (a model the server serves)")
    for name in ("samples", "keep_per_prompt", "max_tokens", "gen_batch", "concurrency", "n"):
        value = getattr(job, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if job.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {job.temperature}")
    teacher = _model_dir(job.teacher, "--teacher") if job.teacher else None
    teacher_tok = model_tokenizer(teacher, "--teacher") if teacher else None
    if not job.sft:
        return teacher, None
    student = _model_dir(job.student, "--student") if job.student else teacher
    if not student:
        raise ValueError("a URL teacher needs --student MODEL_DIR to fine-tune (or --no-sft to only write traces)")
    student_tok = model_tokenizer(student, "--student")
    if teacher_tok is not None and teacher_tok.hash() != student_tok.hash():
        raise ValueError(
            f"--student {student} has a different tokenizer from --teacher {teacher}: the student must share "
            "the teacher's tokenizer (or write the traces with --no-sft and fine-tune with `nanoseek sft`)"
        )
    if job.train.steps is None and job.train.time_budget is None:
        raise ValueError("say how long to fine-tune the student: --steps N and/or --time-budget SECONDS (or --no-sft)")
    resume_point(Path(job.out) / "sft", resume=False)  # fail now, not after generating, if OUT/sft holds a run
    return teacher, student
