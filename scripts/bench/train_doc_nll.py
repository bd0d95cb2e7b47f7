"""How well a built-in model recalls documents it trained on: teacher-forced NLL and top-1 accuracy of training
documents chosen by their source package and a substring (fp32, QAT emulation on, as the model ships).

A document seen several times in training and still scored like unseen code has not been memorised: the model's
capacity and token budget, not the data's coverage, limit what it can recall (bench/NOTES.md, twenty-second
session: the Fibonacci functions of the `algorithms` package).
Usage: PYTHONPATH=. python3 scripts/bench/train_doc_nll.py DATA_DIR [--model DIR] [--source algorithms]
       [--contains fib_] [--max-docs 8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

import dsv4
from dsv4.builtin import builtin_model_path


def documents(data: Path, source: str, contains: str, tok: Tokenizer, limit: int) -> list[tuple[int, np.ndarray]]:
    """(index, ids) of up to `limit` documents of `source` whose text contains `contains` (train.npz order)."""
    npz = np.load(data / "train.npz")
    names = list(npz["source_names"])
    if source not in names:
        sys.exit(f"train_doc_nll: no source {source!r} in {data}/train.npz (sources: {', '.join(names)})")
    ids, offsets, src = npz["ids"], npz["offsets"], npz["source"]      # each read once: npz reloads per access
    found = []
    for i in np.nonzero(src == names.index(source))[0]:
        doc = ids[offsets[i]:offsets[i + 1]]
        if contains in tok.decode(doc.tolist(), skip_special_tokens=False):
            found.append((int(i), doc.astype(np.int64)))
            if len(found) == limit:
                break
    return found


def score(model, doc: np.ndarray) -> tuple[float, float, torch.Tensor]:
    """(mean NLL, top-1 accuracy, per-token NLL) of predicting doc[1:] from its prefixes."""
    ids = torch.from_numpy(doc)[None]
    with torch.no_grad():
        logits = model(ids)[0, :-1].float()
    nll = -torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
    top1 = (logits.argmax(-1) == ids[0, 1:]).float().mean()
    return nll.mean().item(), top1.item(), nll


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", type=Path, help="data directory with train.npz (scripts/builtin_data.py's output)")
    ap.add_argument("--model", type=Path, default=None, help="model directory (default: the built-in)")
    ap.add_argument("--source", default="algorithms", help="source package of the documents")
    ap.add_argument("--contains", default="fib_", help="substring the document's text must contain")
    ap.add_argument("--max-docs", type=int, default=8)
    args = ap.parse_args()
    args.model = args.model or builtin_model_path()
    tok = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    model = dsv4.load_model(args.model, dtype=torch.float32)
    print("| document | tokens | mean NLL | top-1 | costliest tokens (nats) |\n|---|---|---|---|---|")
    for i, doc in documents(args.data, args.source, args.contains, tok, args.max_docs):
        mean, top1, nll = score(model, doc)
        worst = ", ".join(f"`{tok.id_to_token(int(doc[j + 1]))}` {nll[j]:.1f}" for j in nll.argsort()[-3:].flip(0))
        print(f"| {i} | {len(doc)} | {mean:.3f} | {top1:.2f} | {worst} |")


if __name__ == "__main__":
    main()
