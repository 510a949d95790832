"""GRPO's objective in tensors: group advantages, the policy's token log-probs, the clipped token-level surrogate
with the k3 KL penalty, and the padded batch of rollouts they are computed on. The loop that uses them (sampling,
the update's passes and micro-batches, checkpoints) is in grpo.py."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from nanoseek.model import Transformer
from nanoseek.train.rollouts import Rollout


def group_advantages(rewards: Tensor, std_scaling: bool = True, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Advantages [N, G] from rewards [N, G] (N groups of G samples), and the zero-variance mask [N].

    A = (r - mean) / (std + eps) per group (DeepSeekMath sec. 4.1.2), or r - mean without std scaling
    (Dr. GRPO). A group whose rewards are all equal gets A = 0 exactly (it would otherwise be 0/eps noise).
    """
    rewards = rewards.float()
    zero_var = rewards.amax(dim=1) == rewards.amin(dim=1)
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if std_scaling and rewards.shape[1] > 1:
        adv = adv / (rewards.std(dim=1, keepdim=True) + eps)  # unbiased std, as TRL and verl
    return adv.masked_fill(zero_var[:, None], 0.0), zero_var


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(r - l) - (r - l) - 1 >= 0, zero where they agree."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def token_logprobs(
    model: Transformer | Callable[[Tensor], Tensor], ids: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """log pi(ids[:, t+1] | ids[:, :t+1]) from log_softmax(logits / T), fp32: [B, T-1]; and the entropy [B, T-1]
    of that distribution (detached)."""
    logits = model(ids[:, :-1]).float() / temperature
    logp_all = logits.log_softmax(dim=-1)
    logp = logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    adv: Tensor,
    mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    beta: float = 0.0,
    ref_logp: Tensor | None = None,
    num_tokens: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate with token-level aggregation. logp, old_logp, mask (1 on completion tokens) [B, T];
    adv [B]; num_tokens: the normaliser (all completion tokens of the batch when it is split in micro-batches;
    default mask.sum()). Returns (loss, stats: summed clip counts low/high, kl sum, tokens).

    Clip-higher (DAPO eq. 10): rho in [1 - clip_low, 1 + clip_high]. A token is "clipped" when the min picks
    the clipped term and its gradient is zero: rho < 1 - eps_low with A < 0, or rho > 1 + eps_high with A > 0.
    """
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None].to(logp.dtype)
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip_low, 1 + clip_high) * a)
    per_token = -surrogate
    kl = None
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference log-probs")
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + beta * kl
    n = mask.sum() if num_tokens is None else num_tokens
    loss = (per_token * mask).sum() / max(float(n), 1.0)
    with torch.no_grad():
        stats = {
            "clip_low": (((ratio < 1 - clip_low) & (a < 0)).to(mask.dtype) * mask).sum(),
            "clip_high": (((ratio > 1 + clip_high) & (a > 0)).to(mask.dtype) * mask).sum(),
            "kl": (kl * mask).sum() if kl is not None else mask.new_zeros(()),
            "ratio_dev": ((ratio - 1).abs() * mask).max() if mask.any() else mask.new_zeros(()),
            "tokens": mask.sum(),
        }
    return loss, stats


def pad_batch(rollouts: list[Rollout], pad_id: int) -> tuple[Tensor, Tensor]:
    """ids [B, L] (prompt + completion, right-padded) and the completion mask [B, L-1] over next-token positions."""
    L = max(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)
    ids = torch.full((len(rollouts), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rollouts), L - 1)
    for b, r in enumerate(rollouts):
        seq = r.prompt_ids + r.completion_ids
        ids[b, : len(seq)] = torch.tensor(seq)
        mask[b, len(r.prompt_ids) - 1 : len(seq) - 1] = 1.0  # position t predicts token t+1
    return ids, mask
