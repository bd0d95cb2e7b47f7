"""The `dsv4` command: thin front ends that parse arguments and call the library.

Exit codes: 0 success; 2 bad arguments or input (a missing or malformed checkpoint/config), reported as one
`dsv4 <command>: error: ...` line (checkpoint mismatch reports add one line per offending tensor), never a
traceback. NOTE: torch is imported inside the commands, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys

DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}


class UsageError(Exception):
    """An argument that argparse cannot validate on its own (it depends on the config or the machine)."""


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt",
                       description="Generate a continuation of PROMPT. Without --model, the built-in tiny model "
                                   "is used (UNTRAINED: its output is noise, it only shows the pipeline works).")
    p.add_argument("prompt", help="the prompt text (the BOS token is added)")
    p.add_argument("--model", help="checkpoint directory in the official format (default: built-in tiny model)")
    p.add_argument("--max-new-tokens", "--max-tokens", dest="max_new_tokens", type=_positive(int), default=32,
                   help="tokens to generate at most (default 32)")
    p.add_argument("--temperature", type=_non_negative_float, default=0.0,
                   help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--no-quant-emulation", action="store_true",
                   help="turn off the FP8/FP4 QAT emulation (plain dequantised weights)")
    p.set_defaults(func=cmd_generate)


def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="write a random checkpoint in the official format",
                       description="Write a random DeepSeek-V4 checkpoint (official names, dtypes, shapes, shards, "
                                   "index and config.json), streaming one shard at a time.")
    p.add_argument("--config", required=True, help="'flash', 'pro', a config.json file or a checkpoint directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--layers", type=_positive(int), help="keep only the first N blocks (MTP kept)")
    p.add_argument("--shard-gb", type=_positive(float), default=5.0, help="shard size in GiB (default 5)")
    p.set_defaults(func=cmd_synth)


def _add_check(sub) -> None:
    p = sub.add_parser("check", help="verify a checkpoint's tensors against its config (no weights loaded)",
                       description="Check every tensor's name, shape and dtype against the checkpoint's config.json "
                                   "without loading any weights; lists every offender.")
    p.add_argument("model", help="checkpoint directory")
    p.set_defaults(func=cmd_check)


def _device(args) -> str:
    import torch

    if args.device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device is available")
    return args.device


def cmd_generate(args) -> int:
    if args.model is not None and not os.path.exists(args.model):  # before the slow imports
        raise FileNotFoundError(f"no checkpoint at {args.model}")
    import torch

    from dsv4.loader import load_model
    from dsv4.simple_generate import generate_ids, stream_text
    from dsv4.tokenizer import encode_prompt, load_tokenizer

    device = _device(args)
    path = args.model
    if path is None:
        from dsv4.builtin import builtin_model_path
        print("note: no --model given; using the built-in tiny model, which is UNTRAINED (random weights): "
              "expect meaningless text.", file=sys.stderr)
        path = builtin_model_path()
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else (
        torch.bfloat16 if device.startswith("cuda") else torch.float32)
    model = load_model(path, device=device, dtype=dtype, quant_emulation=not args.no_quant_emulation,
                       progress=sys.stderr.isatty())
    tokenizer = load_tokenizer(path)
    ids = encode_prompt(tokenizer, args.prompt, model.cfg.bos_token_id)
    tokens = generate_ids(model, ids, args.max_new_tokens, args.temperature, args.seed, (model.cfg.eos_token_id,))
    for piece in stream_text(tokenizer, tokens):
        print(piece, end="", flush=True)
    print()
    return 0


def cmd_synth(args) -> int:
    from dsv4.config import ModelConfig

    cfg = ModelConfig.resolve(args.config)
    if args.layers is not None:
        if args.layers > cfg.n_layers:
            raise UsageError(f"--layers {args.layers}: the config has only {cfg.n_layers} layers")
        cfg = cfg.truncated(args.layers)
    from dsv4.checkpoint import synthesize
    out = synthesize(cfg, args.out, seed=args.seed, shard_bytes=int(args.shard_gb * 2**30), progress=True)
    print(f"wrote {out}")
    return 0


def cmd_check(args) -> int:
    from dsv4.checkpoint import open_checkpoint

    cfg, reader = open_checkpoint(args.model)
    print(f"ok: {len(reader)} tensors match the config ({cfg.n_layers} layers, {cfg.n_mtp_layers} MTP)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv4", description="DeepSeek-V4 (Flash / Pro): run, check, synthesise.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_synth(sub)
    _add_check(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dsv4.config import ConfigError
    try:
        return args.func(args)
    except (UsageError, ConfigError, FileNotFoundError) as e:
        error = e
    except Exception as e:
        # NOTE: dsv4.checkpoint pulls in torch, so it is not imported just to name its error: a CheckpointError
        # can only come from code that already imported it.
        checkpoint = sys.modules.get("dsv4.checkpoint")
        if checkpoint is None or not isinstance(e, checkpoint.CheckpointError):
            raise
        error = e
    print(f"dsv4 {args.command}: error: {error}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
