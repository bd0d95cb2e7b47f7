"""Argument parsing of `dsv4 finetune` and `dsv4 lora-merge` (torch is imported only when a command runs)."""

from __future__ import annotations

import argparse
import os
import sys

from dsv4.cli import at_least

FINETUNE_HELP = """Supervised fine-tuning on chat data, with LoRA adapters or all weights, on the same model code
as inference. Each line of --data is {"messages": [...], "tools"?: [...]} in OpenAI chat form (encoded with the
official DeepSeek-V4 format; the loss covers only what the assistant writes: reasoning, content, tool calls and
the closing EOS) or pre-tokenised {"input_ids": [...], "loss_mask"?: [...]}. Documents are packed whole into
sequences of --seq-len tokens without attending across documents. --out receives metrics.jsonl (one record per
step), loss.png, run.json, train_state/ (run the same command again to resume) and the result: model/ (official
format, FP8/FP4 re-quantised) and model-bf16/ for --full, adapter/ (+ model/ with --merge) for --lora.
Multi-GPU: torchrun --nproc-per-node N -m dsv4 finetune ... (FSDP2; add --expert-parallel to split the routed
experts over the N processes)."""


def add_probe_arguments(p: argparse.ArgumentParser) -> None:
    """The copy unlikelihood (dsv4/train/unlikelihood.py), the greedy probe and sequence-level unlikelihood
    (dsv4/train/greedy_probe.py); `TrainConfig` fields of the same names; shared with scripts/train_builtin_gpu.py."""
    p.add_argument("--unlikelihood", type=at_least(float, 0), default=0.0, metavar="ALPHA",
                   help="weight of the unlikelihood of wrong in-context copies (default 0: only logged)")
    p.add_argument("--copy-ngram", type=at_least(int, 0), default=4, metavar="N",
                   help="copy candidate: the token after the latest earlier occurrence of the last N-1 tokens in the "
                        "document (default 4; 0 = no copy term nor statistics)")
    p.add_argument("--copy-window", type=at_least(int, 0), default=0,
                   help="that occurrence at most this many tokens back (default 0 = anywhere)")
    p.add_argument("--greedy-probe-every", type=at_least(int, 0), default=0, metavar="N",
                   help="every N steps continue --probe-prefixes prefixes of the step's pack greedily and log "
                        "greedy_seq_rep4 / greedy_distinct4 (default 0 = off)")
    p.add_argument("--probe-prefixes", type=at_least(int, 1), default=16, metavar="P",
                   help="prefixes per probe (default 16)")
    p.add_argument("--probe-prefix-len", type=at_least(int, 1), default=32,
                   help="tokens per prefix, BOS included (default 32)")
    p.add_argument("--probe-tokens", type=at_least(int, 1), default=64, metavar="L",
                   help="greedy tokens per prefix (default 64)")
    p.add_argument("--seq-unlikelihood", type=at_least(float, 0), default=0.0, metavar="ALPHA",
                   help="on probe steps, add ALPHA x the unlikelihood of the continuation tokens that complete an "
                        "earlier 4-gram, per continuation position (default 0 = off; needs --greedy-probe-every)")
    p.add_argument("--probe-cache", action="store_true",
                   help="generate the probe's tokens through decode state (one prefill, then one token per sequence "
                        "a step, as the engine does) instead of a full forward per token; same tokens in the tests. "
                        "On CUDA in one process the decode steps replay one captured CUDA graph (H200, built-in "
                        "model: ~1.3 s a probe of 16 x 64 tokens instead of 7-9 s)")


def probe_fields(args) -> dict:
    return {k: getattr(args, k) for k in ("unlikelihood", "copy_ngram", "copy_window", "greedy_probe_every",
                                          "probe_prefixes", "probe_prefix_len", "probe_tokens", "seq_unlikelihood",
                                          "probe_cache")}


def add_parsers(sub, positive, dtypes: dict) -> None:
    p = sub.add_parser("finetune", help="fine-tune on chat JSONL (LoRA or full weights)", description=FINETUNE_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory or Hub id (default: the built-in tiny model)")
    p.add_argument("--data", required=True, help="training JSONL file")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--lora", type=positive(int), metavar="RANK", help="train LoRA adapters of this rank")
    mode.add_argument("--full", action="store_true", help="train all weights (FP8/FP4 dequantised for training)")
    p.add_argument("--out", default="finetune-out", help="output directory (default ./finetune-out)")
    p.add_argument("--max-steps", type=positive(int), default=100, help="optimiser steps (default 100)")
    p.add_argument("--lr", type=positive(float), default=1e-4, help="peak learning rate (default 1e-4)")
    p.add_argument("--warmup-steps", type=at_least(int, 0), default=10,
                   help="linear warmup steps, then cosine (default 10)")
    p.add_argument("--min-lr-ratio", type=at_least(float, 0), default=0.1, help="final lr / peak lr (default 0.1)")
    p.add_argument("--weight-decay", type=at_least(float, 0), default=0.0,
                   help="AdamW weight decay on matrices (default 0)")
    p.add_argument("--clip-grad", type=at_least(float, 0), default=1.0, help="gradient-norm clip, 0 = off (default 1)")
    p.add_argument("--seq-len", type=positive(int), default=2048, help="tokens per packed sequence (default 2048)")
    p.add_argument("--packs-per-step", type=positive(int), default=1,
                   help="packed sequences per optimiser step, over all processes (default 1)")
    p.add_argument("--no-grad-ckpt", action="store_true", help="keep activations instead of recomputing blocks")
    p.add_argument("--mtp-weight", type=at_least(float, 0), default=0.0,
                   help="weight of the MTP loss (default 0 = off)")
    add_probe_arguments(p)
    p.add_argument("--bias-update-rate", type=at_least(float, 0), default=0.0,
                   help="noaux_tc gate-bias balancing step per optimiser step (default 0 = off)")
    p.add_argument("--lora-alpha", type=positive(float), help="LoRA alpha (default 2 * rank)")
    p.add_argument("--lora-targets", default="attn,shared",
                   help="comma list of attn, shared, experts (default attn,shared)")
    p.add_argument("--qat", action="store_true",
                   help="train through the FP8/FP4 storage rounding of the weights (straight-through)")
    p.add_argument("--merge", action="store_true", help="with --lora: also write the merged checkpoint")
    p.add_argument("--thinking", action="store_true", help="encode chats in thinking mode")
    p.add_argument("--save-every", type=at_least(int, 0), default=0,
                   help="resumable state every N steps (default: at the end)")
    p.add_argument("--seed", type=int, default=0, help="data order and LoRA init seed (default 0)")
    p.add_argument("--expert-parallel", action="store_true",
                   help="under torchrun with N processes: routed expert e of each layer lives only on rank "
                        "e // (experts / N), outside FSDP (the expert count must be divisible by N)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(dtypes), help="compute dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--no-quant-emulation", action="store_true", help="train without the FP8/FP4 QAT emulation")
    p.set_defaults(func=cmd_finetune)

    q = sub.add_parser("lora-merge", help="merge saved LoRA adapters into their base checkpoint",
                       description="Write base + adapters as one checkpoint the engine loads (official format, or "
                                   "--bf16).")
    q.add_argument("adapter", help="adapter directory written by `dsv4 finetune --lora`")
    q.add_argument("--out", required=True, help="output checkpoint directory")
    q.add_argument("--model", help="base checkpoint (default: the one recorded in the adapter)")
    q.add_argument("--bf16", action="store_true", help="write bf16 weights instead of FP8/FP4")
    q.set_defaults(func=cmd_lora_merge)


def cmd_finetune(args) -> int:
    import torch

    from dsv4.cli import DTYPES, UsageError
    from dsv4.train.loop import TrainConfig
    from dsv4.train.run import finetune

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else (
        torch.bfloat16 if device.startswith("cuda") else torch.float32)
    main_rank = os.environ.get("RANK", "0") == "0"      # under torchrun: one copy of each message, not N
    if args.model is None and main_rank:
        print("note: no --model given; fine-tuning the built-in tiny model (trained on Python source)", file=sys.stderr)
    train = TrainConfig(max_steps=args.max_steps, lr=args.lr, warmup_steps=args.warmup_steps,
                        min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay, clip_grad=args.clip_grad,
                        seq_len=args.seq_len, packs_per_step=args.packs_per_step, grad_ckpt=not args.no_grad_ckpt,
                        mtp_weight=args.mtp_weight, bias_update_rate=args.bias_update_rate,
                        save_every=args.save_every, seed=args.seed, expert_parallel=args.expert_parallel,
                        **probe_fields(args))
    try:
        out = finetune(args.data, args.out, args.model, args.lora, args.lora_alpha,
                       tuple(t for t in args.lora_targets.split(",") if t), args.qat, train, device, dtype,
                       not args.no_quant_emulation, "thinking" if args.thinking else "chat", args.merge,
                       progress=sys.stderr.isatty())
    except ValueError as e:
        raise UsageError(str(e)) from None
    if main_rank:
        print(f"wrote {out}")
    return 0


def cmd_lora_merge(args) -> int:
    from dsv4.cli import UsageError, check_new_output_dir

    check_new_output_dir(args.out)        # before the base model is loaded
    from dsv4.train.run import merge_lora

    try:
        out = merge_lora(args.adapter, args.out, args.model, args.bf16, progress=sys.stderr.isatty())
    except ValueError as e:               # the adapter directory's files, or adapters that do not fit the base
        raise UsageError(str(e)) from None
    print(f"wrote {out}")
    return 0
