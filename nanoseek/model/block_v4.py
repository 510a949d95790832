"""One DeepSeek-V4 decoder layer (V4 report sec. 2): two sub-layers, each wrapped in manifold-constrained
hyper-connections instead of a residual add.

    X = attn_hc(X, x -> CompressedAttention(input_layernorm(x)))       hybrid attention, compressed_attention.py
    X = ffn_hc(X, x -> MoE(post_attention_layernorm(x), token ids))     sqrt(softplus) or hash routing, moe.py

X [B, T, hc_mult, d] holds the residual streams (hyper_connections.py). Every V4 layer is MoE; sliding-only layers
use the "main" rope set, CSA/HCA layers the "compress" one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from nanoseek.config import SLIDING, ModelConfig
from nanoseek.model.compressed_attention import CompressedAttention, LayerCacheV4
from nanoseek.model.hyper_connections import HyperConnection
from nanoseek.model.moe import MoE
from nanoseek.model.norm import RMSNorm

RopeTables = dict[str, tuple[torch.Tensor, torch.Tensor]]  # {"main", "compress"}: (cos, sin) [T, 1, d_R/2]
RopeAtSet = Callable[[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # (set, positions) -> cos, sin


class BlockV4(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.rope_set = "main" if config.attention_type(layer_idx) == SLIDING else "compress"
        self.attn_hc = HyperConnection(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = CompressedAttention(config, layer_idx)
        self.ffn_hc = HyperConnection(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config, layer_idx)

    def forward(self, streams: torch.Tensor, rope: RopeTables, input_ids: torch.Tensor) -> torch.Tensor:
        """streams [B, T, hc, d] -> [B, T, hc, d]; input_ids [B, T] route the hash layers."""
        cos, sin = rope[self.rope_set]
        streams = self.attn_hc(streams, lambda x: self.self_attn(self.input_layernorm(x), cos, sin))
        return self.ffn_hc(streams, lambda x: self.mlp(self.post_attention_layernorm(x), input_ids))

    def forward_cached(
        self,
        streams: torch.Tensor,
        rope: RopeTables,
        rope_at: RopeAtSet,
        input_ids: torch.Tensor,
        cache: LayerCacheV4,
        slots: torch.Tensor,
        start: torch.Tensor,
    ) -> torch.Tensor:
        """As forward for new tokens (row n at positions start[n] + t, rope tables [N, T, 1, d_R/2]), attending
        through this layer's cache, which it updates (CompressedAttention.forward_cached)."""
        cos, sin = rope[self.rope_set]

        def attention(x: torch.Tensor) -> torch.Tensor:
            at = lambda positions: rope_at(self.rope_set, positions)  # noqa: E731
            return self.self_attn.forward_cached(self.input_layernorm(x), cos, sin, at, cache, slots, start)

        streams = self.attn_hc(streams, attention)
        return self.ffn_hc(streams, lambda x: self.mlp(self.post_attention_layernorm(x), input_ids))
