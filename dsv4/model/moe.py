"""Mixture of experts (spec §3.7): sqrt-softplus gate, hash routing on the first layers, clamped SwiGLU.

NOTE: the gate's `bias` only decides WHICH experts are picked; the weights are the unbiased scores,
renormalised and multiplied by `route_scale`. Hash layers take the experts from `tid2eid[token_id]`.
The SwiGLU clamp (up to [-limit, limit], gate <= limit) applies to routed AND shared experts, and a routed
expert's weight multiplies its hidden activation before w2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv4 import ops
from dsv4.dist import SINGLE
from dsv4.model.pairs import paired
from dsv4.model.primitives import Linear
from dsv4.ops import fp4_layout
from dsv4.ops.grouped_linear import korder_pays
from dsv4.ops.korder import to_korder
from dsv4.ops.moe_pairs import DECODE_KERNEL_MAX_TOKENS
from dsv4.ops.ref import widen
from dsv4.ops.registry import env_switch
from dsv4.parity.taps import tap


class Gate(nn.Module):
    def __init__(self, cfg, layer_id: int):
        super().__init__()
        self.topk, self.score_func, self.route_scale = cfg.n_activated_experts, cfg.score_func, cfg.route_scale
        self.hash = cfg.is_hash_layer(layer_id)
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim, dtype=torch.float32))
        if self.hash:
            self.tid2eid = nn.Parameter(torch.empty(cfg.vocab_size, self.topk, dtype=torch.int64), requires_grad=False)
        else:
            self.bias = nn.Parameter(torch.empty(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D], input_ids [N] -> (weights [N, k] fp32, expert ids [N, k])."""
        scores = ops.widened_dense(x, self.weight)
        if self.score_func == "softmax":
            scores = scores.softmax(dim=-1)
        elif self.score_func == "sigmoid":
            scores = scores.sigmoid()
        else:
            scores = F.softplus(scores).sqrt()
        if self.hash:
            ids = self.tid2eid[input_ids]
        else:
            ids = (scores + self.bias).topk(self.topk, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.score_func != "softmax":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.route_scale, ids


class Expert(nn.Module):
    """SwiGLU FFN w2(silu(w1 x) * (w3 x)) with the clamp; fp32 activation math."""

    def __init__(self, dim: int, inter_dim: int, fmt: str, dtype: torch.dtype, swiglu_limit: float):
        super().__init__()
        self.w1 = Linear(dim, inter_dim, fmt, dtype)
        self.w2 = Linear(inter_dim, dim, fmt, dtype)
        self.w3 = Linear(dim, inter_dim, fmt, dtype)
        self.swiglu_limit = swiglu_limit

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        gate, up = paired(self.w1, self.w3, x)
        return self.w2(self.hidden(widen(gate), widen(up), weights).to(x.dtype))

    def hidden(self, gate: torch.Tensor, up: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """Clamped SwiGLU in fp32, times the routing weight (before w2)."""
        if self.swiglu_limit > 0:
            up = up.clamp(-self.swiglu_limit, self.swiglu_limit)
            gate = gate.clamp(max=self.swiglu_limit)
        h = F.silu(gate) * up
        return h if weights is None else weights * h


def expert_counts(ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens per expert [n_experts] (int64) of expert ids (any shape): `torch.bincount`'s result without its host
    sync (on CUDA bincount reads the ids' min and max on the host to size its output)."""
    flat = ids.flatten().long()
    return torch.zeros(n_experts, dtype=torch.long, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))


class MoE(nn.Module):
    # Steps with at most this many (token, expert) pairs take the pair path on CUDA: fixed shapes and no host
    # synchronisation, so decode steps can be captured in CUDA graphs. Larger steps (prefill) take the sorted path
    # (FP4 experts), else the grouped GEMM over bf16 copies, else loop over the used experts.
    PAIR_PATH_MAX_PAIRS = 1024
    # The shared expert's w1 / w3 read one input: packed into one buffer on CUDA where FP8 (`model/pairs.py`). Not
    # the routed experts': their stacks (`stacked_experts`) hold them.
    PAIRS = (("shared_experts.w1", "shared_experts.w3"),)
    # From this many pairs, FP4 experts take the sorted path (grouped GEMM: each touched expert read about once per
    # 16-row block) instead of one GEMV per pair (each expert read once per pair); below it the GEMV wins.
    SORTED_PATH_MIN_PAIRS = 64
    # Training with at most this many experts batches them (`routed_batched`): it stacks every expert's weights,
    # kept for the backward, and pads each group to the largest. Cheap for a few small experts (the built-in
    # model's 6: 5 MB a layer); for hundreds (Flash: 256) a copy of the layer's experts, so they loop.
    BATCHED_MAX_EXPERTS = 16
    # `routed_batched` pads every group to all rows without reading the counts (always so under CUDA-graph capture;
    # the tests set it to compare the two widths on a CPU)
    PAD_GROUPS_TO_ALL_ROWS = False

    def __init__(self, cfg, layer_id: int, dense_fmt: str, expert_fmt: str, dtype: torch.dtype):
        super().__init__()
        self.dim, self.n_experts, self.expert_fmt = cfg.dim, cfg.n_routed_experts, expert_fmt
        self.gate = Gate(cfg, layer_id)
        self.experts = nn.ModuleList(
            Expert(cfg.dim, cfg.moe_inter_dim, expert_fmt, dtype, cfg.swiglu_limit) for _ in range(self.n_experts))
        self.shared_experts = Expert(cfg.dim, cfg.moe_inter_dim, dense_fmt, dtype, cfg.swiglu_limit)
        self.tp = SINGLE                # expert parallel: experts[e] is None when another rank holds it
        # Training expert parallel (train/ep.py): ranks hold different tokens, so `exchange(routed_loop, x,
        # weights, ids)` runs this rank's experts over every rank's rows and returns this rank's rows' sum.
        self.exchange = None

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.dim)
        weights, ids = self.gate(x, input_ids.reshape(-1))
        tap("ffn.routing.ids", ids)
        tap("ffn.routing.weights", weights)
        y = self._routed_path(x, ids)(x, weights, ids)
        y = self.tp.all_reduce(y)       # fp32 sum of every rank's experts; the shared expert is replicated
        y = y + self.shared_experts(x).to(y.dtype)
        tap("ffn.experts_out", y)
        return y.to(x.dtype).view(shape)

    def _routed_path(self, x: torch.Tensor, ids: torch.Tensor):
        """Which routed-expert sum computes this step. The pair, sorted and grouped paths are inference paths
        (Triton kernels, stacked weights); training and expert-parallel steps loop."""
        local = self.tp is SINGLE and self.exchange is None                # EP: the loop (for now)
        # Trainable experts (train/params.py TrainLinear: a bf16 master, no stored codes or scales, `fmt` still
        # the storage format) take the training path with or without autograd: the greedy probe generates under
        # no_grad, and the inference paths read stored FP4/FP8 (found on the H200: scale None in the FP4 kernel).
        trainable = not self._stored_experts()
        inference = x.is_cuda and not torch.is_grad_enabled() and local and not trainable
        # compiled decode on any device; a compiled training step (autograd on) takes the training path below
        fixed_shapes = inference or (torch.compiler.is_compiling() and local and not torch.is_grad_enabled()
                                     and not trainable)
        sorted_fp4 = self.expert_fmt == "fp4" and ids.numel() >= self.SORTED_PATH_MIN_PAIRS
        if fixed_shapes and ids.numel() <= self.PAIR_PATH_MAX_PAIRS:
            return self.routed_sorted if sorted_fp4 else self.routed_pairs
        grouped_ok = inference and x.dtype == torch.bfloat16 and ops.registry.fast_enabled("moe_grouped")
        sorted_ok = (inference and sorted_fp4 and x.dtype in (torch.bfloat16, torch.float32)
                     and ops.registry.fast_enabled("grouped_linear"))
        if sorted_ok:
            return self.routed_sorted
        if grouped_ok:
            return self.routed_grouped
        if ((torch.is_grad_enabled() or trainable) and local and self.n_experts <= self.BATCHED_MAX_EXPERTS
                and ops.registry.fast_enabled("moe_batched")
                and all(isinstance(getattr(e, n), Linear) for e in self.experts for n in ("w1", "w2", "w3"))):
            return self.routed_batched
        if self.exchange is not None:
            return lambda x, weights, ids: self.exchange(self.routed_loop, x, weights, ids)
        return self.routed_loop

    def _stored_experts(self) -> bool:
        """Do the experts hold their checkpoint format (plain `Linear`s, what the inference paths read)?"""
        first = next((e for e in self.experts if e is not None), None)
        return first is None or type(first.w1) is Linear

    def routed_loop(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Sum of the routed experts' outputs [N, D] fp32: each used expert runs on its tokens (host sync)."""
        y = widen(torch.zeros_like(x))
        counts = torch.bincount(ids.flatten(), minlength=self.n_experts).tolist()
        for e, count in enumerate(counts):
            if count and self.experts[e] is not None:
                rows, slot = torch.where(ids == e)
                y.index_add_(0, rows, self.experts[e](x[rows], weights[rows, slot, None]).to(y.dtype))
        return y

    def routed_batched(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The same sum for training: every expert at once, one batched product per matrix over the rows grouped by
        expert and zero-padded to the largest group ([E, C, D]). `routed_loop` issues ~50 ops and a host sync per
        expert (launch-bound on a GPU); this ~60 ops and one sync in all. Per expert it computes what `routed_loop`
        does (same rows, act-quant per row, the same rounding points) and adds the outputs in the same order (by
        expert, then token). The padding rows are zeros, give zeros and are never read back."""
        k = ids.shape[1]
        flat = ids.flatten()
        order = flat.argsort(stable=True)
        eid, tok = flat[order], order // k
        counts = expert_counts(flat, self.n_experts)
        # NOTE: the one host sync (the GPU queue drains here, once per MoE layer): the groups' padded width is a
        # shape. Padding every group to all n tokens would need none, but triples the experts' work (6 experts).
        # At least 2 rows: a width the compiler cannot prove is not 1 stops inductor's bmm lowering (it guards on
        # Eq(width, 1), a data-dependent guard: found compiling the training step on CPU); a zero row more changes
        # nothing but the (never read) padding, and only where every group has one row.
        # Under CUDA-graph capture (the trainer's greedy probe replays decode steps: train/greedy_probe.py) no host
        # read is allowed: every group is then padded to all the step's tokens (a decode step's few rows).
        pad_all = self.PAD_GROUPS_TO_ALL_ROWS or (x.is_cuda and torch.cuda.is_current_stream_capturing())
        width = max(x.shape[0] if pad_all else int(counts.max()), 2)
        torch._check(width >= 2)
        row = torch.arange(flat.numel(), device=x.device) - (counts.cumsum(0) - counts)[eid]   # row in its group
        grouped = x.new_zeros(self.n_experts, width, x.shape[1]).index_put((eid, row), x[tok])
        wts = weights.new_zeros(self.n_experts, width, 1).index_put((eid, row), weights.flatten()[order, None])
        ex = self.experts[0]
        gate = widen(self._batched_linear("w1", grouped))
        up = widen(self._batched_linear("w3", grouped))
        out = self._batched_linear("w2", ex.hidden(gate, up, wts).to(x.dtype))  # [E, C, D]
        return widen(torch.zeros_like(x)).index_add_(0, tok, widen(out[eid, row]))

    def _batched_linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """`Linear.forward` of every expert's `name` at once: x [E, C, in] -> [E, C, out] in x's dtype (the act
        quantisation and the accumulation dtype of `ops.linear` / `ops.dense`)."""
        linears = [getattr(e, name) for e in self.experts]
        w = torch.stack([lin.weight_value() for lin in linears])                # [E, out, in]
        x = self._quantised_input(linears[0], x)
        acc = ops.acc_dtype(x.dtype) if x.dtype in (torch.float32, torch.float64) else x.dtype
        return torch.bmm(x.to(acc), w.to(acc).transpose(1, 2)).to(x.dtype)

    def routed_pairs(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The same sum computed over (token, expert) pairs with the stacked weights: fixed shapes, no host sync.
        Each expert output is rounded to the compute dtype before the fp32 sum, like `routed_loop`."""
        n, k = ids.shape
        stacks = self.stacked_experts()
        ex = self.experts[0]
        e = ids.flatten()
        # [n*k, D], pair p = token p // k; quantised once per token for w1 and w3 (as in `routed_sorted`)
        xp = self._quantised_input(ex.w1, x).repeat_interleave(k, dim=0)
        grid = self._fp8_grid(ex.w1)                       # the FP8 grid per 128: the kernels may take FP8 x FP8
        small = self.decode_sized(n)
        kernel = {"fp8_grid": grid, "decode_sized": small}
        gate = ops.pair_linear(xp, e, *stacks["w1"], ex.w1.fmt, **kernel).to(x.dtype).float()
        up = ops.pair_linear(xp, e, *stacks["w3"], ex.w3.fmt, **kernel).to(x.dtype).float()
        h = ex.hidden(gate, up, weights.reshape(-1, 1)).to(x.dtype)
        out = self._pair_linear(ex.w2, h, e, stacks["w2"], small).to(x.dtype).float()
        return out.view(n, k, -1).sum(dim=1)

    def routed_sorted(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The same sum over pairs sorted by expert (stable), one `grouped_linear` per matrix over the stored
        weights: fixed shapes, no host sync. Activations are quantised once for all pairs (per row and 128 block,
        so the same as per expert); each expert output is rounded to the compute dtype before the fp32 sum, which
        runs over a token's k pairs in selection order (deterministic, as in `routed_pairs`; no atomics)."""
        n, k = ids.shape
        order = ids.flatten().argsort(stable=True)
        eid, tok = ids.flatten()[order], order // k
        stacks = self.stacked_experts()
        ex = self.experts[0]
        grid = self._fp8_grid(ex.w1)                       # the FP8 grid per 128: the kernels may take FP8 x FP8
        # K order end to end where the kernel reads and writes it for free (`ops.korder`): x permuted once per
        # token, w1 / w3 write K-ordered columns, SwiGLU and the per-128 act quant keep it, w2 reads it. The same
        # products and roundings as element order.
        # (K order with the decode kernel, only where a small model has >= 16 rows per expert in a decode-sized
        # step, is correct, the layouts applied around it; never so at Flash's 256 experts)
        small = self.decode_sized(n)
        korder = korder_pays(ids.numel(), x, stacks["w1"][0], ex.w1.fmt, grid)
        # Quantised per token, then gathered per pair: the same values (per row and 128 block) for 1/k of the work
        # (8k prefill: 8 x 0.72 ms of MoE fake-quant on the H200 when it ran on the k-times gathered rows).
        xq = self._quantised_input(ex.w1, x)
        xs = (to_korder(xq) if korder else xq)[tok]
        # each expert output rounded to the compute dtype (by the kernel's store) before the fp32 sums
        layout = {"x_korder": korder, "out_dtype": x.dtype, "decode_sized": small}
        gate = ops.grouped_linear(xs, eid, *stacks["w1"], ex.w1.fmt, fp8_grid=grid, out_korder=korder, **layout)
        up = ops.grouped_linear(xs, eid, *stacks["w3"], ex.w3.fmt, fp8_grid=grid, out_korder=korder, **layout)
        h = ex.hidden(gate.float(), up.float(), weights.flatten()[order, None]).to(x.dtype)
        h = self._quantised_input(ex.w2, h)
        # rows written back in token-pair order by the kernel (the un-sort fused into its store)
        out = ops.grouped_linear(h, eid, *stacks["w2"], ex.w2.fmt, fp8_grid=self._fp8_grid(ex.w2), out_index=order,
                                 **layout)
        return out.float().view(n, k, -1).sum(dim=1)

    def routed_grouped(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The same sum for large steps (prefill) without the FP4 kernel (FP8 / bf16 experts, or `grouped_linear`
        switched off): pairs sorted by expert, activations quantised once, one grouped GEMM per matrix over bf16
        stacks of the experts decoded for this call only (exact: FP4/FP8 values times powers of two are bf16
        numbers). Nothing is kept: a copy would cost 2-4x the stored experts' memory."""
        n, k = ids.shape
        order = ids.flatten().argsort(stable=True)
        tok = order // k
        offs = torch.bincount(ids.flatten(), minlength=self.n_experts).cumsum(0).to(torch.int32)
        ex = self.experts[0]
        xs = self._quantised_input(ex.w1, x)[tok]           # per token, then per pair (as in `routed_sorted`)
        gate = torch._grouped_mm(xs, self._bf16_stack("w1").transpose(1, 2), offs=offs).float()
        up = torch._grouped_mm(xs, self._bf16_stack("w3").transpose(1, 2), offs=offs).float()
        h = self._quantised_input(ex.w2, ex.hidden(gate, up, weights.flatten()[order, None]).to(x.dtype))
        out = torch._grouped_mm(h, self._bf16_stack("w2").transpose(1, 2), offs=offs).float()
        # a token's k outputs summed in selection order, as `routed_sorted` (index_add_ would sum them by atomics)
        return torch.empty_like(out).index_copy_(0, order, out).view(n, k, -1).sum(dim=1)

    def _bf16_stack(self, name: str) -> torch.Tensor:
        """All experts' `name` matrices decoded to bf16 [E, N, K], made per call (transient)."""
        w, s = self.stacked_experts()[name]
        lin = getattr(self.experts[0], name)
        if lin.fmt == "plain" and w.dtype == torch.bfloat16:
            return w
        if lin.fmt == "fp4":
            return ops.dequant_fp4_bf16(w, s)   # CUDA: one launch over the stack; the twin: one expert at a time
        out = torch.empty(w.shape[0], lin.out_features, lin.in_features, dtype=torch.bfloat16, device=w.device)
        for i in range(w.shape[0]):             # one expert at a time: no fp32 temporary of all of them
            out[i] = ops.dequant_weight(w[i], None if s is None else s[i], lin.fmt)
        return out

    @staticmethod
    def _fp8_grid(linear: Linear) -> bool:
        """Does `linear` multiply its input's FP8 act-quant emulation (then that input is on the FP8 grid)?"""
        return linear.quant_emulation and linear.fmt != "plain"

    @staticmethod
    def _quantised_input(linear: Linear, x: torch.Tensor) -> torch.Tensor:
        """What a linear multiplies: x, or its FP8 act-quant emulation (per row and 128 block, so quantising
        all pairs at once equals quantising each expert's rows)."""
        return ops.fake_quant_fp8(x, 128) if MoE._fp8_grid(linear) else x

    @staticmethod
    def _pair_linear(linear: Linear, x: torch.Tensor, e: torch.Tensor, stack, decode_sized: bool) -> torch.Tensor:
        return ops.pair_linear(MoE._quantised_input(linear, x), e, stack[0], stack[1], linear.fmt,
                               fp8_grid=MoE._fp8_grid(linear), decode_sized=decode_sized)

    @staticmethod
    def decode_sized(tokens: int) -> bool:
        """May this step's FP4 calls take the FP8-MMA decode kernel (where switched on)? By the step's tokens
        (padding included), never by a call's rows (`ops.moe_pairs.DECODE_KERNEL_MAX_TOKENS`: a step and its padded
        prefill bucket take the same kernel class)."""
        return tokens <= DECODE_KERNEL_MAX_TOKENS

    def stacked_experts(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """{"w1" | "w2" | "w3": (weight [E, ...], scale [E, ...] or None)} as stored, FP4 weights tile-major where
        `fp4_tiled` says so (`ops.fp4_layout`: [E, N/64, K/128, 64, 64]). Built once; every expert's parameters
        then become views of the stacks (same names, no extra memory; a tile-major expert's weight is 4-D, which
        every FP4 reader takes)."""
        if getattr(self, "_stacks", None) is None:
            stacks = {}
            with torch.inference_mode(False), torch.no_grad():
                for name in ("w1", "w2", "w3"):
                    linears = [getattr(ex, name) for ex in self.experts]
                    w = _stack_weights(linears)
                    s = None if linears[0].scale is None else torch.stack([lin.scale for lin in linears])
                    for i, lin in enumerate(linears):
                        lin.weight = nn.Parameter(w[i], requires_grad=lin.weight.requires_grad)
                        if s is not None:
                            lin.scale = nn.Parameter(s[i], requires_grad=False)
                    stacks[name] = (w, s)
            self._stacks = stacks
        return self._stacks


def fp4_tiled(linear: Linear) -> bool:
    """Are this expert matrix's FP4 stacks held tile-major (`ops.fp4_layout`)? For whole 64 x 128 tiles, when
    DSV4_FP4_TILED says so (read when the stacks are built): unset, on for weights on CUDA, where the kernels read
    it (bench/NOTES.md, thirty-first session), off on CPU, where the plain twins would put it back per call."""
    return (linear.fmt == "fp4" and fp4_layout.can_tile(linear.out_features, linear.in_features)
            and env_switch("DSV4_FP4_TILED", default=linear.weight.is_cuda))


def _stack_weights(linears: list[Linear]) -> torch.Tensor:
    """The experts' weights in one [E, ...] tensor: stacked as stored, or straight into the tile-major layout
    (each expert copied into its slot: no rows-order stack beside it)."""
    if not fp4_tiled(linears[0]) or fp4_layout.is_tiled(linears[0].weight):
        return torch.stack([lin.weight for lin in linears])
    first = fp4_layout.tiled_view(linears[0].weight)
    out = first.new_empty(len(linears), *first.shape)
    for i, lin in enumerate(linears):
        out[i].copy_(fp4_layout.tiled_view(lin.weight))
    return out
