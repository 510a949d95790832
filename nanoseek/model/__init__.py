"""The DeepSeek-V3 model: RMSNorm, RoPE/YaRN, MLA, DeepSeekMoE, MTP and the decoder stack."""

from nanoseek.model.transformer import Losses, Transformer

__all__ = ["Losses", "Transformer"]
