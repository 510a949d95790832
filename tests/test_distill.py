"""Distillation: rejection sampling keeps exactly the verified-correct traces, the OpenAI-compatible teacher speaks
the chat-completions protocol, an end-to-end run with a local teacher fine-tunes a student, and bad input fails
clearly (nothing kept: no SFT)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from helpers import interrupt_after, memorise, tiny_model

from nanoseek import load_model, save_model
from nanoseek.checkpoint.run import checkpoint_dirs
from nanoseek.cli.main import main
from nanoseek.data.chat import SFTLoader
from nanoseek.infer.cache import CompressedKVCache
from nanoseek.infer.engine import Engine
from nanoseek.tasks.problems import builtin_corpus
from nanoseek.tokenizer import train_tokenizer
from nanoseek.train.distill import DistillJob, Sample, chat_completions_url, rejection_sample, run_distill, write_traces
from nanoseek.train.metrics import read_metrics
from nanoseek.train.pretrain import TrainConfig
from nanoseek.train.sft import SFT_DEFAULTS

KNOWN = {"What is 2+3?": "<think>2+3=5</think> 5", "What is 4*2?": "<think>4*2=8</think> 8"}


def trace(prompt: str, completion: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]}


def write_prompts(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def teacher_dir(tok, tmp_path_factory):
    """A tiny model that has memorised the KNOWN answers (so a random init still gets something right)."""
    model = tiny_model(tok)
    assert memorise(model, tok, [trace(p, a)["messages"] for p, a in KNOWN.items()], steps=150) < 0.05
    out = tmp_path_factory.mktemp("teacher")
    save_model(model, out, tokenizer=tok)
    return out


def sft(**train) -> TrainConfig:
    """The student's SFT settings: SFT's defaults and `train`."""
    return TrainConfig(**{**SFT_DEFAULTS, **train})


# ------------------------------------------------------------------------------------------ rejection sampling
def test_rejection_sampling_keeps_only_verified_correct_traces(tmp_path):
    examples = [
        {"prompt": "What is 8+79*9-66?", "answer": "653", "task": "arithmetic", "level": "3x12"},
        {"prompt": "Make 16 from 3 5 2.", "answer": "(3+5)*2", "task": "countdown", "level": "3"},
        {"prompt": "Half of 7?", "answer": "7/2"},  # a user's {prompt, answer} line: exact-value check
    ]
    replies = {
        "What is 8+79*9-66?": [
            Sample("<think>79*9=711 8+711=719</think> 652"),  # wrong answer
            Sample("<think>79*9=711 8+711=719 719-66=653</think> 653", finished=False),  # right but cut off
            Sample("653"),  # right but no think block
            Sample("<think>79*9=711 8+711=719 719-66=653</think> 653"),  # kept
            Sample("  <think>79*9=711 8+711=719 719-66=653</think> 653\n"),  # the same trace again
            Sample("<think>8+711=719 719-66=653</think> = 653"),  # a second distinct correct one: kept (cap 2)
            Sample("<think>...</think> 653"),  # a third: over --keep-per-prompt
        ],
        "Make 16 from 3 5 2.": [Sample("<think>2*8</think> 2**4"), Sample("<think>3+5=8 8*2=16</think> 2*(5+3)")],
        "Half of 7?": [Sample("<think>7/2</think> 3.5"), Sample("<think>a</think><think>b</think> 3.5")],
    }
    calls = []

    def fake_teacher(prompts: list[str]) -> list[list[Sample]]:
        calls.append(prompts)
        return [replies[p] for p in prompts]

    traces, stats = rejection_sample(fake_teacher, examples, keep_per_prompt=2, require_think=True, chunk=2)
    assert calls == [["What is 8+79*9-66?", "Make 16 from 3 5 2."], ["Half of 7?"]]
    write_traces(tmp_path / "traces.jsonl", traces)
    expected = [
        trace("What is 8+79*9-66?", "<think>79*9=711 8+711=719 719-66=653</think> 653"),
        trace("What is 8+79*9-66?", "<think>8+711=719 719-66=653</think> = 653"),
        trace("Make 16 from 3 5 2.", "<think>3+5=8 8*2=16</think> 2*(5+3)"),
        trace("Half of 7?", "<think>7/2</think> 3.5"),
    ]
    assert (tmp_path / "traces.jsonl").read_text() == "".join(json.dumps(t) + "\n" for t in expected)
    assert {k: stats[k] for k in ("prompts", "prompts_with_trace", "samples", "correct", "kept")} == {
        "prompts": 3,
        "prompts_with_trace": 3,
        "samples": 11,
        "correct": 6,
        "kept": 4,
    }
    assert stats["rejected"] == {"truncated": 1, "bad_format": 2, "wrong": 2}
    assert stats["acceptance_rate"] == pytest.approx(6 / 11)
    assert stats["by_level"]["3x12"]["kept"] == 2 and stats["by_level"]["3"]["samples"] == 2
    assert stats["by_level"]["-"]["correct"] == 1

    # without the format requirement the bare `653` counts; one trace per prompt by default
    traces, stats = rejection_sample(fake_teacher, examples[:1], require_think=False)
    assert traces == [trace("What is 8+79*9-66?", "653")] and stats["correct"] == 5


# ---------------------------------------------------------------------------------------------- URL teacher
class Stub:
    """An OpenAI-compatible chat-completions server in a thread: `reply(body) -> (status, json)`."""

    def __init__(self, reply):
        self.requests: list[tuple[str, dict, dict]] = []  # (path, headers, body)
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append((self.path, dict(self.headers), body))
                status, answer = reply(body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def choice(content, finish="stop", **message):
    return {"index": 0, "message": {"role": "assistant", "content": content, **message}, "finish_reason": finish}


def test_url_teacher_speaks_openai_chat_completions(tmp_path, monkeypatch):
    def reply(body):
        prompt = body["messages"][0]["content"]
        if prompt == "What is 2+3?":
            choices = [choice("<think>2+3=6</think> 6"), choice("<think>2+3=5</think> 5")]
        elif prompt == "What is 4*2?":  # a reasoning model: the thinking comes in its own field; one cut off
            choices = [choice("<think>4*2=", "length"), choice("8", reasoning_content="4*2=8")]
        else:  # a server that ignores n: one choice per request
            choices = [choice("<think>9-1=8</think> 8")]
        return 200, {"id": "x", "object": "chat.completion", "choices": choices[: body["n"]]}

    stub = Stub(reply)
    try:
        prompts = write_prompts(
            tmp_path / "p.jsonl",
            [{"prompt": p, "answer": a} for p, a in (("What is 2+3?", 5), ("What is 4*2?", 8), ("What is 9-1?", 8))],
        )
        monkeypatch.setenv("DISTILL_TEST_KEY", "sk-test")
        args = ["distill", "--teacher-url", stub.url + "/v1/", "--teacher-model", "teacher-x", "--task", prompts]
        args += ["--samples", "2", "--temperature", "0.5", "--max-tokens", "32", "--api-key-env", "DISTILL_TEST_KEY"]
        assert main([*args, "--no-sft", "--out", str(tmp_path / "out"), "--concurrency", "1"]) == 0
    finally:
        stub.close()
    paths = {r[0] for r in stub.requests}
    assert paths == {"/v1/chat/completions"}
    assert all(r[1]["Authorization"] == "Bearer sk-test" for r in stub.requests)
    bodies = sorted((r[2] for r in stub.requests), key=lambda b: (b["messages"][0]["content"], -b["n"]))
    assert bodies[0] == {
        "model": "teacher-x",
        "messages": [{"role": "user", "content": "What is 2+3?"}],
        "n": 2,
        "temperature": 0.5,
        "max_tokens": 32,
    }
    assert [(b["messages"][0]["content"], b["n"]) for b in bodies] == [
        ("What is 2+3?", 2),
        ("What is 4*2?", 2),
        ("What is 9-1?", 2),
        ("What is 9-1?", 1),  # asked again for the missing sample
    ]
    lines = (tmp_path / "out" / "traces.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [
        trace("What is 2+3?", "<think>2+3=5</think> 5"),
        trace("What is 4*2?", "<think>4*2=8</think> 8"),
        trace("What is 9-1?", "<think>9-1=8</think> 8"),
    ]
    stats = json.loads((tmp_path / "out" / "distill.json").read_text())
    assert stats["samples"] == 6 and stats["correct"] == 4 and stats["kept"] == 3
    assert stats["rejected"] == {"truncated": 1, "bad_format": 0, "wrong": 1}
    assert stats["teacher_model"] == "teacher-x" and "by_level" not in stats


def test_url_teacher_http_errors_name_the_url_and_the_fix(tmp_path):
    stub = Stub(lambda body: (404, {"error": {"message": f"model {body['model']} does not exist"}}))
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": "What is 2+3?", "answer": "5"}])
    job = DistillJob(str(tmp_path / "out"), prompts, teacher_url=stub.url, teacher_model="nope", sft=False)
    try:
        with pytest.raises(ValueError) as e:
            run_distill(job)
    finally:
        stub.close()
    err = str(e.value)
    assert f"{stub.url}/v1/chat/completions answered HTTP 404" in err and "model nope does not exist" in err
    assert "--teacher-model" in err
    with pytest.raises(ValueError, match="cannot reach teacher"):  # the server is gone now
        run_distill(job)
    assert not (tmp_path / "out" / "traces.jsonl").exists()


def test_chat_completions_url():
    for url in ("http://h:8000", "http://h:8000/", "http://h:8000/v1", "http://h:8000/v1/chat/completions"):
        assert chat_completions_url(url) == "http://h:8000/v1/chat/completions"


# ------------------------------------------------------------------------------------------------ end to end
def test_distills_a_local_teacher_into_a_student(teacher_dir, tmp_path):
    prompts = [{"prompt": p, "answer": a.split()[-1]} for p, a in KNOWN.items()]
    prompts.append({"prompt": "What is 1+1?", "answer": "2"})  # never learned: no correct sample
    task = write_prompts(tmp_path / "p.jsonl", prompts)
    out = tmp_path / "out"
    job = DistillJob(str(out), task, teacher=str(teacher_dir), samples=4, max_tokens=16)
    job.train = sft(steps=3, batch_size=2, lr=1e-3)
    result = run_distill(job)
    rows = [json.loads(x) for x in (out / "traces.jsonl").read_text().splitlines()]
    assert rows == [trace(p, a) for p, a in KNOWN.items()] and result["traces"] == str(out / "traces.jsonl")
    stats = json.loads((out / "distill.json").read_text())
    assert stats["prompts"] == 3 and stats["samples"] == 12 and stats["prompts_with_trace"] == 2
    assert stats["kept"] == 2 and stats["rejected"]["wrong"] >= 4 and result["stats"]["kept"] == 2
    ckpt = checkpoint_dirs(out / "sft")[-1]  # the student (default: the teacher itself) after 3 SFT steps
    assert ckpt.name == "step_3" and (ckpt / "tokenizer.json").is_file() and result["sft"]["checkpoint"] == str(ckpt)
    student, teacher = load_model(ckpt).state_dict(), load_model(teacher_dir).state_dict()
    assert any(not torch.equal(student[k], teacher[k]) for k in teacher)
    saved = json.loads((out / "sft" / "args.json").read_text())
    assert saved["data"] == str((out / "traces.jsonl").resolve()) and saved["steps"] == 3


def test_a_v4_students_sft_resumes_exactly(tok, tmp_path, monkeypatch):
    """A DeepSeek-V4 student distilled from a URL teacher: its SFT, interrupted after step 2 and resumed with
    `nanoseek sft --out OUT/sft --resume` (what an interrupted distill tells you to run), ends as the run that
    never stopped."""
    student = tmp_path / "student"
    save_model(tiny_model(tok, preset="tiny-v4"), student, tokenizer=tok)
    stub = Stub(lambda body: (200, {"choices": [choice(KNOWN[body["messages"][-1]["content"]])] * body["n"]}))
    task = write_prompts(tmp_path / "p.jsonl", [{"prompt": p, "answer": a.split()[-1]} for p, a in KNOWN.items()])

    def job(out: str) -> DistillJob:
        job = DistillJob(out, task, teacher_url=stub.url, teacher_model="m", student=str(student), samples=2)
        job.train = sft(steps=4, batch_size=2, lr=1e-2, warmup=1, save_every=2)
        return job

    try:
        run_distill(job(str(tmp_path / "a")))
        interrupt_after(monkeypatch, SFTLoader, 2)
        with pytest.raises(KeyboardInterrupt):
            run_distill(job(str(tmp_path / "b")))
        monkeypatch.undo()
    finally:
        stub.close()
    assert main(["sft", "--out", str(tmp_path / "b" / "sft"), "--resume"]) == 0
    a, b = (load_model(checkpoint_dirs(tmp_path / r / "sft")[-1]).state_dict() for r in ("a", "b"))
    assert checkpoint_dirs(tmp_path / "b" / "sft")[-1].name == "step_4" and any(k.startswith("mtp.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # teaching the V4 teacher its answers: ~150 training steps
def test_distill_command_on_v4_models(tok, tmp_path):
    """`nanoseek distill` with a DeepSeek-V4 teacher dir (sampled by the Engine over its compressed cache) and a
    fresh V4 student: the verified traces are kept, the student's loss falls, and its checkpoint loads as V4 and
    generates."""
    v4 = dict(preset="tiny-v4", index_n_heads=16)  # 16 indexer heads: no exact top-k ties (spec P9)
    teacher = tiny_model(tok, **v4)
    assert memorise(teacher, tok, [trace(p, a)["messages"] for p, a in KNOWN.items()], steps=150) < 0.05
    save_model(teacher, tmp_path / "teacher", tokenizer=tok)
    save_model(tiny_model(tok, seed=1, **v4), tmp_path / "student", tokenizer=tok)
    task = write_prompts(tmp_path / "p.jsonl", [{"prompt": p, "answer": a.split()[-1]} for p, a in KNOWN.items()])
    out = tmp_path / "out"
    args = ["distill", "--out", str(out), "--task", task, "--teacher", str(tmp_path / "teacher"), "--samples", "2"]
    args += ["--max-tokens", "16", "--student", str(tmp_path / "student"), "--steps", "8", "--batch-size", "2"]
    assert main([*args, "--lr", "1e-2"]) == 0
    rows = [json.loads(x) for x in (out / "traces.jsonl").read_text().splitlines()]
    assert rows == [trace(p, a) for p, a in KNOWN.items()]
    losses = [r["loss"] for r in read_metrics(out / "sft" / "metrics.jsonl")]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.25, losses  # 5.77 -> 5.23 on seed 1
    ckpt = checkpoint_dirs(out / "sft")[-1]
    engine = Engine.from_pretrained(ckpt, max_batch_size=2)
    assert engine.config.is_v4 and isinstance(engine.cache, CompressedKVCache)
    done = engine.generate(list(KNOWN), max_tokens=8, temperature=0)
    assert all(c.token_ids or c.finish_reason == "stop" for c in done)


# ------------------------------------------------------------------------------------------------ bad input
def test_nothing_kept_is_an_error_and_no_sft_starts(teacher_dir, tmp_path):
    stub = Stub(lambda body: (200, {"choices": [choice("<think>hmm</think> 7")] * body["n"]}))
    task = write_prompts(tmp_path / "p.jsonl", [{"prompt": "What is 2+3?", "answer": "5"}])
    out = tmp_path / "out"
    job = DistillJob(str(out), task, teacher_url=stub.url, teacher_model="m", student=str(teacher_dir))
    job.train = sft(steps=2)
    try:
        with pytest.raises(ValueError) as e:
            run_distill(job)
    finally:
        stub.close()
    err = str(e.value)
    assert "no trace kept" in err and "4 wrong" in err and "--samples" in err and "--temperature" in err
    assert not (out / "traces.jsonl").exists() and not (out / "sft").exists()
    assert json.loads((out / "distill.json").read_text())["kept"] == 0


def test_bad_settings_fail_clearly_before_generating(teacher_dir, tmp_path, capsys):
    empty = write_prompts(tmp_path / "empty.jsonl", [])
    other_tok = train_tokenizer(builtin_corpus(50, seed=1), vocab_size=300)
    save_model(tiny_model(other_tok), tmp_path / "other", tokenizer=other_tok)
    out, t, one = str(tmp_path / "out"), str(teacher_dir), sft(steps=1)
    cases = [
        (DistillJob(out, "arithmetic", n=2), "pass one teacher"),
        (DistillJob(out, "arithmetic", n=2, teacher=t, teacher_url="http://x"), "pass one teacher"),
        (DistillJob(out, "arithmetic", n=2, teacher_url="http://x"), "--teacher-model"),
        (DistillJob(out, "arithmetic", n=2, teacher=str(tmp_path / "missing"), sft=False), "not a model dir"),
        (DistillJob(out, "arithmetic", n=2, teacher_url="http://x", teacher_model="m", train=one), "--student"),
        (DistillJob(out, "arithmetic", n=2, teacher=t), "--steps N and/or --time-budget"),
        (DistillJob(out, "arithmetic", teacher=t, student=str(tmp_path / "other"), train=one), "different tokenizer"),
        (DistillJob(out, empty, teacher=t, sft=False), "no prompts"),
        (DistillJob(out, "nofile.jsonl", teacher=t, sft=False), "no such file"),
        (DistillJob(out, "arithmetic", teacher=t, samples=0, sft=False), "--samples must be >= 1"),
    ]
    for job, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            run_distill(job)
    assert not (tmp_path / "out").exists()
    # the command line: the same errors as `nanoseek distill: error: ...` and status 1, nothing generated
    base = ["distill", "--out", out, "--task", "arithmetic", "--n", "2"]
    assert main([*base, "--teacher", t, "--samples", "0", "--no-sft"]) == 1
    assert "nanoseek distill: error: --samples must be >= 1, got 0" in capsys.readouterr().err
    assert main([*base, "--teacher", t, "--student", str(tmp_path / "other"), "--steps", "1"]) == 1
    assert "different tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_distill_from_a_running_nanoseek_serve(teacher_dir, tmp_path):
    """End to end over HTTP: `nanoseek serve` answers with reasoning_content, distill puts the think block back,
    verifies, keeps, and fine-tunes the student."""
    from serve_util import ServeProcess

    prompts = [{"prompt": p, "answer": a.split()[-1]} for p, a in KNOWN.items()]
    task = write_prompts(tmp_path / "p.jsonl", prompts)
    out = tmp_path / "out"
    with ServeProcess(teacher_dir, "--served-model-name", "teacher", "--max-batch", "8") as server:
        job = DistillJob(str(out), task, teacher_url=server.base_url, teacher_model="teacher", samples=2)
        job.temperature, job.max_tokens, job.student = 0.0, 16, str(teacher_dir)
        job.train = sft(steps=2, batch_size=2)
        run_distill(job)
    rows = [json.loads(x) for x in (out / "traces.jsonl").read_text().splitlines()]
    assert rows == [trace(p, a) for p, a in KNOWN.items()]  # greedy teacher: both memorised answers, verified
    assert json.loads((out / "distill.json").read_text())["kept"] == 2
    assert checkpoint_dirs(out / "sft")[-1].name == "step_2"
