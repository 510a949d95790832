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
   `OUT/distill.json` (counts, acceptance rate, rejections by reason, per level), then `nanoseek sft` of the
   student on the traces into `OUT/sft/` (skipped with `--no-sft`). The student defaults to a local teacher
   itself (rejection-sampling fine-tuning, R1 sec. 2.3.3); it must share a local teacher's tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from nanoseek.checkpoint import resolve_model_dir
from nanoseek.config import atomic_write_text
from nanoseek.data.tasks import LEVELS, THINK_END, THINK_START
from nanoseek.eval import NO_LEVEL, read_prompt_file
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.checkpointing import resume_point
from nanoseek.train.grpo import accuracy_reward, format_reward, has_reasoning, prompt_ids, task_eval_examples
from nanoseek.train.loop import resolve_device

DEFAULT_N = 1000  # built-in prompts when --n is not given
SFT_OPTIONS = ("steps", "time_budget", "lr", "batch_size", "seq_len", "seed", "device")  # passed on to `sft`


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


# ====================================================================================================== CLI
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


def make_teacher(args: argparse.Namespace) -> Teacher:
    """The teacher the options name: a local model dir (Engine) or an OpenAI-compatible URL."""
    if args.teacher_url:
        api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
        return URLTeacher(
            args.teacher_url,
            args.teacher_model,
            args.samples,
            args.temperature,
            args.max_tokens,
            api_key,
            args.concurrency,
        )
    engine = Engine.from_pretrained(args.teacher, device=resolve_device(args.device), max_batch_size=args.gen_batch)
    return EngineTeacher(engine, args.samples, args.temperature, args.max_tokens, args.seed)


def run_sft(argv: list[str]) -> int:
    """`nanoseek sft ARGV`, in this process (the command's own code path)."""
    from nanoseek.train import sft

    parser = argparse.ArgumentParser(prog="nanoseek")
    sft.add_parser(parser.add_subparsers())
    args = parser.parse_args(["sft", *argv])
    return args.func(args)


def _check_args(args: argparse.Namespace) -> str | None:
    """Validate the options before any generation; returns the student dir (None with --no-sft)."""
    if bool(args.teacher) == bool(args.teacher_url):
        raise ValueError("pass one teacher: --teacher MODEL_DIR, or --teacher-url URL --teacher-model NAME")
    if args.teacher_url and not args.teacher_model:
        raise ValueError("--teacher-url needs --teacher-model NAME (a model the server serves)")
    for name in ("samples", "keep_per_prompt", "max_tokens", "gen_batch", "concurrency", "n"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if args.teacher:
        args.teacher = _model_dir(args.teacher, "--teacher")
    if args.student:
        args.student = _model_dir(args.student, "--student")
    teacher_tok = model_tokenizer(args.teacher, "--teacher") if args.teacher else None
    if args.no_sft:
        return None
    student = args.student or args.teacher
    if not student:
        raise ValueError("a URL teacher needs --student MODEL_DIR to fine-tune (or --no-sft to only write traces)")
    student_tok = model_tokenizer(student, "--student")
    if teacher_tok is not None and teacher_tok.hash() != student_tok.hash():
        raise ValueError(
            f"--student {student} has a different tokenizer from --teacher {args.teacher}: the student must share "
            "the teacher's tokenizer (or write the traces with --no-sft and fine-tune with `nanoseek sft`)"
        )
    if args.steps is None and args.time_budget is None:
        raise ValueError("say how long to fine-tune the student: --steps N and/or --time-budget SECONDS (or --no-sft)")
    resume_point(Path(args.out) / "sft", resume=False)  # fail now, not after generating, if OUT/sft holds a run
    return student


def _cmd_distill(args: argparse.Namespace) -> int:
    out = Path(args.out)
    student = _check_args(args)
    examples = load_prompts(args.task, args.levels, args.n, args.split, args.seed)
    teacher = make_teacher(args)
    source = args.teacher or f"{args.teacher_url} ({args.teacher_model})"
    print(f"distill: {len(examples)} prompts from {args.task}, {args.samples} samples each from {source}")
    chunk = args.concurrency if args.teacher_url else max(1, 4 * args.gen_batch // args.samples)  # keep slots busy
    try:
        traces, stats = rejection_sample(teacher, examples, args.keep_per_prompt, args.require_think, chunk)
    except KeyboardInterrupt:
        print("\nnanoseek distill: interrupted; no traces written", file=sys.stderr)
        return 130
    del teacher  # free the teacher's memory before the student loads
    settings = {k: getattr(args, k) for k in ("teacher", "teacher_url", "teacher_model", "task", "levels", "split")}
    settings |= {k: getattr(args, k) for k in ("seed", "samples", "temperature", "max_tokens", "keep_per_prompt")}
    settings["require_think"] = args.require_think
    atomic_write_text(out / "distill.json", json.dumps({**settings, **stats}, indent=2) + "\n")
    rej = stats["rejected"]
    why = (
        f"{rej['truncated']} cut at --max-tokens {args.max_tokens}, {rej['bad_format']} not <think>...</think> "
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
    if student is None:
        return 0
    argv = ["--model", student, "--data", str(out / "traces.jsonl"), "--out", str(out / "sft")]
    for name in SFT_OPTIONS:
        if getattr(args, name) is not None:
            argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    print(f"distill: fine-tuning the student: nanoseek sft {' '.join(argv)}")
    return run_sft(argv)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("distill", help="teacher traces -> keep verified-correct ones -> SFT a student")
    p.add_argument("--out", required=True, help="output dir: traces.jsonl, distill.json, sft/")
    t = p.add_argument_group("teacher (one of)")
    t.add_argument("--teacher", help="a nanoseek / HF model dir with its tokenizer")
    t.add_argument("--teacher-url", help="an OpenAI-compatible server, e.g. http://localhost:8000/v1")
    t.add_argument("--teacher-model", help="with --teacher-url: the model name to request")
    t.add_argument("--api-key-env", default="OPENAI_API_KEY", help="with --teacher-url: env var holding the API key")
    t.add_argument("--concurrency", type=int, default=4, help="with --teacher-url: requests in flight (default 4)")
    t.add_argument("--gen-batch", type=int, default=64, help="with --teacher: sequences decoded together (64)")
    d = p.add_argument_group("prompts and rejection sampling")
    d.add_argument("--task", required=True, help="arithmetic | countdown | a .jsonl of {prompt, answer}")
    d.add_argument("--levels", nargs="*", help="built-in task levels (default: all)")
    d.add_argument("--split", default="train", help="built-in split to draw prompts from (default train)")
    d.add_argument("--n", type=int, help=f"prompts: built-in distinct problems ({DEFAULT_N}), file: first N (all)")
    d.add_argument("--seed", type=int, default=0, help="prompt and sampling seed, also the SFT seed (default 0)")
    d.add_argument("--samples", type=int, default=4, help="completions per prompt (default 4)")
    d.add_argument("--temperature", type=float, default=0.7, help="teacher sampling temperature (default 0.7)")
    d.add_argument("--max-tokens", type=int, default=256, help="completion length cap; cut ones are rejected (256)")
    d.add_argument("--keep-per-prompt", type=int, default=1, help="correct traces kept per prompt (default 1)")
    d.add_argument(
        "--no-require-think",
        dest="require_think",
        action="store_false",
        help="also keep correct answers without the <think>...</think> answer format",
    )
    s = p.add_argument_group("student SFT")
    s.add_argument("--no-sft", action="store_true", help="only write the traces")
    s.add_argument("--student", help="model dir to fine-tune (default: a local --teacher itself)")
    s.add_argument("--steps", type=int, help="SFT optimizer steps")
    s.add_argument("--time-budget", type=float, help="SFT seconds")
    s.add_argument("--lr", type=float, help="SFT peak learning rate (sft's default)")
    s.add_argument("--batch-size", type=int, help="SFT sequences per batch (sft's default)")
    s.add_argument("--seq-len", type=int, help="SFT tokens per sequence (default: the longest trace)")
    s.add_argument("--device", default="auto", help="cpu, cuda or auto (default), for the teacher and the SFT")
    p.set_defaults(func=_cmd_distill)
