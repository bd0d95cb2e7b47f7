"""TTFT of turn 2 and turn 5 of a multi-turn conversation, with and without prefix caching.

A conversation starts with a `--history`-token prompt; every later turn resends everything (previous prompt +
reply) plus `--user` new tokens, as a chat client does. Each turn's time to first token is measured on one engine
with prefix caching and on one without (same model, same token ids, greedy), and the replies are compared.

  H200 (lead): python scripts/bench/prefix_cache.py --repeats 3 --out bench/results/prefix_cache_h200.json
               (Flash width, 4 layers, synthesised as `dsv4 bench` builds it; 16k-token history)
  CPU:         python scripts/bench/prefix_cache.py --model builtin --history 1024 --user 128 --reply 8 \
                   --repeats 3 --out bench/results/prefix_cache_cpu_builtin.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))     # this checkout's dsv4, not an installed one

from dsv4.engine.config import EngineConfig
from dsv4.engine.engine import Engine
from dsv4.engine.sampling import SamplingParams


def build(name: str, layers: int, device: str):
    """(model, tokenizer) for 'flash' (width of V4-Flash, `layers` blocks, random weights, bf16, QAT emulation as
    dsv4/bench/run.py builds it) or 'builtin' (the shipped tiny model, fp32)."""
    from dsv4.tokenizer import load_tokenizer

    if name == "builtin":
        import dsv4
        from dsv4.builtin import builtin_model_path

        path = builtin_model_path()
        return dsv4.load_model(path, device=device, dtype=torch.float32, progress=False), load_tokenizer(path)
    from dsv4.checkpoint.synth import synthesize_tensors
    from dsv4.config import ModelConfig
    from dsv4.loader import load_tensors

    cfg = ModelConfig.preset("flash").truncated(layers)
    dev = torch.device(device)
    model = load_tensors(cfg, synthesize_tensors(cfg, 0, dev), dev, torch.bfloat16, quant_emulation=True)
    return model, load_tokenizer(None)


def conversation(engine: Engine, history: list[int], user: list[list[int]], reply: int) -> list[dict]:
    """Run the turns one after another; per turn: prompt length, TTFT, cached tokens, reply ids."""
    params = SamplingParams(temperature=0.0, max_tokens=reply, ignore_eos=True)
    prompt, turns = list(history), []
    for k, new in enumerate(user):
        if k:
            prompt = prompt + turns[-1]["reply"] + new
        start = time.perf_counter()
        out = engine.add_request(f"turn{k + 1}-{id(engine)}", prompt, params)
        while not out.token_ids:
            engine.step()
        ttft = time.perf_counter() - start
        while not out.finished:
            engine.step()
        turns.append({"turn": k + 1, "prompt_tokens": len(prompt), "ttft_s": ttft,
                      "cached_tokens": out.num_cached_tokens, "reply": list(out.token_ids)})
    return turns


def first_difference(a: list[list[int]], b: list[list[int]]) -> dict | None:
    """The first (turn, reply index) where two conversations' replies differ; None when they are equal."""
    for turn, (x, y) in enumerate(zip(a, b, strict=True), start=1):
        for i, (u, v) in enumerate(zip(x, y, strict=True)):
            if u != v:
                return {"turn": turn, "index": i}
    return None


def run(args) -> dict:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = build(args.model, args.layers, device)
    vocab = min(model.cfg.vocab_size, tokenizer.get_vocab_size())
    gen = torch.Generator().manual_seed(args.seed)
    history = torch.randint(2, vocab, (args.history,), generator=gen).tolist()
    user = [[]] + [torch.randint(2, vocab, (args.user,), generator=gen).tolist() for _ in range(args.turns - 1)]
    max_len = args.history + (args.turns - 1) * (args.user + args.reply) + args.reply + 8
    res = {"model": args.model, "layers": model.cfg.n_layers, "device": device, "history": args.history,
           "user": args.user, "reply": args.reply, "page_size": args.page_size,
           "max_num_batched_tokens": args.max_num_batched_tokens,
           "host": platform.node(), "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None}
    settings = [("without_caching", False, args.max_num_batched_tokens),
                ("with_caching", True, args.max_num_batched_tokens)]
    if args.control:
        # the control: no caching, prefill chunks of one page instead of max_num_batched_tokens. Caching changes
        # nothing but where prefill chunks start and end; if this changes the replies too, a difference between
        # the first two settings is the kernels' shape-dependent rounding (GPU GEMMs pick their reduction order
        # by shape), not the cache.
        settings.append(("without_caching_page_chunks", False, args.page_size))
    replies = {}
    for key, caching, chunk in settings:
        runs = []
        for _ in range(args.repeats):                               # a fresh engine (empty cache) each time
            engine = Engine(model, tokenizer, EngineConfig(
                device=device, max_model_len=max_len, max_num_seqs=2, page_size=args.page_size,
                max_num_batched_tokens=chunk, enable_prefix_caching=caching, cpu_cache_gib=args.cpu_cache_gib))
            conversation(engine, history[-300:], [[]], 4)         # warm-up (kernels, graphs), a different prefix
            runs.append(conversation(engine, history, user, args.reply))
            del engine
        turns = [dict(t) for t in runs[0]]
        for k, t in enumerate(turns):                               # the least disturbed of the repeats
            t["ttft_all_s"] = [r[k]["ttft_s"] for r in runs]
            t["ttft_s"] = min(t["ttft_all_s"])
        res[key] = [{k: v for k, v in t.items() if k != "reply"} for t in turns]
        replies[key] = [t["reply"] for t in turns]
        res[key + "_repeats_agree"] = all([t["reply"] for t in r] == replies[key] for r in runs)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    res["replies_equal"] = replies["with_caching"] == replies["without_caching"]
    res["first_difference"] = first_difference(replies["without_caching"], replies["with_caching"])
    if args.control:
        res["control_replies_equal"] = replies["without_caching_page_chunks"] == replies["without_caching"]
        res["control_first_difference"] = first_difference(replies["without_caching"],
                                                           replies["without_caching_page_chunks"])
    for k in (2, 5):
        if k <= args.turns:
            off, on = res["without_caching"][k - 1]["ttft_s"], res["with_caching"][k - 1]["ttft_s"]
            res[f"turn{k}_ttft_s"] = {"without": off, "with": on, "speedup": off / on}
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["flash", "builtin"], default="flash")
    p.add_argument("--layers", type=int, default=4, help="flash: blocks kept (default 4, as dsv4 bench)")
    p.add_argument("--device", help="default: cuda when available")
    p.add_argument("--history", type=int, default=16384, help="tokens of the first prompt (default 16384)")
    p.add_argument("--user", type=int, default=256, help="new tokens per later turn (default 256)")
    p.add_argument("--reply", type=int, default=64, help="tokens generated per turn (default 64)")
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--page-size", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--cpu-cache-gib", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--control", action="store_true",
                   help="also run without caching in page-sized prefill chunks (tells rounding from a cache defect)")
    p.add_argument("--repeats", type=int, default=1, help="whole conversations per setting; TTFT = the minimum")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    res = run(args)
    for k in (2, 5):
        if f"turn{k}_ttft_s" in res:
            t = res[f"turn{k}_ttft_s"]
            print(f"turn {k}: TTFT {t['without'] * 1e3:.1f} ms without caching, {t['with'] * 1e3:.1f} ms with "
                  f"({t['speedup']:.1f}x; {res['with_caching'][k - 1]['cached_tokens']} of "
                  f"{res['with_caching'][k - 1]['prompt_tokens']} prompt tokens cached)")
    print(f"replies equal with and without caching: {res['replies_equal']} "
          f"(first difference: {res['first_difference']})")
    if args.control:
        print(f"control, no caching, page-sized chunks: replies equal to the default chunking: "
              f"{res['control_replies_equal']} (first difference: {res['control_first_difference']})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
