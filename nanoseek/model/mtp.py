"""Multi-Token Prediction (V3 report, sec. 2.2, eq. 21-25).

Depth k combines the previous depth's hidden state h^{k-1}_i with the embedding of token t_{i+k}:
    h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]);  h^k = Block(h');  logits = head(shared_head.norm(h^k))
and predicts t_{i+k+1}. Embedding and output head are shared with the main model.

Decision: h^0 is the main model's hidden state *after* the final norm (what vLLM/SGLang feed the
official weights' MTP layer at inference); torchtitan feeds the pre-norm state instead.

DeepSeek-V4 (`MTPModuleV4`; transformers 5.25 has no MTP module, so this follows DeepSeek's reference
`MTPBlock`) keeps the hc_mult residual streams X^{k-1} [hc, d] of the main model (before its HyperHead) or of the
previous depth, and projects the two inputs separately instead of concatenating them:
    X'_j = e_proj(enorm(Emb(t_{i+k}))) + h_proj(hnorm(X^{k-1}_j))     every stream j gets the same embedding term
    X^k = BlockV4(X');  logits = head(norm(hc_head(X^k)))              its own HyperHead and final norm
The block is a full V4 layer (mHC, attention of config.mtp_layer_types[k], sliding by default, and a
bias-routed MoE); embedding and head are shared with the main model.
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.block import Block
from nanoseek.model.block_v4 import BlockV4, RopeTables
from nanoseek.model.hyper_connections import HyperHead
from nanoseek.model.norm import RMSNorm


class SharedHead(nn.Module):
    """Holds the MTP output norm; the head matrix itself is the main model's lm_head."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, eps)


class MTPModule(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.enorm = RMSNorm(d, config.rms_norm_eps)
        self.hnorm = RMSNorm(d, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.block = Block(config, layer_idx)
        self.shared_head = SharedHead(d, config.rms_norm_eps)

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """h_prev [B, T, d], emb_next = Emb(t_{i+k}) [B, T, d] -> (h^k, normed h^k for the shared head)."""
        h = self.block(self.combine(h_prev, emb_next), cos, sin)
        return h, self.shared_head.norm(h)

    def combine(self, h_prev: torch.Tensor, emb_next: torch.Tensor) -> torch.Tensor:
        return self.eh_proj(torch.cat((self.enorm(emb_next), self.hnorm(h_prev)), dim=-1))


class MTPModuleV4(nn.Module):
    """DeepSeek-V4's MTP depth k (layer index num_hidden_layers + k): streams in, streams out (module docstring).
    Parameter names follow DeepSeek's hub (`mtp.k.e_proj`, `mtp.k.hc_head_fn`, `mtp.k.norm`; the block's as a
    layer's), through checkpoint/hub_v4.py."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.enorm = RMSNorm(d, eps)
        self.hnorm = RMSNorm(d, eps)
        self.e_proj = nn.Linear(d, d, bias=False)
        self.h_proj = nn.Linear(d, d, bias=False)
        self.block = BlockV4(config, layer_idx)
        self.hc_head = HyperHead(config)
        self.norm = RMSNorm(d, eps)

    def forward(
        self, streams: torch.Tensor, emb_next: torch.Tensor, rope: RopeTables, next_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """streams X^{k-1} [B, T, hc, d], emb_next = Emb(t_{i+k}) [B, T, d] (next_ids = t_{i+k} [B, T]) ->
        (X^k [B, T, hc, d] for the next depth, normed hidden [B, T, d] for the shared head)."""
        streams = self.block(self.combine(streams, emb_next), rope, next_ids)
        return streams, self.norm(self.hc_head(streams))

    def combine(self, streams: torch.Tensor, emb_next: torch.Tensor) -> torch.Tensor:
        return self.e_proj(self.enorm(emb_next)).unsqueeze(-2) + self.h_proj(self.hnorm(streams))
