"""The DeepSeek-V3 decoder: embedding -> num_hidden_layers Blocks -> RMSNorm -> lm_head, plus MTP modules; and the
DeepSeek-V4 decoder, TransformerV4: embedding -> hc_mult streams -> BlockV4s -> HyperHead -> RMSNorm -> lm_head.

Module names follow the HF checkpoint (`embed_tokens`, `layers.N.self_attn.kv_b_proj`, `norm`, `lm_head`), so
`checkpoint.py` only has to prefix `model.`, restack routed experts and move MTP modules to index N+k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.block import Block
from nanoseek.model.block_v4 import BlockV4, RopeAtSet, RopeTables
from nanoseek.model.compressed_attention import CompressedAttention, CompressedIndexer, Compressor, LayerCacheV4
from nanoseek.model.hyper_connections import HyperConnection, HyperHead
from nanoseek.model.mla import write_latents
from nanoseek.model.moe import Experts, MoE, hash_table
from nanoseek.model.mtp import MTPModule, MTPModuleV4
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import rope_cos_sin, rope_frequencies

IGNORE_INDEX = -100


@dataclass
class Losses:
    """Separate loss terms; `total(mtp_weight)` = main + lambda * mtp + aux (V3 report eq. 25 and 20) + the V3.2
    indexer's KL loss, which reaches only the indexer."""

    main: torch.Tensor
    mtp: torch.Tensor  # mean over MTP depths of their cross-entropy (0 without MTP)
    aux: torch.Tensor  # sum over MoE layers of the alpha-weighted sequence-wise balance loss (0 when off)
    indexer: torch.Tensor | None = None  # sum over layers of the indexer KL loss (None unless indexer training)

    def total(self, mtp_weight: float = 0.3) -> torch.Tensor:
        total = self.main + mtp_weight * self.mtp + self.aux
        return total if self.indexer is None else total + self.indexer


class Transformer(nn.Module):
    def __new__(cls, config: ModelConfig | None = None, *args, **kwargs):
        """Transformer(config) is the DeepSeek-V4 decoder (TransformerV4, a subclass) when config.model_type is
        deepseek_v4, so every caller builds either family the same way."""
        if cls is Transformer and config is not None and config.is_v4:
            cls = TransformerV4
        return super().__new__(cls)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList([Block(c, i) for i in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList([MTPModule(c, c.num_hidden_layers + k) for k in range(c.num_nextn_predict_layers)])
        # fp32 tensor, not a buffer: model.to(bfloat16) must not round the rotary frequencies
        self.inv_freq, self.rope_attention_factor = rope_frequencies(c)
        if self.embed_tokens.weight.device.type != "meta":
            self.init_weights()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, initializer_range) weights; output projections scaled by 1/sqrt(2 * layers) (GPT-2)."""
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * (self.config.num_hidden_layers + self.config.num_nextn_predict_layers))
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_out = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, 0.0, out_std if is_out else std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, nn.LayerNorm):  # the V3.2 indexer's k_norm
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, Experts):
                nn.init.normal_(module.w13, 0.0, std)
                nn.init.normal_(module.w2, 0.0, out_std)
            elif isinstance(module, MoE):
                nn.init.normal_(module.gate.weight, 0.0, std)
                module.gate.e_score_correction_bias.zero_()

    # --------------------------------------------------------------- forward
    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin shaped to broadcast over heads: [..., T, 1, d_R/2]."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        cos, sin = rope_cos_sin(self.inv_freq, self.rope_attention_factor, positions, dtype)
        return cos.unsqueeze(-2), sin.unsqueeze(-2)

    def hidden(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Final-normed hidden states [B, T, d] and the rope tables used."""
        self._check_input(input_ids)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(torch.arange(input_ids.shape[1], device=input_ids.device), x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x), (cos, sin)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, vocab] for token ids [B, T] (causal; position t sees tokens 0..t)."""
        h, _ = self.hidden(input_ids)
        return self.lm_head(h)

    def forward_cached(
        self,
        input_ids: torch.Tensor,
        kv_cache: torch.Tensor,
        slots: torch.Tensor,
        start: torch.Tensor,
        last_only: bool = False,
        cache_len: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Incremental forward: new tokens [N, T] of the sequences in cache rows `slots`, starting at
        positions `start` [N]; their latents are written to kv_cache [layers, n_slots, max_len, W]
        (W = config.latent_cache_width; see nanoseek.infer.cache). cache_len: cached positions to read (default
        max(start)). Returns (logits [N, T or 1, V], final-normed hidden [N, T, d])."""
        cache_len = int(start.max()) if cache_len is None else cache_len
        logits, h, new = self.cached_step(input_ids, kv_cache, slots, start, cache_len, last_only)
        write_latents(kv_cache, slots, start, new)
        return logits, h

    def cached_step(
        self,
        input_ids: torch.Tensor,
        kv_cache: torch.Tensor,
        slots: torch.Tensor,
        start: torch.Tensor,
        cache_len: int,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """forward_cached without the cache write: (logits, hidden, new entries [layers, N, T, d_c + d_R]).
        A pure function of fixed shapes for fixed (N, T, cache_len): what the engine compiles."""
        T = input_ids.shape[1]
        x = self.embed_tokens(input_ids)
        positions = start.unsqueeze(1) + torch.arange(T, device=input_ids.device)
        cos, sin = self.rope(positions, x.dtype)
        new = []
        for i, layer in enumerate(self.layers):
            x, entry = layer.forward_cached(x, cos, sin, kv_cache[i], slots, start, cache_len)
            new.append(entry)
        h = self.norm(x)
        return self.lm_head(h[:, -1:] if last_only else h), h, torch.stack(new)

    def mtp_cached_step(
        self,
        h: torch.Tensor,
        next_tokens: torch.Tensor,
        kv_cache: torch.Tensor,
        slots: torch.Tensor,
        start: torch.Tensor,
        cache_len: int,
        query_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first MTP module over its own latent cache [n_slots, max_len, d_c + d_R], without writing it: from
        final-normed hidden states h [N, T, d] and the tokens after them [N, T], returns (logits of the tokens
        after those [N, T, V], new entries [N, T, d_c + d_R]). Pure, like cached_step (speculative decoding).
        query_rows [N]: logits for position query_rows[n] of row n only ([N, 1, V]); every position's entry is
        still made, but attention, MoE and head run for one position (a draft needs only the last kept one)."""
        module = self.mtp[0]
        positions = start.unsqueeze(1) + torch.arange(h.shape[1], device=h.device)
        cos, sin = self.rope(positions, h.dtype)
        x = module.combine(h, self.embed_tokens(next_tokens))
        x, new = module.block.forward_cached(x, cos, sin, kv_cache, slots, start, cache_len, query_rows=query_rows)
        return self.lm_head(module.shared_head.norm(x)), new

    def compute_loss(self, input_ids: torch.Tensor, targets: torch.Tensor, mtp: bool = True) -> Losses:
        """Next-token loss, MTP loss and balance loss. targets[b, t] = input_ids[b, t+1] (IGNORE_INDEX to skip).

        MTP depth k at position i sees Emb(t_{i+k}) = Emb(targets[i+k-1]) and predicts targets[i+k].
        mtp=False skips the MTP modules (their loss is then 0), e.g. when the MTP loss weight is 0.
        """
        for m in self.modules():  # only this forward's indexer losses count
            if getattr(m, "indexer_loss", None) is not None:
                m.indexer_loss = None
        h, (cos, sin) = self.hidden(input_ids)
        V = self.config.vocab_size
        main = F.cross_entropy(self.lm_head(h).view(-1, V), targets.reshape(-1), ignore_index=IGNORE_INDEX)
        mtp_losses = []
        tokens, labels = targets, targets
        for module in self.mtp if mtp else ():
            labels = _shift_left(labels, IGNORE_INDEX)  # depth k predicts targets[i + k]
            h, h_normed = module(h, self.embed_tokens(tokens.clamp(min=0)), cos, sin)
            logits = self.lm_head(h_normed)
            mtp_losses.append(F.cross_entropy(logits.view(-1, V), labels.reshape(-1), ignore_index=IGNORE_INDEX))
            tokens = _shift_left(tokens, 0)
        zero = main.new_zeros(())
        mtp = torch.stack(mtp_losses).mean() if mtp_losses else zero
        aux_terms = [m.aux_loss for m in self.moe_layers() if self.training and m.aux_loss is not None]
        aux = torch.stack(aux_terms).sum() if aux_terms else zero
        index_terms = [m.indexer_loss for m in self.modules() if getattr(m, "indexer_loss", None) is not None]
        indexer = torch.stack(index_terms).sum() if index_terms else None
        return Losses(main=main, mtp=mtp, aux=aux, indexer=indexer)

    def set_indexer_training(self, mode: str | None) -> None:
        """V3.2: "dense" (warm-up: dense attention, the indexer fitted to it by KL), "sparse" (top-k attention, the
        indexer fitted on its selection) or None (the indexer is not trained) in every MLA layer, MTP included."""
        if mode not in (None, "dense", "sparse"):
            raise ValueError(f"indexer training mode must be None, 'dense' or 'sparse', got {mode!r}")
        for m in self.modules():
            if getattr(m, "indexer", None) is not None and hasattr(m, "indexer_training"):
                m.indexer_training = mode

    def _check_input(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"input_ids must be an integer tensor [batch, seq], got {input_ids.dtype} {tuple(input_ids.shape)}"
            )
        T = input_ids.shape[1]
        if T > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {T} exceeds max_position_embeddings={self.config.max_position_embeddings}; "
                "truncate the input or raise max_position_embeddings (with YaRN rope_scaling for long context)"
            )
        if input_ids.numel() and not input_ids.is_meta and not torch.compiler.is_compiling():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(
                    f"token id {hi if hi >= self.config.vocab_size else lo} is outside the vocabulary "
                    f"[0, {self.config.vocab_size}); the tokenizer does not match this model"
                )

    # ------------------------------------------------------------ MoE state
    def moe_layers(self) -> list[MoE]:
        """Every MoE module, main layers first then MTP blocks (the order of `expert_loads`)."""
        return [m for m in self.modules() if isinstance(m, MoE)]

    def expert_loads(self) -> torch.Tensor:
        """Tokens routed to each expert in the last forward: [n_moe_layers, n_routed_experts]."""
        loads = [m.last_load for m in self.moe_layers() if m.last_load is not None]
        if not loads:
            return torch.zeros(0, self.config.n_routed_experts)
        return torch.stack(loads)

    @torch.no_grad()
    def update_expert_bias(self, loads: torch.Tensor, gamma: float) -> None:
        """Aux-loss-free balancing step for every MoE layer, from loads [n_moe_layers, E]."""
        for m, load in zip(self.moe_layers(), loads):
            m.update_bias(load, gamma)

    # --------------------------------------------------------------- sizing
    def num_parameters(self, activated: bool = False, include_mtp: bool = False) -> int:
        """Parameter count; `activated` counts only num_experts_per_tok routed experts per MoE layer."""
        total = 0
        seen: set[int] = set()
        for name, p in self.named_parameters():
            if id(p) in seen or (not include_mtp and name.startswith("mtp.")):
                continue
            seen.add(id(p))
            n = p.numel()
            if activated and ".experts." in name:
                n = n * self.config.num_experts_per_tok // self.config.n_routed_experts
            total += n
        return total


class TransformerV4(Transformer):
    """DeepSeek-V4 (V4 report sec. 2): the token's embedding is copied into hc_mult residual streams, BlockV4s
    (block_v4.py) mix them, HyperHead collapses them before the final norm. Shares Transformer's loss terms, MoE
    bookkeeping and parameter counting; module names follow transformers' DeepseekV4 (`attn_hc`, `hc_head`), and
    checkpoint/hub_v4.py maps them to DeepSeek's hub names. MTP: num_nextn_predict_layers MTPModuleV4 depths
    (DeepSeek's; transformers has none). Decoding: `forward_cached` over per-layer caches
    (compressed_attention.LayerCacheV4), `mtp_forward_cached` for the first MTP block over its own (speculative
    decoding). The CSA indexers train as V3.2's (set_indexer_training)."""

    def __init__(self, config: ModelConfig) -> None:
        nn.Module.__init__(self)
        self.config = c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList([BlockV4(c, i) for i in range(c.num_hidden_layers)])
        self.hc_head = HyperHead(c)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        n, k = c.num_hidden_layers, c.num_nextn_predict_layers
        self.mtp = nn.ModuleList([MTPModuleV4(c, n + i) for i in range(k)])
        # two rope sets: "main" (rope_theta, no YaRN) for sliding-only layers, "compress" (compress_rope_theta,
        # YaRN without a cos/sin magnitude factor unless attention_factor says so) for CSA/HCA layers
        main, _ = rope_frequencies(c.replace(rope_scaling=None))
        compress, _ = rope_frequencies(c.replace(rope_theta=c.compress_rope_theta))
        factor = float(c.yarn.get("attention_factor", 1.0)) if c.yarn else 1.0
        self.inv_freqs = {"main": (main, 1.0), "compress": (compress, factor)}  # fp32 tensors, not buffers
        if self.embed_tokens.weight.device.type != "meta":
            self.init_weights()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, initializer_range) matrices (output projections scaled by 1/sqrt(2 layers)), unit norms,
        transformers' mHC start (base 0, scale 1), zero sinks / position biases / balancing bias, and a fresh
        frozen hash table per hash-routed layer."""
        c = self.config
        std = c.initializer_range
        out_std = std / math.sqrt(2 * c.num_hidden_layers)
        for name, module in self.named_modules():
            if not name.startswith("mtp."):
                _init_v4_module(name, module, std, out_std)
        for i, layer in enumerate(self.layers):
            gate = layer.mlp.gate
            nn.init.normal_(gate.weight, 0.0, std)
            if gate.tid2eid is not None:
                table = hash_table(c.vocab_size, c.n_routed_experts, c.num_experts_per_tok, seed=i)
                gate.tid2eid.copy_(table)
            else:
                gate.e_score_correction_bias.zero_()
        # then the MTP depths, whose routers are always bias-routed
        for name, module in self.mtp.named_modules():
            _init_v4_module(name, module, std, out_std)
        for module in self.mtp:
            nn.init.normal_(module.block.mlp.gate.weight, 0.0, std)
            module.block.mlp.gate.e_score_correction_bias.zero_()

    # --------------------------------------------------------------- forward
    def rope_at(self, name: str, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [..., 1, d_R/2] of rope set `name` ("main" or "compress") at positions [...]."""
        inv_freq, factor = self.inv_freqs[name]
        cos, sin = rope_cos_sin(inv_freq.to(positions.device), factor, positions, dtype)
        return cos.unsqueeze(-2), sin.unsqueeze(-2)

    def rope_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeTables:
        """{"main", "compress"}: cos, sin [..., T, 1, d_R/2] for positions [..., T]."""
        return {name: self.rope_at(name, positions, dtype) for name in self.inv_freqs}

    def streams(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, RopeTables]:
        """The last layer's residual streams [B, T, hc, d] (before the HyperHead; what MTP reads) and the rope
        tables used."""
        self._check_input(input_ids)
        x = self.embed_tokens(input_ids)
        rope = self.rope_tables(torch.arange(input_ids.shape[1], device=input_ids.device), x.dtype)
        streams = x.unsqueeze(2).expand(-1, -1, self.config.hc_mult, -1)  # hc copies of the embedding
        for layer in self.layers:
            streams = layer(streams, rope, input_ids)
        return streams, rope

    def hidden(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, RopeTables]:
        """Final-normed hidden states [B, T, d] (after the streams' collapse) and the rope tables used."""
        streams, rope = self.streams(input_ids)
        return self.norm(self.hc_head(streams)), rope

    def compute_loss(self, input_ids: torch.Tensor, targets: torch.Tensor, mtp: bool = True) -> Losses:
        """Next-token loss, MTP loss and balance loss (targets[b, t] = input_ids[b, t+1], IGNORE_INDEX to skip).
        MTP depth k at position i reads Emb(targets[i+k-1]) and predicts targets[i+k], as V3's."""
        for m in self.modules():  # only this forward's balance and indexer losses count (mtp=False skips MTP)
            if isinstance(m, MoE):
                m.aux_loss = None
            elif isinstance(m, CompressedAttention):
                m.indexer_loss = None
        streams, rope = self.streams(input_ids)
        V = self.config.vocab_size
        logits = self.lm_head(self.norm(self.hc_head(streams)))
        main = F.cross_entropy(logits.view(-1, V), targets.reshape(-1), ignore_index=IGNORE_INDEX)
        mtp_losses = []
        tokens, labels = targets, targets
        for module in self.mtp if mtp else ():
            labels = _shift_left(labels, IGNORE_INDEX)
            next_ids = tokens.clamp(min=0)
            streams, h = module(streams, self.embed_tokens(next_ids), rope, next_ids)
            mtp_losses.append(
                F.cross_entropy(self.lm_head(h).view(-1, V), labels.reshape(-1), ignore_index=IGNORE_INDEX)
            )
            tokens = _shift_left(tokens, 0)
        zero = main.new_zeros(())
        aux_terms = [m.aux_loss for m in self.moe_layers() if self.training and m.aux_loss is not None]
        index_terms = [m.indexer_loss for m in self.modules() if getattr(m, "indexer_loss", None) is not None]
        return Losses(
            main=main,
            mtp=torch.stack(mtp_losses).mean() if mtp_losses else zero,
            aux=torch.stack(aux_terms).sum() if aux_terms else zero,
            indexer=torch.stack(index_terms).sum() if index_terms else None,
        )

    def set_indexer_training(self, mode: str | None) -> None:
        """As V3.2's, for the CSA layers' indexers, over compressed entries: "dense" (warm-up: every visible entry
        attended, the indexer fitted to the attention by KL), "sparse" (top-k entries, the indexer fitted on its
        selection) or None. The indexers are trainable exactly while a mode is set (frozen otherwise)."""
        super().set_indexer_training(mode)
        for m in self.modules():
            if isinstance(m, CompressedIndexer):
                m.requires_grad_(mode is not None)

    def mtp_logits(self, input_ids: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """The first MTP depth's logits [B, T, V] over t_{i+2}, given tokens [B, T] and the tokens after them
        next_ids [B, T] (t_{i+1}): a full forward, for tests and drafting without a cache."""
        streams, rope = self.streams(input_ids)
        return self.lm_head(self.mtp[0](streams, self.embed_tokens(next_ids), rope, next_ids)[1])

    def forward_cached(
        self,
        input_ids: torch.Tensor,
        caches: list[LayerCacheV4],
        slots: torch.Tensor,
        start: torch.Tensor,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Incremental forward: new tokens [N, T] of the sequences in cache rows `slots`, row n at positions
        start[n] .. start[n] + T - 1 (start[n] = tokens it has cached; rows may differ). caches: one
        LayerCacheV4 per layer (nanoseek.infer.cache.CompressedKVCache), updated in place: unlike V3's latent
        cache, a V4 step must write before it reads (entries completed by a chunk are visible to its later
        tokens). Returns (logits [N, T or 1, V], the last layer's streams [N, T, hc, d]): the streams, not the
        collapsed hidden state, because they are what V4's MTP block reads (mtp_forward_cached)."""
        x = self.embed_tokens(input_ids)
        rope, rope_at = self._decode_rope(start, input_ids.shape[1], x.dtype)
        streams = x.unsqueeze(2).expand(-1, -1, self.config.hc_mult, -1)
        for layer, cache in zip(self.layers, caches, strict=True):
            streams = layer.forward_cached(streams, rope, rope_at, input_ids, cache, slots, start)
        h = self.norm(self.hc_head(streams[:, -1:] if last_only else streams))
        return self.lm_head(h), streams

    def mtp_forward_cached(
        self,
        streams: torch.Tensor,
        next_ids: torch.Tensor,
        cache: LayerCacheV4,
        slots: torch.Tensor,
        start: torch.Tensor,
        query_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The first MTP depth, incrementally (the engine's drafts): the main model's streams X [N, T, hc, d] at
        positions start[n] + t (forward_cached's second output) and the tokens after them next_ids [N, T]
        (t_{i+1}) -> logits over t_{i+2} [N, T, V]; with query_rows [N], of position query_rows[n] of row n only
        ([N, 1, V]: a draft needs only the last kept position). The block attends through its own LayerCacheV4
        `cache` (infer.cache.mtp_decode_cache), updated in place for every position as a main layer's is; its
        logits equal mtp_logits of a full forward over the same tokens."""
        module = self.mtp[0]
        x = module.combine(streams, self.embed_tokens(next_ids))
        rope, rope_at = self._decode_rope(start, next_ids.shape[1], x.dtype)
        x = module.block.forward_cached(x, rope, rope_at, next_ids, cache, slots, start)
        if query_rows is not None:
            x = x[torch.arange(x.shape[0], device=x.device), query_rows].unsqueeze(1)
        return self.lm_head(module.norm(module.hc_head(x)))

    def _decode_rope(self, start: torch.Tensor, T: int, dtype: torch.dtype) -> tuple[RopeTables, RopeAtSet]:
        """Rope tables of T new tokens per row at positions start[n] + t ([N, T, 1, d_R/2] per set), and the
        rope of any positions (where compressed entries are made)."""
        positions = start.unsqueeze(1) + torch.arange(T, device=start.device)  # [N, T]

        def rope_at(name: str, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.rope_at(name, pos, dtype)

        return self.rope_tables(positions, dtype), rope_at

    def cached_step(self, *args, **kwargs):
        raise NotImplementedError(
            "DeepSeek-V4's decode step updates its cache in place (forward_cached); the engine's pure, compiled "
            "V3 step does not apply"
        )

    def mtp_cached_step(self, *args, **kwargs):
        raise NotImplementedError(
            "DeepSeek-V4's MTP block updates its cache in place (mtp_forward_cached); the engine's pure, compiled "
            "V3 MTP step does not apply"
        )


@torch.no_grad()
def _init_v4_module(name: str, module: nn.Module, std: float, out_std: float) -> None:
    """TransformerV4.init_weights for one module (not recursive; routers are initialised by the caller)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, 0.0, out_std if name.endswith(("o_b_proj", "down_proj")) else std)
    elif isinstance(module, RMSNorm):
        nn.init.ones_(module.weight)
    elif isinstance(module, Experts):
        nn.init.normal_(module.w13, 0.0, std)
        nn.init.normal_(module.w2, 0.0, out_std)
    elif isinstance(module, HyperConnection):
        nn.init.normal_(module.fn, 0.0, std)
        nn.init.zeros_(module.base)
        nn.init.ones_(module.scale)
    elif isinstance(module, HyperHead):
        nn.init.normal_(module.hc_fn, 0.0, std)
        nn.init.zeros_(module.hc_base)
        nn.init.ones_(module.hc_scale)
    elif isinstance(module, CompressedAttention):
        nn.init.zeros_(module.sinks)
    elif isinstance(module, Compressor):
        nn.init.zeros_(module.position_bias)


def _shift_left(x: torch.Tensor, fill: int) -> torch.Tensor:
    """x[:, 1:] followed by `fill` in the last column."""
    return torch.cat((x[:, 1:], x.new_full((x.shape[0], 1), fill)), dim=1)
