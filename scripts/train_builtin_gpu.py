"""Train the built-in model v2 from random init on one GPU, in a wall-clock budget, with dsv4's own trainer.

DATA is the folder `scripts/builtin_data.py` wrote (tokenizer.json, train.npz, heldout.py.txt). The model is
`builtin_config(2)` initialised by `dsv4 synth`'s generator (seed 0), loaded with `dsv4.load_model` (bf16 compute
on CUDA, fp32 on CPU; QAT emulation on) and prepared with `prepare_full(qat=True)`, so training computes what
the saved FP8/FP4 checkpoint computes; `dsv4.train.loop.Trainer` runs the steps (fp32 master weights, AdamW,
clipping, MTP loss, auxiliary-loss-free gate balancing). With --minutes, the step count (and so the cosine
schedule) is sized from the step time measured over the first steps, and the loop stops at the budget anyway.

OUT gets: model/ (official format + tokenizer, loadable by `dsv4.load_model`), metrics.jsonl, loss.png,
run.json (settings), perf.json (tokens/s, step times, peak GPU memory, device), eval.json (held-out perplexity,
a greedy sample).
Usage (GPU): python3 scripts/train_builtin_gpu.py .builtin_data /tmp/builtin_v2 --minutes 6.5 --bundle $OUT
(32k tokens a step: see --seq-len; bench/NOTES.md "run 6" and bench/notes/train_speed.md have the measurements)
CPU smoke test: python3 scripts/train_builtin_gpu.py .builtin_data /tmp/v2 --steps 3 --seq-len 512 --packs-per-step 1
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import re
import shutil
import statistics
import sys
import tarfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from builtin_data import load_documents, load_sources

from dsv4.train.command import add_probe_arguments, probe_fields

PROMPT = "def fibonacci(n):"
PPL_WINDOW = 512               # as v1's held-out perplexity
SHARD_BYTES = 15 * 2**20      # every file that comes back from the GPU machine must stay under 16 MiB


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", help="folder written by scripts/builtin_data.py")
    ap.add_argument("out")
    ap.add_argument("--minutes", type=float, default=None, help="wall-clock budget of the training loop")
    ap.add_argument("--steps", type=int, default=None, help="fixed number of steps (overrides the estimate)")
    ap.add_argument("--calibrate-steps", type=int, default=8, help="steps timed before sizing the schedule")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup-steps", type=int, default=40)
    ap.add_argument("--seq-len", type=int, default=32768,
                    help="tokens per pack (one sequence: fewer kernel launches per token than short ones, but the "
                         "indexer's scores and sort grow with the square of it; measured on an H200: 65,536 gave "
                         "40.8k tokens/s at 1.6 s a step and no better perplexity per token than 32,768, which "
                         "makes twice the optimizer steps; ~0.85 MB of activations a token without --grad-ckpt)")
    ap.add_argument("--grad-ckpt", action="store_true",
                    help="recompute every block (and the losses) in the backward: ~30 KB of activations a token "
                         "plus one block's, for 128k+ tokens a step, at ~50%% more ops a step")
    ap.add_argument("--packs-per-step", type=int, default=1)
    ap.add_argument("--row-len", type=int, default=1024,
                    help="each pack as --seq-len / ROW_LEN rows of ROW_LEN tokens, each a sequence from position 0 "
                         "starting with a document (documents bin-packed into rows, padded), run as one batch "
                         "(default 1024 = the data's longest document). 0: each pack's documents as ONE sequence, "
                         "as runs 1-13 did: the model then never learns the start of a sequence, where every prompt "
                         "begins (bench/notes/train_rows.md)")
    ap.add_argument("--per-document", action="store_true",
                    help="run each document as its own sequence, one attention call each (needs --row-len 0; "
                         "launch-bound on a GPU: ~3k tokens/s on an H200)")
    ap.add_argument("--compile", choices=("inductor", "aot_eager"), default=None,
                    help="run every block through torch.compile (dsv4/train/compiled.py; packs padded to --seq-len "
                         "tokens, rows packs to --seq-len / --row-len rows, so one graph set serves every step; the "
                         "first step includes the compilation; the greedy probe runs the blocks eager)")
    ap.add_argument("--init", help="continue from this model directory (a previous run's model/, same config): "
                                   "weights and gate biases only, so the optimiser and the schedule start afresh")
    ap.add_argument("--seed", type=int, default=0, help="data order (give a continuation another seed)")
    ap.add_argument("--chat-repeat", type=int, default=1, metavar="N",
                    help="each chat document N times an epoch (in different rows): more of the chat turn's end, "
                         "where run 16 went on with another def instead of closing the block with EOS")
    ap.add_argument("--upweight", default="", metavar="NAME=N[,NAME=N]",
                    help="every document of these sources (`stdlib` or a package's name, as in the data's "
                         "summary.json tokens_by_source) N times an epoch, on top of --chat-repeat: e.g. "
                         "algorithms=8 puts the small classic functions of data v4 in front of a short continuation "
                         "that would otherwise see a few of them")
    ap.add_argument("--probe-chat-share", type=float, default=0.0, metavar="X",
                    help="share of the greedy probe's prefixes that are chat requests of the data through the "
                         "assistant marker, --probe-prefix-len tokens long (default 0): the probe's greedy tokens "
                         "are then replies, and --seq-unlikelihood sees their loops (run 16's chat failures)")
    ap.add_argument("--probe-header-lens", default="", metavar="N,M",
                    help="with --probe-chat-share: further probes, in turn with the chat ones, whose prompts are "
                         "function headers of the chat answers (`def name(args):` after BOS, as a user's code prompt "
                         "is encoded) of these token lengths (e.g. 9,11): greedy continuations of a bare header are "
                         "where run 17's code loops were (in the docstring)")
    ap.add_argument("--probe-class-lens", default="", metavar="N,M",
                    help="with --probe-chat-share: further probes whose prompts are class headers of the code "
                         "documents (a `class` line, an optional one-line docstring, and the first method's `def` "
                         "line, after BOS) of these token lengths: where the code loops of the data v3 runs were "
                         "(`self.y = ...` repeated after `class Vector2D:` + `__init__`)")
    ap.add_argument("--mtp-weight", type=float, default=0.3)
    add_probe_arguments(ap)
    ap.add_argument("--tf32", action="store_true",
                    help="CUDA: the training steps' fp32 matmuls (the fp32 head of the main and MTP paths over every "
                         "position, mHC's mixes) on TF32 tensor cores, ~50 ms of a 0.4 s 32k-token step in fp32 on "
                         "an H200 (bench/results/h200_s18/train_probes.txt); the steps' greedy probes run with it, the "
                         "held-out evaluation after training and every inference path in full fp32")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    ap.add_argument("--no-eval", action="store_true", help="skip the held-out perplexity and the greedy sample")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="with --steps: run the last N steps under torch.profiler and write OUT/profile.txt (kernel "
                         "time and host time by op; where the step's time goes)")
    ap.add_argument("--bundle", help="also write the results as <= 8 files of < 16 MiB into this folder: "
                                     "model.tar.NN (join with cat, then untar), metrics.jsonl, loss.png, "
                                     "perf.json, eval.json")
    args = ap.parse_args(argv)
    if args.minutes is None and args.steps is None:
        ap.error("give --minutes (wall-clock budget) or --steps")
    if args.compile and args.per_document:
        ap.error("--compile needs one sequence per pack (padded to --seq-len): drop --per-document")
    if args.row_len and args.per_document:
        ap.error("--per-document needs --row-len 0 (rows run as one batch)")
    if args.row_len and (args.row_len < 2 or args.seq_len % args.row_len):
        ap.error(f"--row-len must divide --seq-len ({args.seq_len}), got {args.row_len}")
    for flag in ("probe_header_lens", "probe_class_lens"):
        try:
            setattr(args, flag, tuple(int(n) for n in getattr(args, flag).split(",") if n.strip()))
        except ValueError:
            ap.error(f"--{flag.replace('_', '-')} takes token counts like 9,11; got {getattr(args, flag)!r}")
        if getattr(args, flag) and not args.probe_chat_share:
            ap.error(f"--{flag.replace('_', '-')} needs --probe-chat-share (the share of each probe given to "
                     "prompts)")
    try:
        args.upweight = {n.strip(): int(k) for n, k in (w.split("=") for w in args.upweight.split(",") if w.strip())}
    except ValueError:
        ap.error(f"--upweight takes NAME=N pairs like algorithms=8; got {args.upweight!r}")
    if any(k < 1 for k in args.upweight.values()):
        ap.error(f"--upweight factors must be >= 1, got {args.upweight}")
    if args.profile and (not args.steps or args.profile >= args.steps):
        ap.error("--profile N needs --steps larger than N (the first steps include one-off costs)")
    return args


def repeat_chat(docs: list, kinds, n: int) -> tuple[list, list[int]]:
    """The documents with every chat document (kind 1) n times; their kinds alongside."""
    if n < 1:
        raise ValueError(f"--chat-repeat must be >= 1, got {n}")
    chat = [d for d, k in zip(docs, kinds, strict=True) if k]
    return list(docs) + chat * (n - 1), [int(k) for k in kinds] + [1] * len(chat) * (n - 1)


def upweight(docs: list, kinds, sources: list[str], weights: dict[str, int]) -> tuple[list, list[int]]:
    """The documents with those of each source in `weights` that many times in all; their kinds alongside.
    (`repeat_chat` appends whole rounds instead; the order does not matter: `row_packs` shuffles the rows.)
    A name no document has is an error (a typo would otherwise train on the plain mix, silently)."""
    unknown = sorted(set(weights) - set(sources))
    if unknown:
        raise ValueError(f"--upweight: no document comes from {unknown}; the sources are {sorted(set(sources))}")
    extra = [i for i, s in enumerate(sources) for _ in range(weights.get(s, 1) - 1)]      # each copy, by index
    return list(docs) + [docs[i] for i in extra], [int(k) for k in kinds] + [int(kinds[i]) for i in extra]


def chat_prompts(docs: list, kinds, length: int, end_id: int) -> list[list[int]]:
    """The chat documents' requests through `end_id` (the token that ends the prompt, `</think>` in chat mode)
    that are exactly `length` tokens long, in data order (the probe batches its prefixes as one [P, length])."""
    out = []
    for d, k in zip(docs, kinds, strict=True):
        if k and end_id in d.ids and d.ids.index(end_id) + 1 == length:
            out.append(list(d.ids[:length]))
    return out


HEADER = re.compile(r"def \w+\(.*\):")


def encoded_once(texts, tokenizer, lengths: tuple[int, ...], bos_id: int) -> list:
    """Each distinct text once, in order, encoded as a user's prompt is (`encode_prompt`: BOS + its tokens), those
    of the given lengths."""
    from dsv4.tokenizer import encode_prompt

    seen, out = set(), []
    for text in texts:
        if text in seen:
            continue
        seen.add(text)
        ids = encode_prompt(tokenizer, text, bos_id)
        if len(ids) in lengths:
            out.append(ids)
    return out


def header_prompts(docs: list, kinds, tokenizer, lengths: tuple[int, ...], end_id: int, bos_id: int) -> list:
    """The first one-line `def` header of each chat document's answer (after `end_id`), encoded as a user's
    prompt is (`encode_prompt`: BOS + the header's tokens), those of the given lengths, each once, in data order."""
    def headers():
        for d, k in zip(docs, kinds, strict=True):
            if k and end_id in d.ids:
                answer = tokenizer.decode(d.ids[d.ids.index(end_id) + 1:], skip_special_tokens=True)
                line = next((x.strip() for x in answer.splitlines() if HEADER.fullmatch(x.strip())), None)
                if line is not None:
                    yield line

    return encoded_once(headers(), tokenizer, lengths, bos_id)


CLASS_HEADER = re.compile(r'^class \w+(?:\([^\n]*\))?:\n(?:    """[^\n]*"""\n\n?)?    def \w+\(self[^\n]*\):$',
                          re.M)


def class_prompts(docs: list, kinds, tokenizer, lengths: tuple[int, ...], bos_id: int) -> list:
    """Each code document's class headers (`class Name(...):`, an optional one-line docstring, the first method's
    one-line `def`), encoded as a user's prompt is (BOS + tokens), those of the given lengths, each once, in data
    order."""
    texts = (m.group() for d, k in zip(docs, kinds, strict=True) if not k
             for m in CLASS_HEADER.finditer(tokenizer.decode(d.ids, skip_special_tokens=True)))
    return encoded_once(texts, tokenizer, lengths, bos_id)


def check_same_config(got, want, where: Path) -> None:
    """A continuation must be the built-in v2 architecture (max_seq_len is a serving limit, not a weight shape)."""
    from dataclasses import fields
    diff = {f.name: (getattr(got, f.name), getattr(want, f.name)) for f in fields(want)
            if f.name != "max_seq_len" and getattr(got, f.name) != getattr(want, f.name)}
    if diff:
        raise ValueError(f"{where}: not builtin_config(2); differs in (got, expected): {diff}")


def sized_steps(done: int, elapsed_s: float, step_times: list[float], budget_s: float,
                probe_s_per_step: float = 0.0) -> int:
    """Total steps that fit the budget: the steps already done plus what the remaining time buys at the median
    measured step time (5% margin for the slower steps), plus the greedy probes' time spread over the steps (the
    median alone misses them: one step in --greedy-probe-every carries a probe)."""
    per = statistics.median(step_times) + probe_s_per_step
    return done + max(1, int((budget_s - elapsed_s) * 0.95 / per))


def probe_s_per_step(probe_times: list[float], every: int) -> float:
    """The greedy probes' seconds spread over the steps, for `sized_steps`. The first probe is left out when there
    are others: it includes one-off costs (with --probe-cache on CUDA, the graph capture: 4.4 s against 1.2-1.7 s
    later on the H200), and counted in, it shrank run p1's 4-minute schedule to 144 s (thirteenth session)."""
    later = probe_times[1:] or probe_times
    return statistics.mean(later) / every if later else 0.0


def resize_now(step: int, calibrate_steps: int, max_steps: int, probed: bool) -> bool:
    """Size the schedule at the calibration step, then again after each greedy probe in the run's first quarter.
    At calibration the probes' cost is known from at most one or two probes, each with its one-off costs (a graph
    capture per probe shape: 5.2 s and 2.5 s for the first two in v7a against ~1.2 s later): sized once, v7a's
    6.2-minute schedule ended after 192 s of training (nineteenth session). Re-sizing while the cosine is still
    near its peak changes the learning rate of the steps that remain by a little."""
    return step == calibrate_steps or (probed and calibrate_steps < step <= max_steps // 4)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from dsv4.builtin import builtin_config
    from dsv4.checkpoint import synthesize
    from dsv4.loader import load_model
    from dsv4.train.compiled import compile_cache_counts
    from dsv4.train.data import PackStream, concat_pack, pack, row_packs
    from dsv4.train.dist import DistContext
    from dsv4.train.loop import TrainConfig, Trainer
    from dsv4.train.metrics import MetricsLog, plot_loss
    from dsv4.train.params import prepare_full
    from dsv4.train.save import export_state, model_values, write_checkpoint

    t_start = time.perf_counter()
    data, out = Path(args.data), Path(args.out)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    out.mkdir(parents=True, exist_ok=True)
    cfg = builtin_config(2)
    if args.init:
        base = out / "base"
        shutil.rmtree(base, ignore_errors=True)
        shutil.copytree(args.init, base)
    else:
        base = synthesize(cfg, out / "base", seed=0, progress=False)
    shutil.copy(data / "tokenizer.json", base / "tokenizer.json")
    docs, kinds = load_documents(data / "train.npz")
    prompts = None
    if args.probe_chat_share:                            # from the data before --chat-repeat: each request once
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(data / "tokenizer.json"))
        end = tok.token_to_id("</think>")
        prompts = chat_prompts(docs, kinds, args.probe_prefix_len, end)
        if len(prompts) < args.probe_prefixes:
            raise SystemExit(f"only {len(prompts)} chat requests are {args.probe_prefix_len} tokens long through "
                             "</think>: choose another --probe-prefix-len (the median request is about 32)")
        if args.probe_header_lens or args.probe_class_lens:
            heads = header_prompts(docs, kinds, tok, args.probe_header_lens, end, cfg.bos_token_id)
            classes = class_prompts(docs, kinds, tok, args.probe_class_lens, cfg.bos_token_id)
            print(f"probe prompts: {len(prompts)} chat requests, {len(heads)} function headers, {len(classes)} "
                  "class headers", flush=True)
            prompts += heads + classes
        random.Random(args.seed).shuffle(prompts)
    if args.upweight:
        docs, kinds = upweight(docs, kinds, load_sources(data / "train.npz"), args.upweight)
    docs, kinds = repeat_chat(docs, kinds, args.chat_repeat)
    top = max(max(d.ids) for d in docs)
    if top >= cfg.vocab_size:
        raise ValueError(f"{data}: token id {top} is outside the model's vocabulary ({cfg.vocab_size})")
    net = load_model(base, device=device, dtype=dtype, quant_emulation=True, progress=False)
    check_same_config(net.cfg, cfg, base)
    net = prepare_full(net, qat=True)
    n_params = sum(p.numel() for p in net.parameters())
    lens = tuple(dict.fromkeys(args.probe_header_lens + args.probe_class_lens))     # a length both use: one group
    train = TrainConfig(max_steps=args.steps or 10**9, lr=args.lr, warmup_steps=args.warmup_steps,
                        min_lr_ratio=args.min_lr_ratio, weight_decay=0.0, clip_grad=1.0, seq_len=args.seq_len,
                        packs_per_step=args.packs_per_step, grad_ckpt=args.grad_ckpt, mtp_weight=args.mtp_weight,
                        bias_update_rate=1e-3, seed=args.seed, compile=args.compile,
                        pad_to_seq_len=args.compile is not None, rows=bool(args.row_len),
                        probe_prompt_share=args.probe_chat_share, probe_prefix_lens=lens,
                        **probe_fields(args))
    if args.steps:
        train.warmup_steps = min(train.warmup_steps, max(1, args.steps // 10))
    if args.row_len:
        packs = row_packs(docs, args.row_len, args.seq_len // args.row_len, seed=args.seed)
    else:
        packs = pack(docs, args.seq_len)
        if not args.per_document:
            packs = [[concat_pack(p)] for p in packs]
    trainer = Trainer(net, PackStream(packs, args.packs_per_step, train.seed), train, out, DistContext(),
                      progress=False, probe_prompts=prompts)
    settings = {"data": str(data), "device": device, "dtype": str(dtype), "qat": True, "quant_emulation": True,
                "config": "builtin_config(2)", "documents": len(docs), "chat_documents": sum(kinds),
                "packs": len(packs), "budget_minutes": args.minutes, "args": vars(args),
                "probe_prompts": {n: len(g) for n, g in trainer.probe_prompts.items()}}
    if args.row_len:
        rows = [r for p in packs for r in p]
        settings["rows"] = len(rows)
        settings["row_padding_fraction"] = round(1 - sum(r.real for r in rows) / (len(rows) * args.row_len), 4)
    (out / "run.json").write_text(json.dumps(settings, indent=2) + "\n")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    setup_s = time.perf_counter() - t_start

    log = MetricsLog(out)
    budget_s = args.minutes * 60 if args.minutes else float("inf")
    if args.tf32 and device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")          # TF32 for fp32 matmuls, until the loop ends
    t0 = time.perf_counter()
    step_times, step_tokens, tokens, graphs, step_probes = [], [], 0, [], []
    prof = None
    while trainer.step < train.max_steps:
        if args.profile and trainer.step == train.max_steps - args.profile:
            prof = start_profiler()
        ts = time.perf_counter()
        rec = trainer.train_step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - ts
        step_times.append(dt)
        tokens += rec["tokens"]
        step_tokens.append(rec["tokens"])
        graphs.append(rec.get("compiled_graphs", 0))
        step_probes.append(rec.get("probe_s", 0.0))           # 0.0: no probe this step
        rec["step_s"], rec["elapsed_s"] = dt, time.perf_counter() - t0
        log.write(rec)
        if trainer.step <= 3 or trainer.step % 25 == 0:
            print(f"step {rec['step']} loss {rec['loss']:.4f} mtp {rec.get('mtp_loss', float('nan')):.4f} "
                  f"lr {rec['lr']:.2e} {rec['tokens']} tok {dt:.3f}s {rec['tokens'] / dt:.0f} tok/s", flush=True)
        if args.steps is None and resize_now(trainer.step, args.calibrate_steps, train.max_steps,
                                             bool(rec.get("probe_s"))):
            # the first steps include one-off costs (allocator growth, kernel selection): time the later ones
            # a step's time includes its probe's: the steps are timed without it, the probes spread over all steps
            bare = [t - p for t, p in zip(step_times, step_probes, strict=True)]
            planned = train.max_steps
            train.max_steps = sized_steps(trainer.step, rec["elapsed_s"], bare[2:] or bare, budget_s,
                                          probe_s_per_step([p for p in step_probes if p],
                                                           args.greedy_probe_every))
            if trainer.step == args.calibrate_steps:
                # a short run gets a short warmup (10% of it), never shorter than the steps already taken
                train.warmup_steps = max(trainer.step + 1, min(args.warmup_steps, train.max_steps // 10))
                print(f"schedule sized to {train.max_steps} steps for the {args.minutes} minute budget", flush=True)
            elif train.max_steps != planned:
                print(f"schedule resized to {train.max_steps} steps at step {trainer.step} (probes measured)",
                      flush=True)
        if rec["elapsed_s"] >= budget_s:
            print(f"budget reached at step {trainer.step}", flush=True)
            break
    train_s = time.perf_counter() - t0
    torch.set_float32_matmul_precision("highest")
    steps = trainer.step
    if prof is not None:
        write_profile(prof, out / "profile.txt", args.profile)
    plot_loss(out / "metrics.jsonl", out / "loss.png", title="built-in model v2: training loss")

    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    steady = step_times[2:] or step_times
    perf = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu", "dtype": str(dtype),
            "torch": torch.__version__, "steps": steps, "planned_steps": train.max_steps, "tokens": tokens,
            "train_s": train_s, "setup_s": setup_s, "tok_per_s": tokens / train_s,
            "tok_per_s_steady": sum(step_tokens[2:] or step_tokens) / sum(steady),
            "step_s_median": statistics.median(steady), "step_s_first": step_times[0],
            "compile": args.compile, "compile_s_est": step_times[0] - statistics.median(steady),
            "compiled_graphs_first_step": graphs[0], "compiled_graphs_later": sum(graphs[1:]),
            "compile_cache": compile_cache_counts() if args.compile else None,
            "tokens_per_step": tokens / max(1, steps), "peak_mem_bytes": peak,
            "peak_mem_gib": peak / 2**30 if peak is not None else None, "parameters": n_params,
            "train": asdict(train), "settings": settings}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tail = records[-20:]
    perf["final_loss"] = sum(r["loss"] for r in tail) / len(tail)
    if any("mtp_loss" in r for r in tail):
        perf["final_mtp_loss"] = sum(r.get("mtp_loss", 0.0) for r in tail) / len(tail)

    t_save = time.perf_counter()
    write_checkpoint(export_state(net, cfg, model_values(net)), cfg, out / "model", tokenizer_from=base,
                     shard_bytes=SHARD_BYTES)
    perf["save_s"] = time.perf_counter() - t_save
    perf["model_bytes"] = sum(p.stat().st_size for p in (out / "model").glob("*.safetensors"))
    (out / "perf.json").write_text(json.dumps(perf, indent=2) + "\n")
    print(json.dumps({k: v for k, v in perf.items() if k != "train"}), flush=True)
    shutil.rmtree(out / "base")
    del trainer, net
    if args.bundle:                       # before the evaluation: a failing evaluation must not lose the model
        bundle(out, Path(args.bundle))
    if not args.no_eval:
        evaluate(out / "model", data, out / "eval.json", device)
        if args.bundle:
            shutil.copy(out / "eval.json", Path(args.bundle) / "eval.json")
    return perf


def start_profiler():
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(activities=acts)
    prof.__enter__()
    return prof


def write_profile(prof, path: Path, steps: int) -> None:
    """Tables of the profiled steps: ops by device (kernel) time and by host time, with call counts."""
    prof.__exit__(None, None, None)
    avg = prof.key_averages()
    device_key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    text = [f"{steps} training steps under torch.profiler",
            "== by self device time", avg.table(sort_by=device_key, row_limit=45, max_name_column_width=60),
            "== by self host time", avg.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60)]
    path.write_text("\n".join(text) + "\n")
    print("\n".join(text[:3])[:6000], flush=True)


def bundle(out: Path, dest: Path) -> list[Path]:
    """out/model as a tar cut into parts of SHARD_BYTES, plus the small records, copied into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(out / "model", arcname="model")
    data = buf.getvalue()
    files = []
    for i in range(0, len(data), SHARD_BYTES):
        files.append(dest / f"model.tar.{i // SHARD_BYTES:02d}")
        files[-1].write_bytes(data[i:i + SHARD_BYTES])
    # perf.json holds run.json's settings
    for name in ("metrics.jsonl", "loss.png", "perf.json", "eval.json", "profile.txt"):
        if (out / name).exists() and (out / name).resolve() != (dest / name).resolve():
            files.append(Path(shutil.copy(out / name, dest / name)))
    return files


def evaluate(model_dir: Path, data: Path, path: Path, device: str = "cpu") -> dict:
    """Held-out perplexity (as v1: 512-token windows, fp32, QAT emulation on; on `device`) and a greedy sample
    (on CPU, as the package runs it)."""
    import dsv4
    from dsv4.tokenizer import load_tokenizer

    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    t0 = time.perf_counter()
    model = dsv4.load_model(model_dir, device=device, dtype=torch.float32, progress=False)
    text = (data / "heldout.py.txt").read_text()
    ids = load_tokenizer(model_dir).encode(text, add_special_tokens=False).ids
    nll, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), PPL_WINDOW - 1):
            window = torch.tensor([[0, *ids[start:start + PPL_WINDOW - 1]]], device=device)
            logits = model(window)[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
            n += window.shape[1] - 1
    del model
    ppl = math.exp(nll / n)
    t1 = time.perf_counter()
    llm = dsv4.LLM(str(model_dir), max_num_seqs=1)
    sample = llm.generate(PROMPT, dsv4.SamplingParams(temperature=0, max_tokens=48))[0].text
    # per-token perplexities of different tokenizers do not compare: nats per character do (v1 vs v2)
    result = {"heldout_ppl": ppl, "heldout_tokens": n, "heldout_chars": len(text),
              "nats_per_char": nll / len(text), "prompt": PROMPT, "greedy": sample,
              "ppl_s": t1 - t0, "sample_s": time.perf_counter() - t1}
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"held-out perplexity {ppl:.2f}\n{PROMPT}{sample}", flush=True)
    return result


if __name__ == "__main__":
    main()
