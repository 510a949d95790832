"""Multi-head Latent Attention (DeepSeek-V2 report, sec. 2.1; V3 report eq. 1-11).

    c_Q = q_a_layernorm(q_a_proj(h))                    (or q = q_proj(h) when q_lora_rank is None)
    [q_nope; q_pe] = q_b_proj(c_Q)                      per head: qk_nope_head_dim + qk_rope_head_dim
    [c_KV; k_pe] = kv_a_proj_with_mqa(h)                c_KV is the kv_lora_rank latent, k_pe one shared head
    c_KV = kv_a_layernorm(c_KV);  [k_nope; v] = kv_b_proj(c_KV)
    o = softmax((q_nope.k_nope + rope(q_pe).rope(k_pe)) * scale) v;   out = o_proj(o)

Training uses this expanded form (one SDPA call). With a cache, only [c_KV | rope(k_pe)] is stored per token
and `forward_cached`, for decoding, uses the absorbed form: kv_b_proj's key half is folded into the query and
its value half into the output, so attention runs over the latents directly.

DeepSeek-V3.2 (config.sparse_attention): a lightning indexer (indexer.py) picks index_topk keys per query and
the others are masked out; its keys are cached after the latent: [c_KV | rope(k_pe) | k^I]. Training the indexer
(`indexer_training`, set by the trainer): "dense" attends densely and fits the indexer to the attention by KL (the
report's warm-up), "sparse" keeps the top-k and fits it on the selected keys; the loss lands in `indexer_loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.indexer import Indexer, indexer_kl
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import apply_rope


class MLA(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.n_heads = c.num_attention_heads
        self.q_lora_rank, self.kv_lora_rank = c.q_lora_rank, c.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = (
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.v_head_dim,
        )
        self.qk_head_dim = c.qk_head_dim
        self.softmax_scale = c.softmax_scale
        bias = c.attention_bias
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
            self.q_b_proj = nn.Linear(c.q_lora_rank, self.n_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, self.n_heads * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * c.v_head_dim, c.hidden_size, bias=bias)
        self.indexer = Indexer(c) if c.sparse_attention else None
        self.indexer_training: str | None = None  # None | "dense" (warm-up) | "sparse": compute indexer_loss
        self.indexer_loss: torch.Tensor | None = None  # of the last forward with gradients, when indexer_training

    def q_latent(self, x: torch.Tensor) -> torch.Tensor:
        """c_Q [B, T, q_r]: feeds q_b_proj and, in V3.2, the indexer's queries."""
        return self.q_a_layernorm(self.q_a_proj(x))

    def query(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, c_q: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q_nope [B, T, H, d_nope] and roped q_pe [B, T, H, d_R] (c_q: the query latent, if already made)."""
        B, T, _ = x.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_latent(x) if c_q is None else c_q)
        q_nope, q_pe = q.view(B, T, self.n_heads, self.qk_head_dim).split(
            [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1
        )
        return q_nope, apply_rope(q_pe, cos, sin)

    def latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the KV cache stores: normalised c_KV [B, T, d_c] and roped k_pe [B, T, d_R]."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin).squeeze(2)
        return self.kv_a_layernorm(c_kv), k_pe

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Causal self-attention over x [B, T, d]; cos/sin [T, 1, d_R/2] (or [B, T, 1, d_R/2])."""
        B, T, _ = x.shape
        c_q = None if self.q_lora_rank is None else self.q_latent(x)
        q_nope, q_pe = self.query(x, cos, sin, c_q)
        c_kv, k_pe = self.latent(x, cos, sin)
        mask = None  # None: plain causal
        if self.indexer is not None and T > self.indexer.topk and self.indexer_training != "dense":
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            mask = self._select(x, c_q, cos, sin, self.indexer.keys(x, cos, sin), causal).unsqueeze(1)
        kv = self.kv_b_proj(c_kv).view(B, T, self.n_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)  # [B, T, H, d_qk]
        k = torch.cat((k_nope, k_pe.unsqueeze(2).expand(B, T, self.n_heads, self.qk_rope_head_dim)), dim=-1)
        if self.v_head_dim < self.qk_head_dim:  # fused (flash) SDPA kernels want one head dim: pad v, slice o
            v = F.pad(v, (0, self.qk_head_dim - self.v_head_dim))
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.softmax_scale,
        )  # [B, H, T, d_qk or d_v]
        o = o[..., : self.v_head_dim].transpose(1, 2).reshape(B, T, self.n_heads * self.v_head_dim)
        self.indexer_loss = None
        if self.indexer_training is not None and self.indexer is not None and torch.is_grad_enabled():
            self.indexer_loss = self._indexer_loss(x, c_q, cos, sin, q, k, mask)
        return self.o_proj(o)

    def _indexer_loss(self, x, c_q, cos, sin, q, k, mask: torch.Tensor | None) -> torch.Tensor:
        """indexer_kl against this forward's attention (mask [B, 1, T, T] of selected keys, None: causal). Inputs
        are detached: the indexer learns only from this loss, the rest of the model only from the LM loss."""
        T = x.shape[1]
        causal = torch.ones(1, T, T, dtype=torch.bool, device=x.device).tril()
        allowed = causal if mask is None else mask.squeeze(1)  # [1 or B, T, T]
        with torch.no_grad():
            logits = (q.transpose(1, 2) @ k.permute(0, 2, 3, 1)) * self.softmax_scale  # [B, H, T, T]
            p = logits.masked_fill(~allowed.unsqueeze(1), float("-inf")).softmax(dim=-1, dtype=torch.float32)
            target = p.sum(dim=1)
            target = target / target.sum(dim=-1, keepdim=True)
        x, c_q = x.detach(), c_q.detach()
        scores = self.indexer.scores(x, c_q, cos, sin, self.indexer.keys(x, cos, sin))
        return indexer_kl(target, scores, allowed.expand_as(scores))

    def _select(self, x, c_q, cos, sin, keys: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """DSA: [B, Tq, S] keys each query attends to (top-k of the visible by index score). No gradient flows
        through a top-k choice; the indexer is trained by its own loss on `Indexer.scores` (V3.2 report 2.1.1)."""
        with torch.no_grad():
            return self.indexer.select(self.indexer.scores(x, c_q, cos, sin, keys), visible)

    def forward_cached(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        slots: torch.Tensor | None,
        start: torch.Tensor,
        cache_len: int,
        absorb: bool | None = None,
        query_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention for new tokens x [N, T, d] of N sequences whose past sits in rows `slots` of this layer's cache
        (None: rows 0..N-1, read in place without a gather).

        kv_cache [n_slots, max_len, W] holds [c_KV | rope(k_pe)] per position (W = config.latent_cache_width; V3.2
        appends the indexer key, whose top-k choice then masks the attention). Row n's new tokens are at
        positions start[n] .. start[n] + T - 1; they attend to cached positions < start[n] among the first
        cache_len (a fixed bound, so shapes never depend on tensor values: compiled decoding) and causally to
        each other. The cache is only read: returns (output [N, T, d], the new tokens' entries [N, T, W])
        for the caller to store (see `write_latents`). absorb (default: T <= 4 queries) picks the absorbed form,
        cheaper when few queries read a long prefix. query_rows [N] (absorbed form): every new token's entry is
        made but only new token query_rows[n] of row n is attended from; output [N, 1, d] (MTP drafting from
        the last kept position, or from a prompt's last token).
        """
        N, T, _ = x.shape
        entries = self.latent(x, cos, sin)
        if self.indexer is not None:
            entries += (self.indexer.keys(x, cos, sin),)
        new = torch.cat(entries, dim=-1)  # [N, T, W]
        if query_rows is not None:
            cos, sin = (c.expand(N, *c.shape[-3:]) for c in (cos, sin))  # [T, 1, d_R/2] -> [N, T, 1, d_R/2]
            x, cos, sin = (pick_rows(t, query_rows) for t in (x, cos, sin))
        Tq = x.shape[1]  # queries per row
        c_q = None if self.q_lora_rank is None else self.q_latent(x)
        q_nope, q_pe = self.query(x, cos, sin, c_q)  # [N, Tq, H, *]
        if slots is None:  # rows are cache rows 0..N-1: read the cache in place
            past = kv_cache[:N, :cache_len].to(x.dtype)
        else:
            past = kv_cache[:, :cache_len].index_select(0, slots).to(x.dtype)  # [N, cache_len, W]
        H, dn, dv, dc = self.n_heads, self.qk_nope_head_dim, self.v_head_dim, self.kv_lora_rank
        dl = dc + self.qk_rope_head_dim  # the MLA latent part of an entry
        selected = None  # V3.2 with more than index_topk keys: [N, Tq, cache_len + T] chosen and visible
        if self.indexer is not None and cache_len + T > self.indexer.topk:
            keys = torch.cat((past[..., dl:], new[..., dl:]), dim=1)  # [N, cache_len + T, d_I]
            selected = self._select(x, c_q, cos, sin, keys, _visible(start, cache_len, T, query_rows))
        past, new_kv = past[..., :dl], new[..., :dl]
        if absorb if absorb is not None else Tq <= 4:
            # k and v of every head come from the same latent (MQA over c_KV): fold heads into query rows.
            # Past and new keys are scored separately (no copy of the past), then share one softmax.
            w = self.kv_b_proj.weight.view(H, dn + dv, dc)
            q_lat = torch.bmm(q_nope.reshape(N * Tq, H, dn).transpose(0, 1), w[:, :dn])  # [H, N*Tq, d_c]: W_UK
            q_lat = q_lat.transpose(0, 1).reshape(N, Tq * H, dc)
            q = torch.cat((q_lat, q_pe.reshape(N, Tq * H, -1)), dim=-1)  # [N, Tq*H, d_c + d_R]
            scores = torch.cat((torch.bmm(q, past.mT), torch.bmm(q, new_kv.mT)), dim=-1)  # [N, Tq*H, S]
            scores = scores.mul_(self.softmax_scale).view(N, Tq, H, cache_len + T)
            visible = _visible(start, cache_len, T, query_rows) if selected is None else selected
            visible = visible.unsqueeze(2)  # [N, Tq, 1, cache_len + T]
            scores = scores.masked_fill_(~visible, float("-inf"))
            p = scores.softmax(dim=-1, dtype=torch.float32).to(x.dtype).view(N, Tq * H, cache_len + T)
            o_lat = torch.bmm(p[..., :cache_len], past[..., :dc]) + torch.bmm(p[..., cache_len:], new[..., :dc])
            o_lat = o_lat.view(N * Tq, H, dc).transpose(0, 1)  # [H, N*Tq, d_c]
            o = torch.bmm(o_lat, w[:, dn:].mT).transpose(0, 1)  # [N*Tq, H, d_v]: W_UV folded into the output
            return self.o_proj(o.reshape(N, Tq, H * dv)), new
        if query_rows is not None:
            raise ValueError("query_rows needs the absorbed form (absorb=None or True)")
        kv = torch.cat((past, new_kv), dim=1)  # [N, S, *]
        S = cache_len + T
        k_nope, v = self.kv_b_proj(kv[..., :dc]).view(N, S, H, dn + dv).split([dn, dv], dim=-1)
        k = torch.cat((k_nope, kv[..., dc:].unsqueeze(2).expand(N, S, H, self.qk_rope_head_dim)), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        if cache_len == 0 and selected is None:  # a fresh prefill: plain causal, the fused (flash) kernel; pad v
            v = F.pad(v, (0, self.qk_head_dim - dv)) if dv < self.qk_head_dim else v
            mask, causal = None, True
        else:
            mask, causal = (_visible(start, cache_len, T) if selected is None else selected).unsqueeze(1), False
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            is_causal=causal,
            scale=self.softmax_scale,
        )  # [N, H, T, d_v (padded)]
        return self.o_proj(o[..., :dv].transpose(1, 2).reshape(N, T, H * dv)), new


def _visible(start: torch.Tensor, cache_len: int, T: int, query_rows: torch.Tensor | None = None) -> torch.Tensor:
    """[N, Tq, cache_len + T]: which keys each query sees: cached positions j < start[n], new tokens causally
    (query t sees new tokens <= t; with query_rows, row n's one query is new token query_rows[n])."""
    N = start.shape[0]
    past = torch.arange(cache_len, device=start.device) < start[:, None]  # [N, cache_len]
    t = torch.arange(T, device=start.device)
    queries = t.expand(N, T) if query_rows is None else query_rows[:, None]  # [N, Tq]
    new = t <= queries.unsqueeze(-1)  # [N, Tq, T]
    return torch.cat((past.unsqueeze(1).expand(N, queries.shape[1], cache_len), new), dim=-1)


def pick_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """t [N, T, ...] -> [N, 1, ...]: position rows[n] of row n."""
    return t[torch.arange(t.shape[0], device=t.device), rows].unsqueeze(1)


def write_latents(kv_cache: torch.Tensor, slots: torch.Tensor, start: torch.Tensor, new: torch.Tensor) -> None:
    """Store new entries [..., N, T, W] at positions start[n] + t of rows `slots` of kv_cache [..., n_slots, L, W]."""
    T = new.shape[-2]
    pos = start.unsqueeze(1) + torch.arange(T, device=start.device)  # [N, T]
    kv_cache[..., slots.unsqueeze(1), pos, :] = new.to(kv_cache.dtype)
