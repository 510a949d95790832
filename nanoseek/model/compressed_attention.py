"""DeepSeek-V4's hybrid attention (V4 report sec. 2.3): a sliding window beside compressed KV entries.

Every layer is multi-query attention with ONE head that is both key and value:

    c_Q = q_a_norm(q_a_proj(x));  q_h = rms(q_b_proj(c_Q))_h      per-head RMS, no weight
    kv = kv_norm(kv_proj(x))                                        [head_dim], K = V
    RoPE on the last qk_rope_head_dim dims of q and kv (interleaved pairs)
    p_{t,h,s} = exp(q_h . k_s / sqrt(d)) / (sum_s' exp(q_h . k_s' / sqrt(d)) + exp(sink_h))   a learned sink
    o_{t,h} = sum_s p_{t,h,s} k_s, then its rope dims rotated by -t (so the value's rotation becomes relative)
    out = o_b_proj(concat_g o_a_proj_g(o_{t, heads of group g}))    grouped low-rank output projection

The keys of query t are the window t-W < s <= t, plus, by layer type,
    CSA (compressed_sparse_attention): entries pooling 2m tokens with stride m (m = 4), of which a lightning
        indexer keeps index_topk per query;
    HCA (heavily_compressed_attention): entries pooling m' tokens each (m' = 128), all of them.
Entry w is visible from t once its last token is: w < (t + 1) // rate. Compressed layers use the "compress" RoPE
(compress_rope_theta, YaRN), sliding-only layers the "main" one (rope_theta, no YaRN): the caller passes the
layer's cos/sin. No FP8/FP4 or Hadamard simulation of DeepSeek's kernels, as in transformers.

Decoding (`forward_cached`) keeps per layer and sequence (`LayerCacheV4`): a ring of the last W keys, the
compressed entries made so far, and the raw projections of the tokens of the unfinished window(s), so an entry
is pooled the moment its window's last token arrives; CSA layers keep the same for their indexer's keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import CSA, ModelConfig
from nanoseek.model.indexer import index_scores, indexer_kl, select_topk
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import apply_rope_tail

RopeAt = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # positions [N, M] -> cos, sin [N, M, 1, d_R/2]


@dataclass
class CompressorCache:
    """One compressor's decode state for every cache slot. A window's tokens are pooled only when its last token
    arrives, so their projections wait here; overlapping (CSA) entries also read the previous window's."""

    entries: torch.Tensor  # [n_slots, max_len // rate, dim]: normed, roped; entry w in row w
    kv: torch.Tensor  # [n_slots, ring, width]: kv_proj of the last `ring` tokens, position p in row p % ring
    score: torch.Tensor  # [n_slots, ring, width]: gate_proj + position_bias of the same tokens
    # when a list, each forward_cached appends its new tokens' (kv, score) [N, T, width] as the ring stores them:
    # a record of every position's projections, which the ring forgets (the prefix cache's, infer/prefix_cache.py)
    tape: list[tuple[torch.Tensor, torch.Tensor]] | None = None


@dataclass
class LayerCacheV4:
    """One V4 attention layer's decode state. mHC needs none: its mixing weights come from each token's own
    streams. The number of tokens seen, and so of entries, is the caller's `start`.

    Writing position p overwrites the ring rows of position p - ring (outside the window of every query >= p;
    for the compressors, in a window whose entry is made by then) and the entry that p completes (made again
    whenever p is). So ONE position written past a sequence's length needs no undo: cutting the sequence back
    to length L after position L was written (a rejected one-token speculative draft) is exact, as the next
    step writes L again before anything reads it. Two would not be: writing L + 1 overwrites position
    L + 1 - ring, which rewriting L still reads (deeper drafts need a ring longer by their depth, or a copy).
    """

    window: torch.Tensor  # [n_slots, min(W, max_len), head_dim]: ring of the last keys (= values)
    compressor: CompressorCache | None  # CSA and HCA layers
    indexer: CompressorCache | None  # CSA layers: the indexer's keys, one per entry
    tape: list[torch.Tensor] | None = None  # when a list, forward_cached appends the new keys [N, T, head_dim]

    def tensors(self) -> list[torch.Tensor]:
        parts = [c for c in (self.compressor, self.indexer) if c is not None]
        return [self.window] + [t for c in parts for t in (c.entries, c.kv, c.score)]


def empty_layer_cache(
    config: ModelConfig, layer_idx: int, n_slots: int, max_len: int, dtype: torch.dtype, device: str | torch.device
) -> LayerCacheV4:
    """Zeroed decode state of layer layer_idx for n_slots sequences of up to max_len tokens."""
    c, rate = config, config.compress_rate(layer_idx)
    overlap = 2 if c.attention_type(layer_idx) == CSA else 1  # CSA entries span two windows

    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(n_slots, *shape, dtype=dtype, device=device)

    def compressor(dim: int) -> CompressorCache:
        ring = (overlap * rate, overlap * dim)  # the open windows' tokens: kv and score
        return CompressorCache(zeros(max_len // rate, dim), zeros(*ring), zeros(*ring))

    window = zeros(min(c.sliding_window, max_len), c.head_dim)
    return LayerCacheV4(
        window,
        compressor(c.head_dim) if rate else None,
        compressor(c.index_head_dim) if overlap == 2 else None,
    )


class Compressor(nn.Module):
    """Gated pooling of every `rate` tokens into one KV entry (V4 report eq. 9-12 and 20-23).

    Per channel c of window w: e_w = kv_norm(sum_s softmax_s(z_{s,c} + position_bias[s - w rate, c]) c_{s,c}) with
    c_s = kv_proj(x_s), z_s = gate_proj(x_s); RoPE at w * rate, the window's first position. overlap (CSA):
    every token projects two halves, and entry w pools the first halves of window w-1 with the second halves of
    window w: 2 * rate tokens, stride rate.
    """

    def __init__(self, hidden_size: int, dim: int, rate: int, overlap: bool, eps: float) -> None:
        super().__init__()
        self.dim, self.rate, self.overlap = dim, rate, overlap
        width = 2 * dim if overlap else dim
        self.kv_proj = nn.Linear(hidden_size, width, bias=False)
        self.gate_proj = nn.Linear(hidden_size, width, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(rate, width))
        self.kv_norm = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Entries [B, T // rate, dim] of the complete windows of x [B, T, hidden]; cos/sin [T, 1, d_R/2] are the
        layer's rope tables at positions 0..T-1."""
        B, T, _ = x.shape
        n = T // self.rate
        if n == 0:
            return x.new_zeros(B, 0, self.dim)
        x = x[:, : n * self.rate]
        kv = self.kv_proj(x).view(B, n, self.rate, -1)  # [B, n, rate, width]
        gate = self.gate_proj(x).view(B, n, self.rate, -1) + self.position_bias
        if self.overlap:  # slots [window w-1's first halves | window w's second halves]; none before window 0
            d = self.dim
            kv = torch.cat((F.pad(kv[:, :-1, :, :d], (0, 0, 0, 0, 1, 0)), kv[..., d:]), dim=2)
            gate = torch.cat((F.pad(gate[:, :-1, :, :d], (0, 0, 0, 0, 1, 0), value=float("-inf")), gate[..., d:]), 2)
        pooled = (kv * gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)).sum(dim=2)  # [B, n, dim]
        starts = slice(0, n * self.rate, self.rate)
        return apply_rope_tail(self.kv_norm(pooled).unsqueeze(2), cos[starts], sin[starts]).squeeze(2)

    def forward_cached(
        self, x: torch.Tensor, start: torch.Tensor, cache: CompressorCache, slots: torch.Tensor, rope_at: RopeAt
    ) -> None:
        """Pool every window that the new tokens x [N, T, hidden] (row n at positions start[n] + t) complete into
        cache.entries (rows `slots`), taking the window's earlier tokens from cache.kv/score; then keep the
        last tokens' projections there for the windows still open."""
        N, T, _ = x.shape
        rate, ring, width = self.rate, cache.kv.shape[1], cache.kv.shape[2]
        pos = start[:, None] + torch.arange(T, device=x.device)  # [N, T]
        kv = self.kv_proj(x)
        score = self.gate_proj(x) + self.position_bias[pos % rate]  # the bias by position within the window
        src_kv = torch.cat((cache.kv[slots].to(kv.dtype), kv), dim=1)  # [N, ring + T, width]: past ring, then new
        src_score = torch.cat((cache.score[slots].to(score.dtype), score), dim=1)
        first, end = start // rate, (start + T) // rate  # entries made before / after these tokens [N]
        M = int((end - first).max())
        if M > 0:
            w = first[:, None] + torch.arange(M, device=x.device)  # [N, M] entries to make (past `end`: padding)

            def tokens(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # positions [N, M, rate] -> kv, score
                idx = torch.where(p >= start[:, None, None], ring + p - start[:, None, None], p % ring)
                idx = idx.clamp(max=ring + T - 1).view(N, -1, 1).expand(-1, -1, width)
                return src_kv.gather(1, idx).view(N, M, rate, width), src_score.gather(1, idx).view(N, M, rate, width)

            p = w[..., None] * rate + torch.arange(rate, device=x.device)  # [N, M, rate]: window w's positions
            kv_w, score_w = tokens(p)
            if self.overlap:  # [window w-1's first halves | window w's second halves], as in forward
                d, (kv_p, score_p), absent = self.dim, tokens(p - rate), (p < rate)[..., None]
                kv_w = torch.cat((kv_p[..., :d].masked_fill(absent, 0), kv_w[..., d:]), dim=2)
                score_w = torch.cat((score_p[..., :d].masked_fill(absent, float("-inf")), score_w[..., d:]), dim=2)
            pooled = (kv_w * score_w.softmax(dim=2, dtype=torch.float32).to(kv_w.dtype)).sum(dim=2)  # [N, M, dim]
            cos, sin = rope_at(w * rate)
            entries = apply_rope_tail(self.kv_norm(pooled).unsqueeze(2), cos, sin).squeeze(2)
            made = w < end[:, None]
            rows = slots[:, None].expand(N, M)
            cache.entries[rows[made], w[made]] = entries[made].to(cache.entries.dtype)
        if cache.tape is not None:
            cache.tape.append((kv.to(cache.kv.dtype), score.to(cache.score.dtype)))
        keep = pos[:, -ring:] % ring  # the last `ring` tokens wait for their windows to close
        cache.kv[slots[:, None], keep] = kv[:, -ring:].to(cache.kv.dtype)
        cache.score[slots[:, None], keep] = score[:, -ring:].to(cache.score.dtype)


class CompressedIndexer(nn.Module):
    """V4's lightning indexer: its own overlapping compressor (width index_head_dim) makes one key per CSA entry;
    queries come from the attention's query latent c_Q, head weights from x; the score and top-k are V3.2's
    (indexer.py). Selection is not differentiable; the language-model loss never reaches it. It learns only by
    the indexer KL loss (CompressedAttention.indexer_training), and stays frozen otherwise, so data-parallel
    training does not wait for gradients that never come (TransformerV4.set_indexer_training unfreezes it)."""

    def __init__(self, config: ModelConfig, rate: int) -> None:
        super().__init__()
        c = config
        self.n_heads, self.head_dim, self.topk = c.index_n_heads, c.index_head_dim, c.index_topk
        self.compressor = Compressor(c.hidden_size, self.head_dim, rate, overlap=True, eps=c.rms_norm_eps)
        self.q_b_proj = nn.Linear(c.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.weights_proj = nn.Linear(c.hidden_size, self.n_heads, bias=False)
        self.requires_grad_(False)

    def scores(self, x: torch.Tensor, c_q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Index scores I [B, T, T_c] (float32, differentiable; no masking) of queries x [B, T, hidden] with query
        latents c_q [B, T, q_r] against the entries of x's complete windows."""
        B, T, _ = x.shape
        keys = self.compressor(x, cos, sin)  # [B, T_c, d_I]
        q = apply_rope_tail(self.q_b_proj(c_q).view(B, T, self.n_heads, self.head_dim), cos, sin)
        return index_scores(q, keys, self.weights_proj(x))

    @torch.no_grad()
    def forward(
        self, x: torch.Tensor, c_q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, visible: torch.Tensor
    ) -> torch.Tensor:
        """[B, T, T_c] bool: the entries each query attends to, at most index_topk of the visible [T, T_c]."""
        return select_topk(self.scores(x, c_q, cos, sin), visible, self.topk)

    @torch.no_grad()
    def forward_cached(
        self,
        x: torch.Tensor,
        c_q: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        visible: torch.Tensor,
        cache: CompressorCache,
        slots: torch.Tensor,
        start: torch.Tensor,
        rope_at: RopeAt,
    ) -> torch.Tensor:
        """As forward for new tokens (positions start[n] + t), keys from the cache after adding the entries the
        new tokens complete: [N, T, T_c] bool of the visible [N, T, T_c]."""
        N, T, _ = x.shape
        self.compressor.forward_cached(x, start, cache, slots, rope_at)
        keys = cache.entries[slots, : visible.shape[-1]].to(x.dtype)  # [N, T_c, d_I]
        q = apply_rope_tail(self.q_b_proj(c_q).view(N, T, self.n_heads, self.head_dim), cos, sin)
        return select_topk(index_scores(q, keys, self.weights_proj(x)), visible, self.topk)


class CompressedAttention(nn.Module):
    """One V4 attention layer of any of the three types (sliding_attention, CSA, HCA)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.n_heads, self.head_dim, self.window = c.num_attention_heads, c.head_dim, c.sliding_window
        self.o_groups, self.o_lora_rank, self.eps = c.o_groups, c.o_lora_rank, c.rms_norm_eps
        self.rate = c.compress_rate(layer_idx)
        H, d = c.hidden_size, c.head_dim
        self.q_a_proj = nn.Linear(H, c.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
        self.q_b_proj = nn.Linear(c.q_lora_rank, self.n_heads * d, bias=False)
        self.kv_proj = nn.Linear(H, d, bias=False)
        self.kv_norm = RMSNorm(d, c.rms_norm_eps)
        # group g maps heads [g n_h/G, (g+1) n_h/G) with rows [g r_o, (g+1) r_o) of this weight
        self.o_a_proj = nn.Linear(self.n_heads * d // c.o_groups, c.o_groups * c.o_lora_rank, bias=False)
        self.o_b_proj = nn.Linear(c.o_groups * c.o_lora_rank, H, bias=False)
        self.sinks = nn.Parameter(torch.zeros(self.n_heads))
        is_csa = c.attention_type(layer_idx) == CSA
        self.compressor = Compressor(H, d, self.rate, is_csa, c.rms_norm_eps) if self.rate else None
        self.indexer = CompressedIndexer(c, self.rate) if is_csa else None
        self.indexer_training: str | None = None  # None | "dense" (warm-up) | "sparse": compute indexer_loss
        self.indexer_loss: torch.Tensor | None = None  # of the last forward with gradients, when indexer_training

    def _project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Query latent c_Q [B, T, q_r], roped queries [B, T, n_h, d] and the roped key = value [B, T, d]."""
        B, T, _ = x.shape
        c_q = self.q_a_norm(self.q_a_proj(x))
        q = self.q_b_proj(c_q).view(B, T, self.n_heads, self.head_dim)
        q = apply_rope_tail(F.rms_norm(q.float(), (self.head_dim,), None, self.eps).to(x.dtype), cos, sin)
        kv = apply_rope_tail(self.kv_norm(self.kv_proj(x)).unsqueeze(2), cos, sin).squeeze(2)
        return c_q, q, kv

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Causal attention over x [B, T, hidden]; cos/sin [T, 1, d_R/2] from this layer's rope set."""
        B, T, _ = x.shape
        c_q, q, kv = self._project(x, cos, sin)
        pos = torch.arange(T, device=x.device)
        visible = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - self.window)  # [T, T]
        visible = visible.expand(B, T, T)
        self.indexer_loss = scores = None
        if self.compressor is not None:
            entries = self.compressor(x, cos, sin)  # [B, T_c, d]
            ready = torch.arange(entries.shape[1], device=x.device) < ((pos + 1) // self.rate)[:, None]  # [T, T_c]
            if self.indexer is not None and self.indexer_training is not None and torch.is_grad_enabled():
                # detached inputs: the indexer learns from its KL loss alone, the rest never from it
                scores = self.indexer.scores(x.detach(), c_q.detach(), cos, sin)
                if self.indexer_training == "sparse":
                    ready = select_topk(scores.detach(), ready, self.indexer.topk)
            elif self.indexer is not None and self.indexer_training != "dense":
                ready = self.indexer(x, c_q, cos, sin, ready)
            kv = torch.cat((kv, entries), dim=1)
            visible = torch.cat((visible, ready.expand(B, *ready.shape[-2:])), dim=-1)  # [B, T, T + T_c]
        out, p = self._attend(q, kv, visible, cos, sin)
        if scores is not None:
            self.indexer_loss = compressed_indexer_kl(p[..., T:], scores, visible[..., T:])
        return out

    def forward_cached(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        rope_at: RopeAt,
        cache: LayerCacheV4,
        slots: torch.Tensor,
        start: torch.Tensor,
    ) -> torch.Tensor:
        """Attention for new tokens x [N, T, hidden] of the sequences in cache rows `slots`, row n at positions
        start[n] .. start[n] + T - 1 (cos/sin [N, T, 1, d_R/2]; rope_at: this layer's rope at any positions).
        Updates the cache in place: the entries the new tokens complete first (later new tokens attend to
        them), the window ring last (the new tokens read the keys before them)."""
        N, T, _ = x.shape
        c_q, q, kv = self._project(x, cos, sin)
        ring = cache.window.shape[1]
        pos = start[:, None] + torch.arange(T, device=x.device)  # [N, T]
        # ring row j holds the latest position < start that is j mod ring (negative: never written)
        past = start[:, None] - 1 - (start[:, None] - 1 - torch.arange(ring, device=x.device)) % ring  # [N, ring]
        seen = (past[:, None] >= 0) & (past[:, None] > pos[..., None] - self.window)  # [N, T, ring]
        t = torch.arange(T, device=x.device)
        causal = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - self.window)  # [T, T]
        keys = torch.cat((cache.window[slots].to(kv.dtype), kv), dim=1)  # [N, ring + T, d]
        visible = torch.cat((seen, causal.expand(N, T, T)), dim=-1)
        if self.compressor is not None:
            self.compressor.forward_cached(x, start, cache.compressor, slots, rope_at)
            n_entries = int(((start + T) // self.rate).max())
            ready = torch.arange(n_entries, device=x.device) < ((pos + 1) // self.rate)[..., None]  # [N, T, T_c]
            if self.indexer is not None:
                ready = self.indexer.forward_cached(x, c_q, cos, sin, ready, cache.indexer, slots, start, rope_at)
            keys = torch.cat((keys, cache.compressor.entries[slots, :n_entries].to(kv.dtype)), dim=1)
            visible = torch.cat((visible, ready), dim=-1)
        out, _ = self._attend(q, keys, visible, cos, sin)
        cache.window[slots[:, None], pos[:, -ring:] % ring] = kv[:, -ring:].to(cache.window.dtype)
        if cache.tape is not None:
            cache.tape.append(kv.to(cache.window.dtype))
        return out

    def _attend(
        self, q: torch.Tensor, kv: torch.Tensor, visible: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sink softmax of queries q [B, T, n_h, d] over keys = values kv [B, S, d] where visible [B, T, S], the
        de-rotation and the grouped output projection: ([B, T, hidden], the probabilities [B, n_h, T, S])."""
        B, T, H, d = q.shape
        # one GEMM over all (token, head) rows: kv is shared by the heads, and this [B, T, H, S] layout is the
        # output's, so nothing is transposed or copied per head
        scores = (q.reshape(B, T * H, d) @ kv.mT).view(B, T, H, -1) * self.head_dim**-0.5  # [B, T, H, S]
        scores.masked_fill_(~visible.unsqueeze(2), float("-inf"))
        sinks = self.sinks.view(1, 1, -1, 1).expand(B, T, -1, 1).to(scores.dtype)
        p = torch.cat((scores, sinks), dim=-1).softmax(dim=-1, dtype=torch.float32)[..., :-1]  # the sink has no value
        o = (p.to(kv.dtype).flatten(1, 2) @ kv).view(B, T, H, d)  # p's rows keep their stride: no copy
        o = apply_rope_tail(o, cos, -sin)  # undo the values' rotation at the query's position
        o = o.reshape(B, T, self.o_groups, -1)  # heads stay contiguous within a group
        w = self.o_a_proj.weight.view(self.o_groups, self.o_lora_rank, -1)  # [G, r_o, n_h d / G]
        o = torch.einsum("btgi,goi->btgo", o, w).flatten(2)  # [B, T, G r_o]
        return self.o_b_proj(o), p.transpose(1, 2)


def compressed_indexer_kl(p: torch.Tensor, scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """V3.2's indexer loss over V4's compressed entries: the target is the attention's probability of each allowed
    entry [B, T, T_c] (every visible one in the dense warm-up, the selected ones in sparse training) summed over
    heads p [B, n_h, T, T_c] and L1-normalised, i.e. conditioned on attending to an entry at all (the softmax is
    joint over window, entries and sink). The mean is over the queries that see an entry (early ones see none)."""
    has = allowed.any(dim=-1)  # [B, T]
    if not has.any():
        return scores.sum() * 0.0  # no complete window yet: a zero that still reaches the indexer's graph
    with torch.no_grad():
        target = p.sum(dim=1).masked_fill(~allowed, 0.0)
        target = target / target.sum(dim=-1, keepdim=True).clamp(min=1e-30)
    return indexer_kl(target[has], scores[has], allowed[has])
