"""The `dsv4` command: thin front ends that parse arguments and call the library."""

from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def _device_default() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt",
                       description="Generate a continuation of PROMPT. Without --model, the built-in tiny model "
                                   "is used (untrained: its output is noise, it only shows the pipeline works).")
    p.add_argument("prompt", help="the prompt text (the BOS token is added)")
    p.add_argument("--model", help="checkpoint directory in the official format (default: built-in tiny model)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate at most (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", default=_device_default(), help="cpu or cuda (default: cuda when available)")
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
    p.add_argument("--layers", type=int, help="keep only the first N blocks (MTP kept)")
    p.add_argument("--shard-gb", type=float, default=5.0, help="shard size in GiB (default 5)")
    p.set_defaults(func=cmd_synth)


def _add_check(sub) -> None:
    p = sub.add_parser("check", help="verify a checkpoint's tensors against its config (no weights loaded)")
    p.add_argument("model", help="checkpoint directory")
    p.set_defaults(func=cmd_check)


def cmd_generate(args) -> int:
    from dsv4.loader import load_model
    from dsv4.simple_generate import generate_ids, stream_text
    from dsv4.tokenizer import encode_prompt, load_tokenizer

    if args.max_new_tokens < 1:
        raise SystemExit("error: --max-new-tokens must be >= 1")
    path = args.model
    if path is None:
        from dsv4.builtin import builtin_model_path
        print("note: no --model given; using the built-in tiny model, which is UNTRAINED (random weights): "
              "expect meaningless text.", file=sys.stderr)
        path = builtin_model_path()
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    model = load_model(path, device=args.device, dtype=dtype, quant_emulation=not args.no_quant_emulation,
                       progress=sys.stderr.isatty())
    tokenizer = load_tokenizer(path)
    ids = encode_prompt(tokenizer, args.prompt, model.cfg.bos_token_id)
    tokens = generate_ids(model, ids, args.max_new_tokens, args.temperature, args.seed, (model.cfg.eos_token_id,))
    for piece in stream_text(tokenizer, tokens):
        print(piece, end="", flush=True)
    print()
    return 0


def cmd_synth(args) -> int:
    from dsv4.checkpoint import synthesize
    from dsv4.config import ModelConfig

    cfg = ModelConfig.resolve(args.config)
    if args.layers is not None:
        if not 1 <= args.layers <= cfg.n_layers:
            raise SystemExit(f"error: --layers must be in 1..{cfg.n_layers}")
        cfg = cfg.truncated(args.layers)
    out = synthesize(cfg, args.out, seed=args.seed, shard_bytes=int(args.shard_gb * 2**30), progress=True)
    print(f"wrote {out}")
    return 0


def cmd_check(args) -> int:
    from dsv4.checkpoint import CheckpointReader, check_inventory
    from dsv4.config import ModelConfig

    cfg = ModelConfig.from_file(args.model)
    reader = CheckpointReader(args.model)
    check_inventory(reader, cfg)
    print(f"ok: {len(reader.keys())} tensors match the config ({cfg.n_layers} layers, {cfg.n_mtp_layers} MTP)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsv4", description="DeepSeek-V4 (Flash / Pro): run, check, synthesise.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_synth(sub)
    _add_check(sub)
    args = parser.parse_args(argv)
    from dsv4.checkpoint import CheckpointError
    from dsv4.config import ConfigError
    try:
        return args.func(args)
    except (CheckpointError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
