"""One pre-norm decoder layer: x + MLA(norm(x)), then + FFN(norm(x)); FFN is dense or DeepSeekMoE."""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.mla import MLA, pick_rows
from nanoseek.model.moe import MLP, MoE
from nanoseek.model.norm import RMSNorm


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_cached(
        self, x, cos, sin, kv_cache, slots, start, cache_len: int, query_rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As forward, attending through this layer's latent cache, which is only read: returns (x, new cache
        entries) (see MLA.forward_cached; with query_rows, x comes back for those positions only: [N, 1, d])."""
        a, new = self.self_attn.forward_cached(
            self.input_layernorm(x), cos, sin, kv_cache, slots, start, cache_len, query_rows=query_rows
        )
        if query_rows is not None:
            x = pick_rows(x, query_rows)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), new
