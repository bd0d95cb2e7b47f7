"""The built-in model's chat and code figures alone (scripts/eval_builtin.py's own functions, same prompts, greedy,
CPU): ~1 minute on 2 cores instead of the full evaluation's ~10, for checking a training direction between runs.
With --selection, also the same checks on a set disjoint from the acceptance one (the held-out chat requests after
the eval's 20, and SELECTION_CODE_PROMPTS): what scripts/bench/train_variants.sh chooses a variant by, so the
acceptance figures of the chosen one are not picked by themselves. Always: README's prompt scored against plain
bodies (`readme_bodies`) and generated alone as `dsv4 generate` does (`readme_greedy`: does it loop?).
Usage: PYTHONPATH=. python3 scripts/bench/quick_eval_builtin.py MODEL_DIR [--out EVAL.json] [--chat-only]
       [--selection]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import eval_builtin as E  # noqa: E402  (a sibling script, found through sys.path)
from install_builtin import PROMPT as README_PROMPT  # noqa: E402  (the prompt CI pins: README's)

from dsv4.cli import DEFAULT_MAX_TOKENS  # noqa: E402

# Written for selection (none in CODE_PROMPTS, none verbatim in the training data): everyday signatures and class
# headers like the eval's, bare, at BOS.
SELECTION_CODE_PROMPTS = (
    "def factorial(n):",
    "def reverse_words(sentence):",
    "def median(values):",
    "def dedupe(items):",
    "def load_json(path):",
    "def clamp(value, low, high):",
    "def word_frequencies(text):",
    "def rotate_left(items, k):",
    "def to_snake_case(name):",
    "class Queue:\n    def __init__(self):",
    "class Point:\n    def __init__(self, x, y):",
    "def slugify(title):",
)

# Plain bodies for the README's prompt, scored teacher-forced (eval_builtin.body_logprob): whether a run moves the
# model towards a plausible function for it (issue 17 item 6) before its greedy text shows it. Evaluation only:
# written here, never in the training data.
README_BODIES = {
    "recursive": "\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "iterative": "\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "docstring": '\n    """Return the n-th Fibonacci number."""\n    if n < 2:\n        return n\n'
                 "    return fibonacci(n - 1) + fibonacci(n - 2)\n",
}


def readme_bodies(model, tokenizer) -> dict:
    return {name: E.body_logprob(model, tokenizer, README_PROMPT, body) for name, body in README_BODIES.items()}


README_TOKENS = DEFAULT_MAX_TOKENS     # `dsv4 generate`'s default budget
README_MIN_DISTINCT4 = 0.6   # item 4's mean bound, here for the one text a newcomer sees first


def readme_greedy(llm, sp) -> dict:
    """README's command as a newcomer runs it: the prompt ALONE (one sequence: on CPU a batch changes the greedy
    path; v7a's batched text ended after 127 tokens, alone it looped to 256), greedy, `dsv4 generate`'s budget.
    `loops`: it runs to the budget with distinct 4-grams below README_MIN_DISTINCT4 (the nineteenth session's v7a
    and v7b passed item 4 and were not installed for this)."""
    o = llm.generate([README_PROMPT], sp(temperature=0, max_tokens=README_TOKENS))[0]
    eos = o.finish_reason == "stop"
    d4 = E.distinct_4gram_ratio(o.token_ids)
    return {"prompt": README_PROMPT, "text": o.text, "tokens": len(o.token_ids), "eos": eos, "distinct4": d4,
            "loops": not eos and d4 < README_MIN_DISTINCT4}


def main(argv=None) -> dict:
    import dsv4

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--data", default=str(REPO / ".builtin_data"), help="scripts/builtin_data.py's output folder")
    ap.add_argument("--out", help="write the chat and code results as JSON here")
    ap.add_argument("--chat-only", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--selection", action="store_true",
                    help="also the checks on the selection set (held-out chat requests 21+, SELECTION_CODE_PROMPTS)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    llm = dsv4.LLM(args.model, max_num_seqs=E.N_CHAT, num_pages=E.N_CHAT * 4, page_size=128)
    held_out = json.loads((Path(args.data) / "heldout_chat.json").read_text())
    requests = held_out[:E.N_CHAT]
    t = time.perf_counter()
    out = {"model": args.model, "chat": E.chat_eval(llm, dsv4.SamplingParams, requests)}
    print("chat", {k: v for k, v in out["chat"].items() if not isinstance(v, list)},
          f"{time.perf_counter() - t:.0f} s", flush=True)
    if not args.chat_only:
        out["code"] = E.code_eval(llm, dsv4.SamplingParams)
        print("code", {k: v for k, v in out["code"].items() if not isinstance(v, list)}, flush=True)
    if args.selection:
        if len(held_out) <= E.N_CHAT:
            raise SystemExit(f"--selection needs held-out chat requests beyond the eval's {E.N_CHAT}")
        out["selection"] = {"chat": E.chat_eval(llm, dsv4.SamplingParams, held_out[E.N_CHAT:]),
                            "code": E.code_eval(llm, dsv4.SamplingParams, SELECTION_CODE_PROMPTS)}
        print("selection", {k: {n: v for n, v in r.items() if not isinstance(v, list)}
                            for k, r in out["selection"].items()}, flush=True)
    out["readme_bodies"] = readme_bodies(llm.model, llm.tokenizer)
    print("readme bodies", {k: round(v["mean"], 3) for k, v in out["readme_bodies"].items()}, flush=True)
    out["readme_greedy"] = readme_greedy(llm, dsv4.SamplingParams)
    print("readme greedy", {k: v for k, v in out["readme_greedy"].items() if k != "text"}, flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    return out


if __name__ == "__main__":
    main()
