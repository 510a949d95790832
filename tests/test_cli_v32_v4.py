"""`nanoseek generate`, `chat`, `eval`, `serve` and the lm-eval adapter on tiny DeepSeek-V3.2 and V4 checkpoints:
the commands users run on V3 models, unchanged. The models have memorised a few `<think>` answers, so replies
(and the server's `reasoning_content`) are known in advance."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from helpers import memorise
from serve_util import KNOWN, ServeProcess, checked_client

from nanoseek import ModelConfig, Transformer, save_model
from nanoseek.cli.chat import DIM, RESET
from nanoseek.cli.main import main
from nanoseek.infer.engine import single_thread
from nanoseek.infer.reasoning import split_reasoning
from nanoseek.tokenizer import train_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: their many tiny ops stall on a pool of threads on a busy machine."""
    with single_thread():
        yield


@pytest.fixture(scope="module", params=["tiny-v32", "tiny-v4"])
def model_dir(request, tmp_path_factory):
    texts = [f"{q} {a}" for q, a in KNOWN.items()] * 20 + ["hello world, the quick brown fox " * 4] * 5
    tok = train_tokenizer(texts, vocab_size=320)
    ids = dict(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset(request.param, max_position_embeddings=128, **ids))
    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in KNOWN.items()]
    with single_thread():
        loss = memorise(model, tok, chats, steps=300, lr=1e-2)  # converges for both presets (3e-2 overshoots)
    assert loss < 0.02, loss
    d = tmp_path_factory.mktemp(request.param) / request.param
    save_model(model.eval(), d, tokenizer=tok)
    return d


def test_generate_and_chat(model_dir, monkeypatch, capsys):
    question = next(iter(KNOWN))
    assert main(["generate", "--model", str(model_dir), "--prompt", "hello", "--max-tokens", "6", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) <= 6
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{question}\n/exit\n"))
    assert main(["chat", "--model", str(model_dir), "--max-tokens", "30", "--temperature", "0"]) == 0
    assert KNOWN[question] in capsys.readouterr().out.replace(DIM, "").replace(RESET, "")


def test_generate_speculative_gives_the_same_completion_and_the_acceptance_rate(model_dir, capsys):
    question = next(iter(KNOWN))
    args = ["generate", "--model", str(model_dir), "--prompt", question, "--max-tokens", "24", "--json"]
    assert main(args) == 0
    plain = capsys.readouterr()
    assert main([*args, "--speculative"]) == 0
    spec = capsys.readouterr()
    assert spec.out == plain.out  # greedy: MTP drafts change the speed, never the tokens
    assert "MTP speculation:" in spec.err and "drafts accepted" in spec.err


def test_eval(model_dir, capsys):
    args = ["eval", "--model", str(model_dir), "--task", "arithmetic", "--levels", "2x1", "--n", "2"]
    assert main([*args, "--max-tokens", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 2


@pytest.mark.slow
def test_serve_answers_the_openai_client_with_reasoning_content(model_dir):
    with ServeProcess(model_dir, "--max-batch", "4") as server:
        client = checked_client(server.base_url)
        for question, answer in list(KNOWN.items())[:2]:
            r = client.chat.completions.create(
                model=model_dir.name, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=30
            )
            msg = r.choices[0].message
            assert (msg.reasoning_content, msg.content) == split_reasoning(answer)


def test_lm_eval_adapter_scores_and_generates(model_dir):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from nanoseek.eval.harness import NanoseekLM

    lm = NanoseekLM(pretrained=str(model_dir), batch_size=2)
    question = next(iter(KNOWN))
    requests = [(f"{question} ", KNOWN[question]), (f"{question} ", "hello world")]
    scores = lm.loglikelihood([Instance("loglikelihood", {}, args, i) for i, args in enumerate(requests)])
    assert all(math.isfinite(logp) and logp < 0 for logp, _ in scores)
    (text,) = lm.generate_until([Instance("generate_until", {}, ("hello", {"max_gen_toks": 5}), 0)])
    assert isinstance(text, str)
