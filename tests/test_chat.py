"""`nanoseek generate` and `nanoseek chat` on a tiny saved model with a tokenizer."""

from __future__ import annotations

import io
import json

import pytest
import torch

from nanoseek import ModelConfig, Transformer, save_model
from nanoseek.cli.chat import DIM, RESET, ThinkPrinter, fit_history
from nanoseek.cli.main import main
from nanoseek.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = train_tokenizer(["What is 2+3? <think>2+3=5</think> 5\n"] * 20 + ["hello world " * 10], vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=128))
    d = tmp_path_factory.mktemp("m")
    save_model(model, d, tokenizer=tok)
    return d, tok


def test_generate_json_prints_text_and_token_ids(model_dir, capsys):
    d, tok = model_dir
    rc = main(
        ["generate", "--model", str(d), "--prompt", "What is", "--prompt", "hello", "--max-tokens", "6", "--json"]
    )
    assert rc == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in lines] == ["What is", "hello"]
    for r in lines:
        assert len(r["token_ids"]) <= 6 and r["text"] == tok.decode(r["token_ids"])


def test_generate_speculative_reports_the_acceptance_rate(model_dir, capsys):
    d, _ = model_dir
    args = ["generate", "--model", str(d), "--prompt", "What is", "--max-tokens", "8", "--json"]
    assert main(args) == 0
    plain = capsys.readouterr()
    assert main([*args, "--speculative"]) == 0
    spec = capsys.readouterr()
    assert spec.out == plain.out  # greedy: the same completion, stdout stays one JSON object per prompt
    assert "MTP speculation:" in spec.err and "drafts accepted" in spec.err and "MTP" not in plain.err


def test_generate_is_deterministic_with_a_seed(model_dir, capsys):
    d, _ = model_dir
    args = ["generate", "--model", str(d), "--prompt", "hello", "--temperature", "1", "--seed", "5", "--json"]
    main(args)
    first = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == first


def test_generate_without_prompt_is_a_clear_error(model_dir, capsys):
    d, _ = model_dir
    assert main(["generate", "--model", str(d)]) == 1
    assert "no prompt given" in capsys.readouterr().err


def test_chat_session_with_reset_and_exit(model_dir, monkeypatch, capsys):
    d, _ = model_dir
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 2+3?\n/reset\nhello\n/exit\n"))
    assert main(["chat", "--model", str(d), "--max-tokens", "5", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert "conversation cleared" in captured.err
    assert captured.out.count("\n") >= 2  # one line per answer


def test_think_printer_dims_the_reasoning_even_when_tags_are_split():
    out = io.StringIO()
    p = ThinkPrinter(out=out)
    for piece in ["<thi", "nk>2+3", "=5</th", "ink> 5"]:
        p.write(piece)
    p.close()
    assert out.getvalue() == f"{DIM}<think>2+3=5</think>{RESET} 5\n"
    hidden = io.StringIO()
    p = ThinkPrinter(hide=True, out=hidden)
    p.write("<think>secret</think> answer")
    p.close()
    assert hidden.getvalue() == " answer\n"


def test_history_is_truncated_to_the_context(model_dir):
    _, tok = model_dir
    history = []
    for i in range(6):
        history += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": "ok " * 5}]
    history.append({"role": "user", "content": "last"})
    full = len(tok.encode_chat(history, add_generation_prompt=True))
    ids, dropped = fit_history(tok, [], history, budget=full // 2)
    assert dropped > 0 and len(ids) <= full // 2 and history[dropped]["role"] == "user"
    with pytest.raises(ValueError, match="does not fit"):
        fit_history(tok, [], [{"role": "user", "content": "x " * 200}], budget=10)


def test_generate_chat_and_serve_default_to_device_auto_like_training():
    from nanoseek.cli.main import build_parser

    parser = build_parser()
    for command in ("generate", "chat", "serve"):
        assert parser.parse_args([command, "--model", "m"]).device == "auto"  # cuda when available, else cpu


def test_serve_leaves_a_core_to_http_and_refuses_zero_threads(monkeypatch, tmp_path):
    import torch

    from nanoseek.cli import serve
    from nanoseek.cli.main import build_parser

    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    for cores, want in ((1, 1), (2, 1), (4, 3), (16, 8)):  # never more than torch's own pool
        monkeypatch.setattr(serve.os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)), raising=False)
        assert serve.default_threads() == want
    args = build_parser().parse_args(["serve", "--model", str(tmp_path), "--threads", "0"])
    with pytest.raises(ValueError, match="--threads must be >= 1"):
        args.func(args)
    # the thread count is set before the engine loads (its compiled decode steps are built for that count)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    events = []
    monkeypatch.setattr(serve.torch, "set_num_threads", lambda n: events.append(("threads", n)))

    def loaded(*a, **k):
        events.append(("engine", None))
        raise RuntimeError("stop here")

    monkeypatch.setattr(serve.Engine, "from_pretrained", loaded)
    monkeypatch.setattr(serve.os, "sched_getaffinity", lambda _pid: set(range(8)), raising=False)
    for flag, want in (([], 7), (["--threads", "3"], 3)):  # 8 cores: the default leaves one
        events.clear()
        args = build_parser().parse_args(["serve", "--model", str(tmp_path), *flag])
        with pytest.raises(RuntimeError, match="stop here"):
            args.func(args)
        assert events == [("threads", want), ("engine", None)]
