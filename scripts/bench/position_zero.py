"""Does a model know the start of a sequence? The next-token distribution after a code prompt placed (a) at
position 0 (BOS + prompt: what `dsv4 generate` runs), (b) after ~700 tokens of held-out text and a BOS (a document
start inside a sequence: what concatenated training packs show the model), (c) after the same text without BOS.

A model trained only on long concatenated packs answers (b) and (c) well and (a) badly: it has hardly seen a
sequence's first positions (empty window, no compressed entries). bench/notes/train_rows.md has the measurements.
Usage: PYTHONPATH=. python3 scripts/bench/position_zero.py MODEL_DIR [MODEL_DIR ...] [--data .builtin_data]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

PROMPTS = ("def fibonacci(n):", "def is_palindrome(text):", "class Stack:\n    def __init__(self):")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--data", default=".builtin_data", help="folder with heldout.py.txt (the context text)")
    ap.add_argument("--top", type=int, default=4)
    args = ap.parse_args()
    from tokenizers import Tokenizer

    import dsv4

    torch.set_num_threads(1)
    context = (Path(args.data) / "heldout.py.txt").read_text()[2000:3500]
    rows = []
    for path in args.models:
        model = dsv4.load_model(path, dtype=torch.float32, progress=False)
        tok = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
        bos = model.cfg.bos_token_id
        pre = tok.encode(context, add_special_tokens=False).ids
        for prompt in PROMPTS:
            body = tok.encode(prompt, add_special_tokens=False).ids
            for where, ids in (("position 0", [bos, *body]), ("after text + BOS", [bos, *pre, bos, *body]),
                               ("after text", [bos, *pre, *body])):
                with torch.no_grad():
                    p = model(torch.tensor([ids]), last_only=True)[0, -1].softmax(-1)
                v, i = p.topk(args.top)
                top = [(tok.id_to_token(int(a)), round(float(b), 3)) for a, b in zip(i, v, strict=True)]
                rows.append({"model": path, "prompt": prompt, "where": where, "tokens": len(ids), "top": top})
                print(f"{Path(path).parent.name:>8} {prompt[:24]!r:28} {where:18} {top}", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
