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


def _add_model_args(p) -> None:
    p.add_argument("--model", help="checkpoint directory in the official format, or a Hugging Face Hub id "
                                   "(default: the built-in tiny model, UNTRAINED)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--no-quant-emulation", action="store_true",
                   help="turn off the FP8/FP4 QAT emulation (plain dequantised weights)")
    p.add_argument("--max-model-len", type=_positive(int), help="context length (default: the model's)")
    p.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=_positive(int),
                   help="shard the model over N processes (one per GPU; gloo on CPU), started here, or by torchrun "
                        "(default: torchrun's WORLD_SIZE, else 1); see docs/parallel.md")


def _add_sampling_args(p, temperature: float) -> None:
    p.add_argument("--max-new-tokens", "--max-tokens", dest="max_new_tokens", type=_positive(int), default=256,
                   help="tokens to generate at most (default 256)")
    p.add_argument("--temperature", type=_non_negative_float, default=temperature,
                   help=f"sampling temperature; 0 = greedy (default {temperature})")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0 = off)")
    p.add_argument("--top-k", type=int, default=-1, help="keep the k most likely tokens (default -1 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="min-p threshold relative to the top token (default 0)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="(default 1.0 = off)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="(default 0)")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="(default 0)")
    p.add_argument("--seed", type=int, help="sampling seed (default: random)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable; not printed)")
    p.add_argument("--thinking", action="store_true", help="thinking mode: the model reasons before answering")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt (streams tokens)",
                       description="Generate a continuation of PROMPT, streaming it as it is produced. With --chat "
                                   "the prompt is sent as a user message in DeepSeek-V4's chat format. Without "
                                   "--model, the built-in tiny model is used (UNTRAINED: its output is noise, it "
                                   "only shows the pipeline works).")
    p.add_argument("prompt", help="the prompt text (exactly one BOS token is added)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a chat user turn")
    _add_model_args(p)
    _add_sampling_args(p, temperature=0.0)
    p.set_defaults(func=cmd_generate)


def _add_chat(sub) -> None:
    p = sub.add_parser("chat", help="interactive multi-turn chat",
                       description="Chat with the model in the terminal (DeepSeek-V4 chat format). Reasoning, when "
                                   "--thinking is on, is shown under [thinking]. /clear resets, /exit quits.")
    p.add_argument("--system", help="system prompt")
    _add_model_args(p)
    _add_sampling_args(p, temperature=1.0)
    p.set_defaults(func=cmd_chat)


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


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="time dsv4 against transformers on a Flash-width model (GPU)",
                       description="Synthesise DeepSeek-V4-Flash at full width truncated to --layers blocks (official "
                                   "formats, straight on the GPU), then time dsv4 and transformers eager on the same "
                                   "weights: decode ms/step after a --context-token prompt, prefill; the HBM floor of "
                                   "each decode step; greedy agreement of dsv4's fast path with its reference path. "
                                   "Prints a table and writes JSON with --out. Needs a CUDA GPU with ~100 GB free.")
    p.add_argument("--layers", type=_positive(int), default=4, help="blocks kept (default 4: ratios 0, 0, 4, 128)")
    p.add_argument("--context", type=_positive(int), default=512, help="prompt tokens before decoding (default 512)")
    p.add_argument("--decode-batches", type=_int_list, default=(1, 8, 64), help="decode batch sizes (default 1,8,64)")
    p.add_argument("--decode-steps", type=_positive(int), default=16, help="timed decode steps (default 16)")
    p.add_argument("--prefill", type=_int_list, default=(1024, 8192, 32768),
                   help="dsv4 prefill lengths (default 1024,8192,32768)")
    p.add_argument("--hf-prefill", type=_int_list, default=(1024,), help="transformers prefill lengths (default 1024)")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers side")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler tables of decode and prefill")
    p.add_argument("--out", help="write the full results as JSON here (e.g. bench/results/h200.json)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from dsv4.bench.run import BenchOptions, run

    run(BenchOptions(layers=args.layers, context=args.context, decode_batches=args.decode_batches,
                     decode_steps=args.decode_steps, prefill=args.prefill, hf_prefill=args.hf_prefill,
                     transformers=not args.no_transformers, profile=args.profile, out=args.out))
    return 0


def _device(args) -> str:
    import torch

    if args.device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device is available")
    return args.device


def _llm(args):
    """The LLM for --model (a path that does not exist and is not a Hub id is an error before slow imports)."""
    if args.model is not None and not os.path.exists(args.model) and args.model.count("/") != 1:
        raise FileNotFoundError(f"no checkpoint at {args.model}")
    device = _device(args)
    from dsv4.dist.context import torchrun_world

    tp = args.tp or torchrun_world()
    if args.model is None and os.environ.get("RANK", "0") == "0":
        print("note: no --model given; using the built-in tiny model, which is UNTRAINED (random weights): "
              "expect meaningless text.", file=sys.stderr)
    from dsv4.llm import LLM

    return LLM(args.model, device=device, dtype=DTYPES[args.dtype] if args.dtype else None,
               quant_emulation=not args.no_quant_emulation, max_model_len=args.max_model_len, max_num_seqs=1,
               tensor_parallel_size=tp, progress=sys.stderr.isatty())


def _sampling(args):
    from dsv4.engine.sampling import SamplingParams

    try:
        return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                              repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                              frequency_penalty=args.frequency_penalty, seed=args.seed,
                              max_tokens=args.max_new_tokens, stop=args.stop or None)
    except ValueError as e:
        raise UsageError(str(e)) from None


def cmd_generate(args) -> int:
    params = _sampling(args)
    llm = _llm(args)
    from dsv4 import interactive

    mode = "thinking" if args.thinking else "chat"
    if args.chat or args.thinking:
        from dsv4.chat import encode_messages

        prompt = encode_messages([{"role": "user", "content": args.prompt}], thinking_mode=mode)
        interactive.print_reply(llm.stream(prompt, params), mode, sys.stdout)
    else:
        interactive.print_stream(llm.stream(args.prompt, params), sys.stdout)
    return 0


def cmd_chat(args) -> int:
    params = _sampling(args)
    llm = _llm(args)
    from dsv4 import interactive

    interactive.chat_loop(llm, params, "thinking" if args.thinking else "chat", args.system)
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
    _add_chat(sub)
    _add_synth(sub)
    _add_check(sub)
    _add_bench(sub)
    return parser


def _known_errors() -> tuple[type, ...]:
    """Errors of modules already imported that mean bad input (a broken checkpoint, a request that cannot run)."""
    known = [(sys.modules.get("dsv4.checkpoint"), "CheckpointError"), (sys.modules.get("dsv4.engine.engine"),
                                                                       "RequestError"),
             (sys.modules.get("dsv4.dist.context"), "TPError")]
    return tuple(getattr(m, name) for m, name in known if m is not None)


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
        if not isinstance(e, _known_errors()):
            raise
        error = e
    print(f"dsv4 {args.command}: error: {error}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
