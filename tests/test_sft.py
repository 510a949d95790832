"""SFT: the loss mask token by token, jsonl and built-in chat data, padded length-bucketed batches, exact resume."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from helpers import interrupt_after, tiny_model

from nanoseek import load_model, save_model
from nanoseek.checkpoint.run import checkpoint_dirs
from nanoseek.cli.main import main
from nanoseek.data.chat import (
    SFTLoader,
    builtin_conversations,
    chat_example,
    encode_conversations,
    inputs_and_targets,
    jsonl_conversations,
)
from nanoseek.model.transformer import IGNORE_INDEX
from nanoseek.tasks.problems import generate
from nanoseek.train.metrics import read_metrics
from nanoseek.train.pretrain import TrainConfig
from nanoseek.train.sft import SFT_DEFAULTS, SFTJob, run_sft


def test_mask_targets_exactly_the_assistant_content_and_its_eos(tok):
    p = generate("arithmetic", 1, seed=0)[0]
    messages = [{"role": "system", "content": "Be brief."}, *p.chat()]
    ids, is_target = chat_example(tok, messages)
    assert ids == tok.encode_chat(messages)  # piecewise encoding = the template's encoding
    prompt = tok.encode_chat(messages[:2], add_generation_prompt=True)  # BOS, system, user turn, <｜Assistant｜>
    answer = tok.encode(p.completion()) + [tok.eos_id]
    assert ids == prompt + answer
    assert is_target == [False] * len(prompt) + [True] * len(answer)
    x, y = inputs_and_targets(ids, is_target)
    assert x == ids[:-1] and len(y) == len(x)
    for t in range(len(x)):  # position t predicts ids[t + 1]
        assert y[t] == (ids[t + 1] if t + 1 >= len(prompt) else IGNORE_INDEX)
    assert y[-1] == tok.eos_id and tok.assistant_id not in [v for v in y if v != IGNORE_INDEX]


def test_multi_turn_targets_every_rendered_turn_but_not_history_with_stripped_reasoning(tok):
    messages = [
        {"role": "user", "content": "What is 1+1?"},
        {"role": "assistant", "content": "<think>1+1=2</think> 2"},  # rendered as " 2" in history: context
        {"role": "user", "content": "And 2+2?"},
        {"role": "assistant", "content": "<think>2+2=4</think> 4"},
    ]
    ids, is_target = chat_example(tok, messages)
    assert ids == tok.encode_chat(messages)
    targets = [i for i, m in zip(ids, is_target) if m]
    assert targets == tok.encode("<think>2+2=4</think> 4") + [tok.eos_id]
    plain = [*messages[:1], {"role": "assistant", "content": "2"}, *messages[2:]]  # no reasoning: both targets
    ids, is_target = chat_example(tok, plain)
    assert [i for i, m in zip(ids, is_target) if m] == tok.encode("2") + [tok.eos_id] + targets


def test_worked_fraction_and_jsonl_split(tok, tmp_path):
    conv = builtin_conversations(["arithmetic"], 400, seed=0, split="train", worked_fraction=0.25)
    worked = sum("<think></think>" not in c[1]["content"] for c in conv) / len(conv)
    assert 0.18 < worked < 0.32
    assert all("<think></think>" in c[1]["content"] for c in builtin_conversations(["countdown"], 50, 0, "train", 0.0))
    f = tmp_path / "chat.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(200)
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    train, val = jsonl_conversations([str(f)], 0.1, "train"), jsonl_conversations([str(f)], 0.1, "val")
    assert len(train) + len(val) == 200 and 5 < len(val) < 40
    assert not {json.dumps(c) for c in train} & {json.dumps(c) for c in val}


def test_loader_pads_right_buckets_by_length_and_resumes(tok):
    conv = builtin_conversations(["arithmetic", "countdown"], 300, seed=0, split="train", worked_fraction=1.0)
    examples, dropped = encode_conversations(tok, conv, seq_len=40)
    assert dropped == 0 and all(len(x) <= 40 for x, _ in examples)
    loader = SFTLoader(examples, batch_size=8, pad_id=tok.pad_id, seed=1)
    assert loader.padding_fraction() < 0.1  # length buckets: little padding
    x, y = loader.next_batch()
    lengths = (y != IGNORE_INDEX).long().cumsum(1).argmax(1) + 1  # last target position + 1 per row
    for r in range(x.shape[0]):
        n = int(lengths[r])
        assert (x[r, n:] == tok.pad_id).all() and (y[r, n:] == IGNORE_INDEX).all()
    for _ in range(loader.batches_per_epoch + 3):  # cross an epoch boundary
        loader.next_batch()
    state = loader.state_dict()
    other = SFTLoader(examples, batch_size=8, pad_id=tok.pad_id, seed=1)
    other.load_state_dict(state)
    for _ in range(3):
        (a, b), (c, d) = loader.next_batch(), other.next_batch()
        assert torch.equal(a, c) and torch.equal(b, d)


def test_sft_trains_on_builtin_chat_and_resumes_exactly(tok, tmp_path, monkeypatch, capsys):
    save_model(tiny_model(tok), tmp_path / "m", tokenizer=tok)
    cfg = TrainConfig(**{**SFT_DEFAULTS, "steps": 8, "batch_size": 8, "lr": 1e-2, "warmup": 2, "eval_every": 4})
    job = SFTJob(str(tmp_path / "m"), "builtin:arithmetic", str(tmp_path / "a"), worked_fraction=0.5, n=200)
    job.train = dataclasses.replace(cfg, save_every=4)
    summary = run_sft(job)
    assert summary["step"] == 8 and summary["checkpoint"].endswith("step_8")
    calls, next_batch = {"n": 0}, SFTLoader.next_batch

    def interrupt_after_step_4(self):
        calls["n"] += len(self.examples) == 200  # count the training loader's batches only (val has 10)
        if calls["n"] > 4:
            raise KeyboardInterrupt
        return next_batch(self)

    monkeypatch.setattr(SFTLoader, "next_batch", interrupt_after_step_4)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C during step 5 reaches the caller
        run_sft(dataclasses.replace(job, out=str(tmp_path / "b")))
    monkeypatch.undo()
    with pytest.raises(ValueError, match="--worked-fraction 1.0 differs from the run's saved 0.5"):
        run_sft(dataclasses.replace(job, out=str(tmp_path / "b"), resume=True, worked_fraction=1.0))
    assert main(["sft", "--out", str(tmp_path / "b"), "--resume"]) == 0  # the CLI fills in the saved settings
    assert "done: step 8" in capsys.readouterr().out
    a, b = (load_model(checkpoint_dirs(tmp_path / r)[-1]).state_dict() for r in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9)) and "val_loss" in records[-1]
    assert records[-1]["loss"] < records[0]["loss"]
    assert (tmp_path / "a" / "plots" / "loss.png").is_file()
    saved = json.loads((tmp_path / "a" / "args.json").read_text())
    # seq_len defaults to the longest example (worked ones run to ~230 tokens), within the model's context
    context = load_model(tmp_path / "m").config.max_position_embeddings
    assert saved["worked_fraction"] == 0.5 and 64 < saved["seq_len"] <= context
    assert saved["lr"] == 1e-2 and saved["eval_batches"] == SFT_DEFAULTS["eval_batches"]


def test_sft_of_a_v4_model_resumes_exactly(tok, tmp_path, monkeypatch):
    """Interrupted after step 2 and resumed, a DeepSeek-V4 SFT run (mHC, compressed attention, hash routing, MTP)
    ends with the weights, balancing biases and losses of the run that never stopped."""
    save_model(tiny_model(tok, preset="tiny-v4"), tmp_path / "m", tokenizer=tok)
    cfg = TrainConfig(**{**SFT_DEFAULTS, "steps": 4, "batch_size": 4, "lr": 1e-2, "warmup": 1, "eval_every": 0})
    job = SFTJob(str(tmp_path / "m"), "builtin:arithmetic", str(tmp_path / "a"), worked_fraction=0.0, n=40)
    job.train = dataclasses.replace(cfg, save_every=2)
    run_sft(job)
    interrupt_after(monkeypatch, SFTLoader, 2)
    with pytest.raises(KeyboardInterrupt):
        run_sft(dataclasses.replace(job, out=str(tmp_path / "b")))
    monkeypatch.undo()
    run_sft(dataclasses.replace(job, out=str(tmp_path / "b"), resume=True))
    a, b = (load_model(checkpoint_dirs(tmp_path / r)[-1]).state_dict() for r in ("a", "b"))
    assert a.keys() == b.keys() and any(k.startswith("mtp.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [[r["loss"] for r in read_metrics(tmp_path / r / "metrics.jsonl")] for r in ("a", "b")]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_cli_options_override_the_sft_defaults(tok, tmp_path):
    save_model(tiny_model(tok), tmp_path / "m", tokenizer=tok)
    args = ["sft", "--model", str(tmp_path / "m"), "--data", "builtin:countdown", "--problems", "40", "--steps", "1"]
    args += ["--worked-fraction", "0", "--levels", "3", "--data-seed", "2", "--seq-len", "48", "--eval-every", "0"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    saved = json.loads((tmp_path / "run" / "args.json").read_text())
    assert (saved["n"], saved["worked_fraction"], saved["levels"], saved["data_seed"]) == (40, 0.0, ["3"], 2)
    assert (saved["seq_len"], saved["lr"], saved["batch_size"]) == (48, SFT_DEFAULTS["lr"], SFT_DEFAULTS["batch_size"])
    assert saved["model"] == str(tmp_path / "m") and saved["data"] == "builtin:countdown"
    assert main([*args, "--out", str(tmp_path / "bad"), "--worked-fraction", "2"]) == 1
