"""Where does a traced prefill side first compute other bits than the same side run eagerly? (issue 16 item 7)

The opt-in `compile_prefill` fails its GPU test (cosine 0.98436 against `model.step`, bound 0.999), and Dynamo
alone (backend "eager": the traced graph's ops run eagerly, no compiler) already gives 0.99812, while on the CPU
the traced sides are bit-identical to the plain ones (twenty-fourth session). So on CUDA tracing itself takes
another path somewhere. The end-to-end test cannot say where: each side's output feeds the next, and a 1-ulp
change is amplified (routing flips under the quantisation emulation).
This runs the test's model (the tiny random checkpoint, bf16, emulation on, CUDA) through one bucket's segments
eagerly, recording every side call's inputs and every module call's inputs inside them; then, on exactly those
inputs, it runs each side and each module eagerly with RoPE's rotations complex (model.step's form) and real
(the form a traced side makes and passes on), and through torch.compile with BACKEND on the real form, and prints
whether the outputs are the same bits (max |diff| otherwise): "rope form" (complex vs real, both eager) and
"traced" (compiled vs eager, both real). A side that differs while none of its modules do
points at the plain functions between them (hc_pre / hc_post / RoPE tables).
Usage: PYTHONPATH=. python3 scripts/bench/compiled_side_diff.py [--backend eager] [--tokens 128]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch.utils._pytree import tree_flatten, tree_map


def _diff(a, b) -> str:
    la, lb = (tree_flatten(a)[0], tree_flatten(b)[0])
    worst, same = 0.0, True
    for x, y in zip(la, lb, strict=True):
        if not isinstance(x, torch.Tensor):
            continue
        if x.shape != y.shape or x.dtype != y.dtype:
            return f"shape/dtype {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}"
        if not torch.equal(x.nan_to_num(), y.nan_to_num()):
            same = False
            if x.is_floating_point():
                worst = max(worst, (x.double() - y.double()).abs().max().item())
            else:
                worst = max(worst, float((x != y).sum().item()))      # integer outputs (routing ids): count
    return "same bits" if same else f"DIFFER (max |diff| or count {worst:.3g})"


def _record(model, ids, positions, attn_out):
    """One eager pass over the bucket's segments: [(label, fn, args, kwargs)] of every side, module and listed
    method call, inputs copied before the call."""
    from dsv4.engine.prefill_graphs import SIDES, segment

    calls, hooks = [], []

    def hook(name):
        def pre(module, args, kwargs):
            calls.append((name, module, _clone(args), _clone(kwargs)))
        return pre

    for name, module in model.layers.named_modules():
        if name:
            hooks.append(module.register_forward_pre_hook(hook(f"layers.{name}"), with_kwargs=True))

    def recorded(side):
        def run(block, *args):
            calls.append((f"{side.__name__}[{block.layer_id}]", side, _clone((block, *args)), {}))
            return side(block, *args)
        return run

    def method(obj, name, label):       # the plain methods and functions between the modules
        fn = getattr(obj, name)

        def run(*args, **kwargs):
            calls.append((label, fn, _clone(args), _clone(kwargs)))
            return fn(*args, **kwargs)
        setattr(obj, name, run)
        return lambda: delattr(obj, name) if name in vars(obj) else None

    undo = []
    for block in model.layers:
        at, attn = f"layers.{block.layer_id}.attn", block.attn
        undo += [method(attn, "queries", f"{at}.queries"), method(attn, "window_kv", f"{at}.window_kv"),
                 method(attn.rotary, "cis", f"{at}.rotary.cis")]
        if attn.ratio:
            undo.append(method(attn.compressor, "project", f"{at}.compressor.project"))
        if attn.ratio == 4:
            undo += [method(attn.indexer, "weights", f"{at}.indexer.weights"),
                     method(attn.indexer, "queries", f"{at}.indexer.queries"),
                     method(attn.indexer.compressor, "project", f"{at}.indexer.compressor.project")]
    import dsv4.model.block as block_module
    hc_pre = block_module.hc_pre
    block_module.hc_pre = lambda *a: calls.append(("hc_pre", hc_pre, _clone(a), {})) or hc_pre(*a)
    sides = tuple(recorded(s) for s in SIDES)
    prev = None
    try:
        for i in range(len(model.layers) + 1):
            prev = segment(model, i, ids, positions, prev, attn_out, sides)
    finally:
        for h in hooks:
            h.remove()
        for u in undo:
            u()
        block_module.hc_pre = hc_pre
    return calls


def _real(obj):
    """Complex tensors (RoPE's rotations) as the real (cos, sin) pairs a traced side makes and passes on."""
    return tree_map(lambda t: torch.view_as_real(t) if isinstance(t, torch.Tensor) and t.is_complex() else t, obj)


def _clone(obj):
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, obj)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="eager", help="torch.compile backend (eager: Dynamo alone)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--device", default="cuda", help="cuda (the failing case) or cpu (a smoke run)")
    args = ap.parse_args()

    import dsv4
    from dsv4.checkpoint import synthesize
    from dsv4.config import tiny_config
    from dsv4.engine.graphs import compiled

    ckpt = synthesize(tiny_config(), Path(tempfile.mkdtemp()), seed=1234, progress=False)    # tests' tiny_ckpt
    model = dsv4.load_model(ckpt, device=args.device, dtype=torch.bfloat16, progress=False)
    model.prepare_fixed_shape_decode(torch.device(args.device))     # as PrefillGraphs: no stacks made in a trace
    cfg, n = model.cfg, args.tokens
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(2, cfg.vocab_size, (1, n), generator=gen).to(args.device)
    positions = torch.arange(n, device=args.device)
    attn_out = [torch.randn(1, n, cfg.n_heads, cfg.head_dim, generator=gen).to(args.device, model.dtype)
                for _ in model.layers]
    with torch.inference_mode():
        calls = _record(model, ids, positions, attn_out)
        print(f"{len(calls)} calls recorded; backend {args.backend}", flush=True)
        differ = 0
        for label, fn, a, kw in calls:
            torch._dynamo.reset()           # a fresh cache per call: one wrapper's code serves every module
            traced = compiled(lambda *x, fn=fn, **k: fn(*x, **k), args.backend)
            # fresh copies for every run: a side may write into its inputs (Attention.output rotates the core's
            # output in place)
            want = _real(fn(*_clone(a), **_clone(kw)))      # model.step's form: complex rotations
            a_r, kw_r = _real(a), _real(kw)                 # a compiled side's: real (cos, sin) pairs
            want_r = _real(fn(*_clone(a_r), **_clone(kw_r)))
            got = _real(traced(*_clone(a_r), **_clone(kw_r)))
            form, trace = _diff(want_r, want), _diff(got, want_r)
            differ += trace != "same bits"
            if "DIFFER" in form + trace or "shape" in form + trace or "side" in label:
                print(f"{label:44s} rope form: {form:36s} traced: {trace}", flush=True)
        print(f"{differ} of {len(calls)} calls differ")


if __name__ == "__main__":
    main()
