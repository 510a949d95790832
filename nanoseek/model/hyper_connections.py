"""Manifold-constrained hyper-connections, mHC (Xie et al. 2026; DeepSeek-V4 report sec. 2.2).

DeepSeek-V4 replaces the residual stream by hc_mult streams X [hc, d] per token (initially hc copies of the
embedding). Around every sub-layer F (attention, MoE), from the streams themselves:

    mu = (fn . flat(X)) / rms(flat(X))               one RMS over all hc*d numbers, no weight
    pre  = sigmoid(a_pre  mu_pre  + b_pre) + eps     [hc]   how much of each stream F reads
    post = 2 sigmoid(a_post mu_post + b_post)         [hc]   how much of F's output each stream gets, in (0, 2)
    C    = Sinkhorn(a_comb mu_comb + b_comb)           [hc, hc] doubly stochastic: C[j, k] moves stream j to k
    X'_k = post_k F(sum_i pre_i X_i) + sum_j C[j, k] X_j

A doubly-stochastic C keeps the mix a convex combination of streams, so deep stacks neither blow up nor fade.
At the top, `HyperHead` collapses the streams with a pre-style weighting before the final norm.
The weights are computed in float32 (as transformers and DeepSeek do), whatever the model's dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Project logits [..., hc, hc] towards doubly-stochastic matrices: softmax over the last index (+eps), then
    a column normalisation, then (iters - 1) x (rows, columns). It ends on columns: every destination stream k
    receives a convex mix (sum_j C[j, k] = 1). This order is transformers' and DeepSeek's; a transposed C would
    look just as doubly stochastic, so only parity tests catch that mistake."""
    c = logits.softmax(dim=-1) + eps
    c = c / (c.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(dim=-1, keepdim=True) + eps)
        c = c / (c.sum(dim=-2, keepdim=True) + eps)
    return c


def _mix_logits(streams: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """fn . flat(X) / rms(flat(X)) in float32: streams [B, T, hc, d] -> [B, T, fn rows]."""
    flat = streams.flatten(-2).float()
    return F.linear(F.rms_norm(flat, (flat.shape[-1],), None, eps), fn.float())


class HyperConnection(nn.Module):
    """mHC around one sub-layer: `forward(X, F)` reads the streams through `pre`, runs F, writes its output back
    through `post` and mixes the old streams through C. Parameters: fn [(2+hc)hc, hc d], base [(2+hc)hc], scale [3]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hc = self.hc = config.hc_mult
        self.iters, self.hc_eps, self.norm_eps = config.hc_sinkhorn_iters, config.hc_eps, config.rms_norm_eps
        self.fn = nn.Parameter(torch.empty((2 + hc) * hc, hc * config.hidden_size))
        self.base = nn.Parameter(torch.zeros((2 + hc) * hc))
        self.scale = nn.Parameter(torch.ones(3))

    def weights(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pre [B, T, hc], post [B, T, hc], C [B, T, hc, hc] (float32) for streams [B, T, hc, d]."""
        hc = self.hc
        mu_pre, mu_post, mu_comb = _mix_logits(streams, self.fn, self.norm_eps).split([hc, hc, hc * hc], dim=-1)
        b_pre, b_post, b_comb = self.base.float().split([hc, hc, hc * hc])
        a_pre, a_post, a_comb = self.scale.float().unbind(0)
        pre = torch.sigmoid(a_pre * mu_pre + b_pre) + self.hc_eps
        post = 2 * torch.sigmoid(a_post * mu_post + b_post)
        comb = sinkhorn((a_comb * mu_comb + b_comb).unflatten(-1, (hc, hc)), self.iters, self.hc_eps)
        return pre, post, comb

    def forward(self, streams: torch.Tensor, sublayer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """X' = post * F(sum_i pre_i X_i) + C^T X for streams X [B, T, hc, d] -> [B, T, hc, d]."""
        pre, post, comb = self.weights(streams)
        y = sublayer((pre.unsqueeze(-1) * streams).sum(dim=-2).to(streams.dtype))  # [B, T, d]
        dtype = streams.dtype  # transformers mixes in the model dtype
        return post.to(dtype).unsqueeze(-1) * y.unsqueeze(-2) + comb.to(dtype).mT @ streams


class HyperHead(nn.Module):
    """The final collapse of the streams into one hidden state: h = sum_i pre_i X_i with
    pre = sigmoid(a (hc_fn . flat(X)) / rms + b) + eps. Parameters hc_fn [hc, hc d], hc_base [hc], hc_scale [1]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hc = config.hc_mult
        self.hc_eps, self.norm_eps = config.hc_eps, config.rms_norm_eps
        self.hc_fn = nn.Parameter(torch.empty(hc, hc * config.hidden_size))
        self.hc_base = nn.Parameter(torch.zeros(hc))
        self.hc_scale = nn.Parameter(torch.ones(1))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        """streams [B, T, hc, d] -> [B, T, d]."""
        mix = _mix_logits(streams, self.hc_fn, self.norm_eps)
        pre = torch.sigmoid(mix * self.hc_scale.float() + self.hc_base.float()) + self.hc_eps
        return (pre.unsqueeze(-1) * streams).sum(dim=-2).to(streams.dtype)
