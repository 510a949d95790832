"""Multi-Token Prediction (V3 report, sec. 2.2, eq. 21-25).

Depth k combines the previous depth's hidden state h^{k-1}_i with the embedding of token t_{i+k}:
    h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]);  h^k = Block(h');  logits = head(shared_head.norm(h^k))
and predicts t_{i+k+1}. Embedding and output head are shared with the main model.

Decision: h^0 is the main model's hidden state *after* the final norm (what vLLM/SGLang feed the
official weights' MTP layer at inference); torchtitan feeds the pre-norm state instead.
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.block import Block
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
