"""Evidence for `dsv4 finetune`: a tiny model learns to retrieve a key placed > 300 tokens back.

Each document is BOS, KEY, the key k repeated to fill the first 128-token block, 300-330 random filler tokens,
QUERY, k, EOS; the loss covers only the answer k and the EOS. The last copy of k is > 300 tokens before the answer
and the sliding window is 16 tokens, so the only route from the answer back to k is the compressed attention (the
HCA layer's 128-token block entries, the CSA layer's indexer picks). Guessing gives ln(16) / 2 = 1.39 nats per
target token (the EOS is free); retrieval gives ~0.
Usage: python scripts/finetune_retrieval.py OUT_DIR [--steps N]   (CPU: ~2-4 s per step)
       python scripts/finetune_retrieval.py OUT_DIR --prepare-only        (base model + data: for other runners,
                                                                          e.g. scripts/finetune_multigpu.sh)
       python scripts/finetune_retrieval.py OUT_DIR --accuracy MODEL_DIR  (held-out accuracy of a trained model)
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import torch

N_KEYS, KEY, QUERY, FIRST_KEY, FIRST_FILLER = 16, 3, 4, 10, 64


def config():
    from dsv4.config import tiny_config

    # sliding, CSA, HCA (+ the sliding MTP block); 4 experts, 1 hash layer: small enough for a CPU.
    return tiny_config(n_layers=3, compress_ratios=(0, 4, 128, 0), n_hash_layers=1, n_routed_experts=4,
                       vocab_size=256)


def document(rng: random.Random) -> dict:
    k = FIRST_KEY + rng.randrange(N_KEYS)
    filler = [rng.randrange(FIRST_FILLER, 256) for _ in range(rng.randrange(300, 331))]
    ids = [0, KEY] + [k] * 126 + [*filler, QUERY, k, 1]
    return {"input_ids": ids, "loss_mask": [0] * (len(ids) - 2) + [1, 1]}


def accuracy(model_dir: Path, n: int = 64) -> float:
    """Share of held-out documents whose answer is the argmax at the QUERY position."""
    import dsv4

    model = dsv4.load_model(model_dir, dtype=torch.float32, progress=False)
    rng, hits = random.Random(12345), 0
    with torch.no_grad():
        for _ in range(n):
            ids = document(rng)["input_ids"]
            logits = model(torch.tensor([ids[:-2]]), last_only=True)
            hits += int(logits[0, -1].argmax()) == ids[-2]
    return hits / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--prepare-only", action="store_true", help="write OUT/base and OUT/retrieval.jsonl, stop")
    ap.add_argument("--accuracy", metavar="MODEL_DIR", help="print the held-out accuracy of MODEL_DIR and OUT/base")
    args = ap.parse_args()
    from dsv4.checkpoint import synthesize
    from dsv4.train.loop import TrainConfig
    from dsv4.train.run import finetune

    out = Path(args.out)
    if args.accuracy:
        print(f"held-out retrieval accuracy: base {accuracy(out / 'base'):.3f}, {args.accuracy} "
              f"{accuracy(Path(args.accuracy)):.3f}")
        return
    base = synthesize(config(), out / "base", seed=7, progress=False)
    rng = random.Random(0)
    data = out / "retrieval.jsonl"
    data.write_text("".join(json.dumps(document(rng)) + "\n" for _ in range(2000)))
    if args.prepare_only:
        return
    train = TrainConfig(max_steps=args.steps, lr=3e-3, warmup_steps=20, seq_len=470, packs_per_step=4,
                        grad_ckpt=False, clip_grad=1.0)
    finetune(data, out / "run", str(base), train=train, quant_emulation=False)
    print(f"held-out retrieval accuracy: base {accuracy(base):.3f}, fine-tuned {accuracy(out / 'run' / 'model'):.3f}")
    shutil.rmtree(out / "run" / "train_state", ignore_errors=True)


if __name__ == "__main__":
    main()
