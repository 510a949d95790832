"""GRPO: group advantages, clipped token-level loss, k3 KL, zero gradient for equal rewards, rho = 1 on the first
pass, rewards and verifiers, and a tiny-model run whose reward must rise (guards the sign of the loss)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from helpers import tiny_model

from nanoseek import load_model, save_model
from nanoseek.checkpoint.run import checkpoint_dirs
from nanoseek.cli.main import main
from nanoseek.tasks.rewards import accuracy_reward, format_reward, overlong_penalty
from nanoseek.tasks.sources import ListPrompts, TaskPrompts
from nanoseek.tasks.verify import answer_matches
from nanoseek.train.grpo import GRPOConfig, GRPOJob, grpo, policy_update, run_grpo
from nanoseek.train.grpo_loss import group_advantages, grpo_loss, k3_kl, pad_batch, token_logprobs
from nanoseek.train.metrics import read_metrics
from nanoseek.train.optim import build_optimizer
from nanoseek.train.rollouts import Rollout


# ------------------------------------------------------------------------------------------------ advantages
def test_group_advantages_with_and_without_std_scaling():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.5, 1.0, 0.5]])
    adv, zero = group_advantages(r, std_scaling=True)
    std0 = torch.tensor([1.0, 0.0, 0.0, 0.0]).std()  # unbiased (Bessel), as TRL and verl
    assert torch.allclose(adv[0], (r[0] - 0.25) / (std0 + 1e-6))
    assert torch.equal(adv[1], torch.zeros(4)) and zero.tolist() == [False, True, False]
    assert torch.allclose(adv[2], (r[2] - 0.5) / (r[2].std() + 1e-6))
    plain, _ = group_advantages(r, std_scaling=False)  # Dr. GRPO: r - mean only
    assert torch.allclose(plain, r - r.mean(1, keepdim=True))
    assert torch.allclose(adv.sum(1), torch.zeros(3), atol=1e-6)  # centred per group


def test_single_sample_groups_have_zero_advantage():
    adv, zero = group_advantages(torch.tensor([[1.0], [0.0]]))
    assert torch.equal(adv, torch.zeros(2, 1)) and zero.all()


# ------------------------------------------------------------------------------------------------- the loss
def _loss_at(ratio: float, a: float):
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, st = grpo_loss(logp, torch.zeros(1, 1), torch.tensor([a]), torch.ones(1, 1), 0.2, 0.28)
    loss.backward()
    return loss.item(), logp.grad.item(), st


@pytest.mark.parametrize(
    "ratio, a, loss, clipped_side",
    [
        (1.5, 1.0, -1.28, "clip_high"),  # A > 0 above 1 + eps_high: capped, no gradient
        (0.5, 1.0, -0.5, None),  # A > 0 below 1: unclipped, pushes up
        (0.5, -1.0, 0.8, "clip_low"),  # A < 0 below 1 - eps_low: capped, no gradient
        (1.5, -1.0, 1.5, None),  # A < 0 above 1: unclipped, pushes down
        (1.1, 1.0, -1.1, None),  # inside the band
    ],
)
def test_clipped_loss_at_known_ratios(ratio, a, loss, clipped_side):
    value, grad, st = _loss_at(ratio, a)
    assert value == pytest.approx(loss, abs=1e-6)
    if clipped_side:
        assert grad == 0.0 and st[clipped_side] == 1
    else:
        assert grad == pytest.approx(-a * ratio, rel=1e-5)  # d(-rho A)/d logp = -rho A
        assert st["clip_low"] == 0 and st["clip_high"] == 0


def test_loss_sign_follows_advantage_at_ratio_one():
    for a in (1.0, -1.0):
        _, grad, _ = _loss_at(1.0, a)
        assert grad == pytest.approx(-a)  # gradient descent raises log-prob for A > 0, lowers it for A < 0


def test_token_level_aggregation_weights_every_token_equally():
    # sequence 0 has 1 token, sequence 1 has 3: each token weighs 1/4 (DAPO), not 1/2 and 1/6 (per-sequence mean)
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([2.0, -1.0])
    loss, _ = grpo_loss(logp, logp.detach(), adv, mask, beta=0.0)
    assert loss.item() == pytest.approx(-(2.0 * 1 - 1.0 * 3) / 4)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.5, 0.0, 0.0], [0.25, 0.25, 0.25]]))
    part, _ = grpo_loss(logp, logp.detach(), adv, mask, num_tokens=8.0)  # micro-batches share the normaliser
    assert part.item() == pytest.approx(loss.item() * 4 / 8)


def test_k3_kl_value_and_gradient():
    logp = torch.tensor([math.log(0.5), math.log(0.3)], requires_grad=True)
    ref = torch.tensor([math.log(0.25), math.log(0.3)])
    kl = k3_kl(logp, ref)
    assert kl[0].item() == pytest.approx(0.5 - math.log(0.5) - 1)  # exp(d) - d - 1 with d = log(0.25 / 0.5)
    assert kl[1].item() == 0.0 and (kl >= 0).all()
    kl.sum().backward()
    assert torch.allclose(logp.grad, 1 - torch.exp(ref - logp.detach()))  # d k3 / d logp
    assert logp.grad[1] == 0.0
    # in the loss: + beta * k3 per token, token-averaged
    loss, st = grpo_loss(logp.detach(), logp.detach(), torch.zeros(1), torch.ones(1, 2), beta=0.1, ref_logp=ref[None])
    assert loss.item() == pytest.approx(0.1 * kl.sum().item() / 2) and st["kl"].item() == pytest.approx(kl.sum().item())


# ------------------------------------------------------------------------------------- policy update on a model
def _rollouts(tok, n: int = 4) -> list[Rollout]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        prompt = tok.encode_chat([{"role": "user", "content": f"What is {i}+1?"}], add_generation_prompt=True)
        completion = torch.randint(3, tok.vocab_size, (2 + i,), generator=g).tolist() + [tok.eos_id]
        out.append(Rollout({"prompt": "", "answer": "1"}, prompt, completion, "", False))
    return out


def test_policy_gradient_is_exactly_zero_when_all_rewards_are_equal(tok):
    model = tiny_model(tok).eval()
    rollouts = _rollouts(tok)
    adv, zero = group_advantages(torch.full((1, 4), 0.7))
    assert zero.all()
    ids, mask = pad_batch(rollouts, tok.pad_id)
    logp, _ = token_logprobs(model, ids)
    loss, _ = grpo_loss(logp, logp.detach(), adv[0], mask)
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_ratio_is_exactly_one_on_the_first_pass_and_mu_passes_step_the_optimizer(tok):
    model = tiny_model(tok)
    before = [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.0)
    cfg = GRPOConfig(steps=1, mu=3, micro_batch=3, clip_high=0.0, clip_low=0.0, beta=0.1)  # pass 2+ clips
    ref = tiny_model(tok, seed=5).eval()
    stats = policy_update(model, opt, _rollouts(tok), [1.0, -1.0, 0.5, -0.5], cfg, tok.pad_id, ref_model=ref)
    assert stats["first_pass_ratio_dev"] == 0.0
    assert opt.state[next(model.parameters())]["step"] == 3  # one AdamW step per pass
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert stats["clip_frac_low"] + stats["clip_frac_high"] > 0  # with a zero-width band, pass 3 clips
    assert stats["kl"] > 0 and all(p.grad is None for p in ref.parameters())  # frozen reference


# ------------------------------------------------------------------------------------------------- rewards
def test_rewards_and_answer_checking():
    ex = {"prompt": "What is 8+79*9-66?", "answer": "653", "task": "arithmetic"}
    assert accuracy_reward("", "<think>79*9=711 8+711=719 719-66=653</think> 653", ex) == 1.0
    assert accuracy_reward("", "<think></think> 652", ex) == 0.0
    cd = {"prompt": "", "answer": "(3+5)*2", "task": "countdown"}
    assert accuracy_reward("", "<think></think> 2*(5+3)", cd) == 1.0
    assert accuracy_reward("", "<think></think> 2**4", cd) == 0.0  # never eval: ** is not whitelisted
    assert answer_matches("<think>x</think> 3.50", "7/2") and answer_matches("<think></think> 3*4 = 12", "12")
    assert answer_matches("<think></think> (1+2)*4", "12") and not answer_matches("<think></think> 13", "12")
    assert not answer_matches("<think>never closed", "12")
    assert format_reward("", "<think>a b</think> 5", {}) == 1.0 and format_reward("", "<think></think> 5", {}) == 1.0
    assert format_reward("", "<think>a</think>", {}) == 0.0 and format_reward("", "5", {}) == 0.0
    assert format_reward("", "<think>a</think><think>b</think> 5", {}) == 0.0
    assert [overlong_penalty(n, 20, 4) for n in (16, 18, 20, 21)] == [0.0, -0.5, -1.0, -1.0]  # DAPO eq. 13


def test_prompt_sources_are_deterministic_and_resumable():
    a, b = TaskPrompts("arithmetic", ["2x1", "4x12"], seed=3), TaskPrompts("arithmetic", ["2x1", "4x12"], seed=3)
    first = a.next(6)
    assert {e["level"] for e in first} <= {"2x1", "4x12"} and len(first) == 6
    b.load_state_dict(a.state_dict())
    assert a.next(6) == b.next(6) and first != a.next(6)
    lp = ListPrompts([{"prompt": str(i), "answer": str(i)} for i in range(5)], seed=0)
    seen = [e["prompt"] for e in lp.next(3) + lp.next(3)]
    assert sorted(seen[:5]) == [str(i) for i in range(5)]  # one full epoch before any repeat


# ------------------------------------------------------------------------------------------------ end to end
def test_grpo_raises_a_trivially_learnable_reward(tok, tmp_path):
    """Reward 1 when the completion starts with a digit: a few GRPO steps must raise the sampled reward."""
    model = tiny_model(tok, seed=1)
    examples = [{"prompt": f"What is {i}+{i}?", "answer": str(2 * i)} for i in range(8)]
    cfg = GRPOConfig(
        steps=8, prompts_per_step=8, group_size=8, max_new_tokens=1, lr=3e-2, warmup=0,
        eval_every=0, save_every=0, zero_truncated=False,
    )  # fmt: skip
    grpo(cfg, model, tok, ListPrompts(examples, 0), tmp_path, [lambda p, c, e: float(c[:1].isdigit())])
    rewards = [r["reward_mean"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.2, rewards
    assert {"reward.png", "accuracy.png", "response_length.png", "kl.png", "clip_fraction.png"} <= {
        p.name for p in (tmp_path / "plots").iterdir()
    }


def test_run_logs_eval_and_resumes_exactly(tok, tmp_path):
    save_model(tiny_model(tok), tmp_path / "m", tokenizer=tok)
    cfg = GRPOConfig(
        steps=2, group_size=4, prompts_per_step=2, max_new_tokens=4, lr=1e-2, eval_every=1, eval_n=2,
        zero_truncated=False, format_reward=0.5, beta=0.05, save_every=1,
    )  # fmt: skip
    job = GRPOJob(str(tmp_path / "m"), "arithmetic", str(tmp_path / "a"), levels=["2x1"], grpo=cfg)
    summary = run_grpo(job)
    assert summary["step"] == 2 and summary["run_dir"] == str(tmp_path / "a") and "eval_accuracy" in summary
    run_grpo(dataclasses.replace(job, out=str(tmp_path / "b"), grpo=dataclasses.replace(cfg, steps=1)))
    with pytest.raises(ValueError, match="--lr 0.02 differs from the run's saved 0.01"):  # a resume keeps its settings
        run_grpo(dataclasses.replace(job, out=str(tmp_path / "b"), resume=True, grpo=dataclasses.replace(cfg, lr=2e-2)))
    assert main(["grpo", "--out", str(tmp_path / "b"), "--resume", "--steps", "2"]) == 0  # the CLI fills in the rest
    a, b = (load_model(checkpoint_dirs(tmp_path / r)[-1]).state_dict() for r in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]
    assert {"eval_accuracy", "eval_response_len", "eval_format_rate"} <= records[0].keys() <= records[2].keys()
    assert all(r.get("first_pass_ratio_dev", 0.0) == 0.0 for r in records)
    assert [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")] == [0, 1, 2]


def test_grpo_on_a_v4_model_resumes_exactly(tok, tmp_path):
    """A DeepSeek-V4 policy (rollouts through the Engine's V4 cache), stopped after step 1 and resumed, ends with
    the weights of the run that never stopped."""
    pytest.importorskip("nanoseek.infer.runner_v4", reason="needs the Engine's DeepSeek-V4 decoding (issue 21)")
    save_model(tiny_model(tok, preset="tiny-v4"), tmp_path / "m", tokenizer=tok)
    cfg = GRPOConfig(
        steps=2, group_size=4, prompts_per_step=2, max_new_tokens=4, lr=1e-2, eval_every=0,
        zero_truncated=False, format_reward=0.5, beta=0.05, save_every=1,
    )  # fmt: skip
    job = GRPOJob(str(tmp_path / "m"), "arithmetic", str(tmp_path / "a"), levels=["2x1"], grpo=cfg)
    run_grpo(job)
    run_grpo(dataclasses.replace(job, out=str(tmp_path / "b"), grpo=dataclasses.replace(cfg, steps=1)))
    run_grpo(dataclasses.replace(job, out=str(tmp_path / "b"), resume=True))
    a, b = (load_model(checkpoint_dirs(tmp_path / r)[-1]).state_dict() for r in ("a", "b"))
    assert checkpoint_dirs(tmp_path / "b")[-1].name == "step_2" and any(k.startswith("mtp.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_options_make_the_job_and_resume_refuses_changed_settings(tok, tmp_path, capsys):
    save_model(tiny_model(tok), tmp_path / "m", tokenizer=tok)
    args = ["grpo", "--model", str(tmp_path / "m"), "--task", "arithmetic", "--levels", "2x1", "--group-size", "2"]
    args += ["--prompts-per-step", "2", "--max-new-tokens", "2", "--eval-every", "0", "--reward-truncated"]
    args += ["--no-std-scaling", "--length-penalty", "8", "2", "--out", str(tmp_path / "run"), "--steps", "1"]
    assert main(args) == 0
    assert "done: step 1" in capsys.readouterr().out
    saved = json.loads((tmp_path / "run" / "args.json").read_text())
    assert (saved["group_size"], saved["zero_truncated"], saved["std_scaling"]) == (2, False, False)
    assert saved["length_penalty"] == [8, 2] and saved["levels"] == ["2x1"] and saved["device"] == "auto"
    assert main(["grpo", "--out", str(tmp_path / "run"), "--resume", "--steps", "2", "--group-size", "4"]) == 1
    assert "--group-size 4 differs from the run's saved 2" in capsys.readouterr().err
    assert main(["grpo", "--out", str(tmp_path / "run"), "--steps", "2"]) == 1  # a run dir with checkpoints
    assert "pass --resume" in capsys.readouterr().err
