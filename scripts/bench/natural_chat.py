"""How the built-in model answers coding requests typed the way a newcomer types them (no signature, plain
English), outside the chat set's templates: twelve fixed requests, greedy, 256 tokens, in one batch on the CPU.
Prints per request whether the reply ended with EOS, its length and the reply's first `def` line, then how many
replies hold a `def` and end with EOS (the chat acceptance check of scripts/eval_builtin.py, on these requests).
Usage: PYTHONPATH=. python3 scripts/bench/natural_chat.py [MODEL_DIR] [--threads N] [--out PATH]
(MODEL_DIR: default the installed built-in model)
"""

from __future__ import annotations

import argparse
import json
import re

import torch

REQUESTS = (
    "Write a function that checks whether a number is prime.",
    "Write a function that returns the factorial of n.",
    "Write a function that reverses a string.",
    "Write a Python function that returns the largest element of a list.",
    "Write a function that counts the vowels in a string.",
    "Write a function that returns the sum of a list of numbers.",
    "Write a function that checks whether a string is a palindrome.",
    "Write a function that returns the n-th Fibonacci number.",
    "Write a function that removes duplicates from a list, keeping order.",
    "Write a function that computes the greatest common divisor of two integers.",
    "Write a function that converts Celsius to Fahrenheit.",
    "Write a function that flattens a nested list.",
)


def main() -> None:
    import dsv4
    from dsv4.builtin import builtin_model_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", help="model directory (default: the installed built-in model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="write the replies as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = dsv4.LLM(args.model or str(builtin_model_path()), max_num_seqs=len(REQUESTS), num_pages=4 * len(REQUESTS),
                   page_size=128)
    outs = llm.chat([[{"role": "user", "content": r}] for r in REQUESTS],
                    dsv4.SamplingParams(temperature=0, max_tokens=256))
    eos, rows = llm.model.cfg.eos_token_id, []
    for request, o in zip(REQUESTS, outs, strict=True):
        stopped = o.finish_reason == "stop" and bool(o.token_ids) and o.token_ids[-1] == eos
        head = re.search(r"^\s*(?:async )?def .*$", o.text, re.M)
        rows.append({"request": request, "eos": stopped, "tokens": len(o.token_ids),
                     "def": head.group(0).strip() if head else None, "reply": o.text})
        print(f"{'EOS' if stopped else 'cut'} {len(o.token_ids):3d}  {request:<75} {rows[-1]['def'] or '-'}")
    ok = sum(r["eos"] and r["def"] is not None for r in rows)
    print(f"def + EOS: {ok}/{len(rows)}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"def_and_eos": ok, "n": len(rows), "replies": rows}, f, indent=1)


if __name__ == "__main__":
    main()
