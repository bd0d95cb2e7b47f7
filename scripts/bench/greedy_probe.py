"""Time, ATen ops and host reads of the greedy-repetition probe (train/greedy_probe.py) on any device.

The probe's forwards are launch-bound on a GPU (P short sequences of <= prefix + tokens tokens), so the figures to
cut are the dispatched ops per forward (~ kernel launches on CUDA) and the host reads (`SyncCounter`). Builds the
tiny test config or `builtin_config(2)` from random weights as the trainer does (QAT emulation on,
`prepare_full(qat=True)`), then measures one greedy forward (task "greedy", the longest: prefix + tokens - 1
tokens per sequence), the whole `greedy_continue`, and the seq-UL term's forward + backward.
`--per-sequence` measures the probe as it was before (the sequences attended one by one).
Usage: PYTHONPATH=. python3 scripts/bench/greedy_probe.py [--config v2|tiny] [--prefixes 32] [--prefix-len 32]
       [--tokens 64] [--device cpu] [--top 15] [--no-count] [--no-continue] [--per-sequence]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location("train_step_ops", Path(__file__).resolve().parent / "train_step_ops.py")
train_step_ops = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_step_ops)


def build(config: str, device: str, dtype: torch.dtype, tmp: Path):
    from dsv4.builtin import builtin_config
    from dsv4.checkpoint import synthesize
    from dsv4.config import tiny_config
    from dsv4.loader import load_model
    from dsv4.train.forward import TrainStep
    from dsv4.train.params import prepare_full, refresh_qat

    cfg = builtin_config(2) if config == "v2" else tiny_config()
    ckpt = synthesize(cfg, tmp / "base", seed=0, progress=False)
    net = prepare_full(load_model(ckpt, device=device, dtype=dtype, quant_emulation=True, progress=False),
                       qat=True)
    refresh_qat(net)              # as `Trainer.train_step` before its packs and the probe: weights rounded once
    return TrainStep(net, grad_ckpt=False)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int = 1) -> float:
    fn()                                                          # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / repeat


def counted(fn, top: int, label: str) -> tuple[int, int]:
    """ATen ops and host reads of fn(), with the top call sites of both."""
    ops = train_step_ops.OpCounter()
    with ops:
        fn()
    with train_step_ops.SyncCounter() as syncs:
        fn()
    n = sum(ops.forward.values())
    print(f"{label}: {n} ops, {syncs.total} host reads")
    for s, k in ops.forward.most_common(top):
        print(f"  {k:6d}  {s}")
    for s, k in syncs.sites.most_common(top):
        print(f"  sync {k:4d}  {s}")
    return n, syncs.total


def per_sequence_batch(P: int, S: int, device):
    """The probe's batch before the change: P sequences of one flattened `StepBatch`, each in pages of its own."""
    from dsv4.model.state import StepBatch

    pages = -(-S // 128)
    return StepBatch.build([(i, 0, S, range(i * pages, (i + 1) * pages)) for i in range(P)], device)


def main(argv=None) -> dict:
    from dsv4.train.forward import PackedBatch
    from dsv4.train.greedy_probe import greedy_continue, repeat_mask, sequences_batch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=("v2", "tiny"), default="v2")
    ap.add_argument("--prefixes", type=int, default=32)
    ap.add_argument("--prefix-len", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--no-continue", action="store_true", help="skip timing the whole greedy_continue")
    ap.add_argument("--no-count", action="store_true", help="only time (the counters trace every op: slow)")
    ap.add_argument("--count-only", action="store_true", help="only count ops and host reads")
    ap.add_argument("--per-sequence", action="store_true",
                    help="the probe as before: the P sequences as a flattened StepBatch, attended one by one")
    args = ap.parse_args(argv)
    if args.per_sequence:
        import dsv4.train.greedy_probe as probe

        sequences_batch = probe.sequences_batch = per_sequence_batch
    P, s, L, dev = args.prefixes, args.prefix_len, args.tokens, args.device
    with tempfile.TemporaryDirectory() as tmp:
        step = build(args.config, dev, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype], Path(tmp))
        vocab = step.model.cfg.vocab_size
        ids = torch.randint(1, vocab, (P, s + L), generator=torch.Generator().manual_seed(0)).to(dev)
        S = s + L - 1                                             # the last greedy forward's length

        def greedy():
            with torch.no_grad():
                return step(PackedBatch(ids[:, :S].reshape(1, -1), None, sequences_batch(P, S, dev), []),
                            task="greedy")

        def seq_ul():
            pb = PackedBatch(ids.reshape(1, -1), None, sequences_batch(P, s + L, dev), [])
            step(pb, task="seq_ul", repeats=repeat_mask(ids), first=s).backward()
            step.model.zero_grad(set_to_none=True)

        out = {"config": args.config, "P": P, "prefix": s, "tokens": L, "device": dev, "dtype": args.dtype,
               "per_sequence": args.per_sequence}
        if not args.no_count:
            out["greedy_ops"], out["greedy_syncs"] = counted(greedy, args.top, f"greedy forward ({P} x {S} tokens)")
            out["seq_ul_ops"], out["seq_ul_syncs"] = counted(seq_ul, args.top, f"seq_ul fwd+bwd ({P} x {s + L})")
        if not args.count_only:
            out["greedy_forward_s"] = timed(greedy, dev, 3)
            out["seq_ul_s"] = timed(seq_ul, dev, 1)
        if not (args.no_continue or args.count_only):
            out["greedy_continue_s"] = timed(lambda: greedy_continue(step, ids[:, :s], L), dev)
        print(json.dumps(out))
        return out


if __name__ == "__main__":
    main()
