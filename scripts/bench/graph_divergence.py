"""Where do the fixed-shape decode step and the general step first compute different bits? (issue 16 item 7)

graph_bisect.py forces one fast op to its twin around the whole scenario, prefill included, so each case starts
from another state and follows another trajectory (with the QAT emulation a 1-ulp change is amplified): a case
that lifts the worst cosine need not be where the paths part. This runs the test's scenario once (every fast op
on, tests/test_graphs_gpu.py's prompts, seeds and 20 steps, eager) and, per step, records in both paths the
output of every module call and of the ops that the two paths call on different row sets, keyed by the calling
module; at the first step where the logits or the decode state differ it prints, in the fixed step's call order,
each record whose output differs, marking as ORIGIN those whose first input is the same bits in both paths (the
difference is made there, not carried in), the model's taps inside modules (e.g. `attn.out_pre_inverse_rope`,
`attn.out`: before and after the inverse RoPE), and every state tensor that differs (rings, compressed entries,
indexer keys). Records whose calls cover different rows in the two paths (the general step pools only the sequences
that complete a block, the fixed one all) are listed as "rows differ" and judged by the state.
Usage: PYTHONPATH=. python3 scripts/bench/graph_divergence.py [--emulation-off] [--tokens 1] [--device cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

OPS = ("sparse_attention", "sparse_attention_dense_tail", "indexer_scores", "fake_quant_kv", "fake_quant_fp8",
       "hc_split_sinkhorn", "hc_pre_mix", "hc_head_mix", "linear", "logits")


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    return []


class Recorder:
    """Module outputs and op calls of one step, keyed "module qualname[/op]", in call order."""

    scope = ""          # dsv4.parity.taps' recorder interface: the model sets it; the keys name the module instead

    def __init__(self, model):
        self.names = {m: n or "model" for n, m in model.named_modules()}
        self.stack: list[str] = []
        self.calls: dict[str, list[tuple[list[torch.Tensor], list[torch.Tensor]]]] = {}

    def record(self, name: str, tensor: torch.Tensor, index_offset: int = 0) -> None:
        """A model tap (`dsv4.parity.taps.tap`: points inside a module, e.g. `attn.out_pre_inverse_rope` before the
        inverse RoPE and `attn.out` after it), keyed "module/tap:name"; repeated per sequence in the general step."""
        self.add(f"{self.stack[-1] if self.stack else 'model'}/tap:{name}", (), tensor)

    def add(self, key: str, inputs, output) -> None:
        first = _tensors(inputs)[:1]
        self.calls.setdefault(key, []).append(([t.detach().clone() for t in first],
                                               [t.detach().clone() for t in _tensors(output)]))

    @contextlib.contextmanager
    def hooks(self):
        from torch.nn.modules import module as nn_module

        from dsv4 import ops
        from dsv4.parity import taps

        def pre(mod, args):
            self.stack.append(self.names.get(mod, type(mod).__name__))

        def post(mod, args, out):
            self.add(self.stack.pop(), args, out)

        def wrap(name, fn):
            def call(*args, **kwargs):
                out = fn(*args, **kwargs)
                self.add(f"{self.stack[-1] if self.stack else 'model'}/{name}", args, out)
                return out
            return call

        saved = {name: getattr(ops, name) for name in OPS}
        handles = [nn_module.register_module_forward_pre_hook(pre), nn_module.register_module_forward_hook(post)]
        for name, fn in saved.items():
            setattr(ops, name, wrap(name, fn))
        token = taps._ACTIVE.set(self)               # the model's taps too
        try:
            yield self
        finally:
            taps._ACTIVE.reset(token)
            for h in handles:
                h.remove()
            for name, fn in saved.items():
                setattr(ops, name, fn)


def _joined(parts: list[list[torch.Tensor]]) -> list[torch.Tensor] | None:
    """Each output slot of a key's calls, flattened and joined in call order (the general step's per-sequence
    calls then line up with the fixed step's batched rows); None if the calls return different slot counts."""
    if not parts or any(len(p) != len(parts[0]) for p in parts):
        return None
    return [torch.cat([p[i].flatten().float() for p in parts]) for i in range(len(parts[0]))]


def differences(fixed: Recorder, general: Recorder) -> list[str]:
    out = []
    for key, calls in fixed.calls.items():
        other = general.calls.get(key)
        if other is None:
            continue                              # a call only one path makes (e.g. decode-only helpers)
        a_out, b_out = _joined([c[1] for c in calls]), _joined([c[1] for c in other])
        if a_out is None or b_out is None or [t.numel() for t in a_out] != [t.numel() for t in b_out]:
            out.append(f"  rows differ  {key} ({len(calls)} vs {len(other)} calls)")
            continue
        if all(torch.equal(x, y) for x, y in zip(a_out, b_out, strict=True)):
            continue
        a_in, b_in = _joined([c[0] for c in calls]), _joined([c[0] for c in other])
        same_in = (a_in is not None and b_in is not None and [t.numel() for t in a_in] == [t.numel() for t in b_in]
                   and all(torch.equal(x, y) for x, y in zip(a_in, b_in, strict=True)))
        worst = max(((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()
                    for x, y in zip(a_out, b_out, strict=True) if x.numel())
        n = sum(int((x != y).sum()) for x, y in zip(a_out, b_out, strict=True))
        kind = "tap" if "/tap:" in key else "ORIGIN" if same_in else "carried"     # a tap has no input to compare
        out.append(f"  {kind:<11} {key}: {n} elements differ, max |diff| / max "
                   f"{worst:.2e}")
    return out


def state_differences(a, b) -> list[str]:
    """The state a later step reads as data: rings, compressed entries, indexer keys. (The compressors' partial-
    block buffers are left out: after a block completes the fixed step leaves its last token's row in the
    current-block rows, the general step does not; stale rows, overwritten before they are read.)"""
    out = []
    for i, (la, lb) in enumerate(zip(a.layers, b.layers, strict=True)):
        for name in ("ring", "entries", "index_keys"):
            x, y = getattr(la, name), getattr(lb, name)
            if x is not None and not torch.equal(x, y):
                out.append(f"  state layer {i} {name}: {int((x != y).sum())} elements differ")
    return out


def scenario(device: str, emulation: bool):
    """tests/test_graphs_gpu.py's scenario: its tiny checkpoint (seed 1234) in bf16, prompts of 5, 130 and 200
    tokens prefilled into a state with a scratch slot and page -> (model, prompts, state, pages, generator; the
    generator continues to the first decode tokens, as in the test)."""
    from graph_bisect import _prefilled_on
    from test_graphs_gpu import _prefilled

    import dsv4
    from dsv4.checkpoint import synthesize
    from dsv4.config import tiny_config

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = synthesize(tiny_config(), Path(tmp), seed=1234, progress=False)
        model = dsv4.load_model(ckpt, device=device, dtype=torch.bfloat16, quant_emulation=emulation,
                                progress=False)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 512, (n,), generator=gen).tolist() for n in (5, 130, 200)]
    state, pages = _prefilled_on(model, prompts, device, _prefilled)
    return model, prompts, state, pages, gen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--emulation-off", action="store_true")
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    from graph_bisect import PAGES
    from test_graphs_gpu import _copy

    from dsv4.model.state import DecodeBatch, StepBatch

    t, dev = args.tokens, args.device
    model, prompts, state, pages, gen = scenario(dev, not args.emulation_off)
    fixed_state, general_state = _copy(state), _copy(state)
    tokens = torch.randint(2, 512, (3 * t,), generator=gen).tolist()
    for step in range(20):
        rows = [(i, len(p) + step * t, pages[i]) for i, p in enumerate(prompts)]
        ids = torch.tensor([tokens], device=dev)
        with torch.inference_mode(), Recorder(model).hooks() as fr:
            fixed = model.main_logits(model.step(ids, DecodeBatch.build(rows, PAGES, dev, t), fixed_state))[0]
        with torch.inference_mode(), Recorder(model).hooks() as gr:
            general = model.main_logits(model.step(ids, StepBatch.build([(s, p, t, pg) for s, p, pg in rows], dev),
                                                   general_state))[0]
        report = differences(fr, gr) + state_differences(fixed_state, general_state)
        cos = torch.nn.functional.cosine_similarity(fixed.double(), general.double(), dim=-1)
        print(f"step {step}: logits equal {torch.equal(fixed, general)}, worst row cosine {cos.min().item():.6f}, "
              f"{sum(not line.startswith('  rows differ') for line in report)} differing records", flush=True)
        if any(not line.startswith("  rows differ") for line in report):
            print("\n".join(report))
            return step
        tokens = general.argmax(-1).tolist()
    print("the two paths computed the same bits at every step")
    return -1


if __name__ == "__main__":
    main()
