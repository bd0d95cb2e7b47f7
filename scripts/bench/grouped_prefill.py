"""Micro-benchmark of the expert-major FP4 grouped GEMM (`ops/triton/fp4_grouped_prefill.py`) against the 16-row-
block kernel (`ops/triton/fp4_grouped.py`, the one dispatched today) and torch._grouped_mm over bf16 copies of the
same experts, at the bench model's prefill shapes: 1k and 8k tokens x top-6 of 256 experts = 6144 and 49152 sorted
(token, expert) pairs, K 4096 -> N 2048 (w1/w3), FP8-quantised bf16 activations as the model feeds them.

Prints median ms and TFLOP/s (2 M N K / t) per kernel and config, each output's relative error (Frobenius) against
the 16-row-block kernel (the FP4 kernels must agree to 1e-5: same exact products, fp32 sums in another order;
_grouped_mm's bf16 output is shown for information), and a CUDA-graph capture + replay check of the new kernel.
The new kernel is called directly: it is not in the default dispatch until this shows it wins. The "PACKED" rows
are its `packed=True` option (inline-PTX decode of four codes per op, fp16 dots: `ops/triton/fp4_decode.py`), the
"FP8MMA" rows its `fp8mma` option (the reference's FP8 x FP8 arithmetic: `ops/triton/fp4_prefill_fp8mma.py`; the
FP8 MMA's accumulation is below fp32: flagged above 4e-3); `--tokens 64` is the decode batch-64 shape (384 rows).
Usage: python3 scripts/bench/grouped_prefill.py [--tokens 1024 8192] [--repeats 10] [--json PATH] [--only fp8mma]
(`--only fp8mma`: the two references, the default config and the FP8MMA rows only). `--only swapped` (tokens 64,
1024 and 8192 unless given): the expert-major kernel's configuration (`ops/grouped_linear.py`, with the swapped
kernel switched off) against the swapped-operand kernel (`ops/triton/fp4_grouped_swapped.py`) in a few tiles, as
us per call and TB/s of weight bytes (the FP4 bytes and scales of the experts with rows, counted once;
captured-graph replays with a cold L2), each output's rel. error against the expert-major one (labelled
"dispatched": the default before the sixteenth session); no bf16 copies, no 16-row-block kernel. `--only transient`
(tokens 1024 2048 4096 8192 unless given): the dispatched FP4 path against per-call transient bf16 stacks
(`transient_results`). `--only direct` (tokens 64 256 1024 4096 8192 unless given): the dispatched path against the
bf16-decode kernel (`ops/triton/fp4_grouped_direct.py`) in DIRECT_CONFIGS and at `direct_tiles`, torch._grouped_mm
over bf16 copies (the bound a decode-free kernel would reach), x's K-ordered copy alone and the dispatched call with
the MoE's layouts (x K-ordered by the caller, bf16 K-ordered output rows scattered), graph-timed as `--only swapped`.
"""

import argparse
import json
from functools import partial

import torch

from dsv4 import ops
from dsv4.bench.timing import cold_graph_time, cuda_time, summary
from dsv4.ops.grouped_linear import _PACKED_BELOW, direct_tiles, expert_major_tiles, with_layout
from dsv4.ops.korder import to_korder
from dsv4.ops.triton.fp4_gemv import fp4_pair_gemv
from dsv4.ops.triton.fp4_grouped import fp4_grouped_gemm
from dsv4.ops.triton.fp4_grouped_direct import fp4_grouped_gemm_direct
from dsv4.ops.triton.fp4_grouped_prefill import expert_offsets, fp4_grouped_gemm_prefill
from dsv4.ops.triton.fp4_grouped_swapped import fp4_grouped_gemm_swapped
from dsv4.quant import fake_quant_fp8

E, N, K, TOP_K = 256, 2048, 4096, 6
DEVICE = "cuda"
CONFIGS = [            # block_m, block_n, num_warps, group_scales, join (num_stages 3, block_k 128); first: default
    (64, 64, 8, True, True), (64, 64, 8, False, True), (64, 64, 8, True, False), (64, 64, 8, False, False),
    (128, 64, 8, True, True), (128, 64, 8, False, False), (64, 128, 8, True, True), (128, 128, 8, True, True),
    (128, 128, 8, True, False), (32, 64, 4, True, True), (32, 64, 4, False, False), (64, 64, 4, True, True),
]
# The packed decode with fp16 dots (`packed=True`, block_k 128; group_scales / join do not apply): block_m,
# block_n, num_warps. 16-row tiles for the decode shape (--tokens 64: 384 rows, ~1.5 per expert).
PACKED_CONFIGS = [(64, 64, 8), (128, 64, 8), (64, 128, 8), (128, 128, 8), (32, 64, 4), (16, 64, 4), (16, 128, 4),
                  (16, 128, 8)]
# The FP8-MMA variant (`fp8mma=True` / "fold": `ops/triton/fp4_prefill_fp8mma.py`): block_m (tokens, the wgmma's N),
# block_n (weight rows, 64 per warpgroup), num_warps, fold, maxnreg (ptxas's register cap); first: dispatched.
FP8MMA_CONFIGS = [(32, 128, 4, False, 168), (32, 128, 4, False, None), (16, 128, 4, False, None),
                  (32, 256, 8, False, None), (32, 64, 4, False, None), (64, 64, 4, False, None),
                  (32, 64, 4, True, None), (64, 64, 4, True, None), (64, 128, 8, True, None)]
# The swapped-operand kernel (`--only swapped`): block_m (tokens, the MMA's N), block_n (weight rows, its M: 64 per
# warpgroup), num_warps, korder (K permuted per 128 block: 128-bit weight loads, offline 4.6-6.0 instructions per
# weight at these tiles against 6.9-7.8). Offline for sm_90 none of these spills inside its K loops (64 x 128 with 4
# warps does).
SWAPPED_CONFIGS = [(16, 64, 4, False), (16, 128, 4, False), (16, 128, 8, False), (32, 64, 4, False),
                   (32, 128, 8, False), (64, 64, 4, False), (64, 128, 8, False), (16, 64, 4, True), (16, 128, 4, True),
                   (32, 64, 4, True), (32, 128, 8, True)]
# The bf16-decode kernel (`--only direct`): block_m (tokens, wgmma's N), block_n (weight rows), num_warps,
# num_stages, xperm (x K-ordered inside the kernel, not by a copy). Offline for sm_90 (Triton 3.9): fast K loop 6.6 /
# 5.4 (xperm 6.0) / 5.6 / 5.0 (xperm 5.0) instructions per weight (per 128-K normalisation) at 256x128/8,
# 128x128/8, 64x64/4, 32x64/4; 256 x 64 with 4 warps and 256 x 128 with xperm spill inside the loop (left out).
DIRECT_CONFIGS = [(256, 128, 8, 3, False), (256, 128, 8, 2, False), (128, 128, 8, 3, False), (128, 128, 8, 3, True),
                  (64, 64, 4, 3, False), (64, 64, 4, 3, True), (32, 64, 4, 3, False), (32, 64, 4, 3, True),
                  (16, 64, 4, 3, True)]
FP4_TOL = 1e-5
FP8MMA_TOL = 4e-3           # a flag, not a bound: the FP8 MMA's class is elementwise (tests/test_fp4_prefill_fp8mma.py)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def experts(gen, bf16: bool = True):
    """Random FP4 bytes (every code) and e8m0 scales 2^-9 .. 2^-3; the bf16 copies hold the same values exactly
    (None without `bf16`)."""
    w = torch.randint(-128, 128, (E, N, K // 2), dtype=torch.int8, device=DEVICE, generator=gen)
    s = torch.randint(118, 125, (E, N, K // 32), dtype=torch.uint8, device=DEVICE, generator=gen)
    s = s.view(torch.float8_e8m0fnu)
    wb = torch.stack([ops.dequant_weight(w[e], s[e], "fp4").bfloat16() for e in range(E)]) if bf16 else None
    return w, s, wb


def routed_rows(tokens: int, gen):
    """Sorted expert ids of `tokens` x top-6 pairs over uniform random scores, and their FP8-quantised rows."""
    eid = torch.rand(tokens, E, device=DEVICE, generator=gen).topk(TOP_K, dim=-1).indices.flatten().sort().values
    x = fake_quant_fp8(torch.randn(tokens * TOP_K, K, device=DEVICE, generator=gen), 128).bfloat16()
    return eid, x


def timed(name: str, fn, ref, m: int, repeats: int) -> dict:
    try:
        out = fn()
        t = summary(cuda_time(fn, repeats))["median_s"]
    except Exception as e:                       # a config that does not compile / fit: report and go on
        print(f"  {name:<50} {type(e).__name__}: {str(e)[:160]}", flush=True)
        return {"name": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    err = rel(out, ref) if ref is not None else 0.0
    tflops = 2 * m * N * K / t / 1e12
    print(f"  {name:<50} {t * 1e3:8.3f} ms {tflops:7.1f} TFLOP/s   rel err vs fp4_grouped_gemm {err:.2e}", flush=True)
    return {"name": name, "ms": t * 1e3, "tflops": tflops, "rel_err_vs_fp4_grouped_gemm": err}


_FLUSH: list[torch.Tensor] = []


def timed_bytes(name: str, fn, ref, weight_bytes: int, repeats: int) -> dict:
    """`timed` for the swapped comparison: us per call and TB/s of `weight_bytes`, rel. error against `ref`. Timed
    as a captured CUDA graph replayed with the L2 flushed (`cold_graph_time`), as a decode step runs it: the first
    run (2026-12-05) timed eager calls, whose host-side launches (offsets, checks, fp16 blocks) made a 6-row call
    cost ~0.5 ms and hid the kernels' own times."""
    if not _FLUSH:
        _FLUSH.append(torch.empty(256 * 2**20, dtype=torch.uint8, device=DEVICE))     # > the H200's 60 MB L2
    try:
        out = fn()
        t = cold_graph_time(fn, _FLUSH[0], reps=max(repeats, 10))
    except Exception as e:                       # a config that does not compile / fit: report and go on
        print(f"  {name:<50} {type(e).__name__}: {str(e)[:160]}", flush=True)
        return {"name": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    err = rel(out, ref)
    print(f"  {name:<50} {t * 1e6:9.1f} us {weight_bytes / t / 1e12:6.2f} TB/s   rel err vs dispatched {err:.2e}",
          flush=True)
    return {"name": name, "us": t * 1e6, "weight_tbps": weight_bytes / t / 1e12, "rel_err_vs_dispatched": err}


def swapped_results(tokens: int, w, s, gen, repeats: int) -> dict:
    """The expert-major configuration (`_PACKED_BELOW`, `expert_major_tiles`; DSV4_FP4_PACKED / DSV4_FP4_FP8MMA
    unset; dispatched where `swapped_tiles` is None or DSV4_FP4_SWAPPED=0) against SWAPPED_CONFIGS."""
    eid, x = routed_rows(tokens, gen)
    m = eid.numel()
    used = eid.unique().numel()
    weight_bytes = used * N * (K // 2 + K // 32)
    packed = m < _PACKED_BELOW * E
    bm, bn, nw = expert_major_tiles(m, E, packed)
    print(f"{tokens} tokens: M = {m} pairs, K {K} -> N {N}, {used} of {E} experts with rows "
          f"({weight_bytes / 1e9:.2f} GB of weights)", flush=True)
    dispatched = partial(fp4_grouped_gemm_prefill, x, eid, w, s, block_m=bm, block_n=bn, num_warps=nw, packed=packed)
    ref = dispatched()
    rows = [timed_bytes(f"dispatched prefill{' PACKED' if packed else ''} bm={bm} bn={bn} warps={nw}", dispatched,
                        ref, weight_bytes, repeats)]
    if m < E:           # decode below ~43 tokens: the MoE runs the pair GEMV (`ops/moe_pairs.py`), one row per pair
        rows.append(timed_bytes("pair GEMV (dispatched below 1 row per expert)",
                                partial(fp4_pair_gemv, x.contiguous(), eid, w, s), ref, weight_bytes, repeats))
    for bm, bn, nw, korder in SWAPPED_CONFIGS:
        fn = partial(fp4_grouped_gemm_swapped, x, eid, w, s, block_m=bm, block_n=bn, num_warps=nw, korder=korder)
        name = f"SWAPPED packed{' korder' if korder else ''} bm={bm} bn={bn} warps={nw}"
        rows.append(timed_bytes(name, fn, ref, weight_bytes, repeats))
    bad = [r["name"] for r in rows if r.get("rel_err_vs_dispatched", 0.0) > FP4_TOL]
    print(f"  {'MISMATCH: ' + ', '.join(bad) if bad else 'all agree with the dispatched kernel (1e-5)'}", flush=True)
    return {"tokens": tokens, "pairs": m, "experts_used": used, "weight_bytes": weight_bytes, "kernels": rows,
            "mismatch": bad}


def direct_results(tokens: int, w, s, wb, gen, repeats: int) -> dict:
    """The dispatched path (`ops.grouped_linear`, DSV4_FP4_DIRECT as set: on by default) against DIRECT_CONFIGS,
    cuBLAS's grouped GEMM over bf16 copies and the K-ordered copy of x alone."""
    eid, x = routed_rows(tokens, gen)
    m = eid.numel()
    used = eid.unique().numel()
    weight_bytes = used * N * (K // 2 + K // 32)
    print(f"{tokens} tokens: M = {m} pairs ({m / E:.1f} per expert), K {K} -> N {N}, {used} of {E} experts with "
          f"rows ({weight_bytes / 1e9:.2f} GB of weights); direct_tiles {direct_tiles(m, E)}", flush=True)

    def dispatched():
        return ops.grouped_linear(x, eid, w, s, "fp4", fp8_grid=True)
    ref = dispatched()
    rows = [timed_bytes("dispatched grouped_linear", dispatched, ref, weight_bytes, repeats)]
    ends = expert_offsets(eid, E)[1:].clone()
    rows.append(timed_bytes("torch._grouped_mm bf16 copies (no decode)",
                            lambda: torch._grouped_mm(x, wb.transpose(1, 2), offs=ends), ref, weight_bytes, repeats))
    rows.append(timed_bytes("bf16_korder copy of x alone", lambda: to_korder(x), x, weight_bytes, repeats))
    rows[-1].pop("rel_err_vs_dispatched", None)
    # what the MoE asks for since the twenty-eighth session: x K-ordered by the caller, K-ordered bf16 output rows
    # scattered to token-pair order (`dsv4.ops.korder`); compared with the dispatched result in that layout
    xk, perm = to_korder(x), torch.randperm(m, device=DEVICE)
    layouts = dict(x_korder=True, out_korder=True, out_dtype=torch.bfloat16, out_index=perm)
    rows.append(timed_bytes("dispatched, the MoE's layouts (no copy, bf16 out, scattered)",
                            lambda: ops.grouped_linear(xk, eid, w, s, "fp4", fp8_grid=True, **layouts),
                            with_layout(ref, True, torch.bfloat16, perm), weight_bytes, repeats))
    for bm, bn, nw, st, xp in DIRECT_CONFIGS:
        fn = partial(fp4_grouped_gemm_direct, x, eid, w, s, block_m=bm, block_n=bn, num_warps=nw, num_stages=st,
                     xperm=xp)
        name = f"DIRECT bm={bm} bn={bn} warps={nw} stages={st}{' xperm' if xp else ''}"
        rows.append(timed_bytes(name, fn, ref, weight_bytes, repeats))
    bad = [r["name"] for r in rows if "DIRECT" in r["name"] and r.get("rel_err_vs_dispatched", 1.0) > FP4_TOL]
    print(f"  {'MISMATCH: ' + ', '.join(bad) if bad else 'all agree with the dispatched path (1e-5)'}", flush=True)
    return {"tokens": tokens, "pairs": m, "experts_used": used, "weight_bytes": weight_bytes,
            "direct_tiles": direct_tiles(m, E), "kernels": rows, "mismatch": bad}


def graph_check(x, eid, w, s) -> float:
    """Capture the new kernel once, replay it with other (sorted) expert ids: the offsets follow on the device."""
    eid_in, graph = eid.clone(), torch.cuda.CUDAGraph()
    fp4_grouped_gemm_prefill(x, eid_in, w, s)
    with torch.cuda.graph(graph):
        out = fp4_grouped_gemm_prefill(x, eid_in, w, s)
    eid_in.copy_(((eid + 7) % E).sort().values)
    graph.replay()
    return rel(out, fp4_grouped_gemm(x, eid_in, w, s))


def shape_results(tokens: int, w, s, wb, gen, repeats: int, only: str = "all") -> dict:
    eid, x = routed_rows(tokens, gen)
    m = eid.numel()
    print(f"{tokens} tokens: M = {m} pairs, K {K} -> N {N}, {E} experts", flush=True)
    ref = fp4_grouped_gemm(x, eid, w, s)
    rows = [timed("fp4_grouped_gemm (16-row blocks, dispatched)", lambda: fp4_grouped_gemm(x, eid, w, s), None, m,
                  repeats)]
    ends = expert_offsets(eid, E)[1:].clone()        # the end row of each expert, as _grouped_mm takes them
    rows.append(timed("torch._grouped_mm bf16 copies (bf16 out)",
                      lambda: torch._grouped_mm(x, wb.transpose(1, 2), offs=ends), ref, m, repeats))
    for bm, bn, nw, gs, join in CONFIGS[:1] if only == "fp8mma" else CONFIGS:
        name = f"prefill bm={bm} bn={bn} warps={nw}{' group_scales' if gs else ''}{' join' if join else ''}"
        fn = partial(fp4_grouped_gemm_prefill, x, eid, w, s, block_m=bm, block_n=bn, group_scales=gs, join=join,
                     num_warps=nw)
        rows.append(timed(name, fn, ref, m, repeats))
    for bm, bn, nw in [] if only == "fp8mma" else PACKED_CONFIGS:
        fn = partial(fp4_grouped_gemm_prefill, x, eid, w, s, block_m=bm, block_n=bn, num_warps=nw, packed=True)
        rows.append(timed(f"prefill PACKED fp16 dots bm={bm} bn={bn} warps={nw}", fn, ref, m, repeats))
    for bm, bn, nw, fold, cap in FP8MMA_CONFIGS:
        fn = partial(fp4_grouped_gemm_prefill, x, eid, w, s, block_m=bm, block_n=bn, num_warps=nw,
                     fp8mma="fold" if fold else True, maxnreg=cap)
        name = f"prefill FP8MMA{' fold' if fold else ''} bm={bm} bn={bn} warps={nw}{f' maxnreg={cap}' if cap else ''}"
        rows.append(timed(name, fn, ref, m, repeats))
    # the FP8 MMA's own accumulation (below fp32) puts it in a looser class (tests/test_fp4_prefill_fp8mma.py)
    bad = [r["name"] for r in rows[2:] if r.get("rel_err_vs_fp4_grouped_gemm", 0.0) > (
        FP8MMA_TOL if "FP8MMA" in r["name"] else FP4_TOL)]
    graph_err = graph_check(x, eid, w, s)
    print(f"  CUDA graph replay with other ids: rel err {graph_err:.2e}; "
          f"{'MISMATCH: ' + ', '.join(bad) if bad else 'all FP4 kernels agree (1e-5; FP8MMA 4e-3)'}", flush=True)
    return {"tokens": tokens, "pairs": m, "kernels": rows, "graph_replay_rel_err": graph_err, "mismatch": bad}


def transient_results(tokens: int, w, s, gen, repeats: int) -> dict:
    """Per-call bf16 stacks (`MoE.routed_grouped` over FP4 experts): the stack decoded to bf16 for the call
    (`ops.dequant_fp4_bf16`, one launch) + cuBLAS's grouped GEMM, against the dispatched FP4 kernel
    (`ops.grouped_linear`); the decode alone too, and the stack's bytes per second (FP4 + scales read, bf16
    written). The MoE's switch to this path for large FP4 steps (DSV4_MOE_TRANSIENT) was removed after three 8k
    prefills measured it slower (bench/NOTES.md, twentieth session)."""
    eid, x = routed_rows(tokens, gen)
    m = eid.numel()
    ref = ops.grouped_linear(x, eid, w, s, "fp4", fp8_grid=True)
    ends = expert_offsets(eid, E)[1:].to(torch.int32)

    def transient():
        return torch._grouped_mm(x, ops.dequant_fp4_bf16(w, s).transpose(1, 2), offs=ends)
    print(f"{tokens} tokens: M = {m} pairs, K {K} -> N {N}, {E} experts", flush=True)
    rows = [timed("dispatched grouped_linear (FP4 kernel)",
                  lambda: ops.grouped_linear(x, eid, w, s, "fp4", fp8_grid=True), ref, m, repeats),
            timed("transient: dequant stack + torch._grouped_mm", transient, ref, m, repeats)]
    t = summary(cuda_time(lambda: ops.dequant_fp4_bf16(w, s), repeats))["median_s"]
    stack_bytes = E * N * (K // 2 + K // 32 + 2 * K)
    print(f"  {'dequant_fp4_bf16 alone':<50} {t * 1e3:8.3f} ms {stack_bytes / t / 1e12:6.2f} TB/s", flush=True)
    rows.append({"name": "dequant_fp4_bf16 alone", "ms": t * 1e3, "tbps": stack_bytes / t / 1e12})
    return {"tokens": tokens, "pairs": m, "kernels": rows}


# Inference mode: the fast grouped op applies only with autograd off (`_fp4_applies`); with it on, every
# "dispatched" call ran the twin (5.24 s a call at 1k tokens on the H100, bench/results/h100_s19/transient.log).
@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", help="default 1024 8192; with --only swapped 64 1024 8192")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", help="write the results here (e.g. bench/results/grouped_prefill_h200.json)")
    p.add_argument("--only", choices=["all", "fp8mma", "swapped", "transient", "direct"], default="all")
    args = p.parse_args()
    tokens = args.tokens or ([64, 1024, 8192] if args.only == "swapped" else [1024, 8192])
    gen = torch.Generator(DEVICE).manual_seed(0)
    w, s, wb = experts(gen, bf16=args.only not in ("swapped", "transient"))
    if args.only == "direct":
        shapes = [direct_results(t, w, s, wb, gen, args.repeats) for t in args.tokens or [64, 256, 1024, 4096, 8192]]
    elif args.only == "transient":
        shapes = [transient_results(t, w, s, gen, args.repeats) for t in args.tokens or [1024, 2048, 4096, 8192]]
    elif args.only == "swapped":
        shapes = [swapped_results(t, w, s, gen, args.repeats) for t in tokens]
    else:
        shapes = [shape_results(t, w, s, wb, gen, args.repeats, args.only) for t in tokens]
    results = {"gpu": torch.cuda.get_device_name(), "E": E, "N": N, "K": K, "shapes": shapes}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
