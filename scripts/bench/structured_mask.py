"""Per-token cost of a grammar mask on the DeepSeek-V4 vocabulary (129,280 ids): one `fill_next_token_bitmask`
per generated token (host CPU), and applying the mask to a row of logits (CPU, and CUDA when present).

    python scripts/bench/structured_mask.py [--rows 1 8 32] [--repeats 3]

Each grammar is walked along a valid output (its tokens from the V4 tokenizer); every step fills the masks of
`rows` matchers at that state (the batch filler's threads, as the engine does) and then accepts the token.
Prints a table (median microseconds per step) and writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dsv4.chat.dsml import render_tool_calls
from dsv4.chat.dsml_grammar import tool_call_tag
from dsv4.engine.structured import Grammars, StructuredOutputsParams
from dsv4.tokenizer import load_tokenizer

V4_VOCAB, EOS = 129280, 1
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
TOOL = {"type": "function", "function": {"name": "search", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
    "required": ["query"]}}}
CASES = {  # name -> (constraint, a valid output)
    "json_schema": (StructuredOutputsParams(json=SCHEMA),
                    '{"name": "Ada Lovelace", "age": 36, "tags": ["math", "poetry", "engines"]}'),
    "dsml_tool_call": (StructuredOutputsParams(structural_tag=tool_call_tag([TOOL], "search")),
                       render_tool_calls([{"function": {"name": "search",
                                                        "arguments": {"query": "weather in Paris", "limit": 5}}}])),
    "choice": (StructuredOutputsParams(choice=["positive", "negative", "neutral"]), "negative"),
}


def walk(grammars: Grammars, so: StructuredOutputsParams, ids: list[int], rows: int) -> list[float]:
    import xgrammar as xgr

    compiled = grammars.compile(so)
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(rows)]
    batch = xgr.BatchGrammarMatcher(max_threads=2)
    mask = torch.empty(rows, (V4_VOCAB + 31) // 32, dtype=torch.int32)
    times = []
    for token in [*ids, EOS]:
        start = time.perf_counter()
        batch.batch_fill_next_token_bitmask(matchers, mask)
        times.append(time.perf_counter() - start)
        for m in matchers:
            assert m.accept_token(token), token
    return times


def apply_cost(rows: int, device: str, repeats: int = 50) -> float:
    import xgrammar as xgr

    logits = torch.randn(rows, V4_VOCAB, device=device)
    mask = torch.randint(-2**31, 2**31 - 1, (rows, (V4_VOCAB + 31) // 32), dtype=torch.int32).to(device)
    xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=V4_VOCAB)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=V4_VOCAB)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tokenizer = load_tokenizer(None)
    grammars = Grammars(tokenizer, V4_VOCAB, EOS)
    for name, (so, _) in CASES.items():
        start = time.perf_counter()
        grammars.compile(so)
        print(f"{name}: compile {1e3 * (time.perf_counter() - start):.0f} ms (first grammar includes the "
              "vocabulary preprocessing)")
    print(f"{'grammar':16s} {'rows':>4s} {'tokens':>6s} {'fill us/step (median)':>22s} {'p90':>8s}")
    for name, (so, text) in CASES.items():
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        for rows in args.rows:
            times = sorted(t for _ in range(args.repeats) for t in walk(grammars, so, ids, rows))
            p90 = times[int(0.9 * (len(times) - 1))]
            print(f"{name:16s} {rows:4d} {len(ids):6d} {1e6 * statistics.median(times):22.0f} {1e6 * p90:8.0f}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for rows in args.rows:
            print(f"apply mask {device:4s} rows {rows:3d}: {1e6 * apply_cost(rows, device):.0f} us")


if __name__ == "__main__":
    main()
