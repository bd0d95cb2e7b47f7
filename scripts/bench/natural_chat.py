"""How the built-in model answers coding requests typed the way a newcomer types them (no signature, plain
English), outside the chat set's templates: twelve fixed requests, greedy, 256 tokens, in one batch on the CPU.
Runs the chat acceptance check of scripts/eval_builtin.py (`chat_eval`: a `def` and EOS within 256 tokens) on these
requests; prints per request whether the reply ended with EOS, its length and its first `def` line, then the count.
Usage: PYTHONPATH=. python3 scripts/bench/natural_chat.py [MODEL_DIR] [--threads N] [--out PATH]
(MODEL_DIR: default the installed built-in model)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

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

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # scripts/: the acceptance check
    import eval_builtin

    from dsv4.builtin import builtin_model_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", help="model directory (default: the installed built-in model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="write the replies as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = dsv4.LLM(args.model or str(builtin_model_path()), max_num_seqs=len(REQUESTS), num_pages=4 * len(REQUESTS),
                   page_size=128)
    res = eval_builtin.chat_eval(llm, dsv4.SamplingParams, [{"messages": [{"role": "user", "content": r}]}
                                                            for r in REQUESTS])
    for r in res["replies"]:
        head = re.search(r"^\s*(?:async )?def .*$", r["reply"], re.M)
        print(f"{'EOS' if r['eos'] else 'cut'} {r['tokens']:3d}  {r['request']:<75} "
              f"{head.group(0).strip() if head else '-'}")
    print(f"def + EOS: {res['def_and_eos']}/{res['n']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
