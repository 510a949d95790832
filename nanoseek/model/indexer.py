"""The lightning indexer of DeepSeek Sparse Attention (DeepSeek-V3.2 report, sec. 2.1, eq. 1-2).

For a query token t and a key token s <= t it scores
    I_{t,s} = sum_j w_{t,j} * ReLU(q^I_{t,j} . k^I_s)                                  (eq. 1)
with n_I cheap heads: q^I_t = wq_b(c_Q,t) (c_Q is MLA's query latent), one key per token shared by the heads,
k^I_s = k_norm(wk(h_s)) (a LayerNorm with bias), and head weights w_t = weights_proj(h_t). RoPE, half-split pairing
(unlike MLA's interleaved one), turns the first qk_rope_head_dim dims of q^I and k^I. Constants as transformers
writes them: q.k times d_I^-1/2, w times n_I^-1/2 (DeepSeek folds both into w; the ranking is the same).
MLA then attends, for query t, only to the index_topk keys with the largest I_{t,s} (eq. 2), the same keys for
every head; with index_topk or fewer visible keys that is plain causal attention.

Not done here, as in transformers: DeepSeek's Hadamard rotation and FP8 quantisation of q^I and k^I before
scoring (the rotation is orthogonal, the quantisation is a kernel's precision choice).
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.rope import apply_rope_half


class Indexer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.n_heads, self.head_dim, self.topk = c.index_n_heads, c.index_head_dim, c.index_topk
        self.rope_dim = c.qk_rope_head_dim
        self.wq_b = nn.Linear(c.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(c.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)  # eps fixed by DeepSeek, not rms_norm_eps
        self.weights_proj = nn.Linear(c.hidden_size, self.n_heads, bias=False)

    def _rope(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on the leading rope_dim dims of t [..., T, heads, d_I]: the layout is [rope | nope]."""
        rot, rest = t.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat((apply_rope_half(rot, cos, sin), rest), dim=-1)

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """k^I [B, T, d_I] for layer inputs x [B, T, d] (roped: what a decode cache keeps per token)."""
        return self._rope(self.k_norm(self.wk(x)).unsqueeze(2), cos, sin).squeeze(2)

    def scores(
        self, x: torch.Tensor, c_q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor
    ) -> torch.Tensor:
        """Index scores I [B, Tq, S] (eq. 1, float32) of queries x [B, Tq, d] (query latents c_q [B, Tq, q_r],
        rope at their positions) against keys [B, S, d_I]. Differentiable, for an indexer loss; no masking."""
        B, T, _ = x.shape
        q = self._rope(self.wq_b(c_q).view(B, T, self.n_heads, self.head_dim), cos, sin)
        return index_scores(q, keys, self.weights_proj(x))

    def select(self, scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """[B, Tq, S] bool: the (at most) topk visible keys of largest score per query (eq. 2); visible
        [B or 1, Tq, S] is the causal (and cache-length) mask, so no future key is ever chosen."""
        return select_topk(scores, visible, self.topk)


def index_scores(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Eq. 1 in float32: I [B, Tq, S] = sum_j w_j n_I^-1/2 ReLU(q_j . k_s) d_I^-1/2 for roped queries q
    [B, Tq, n_I, d_I], keys [B, S, d_I] and head weights [B, Tq, n_I]. Shared with V4's indexer, whose keys
    are compressed entries (compressed_attention.py)."""
    B, T, n_heads, head_dim = q.shape
    dots = torch.matmul(q.float().reshape(B, T * n_heads, -1), keys.float().mT)  # [B, Tq*n_I, S]
    dots = dots.view(B, T, n_heads, -1).relu() * head_dim**-0.5
    w = weights.float() * n_heads**-0.5  # [B, Tq, n_I]
    return torch.matmul(w.unsqueeze(-2), dots).squeeze(-2)


def indexer_kl(target: torch.Tensor, scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The V3.2 indexer loss (report sec. 2.1.1): mean over queries of KL(p_t || softmax(I_t)) over the allowed
    keys [B, T, S] (causal in the dense warm-up, the selected top-k in sparse training), where the target p_t
    [B, T, S] is the main attention summed over heads and L1-normalised (no gradient) and I the index scores."""
    log_q = scores.masked_fill(~allowed, float("-inf")).log_softmax(dim=-1)
    log_p = target.clamp(min=1e-30).log()
    return (target * (log_p - log_q)).masked_fill(~allowed, 0.0).sum(dim=-1).mean()


def select_topk(scores: torch.Tensor, visible: torch.Tensor, topk: int) -> torch.Tensor:
    """Eq. 2: [B, Tq, S] bool, the (at most) topk visible keys of largest score per query; visible
    [B or 1, Tq, S] is the causal mask, so no future key is ever chosen.

    Equal scores go to the earliest key (a stable sort). ReLU makes exact ties common (every head's dot
    product negative gives 0.0), and `topk` breaks them by its algorithm and the row's length, so a decode
    step (S = t + 1 keys) and a full forward (S = T) would pick different keys; earliest-first picks the
    same ones at any length, batch or device. transformers' plain `topk` agrees wherever the k-th and
    (k+1)-th scores differ, which is where a reference exists at all (spec P9)."""
    k = min(topk, scores.shape[-1])
    masked = scores.masked_fill(~visible, float("-inf"))
    picks = masked.sort(dim=-1, descending=True, stable=True).indices[..., :k]
    chosen = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, picks, True)
    return chosen & visible
