"""DeepSeekMoE (V3 report, sec. 2.1.2): shared experts + fine-grained routed experts.

    s = sigmoid(u W_g)  (softmax for V2, sqrt(softplus) for V4);   selection uses s + b (b = e_score_correction_bias,
    not learned); V4's first layers ("hash_moe") pick experts by a frozen table of the token id instead, tid2eid
    groups: keep topk_group of n_group groups by the sum of each group's top-2 (max for V2's group_limited_greedy)
    g = s[top-k] / sum (if norm_topk_prob) * routed_scaling_factor  -- weights from the *unbiased* scores
    y = shared(u) + sum_k g_k expert_k(u)
    V4 clamps the experts' pre-activations: SiLU(min(gate, limit)) * clamp(up, -limit, limit)

Routed experts run as one grouped GEMM over tokens sorted by expert (decoding a few tokens: their experts'
weights gathered into one batched GEMM; torch.compile'd decoding: every expert densely, fixed shapes; the
exported fast path: each (token, expert) pair's product reads its expert's weights in place, or, for larger
matrices, every expert's rows in one padded batch). The bias is
balanced without an auxiliary loss (eq. 16): after each step b += gamma * sign(mean_load - load); `last_load`
holds the counts (every forward but compiled inference). `MoE.experts` is the seam for expert parallelism:
nanoseek/distributed/expert_parallel.py swaps in a module with the same call that sends rows to the ranks owning
their experts; this file knows nothing of torch.distributed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """silu(gate) * up; with a limit (V4) the gate is clamped from above and up to [-limit, limit] first."""
    if limit is not None:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return F.silu(gate) * up


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Dense layers and shared experts."""

    def __init__(self, dim: int, inter_dim: int, limit: float | None = None) -> None:
        super().__init__()
        self.limit = limit
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), self.limit))


class Gate(nn.Module):
    """Router: top-k expert indices and their weights per token. hash_routed (V4's "hash_moe" layers): the experts
    are tid2eid[token id], a frozen table, and only their weights come from the learned scores."""

    def __init__(self, config: ModelConfig, hash_routed: bool = False) -> None:
        super().__init__()
        c = config
        self.top_k, self.n_experts = c.num_experts_per_tok, c.n_routed_experts
        self.n_group, self.topk_group = c.n_group, c.topk_group
        self.scoring_func, self.topk_method = c.scoring_func, c.topk_method
        # V4 always renormalises the K weights (transformers ignores norm_topk_prob there)
        self.norm_topk_prob, self.routed_scaling_factor = c.norm_topk_prob or c.is_v4, c.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(c.n_routed_experts, c.hidden_size))
        if hash_routed:
            self.register_buffer("e_score_correction_bias", None)
            self.register_buffer("tid2eid", torch.zeros(c.vocab_size, c.num_experts_per_tok, dtype=torch.long))
        else:  # fp32 always: a low-precision bias changes which experts are chosen
            self.register_buffer("e_score_correction_bias", torch.zeros(c.n_routed_experts, dtype=torch.float32))
            self.tid2eid = None

    def forward(
        self, x: torch.Tensor, input_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, d] (token ids [N] for hash routing) -> (weights [N, K] fp32, indices [N, K], scores [N, E] fp32)."""
        logits = F.linear(x.float(), self.weight.float())
        if self.scoring_func == "sigmoid":
            scores = logits.sigmoid()
        elif self.scoring_func == "sqrtsoftplus":  # V4
            scores = F.softplus(logits).sqrt()
        else:
            scores = logits.softmax(dim=-1)
        if self.tid2eid is not None:
            if input_ids is None:
                raise ValueError("a hash-routed MoE layer picks experts by token id: pass input_ids")
            indices = self.tid2eid[input_ids]
            return self._weights(scores, indices), indices, scores
        choice = scores + self.e_score_correction_bias if self.topk_method == "noaux_tc" else scores
        if self.n_group > 1 and self.topk_group < self.n_group:
            grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
            if self.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            # -inf (not 0): a biased score can be negative and must still lose to every kept expert
            choice = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).view(-1, self.n_experts)
        indices = choice.detach().topk(self.top_k, dim=-1).indices
        return self._weights(scores, indices), indices, scores

    def _weights(self, scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor


def hash_table(vocab_size: int, n_experts: int, top_k: int, seed: int) -> torch.Tensor:
    """A fresh tid2eid [V, K] for training from scratch: K distinct experts per token id, drawn once (seeded) and
    then frozen. DeepSeek's hash is not published; its checkpoints carry the table."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(vocab_size, n_experts, generator=generator).topk(top_k, dim=-1).indices


class Experts(nn.Module):
    """All routed experts' SwiGLU weights stacked: w13 [E, d, 2I] (gate | up), w2 [E, I, d]."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int, limit: float | None = None) -> None:
        super().__init__()
        self.inter_dim, self.limit = inter_dim, limit
        self.w13 = nn.Parameter(torch.empty(n_experts, dim, 2 * inter_dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x_sorted [M, d], rows grouped by expert with `counts` [E] rows each -> [M, d]."""
        if torch.compiler.is_compiling():  # grouped_mm has no fp32 meta kernel: run this part eagerly
            return _grouped_eager(self, x_sorted, counts)
        return self._grouped(x_sorted, counts)

    def gathered(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Few tokens (decoding): gather each token's K experts' weights and batch the GEMMs. x [N, d],
        indices [N, K] -> [N, K, d]. Costs N*K weight copies, so only for small N."""
        h = x[:, None, None, :] @ self.w13[indices]  # [N, K, 1, 2I]
        gate, up = h.split(self.inter_dim, dim=-1)
        return (swiglu(gate, up, self.limit) @ self.w2[indices]).squeeze(2)

    def selected(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """One token on the CPU (batch-1 decoding): its K experts' weights read in place, as views, with no copy
        (`gathered` copies them: 3*d*I floats per expert, the step's largest cost on a wider model). x [1, d],
        indices [1, K] -> [1, K, d]. The expert ids are read as ints, a sync a CUDA step must not make.

        Where the module also holds `w13_t` [E, 2I, d] and `w2_t` [E, d, I] (the same weights laid out [out, in],
        as nn.Linear's are: only the fast path's graphs have them, fed from copies the engine keeps), those
        are read instead: a matrix-vector product over contiguous rows streams the weights faster."""
        E, out = self.w13.shape[0], []
        out_in = hasattr(self, "w13_t")
        for k in range(indices.shape[1]):
            e = indices[0, k].item()
            torch._check(e >= 0)  # an unbacked int under torch.export: bound it so the views are valid
            torch._check(e < E)
            if out_in:
                gate, up = F.linear(x, self.w13_t[e]).split(self.inter_dim, dim=-1)
                out.append(F.linear(swiglu(gate, up, self.limit), self.w2_t[e]))
            else:
                gate, up = (x @ self.w13[e]).split(self.inter_dim, dim=-1)
                out.append(swiglu(gate, up, self.limit) @ self.w2[e])
        return torch.stack(out, dim=1)

    def pairs(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """A few tokens under torch.export (the fast path's graph), from `w13_t` / `w2_t` ([out, in] copies): one
        multiply-and-sum per (token, expert) pair that reads its expert's rows in place (inductor fuses the
        indexing into the loads), pairs sorted by expert so an expert's weights stay in cache between its pairs.
        Routing's exact FLOPs, no padding, no BLAS call (whose packing of the weights costs more than the product
        at a few rows) and no weight copies. Eagerly `w13_t[expert]` would be a copy: export only.
        x [N, d], indices [N, K] -> [N, K, d]."""
        K = indices.shape[1]
        expert, order = indices.flatten().sort(stable=True)  # pairs grouped by expert
        xs = x[order // K]  # [N*K, d]
        gate, up = (xs[:, None, :] * self.w13_t[expert]).sum(-1).split(self.inter_dim, dim=-1)
        y = (swiglu(gate, up, self.limit)[:, None, :] * self.w2_t[expert]).sum(-1)  # [N*K, d], sorted
        return torch.empty_like(y).index_copy_(0, order, y).view(*indices.shape, -1)

    def padded(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Each expert's rows in one zero-padded batch as long as the busiest expert's: one batched GEMM over the
        experts, routing's FLOPs (plus the padding) and no copies of weights. The batch length is data-dependent,
        so this is for torch.export (the fast path's graph), where `dense` would do E/K times the work.
        x [N, d], indices [N, K] -> [N, K, d]."""
        N, K = indices.shape
        E, I = self.w13.shape[0], self.inter_dim
        expert = indices.flatten()  # [N*K]
        onehot = F.one_hot(expert, E)
        rank = ((onehot.cumsum(0) - 1) * onehot).sum(1)  # each (token, k)'s place in its expert's rows
        rows = onehot.sum(0).max().clamp(min=2).item()  # >= 2: a length of 1 would be a special case to lower
        torch._check(rows >= 2)
        torch._check(rows <= max(2, N * K))
        xp = x.new_zeros(E, rows, x.shape[1]).index_put_((expert, rank), x.repeat_interleave(K, dim=0))
        gate, up = torch.bmm(xp, self.w13).split(I, dim=-1)
        y = torch.bmm(swiglu(gate, up, self.limit), self.w2)  # [E, rows, d]
        return y[expert, rank].view(N, K, -1)

    def dense(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, combined with weights [N, E] (0 for unselected experts): E/K times the
        FLOPs of routing but fixed shapes and no sorting, for compiled decoding of a few tokens. x [N, d] -> [N, d]."""
        E, N, I = self.w13.shape[0], x.shape[0], self.inter_dim
        gate, up = torch.matmul(x, self.w13).split(I, dim=-1)  # [E, N, I] each
        h = swiglu(gate, up, self.limit) * weights.T.unsqueeze(-1)  # routing weights before the down projection
        return h.transpose(0, 1).reshape(N, E * I) @ self.w2.view(E * I, -1)  # sum over experts in one GEMM

    def _grouped(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return grouped_swiglu(x_sorted, counts, self.w13, self.w2, self.limit)


def grouped_swiglu(
    x_sorted: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, limit: float | None = None
) -> torch.Tensor:
    """SwiGLU experts as one grouped GEMM: x_sorted [M, d] grouped by expert (counts [E] rows each), w13 [E, d, 2I],
    w2 [E, I, d] -> [M, d]. Shared by the local experts and the expert-parallel shard of them."""
    inter_dim = w2.shape[1]
    if _HAS_GROUPED_MM and x_sorted.dtype in (torch.float32, torch.bfloat16):
        offs = counts.cumsum(0).to(torch.int32)
        h = F.grouped_mm(x_sorted, w13, offs=offs)
        gate, up = h.split(inter_dim, dim=-1)
        return F.grouped_mm(swiglu(gate, up, limit), w2, offs=offs)
    out, start = [], 0  # fallback for torch < 2.9 or other dtypes: one GEMM per expert
    for e, n in enumerate(counts.tolist()):
        gate, up = (x_sorted[start : start + n] @ w13[e]).split(inter_dim, dim=-1)
        out.append(swiglu(gate, up, limit) @ w2[e])
        start += n
    return torch.cat(out) if out else x_sorted.new_zeros(0, w2.shape[2])


@torch.compiler.disable
def _grouped_eager(experts: Experts, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return experts._grouped(x_sorted, counts)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int | None = None) -> None:
        super().__init__()
        c = config
        self.top_k, self.n_experts = c.num_experts_per_tok, c.n_routed_experts
        self.aux_loss_alpha = c.aux_loss_alpha
        self.hash_routed = c.is_v4 and layer_idx is not None and c.mlp_layer_type(layer_idx) == "hash_moe"
        self.gate = Gate(c, hash_routed=self.hash_routed)
        limit = c.swiglu_limit if c.is_v4 else None
        self.experts = Experts(c.n_routed_experts, c.hidden_size, c.moe_intermediate_size, limit)
        self.shared_experts = (
            MLP(c.hidden_size, c.n_shared_experts * c.moe_intermediate_size, limit) if c.n_shared_experts else None
        )
        # decoding a few tokens: gathering their experts' weights beats sorting (weights copied N*K times)
        self.gather_max_tokens = max(1, 2**18 // (3 * c.hidden_size * c.moe_intermediate_size * c.num_experts_per_tok))
        self.last_load: torch.Tensor | None = None  # tokens per expert in the last forward [E]
        self.aux_loss: torch.Tensor | None = None  # sequence-wise balance loss of the last training forward

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, d] -> [B, T, d]; input_ids [B, T] are needed by hash-routed layers only."""
        B, T, d = x.shape
        flat = x.reshape(-1, d)
        weights, indices, scores = self.gate(flat, None if input_ids is None else input_ids.reshape(-1))  # [N, K]
        expert_of = indices.flatten()  # [N*K]
        inference = not torch.is_grad_enabled()
        load = None  # tokens per expert; compiled decoding never reads them: no scatter there
        if not (inference and torch.compiler.is_compiling()):
            load = self.last_load = expert_of.new_zeros(self.n_experts).index_add_(
                0, expert_of, torch.ones_like(expert_of)
            )
        if inference and flat.shape[0] == 1 and self._select_in_place(flat):
            y = self.experts.selected(flat, indices)  # [1, K, d]
        elif inference and flat.shape[0] <= self.gather_max_tokens:
            y = self.experts.gathered(flat, indices)  # [N, K, d]
        elif inference and self._select_in_place(flat) and torch.compiler.is_compiling():  # torch.export (fast path)
            in_place = hasattr(self.experts, "w13_t")  # [out, in] copies: see Experts.pairs
            y = self.experts.pairs(flat, indices) if in_place else self.experts.padded(flat, indices)  # [N, K, d]
        elif inference and torch.compiler.is_compiling() and flat.dtype == torch.float32:
            # torch.compile: grouped_mm has no fp32 compile kernel; run all experts with fixed shapes
            dense_w = weights.new_zeros(flat.shape[0], self.n_experts).scatter_(1, indices, weights)
            y = self.experts.dense(flat, dense_w.to(x.dtype))
            if self.shared_experts is not None:
                y = y + self.shared_experts(flat)
            return y.view(B, T, d)
        else:
            order = expert_of.argsort(stable=True)
            counts = load if load is not None else expert_of.bincount(minlength=self.n_experts)
            y_sorted = self.experts(flat.index_select(0, order // self.top_k), counts)  # grouped by expert
            y = torch.empty_like(y_sorted).index_copy_(0, order, y_sorted).view(-1, self.top_k, d)  # (token, k)
        y = (y * weights.to(x.dtype).unsqueeze(-1)).sum(1).view(B, T, d)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        if self.training and self.aux_loss_alpha > 0 and not self.hash_routed:  # hash routing: balance is fixed
            self.aux_loss = self.sequence_aux_loss(scores.view(B, T, -1), indices.view(B, T, -1))
        return y

    def _select_in_place(self, x: torch.Tensor) -> bool:
        """Whether one token's experts can be read as views (`Experts.selected`): on the CPU, eagerly or under
        torch.export (the fast path's graph), not under dynamo (`.item()` would break the compiled graph)."""
        return x.device.type == "cpu" and isinstance(self.experts, Experts) and not torch.compiler.is_dynamo_compiling()

    def sequence_aux_loss(self, scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """V3 eq. 17-20: alpha * sum_i f_i P_i per sequence, averaged over the batch."""
        B, T, E = scores.shape
        selected = torch.zeros(B, T, E, device=scores.device).scatter_(2, indices, 1.0)
        f = selected.sum(1) * (E / (self.top_k * T))  # [B, E]
        p = (scores / scores.sum(-1, keepdim=True)).mean(1)  # [B, E]
        return self.aux_loss_alpha * (f * p).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, gamma: float) -> None:
        """Auxiliary-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded ones."""
        if self.hash_routed:  # the token-id table decides, there is no bias
            return
        load = load.float()
        self.gate.e_score_correction_bias += gamma * torch.sign(load.mean() - load)
