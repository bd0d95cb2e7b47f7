"""The `dsv4` command: thin front ends that parse arguments and call the library.

Exit codes: 0 success; 2 bad arguments or input (a missing or malformed checkpoint/config), reported as one
`dsv4 <command>: error: ...` line (checkpoint mismatch reports add one line per offending tensor), never a
traceback. NOTE: torch is imported inside the commands, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}
# `dsv4 generate` with the built-in model: a cap, enough for a function, few enough that the README's first command
# finishes in seconds on a CPU. The installed v2 ends a function with EOS (trained on function documents): its
# README continuation ends after 155 tokens (~10 s on 2 cores, ~20 tokens/s); the earlier cap of 96 (set for v1,
# which never stopped) cut it mid-line.
BUILTIN_GENERATE_TOKENS = 192
CHAT_TEMPERATURE = 1.0
DEFAULT_MAX_TOKENS = 256


class UsageError(Exception):
    """An argument that argparse cannot validate on its own (it depends on the config or the machine)."""


def at_least(kind, least, strict: bool = False):
    """argparse type: a `kind` value >= `least` (> with `strict`), NaN refused; errors name the value, not this
    function. Why bounds at parse time: a negative weight, rate or count is never meant, and some are not harmless
    (a negative --clip-grad flips the sign of every gradient, silently)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:                # else argparse names this function: "invalid parse value"
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        if not (value > least if strict else value >= least):       # NaN fails both
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {least}, got {text}")
        return value
    return parse


def _positive(kind):
    return at_least(kind, 0, strict=True)


_non_negative_float = at_least(float, 0)
_non_negative_int = at_least(int, 0)


def _add_model_args(p) -> None:
    p.add_argument("--model", help="checkpoint directory in the official format, or a Hugging Face Hub id "
                                   "(default: the built-in tiny model, trained on Python source)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--no-quant-emulation", action="store_true",
                   help="turn off the FP8/FP4 QAT emulation (plain dequantised weights)")
    p.add_argument("--max-model-len", type=_positive(int), help="context length (default: the model's)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="turn off automatic prefix caching (on by default: a prompt that repeats an earlier prompt's "
                        "start, e.g. the next turn of a conversation, skips recomputing it)")
    p.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=_positive(int),
                   help="shard the model over N processes (one per GPU; gloo on CPU), started here, or by torchrun "
                        "(default: torchrun's WORLD_SIZE, else 1); see docs/parallel.md")
    p.add_argument("--speculative-tokens", type=_non_negative_int, default=0,
                   help="speculative decoding: tokens the MTP block drafts per decode step, verified in one forward "
                        "(same outputs; default 0 = off)")


def _add_sampling_args(p, temperature: float | None, max_tokens_help: str = f"default {DEFAULT_MAX_TOKENS}",
                       temperature_help: str | None = None) -> None:
    p.add_argument("--max-new-tokens", "--max-tokens", dest="max_new_tokens", type=_positive(int), default=None,
                   help=f"tokens to generate at most ({max_tokens_help})")
    p.add_argument("--temperature", type=_non_negative_float, default=temperature,
                   help=f"sampling temperature; 0 = greedy (default {temperature_help or temperature})")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0 = off)")
    p.add_argument("--top-k", type=int, default=-1, help="keep the k most likely tokens (default -1 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="min-p threshold relative to the top token (default 0)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 makes tokens already in the prompt or output less likely (default 1.0 = off)")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="-2..2, subtracted once from the logit of every token already generated (default 0 = off)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="-2..2, subtracted per earlier occurrence of a generated token (default 0 = off)")
    p.add_argument("--seed", type=int, help="sampling seed (default: random)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable; not printed)")
    p.add_argument("--thinking", action="store_true", help="thinking mode: the model reasons before answering")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt (streams tokens)",
                       description="Generate a continuation of PROMPT, streaming it as it is produced. With --chat "
                                   "the prompt is sent as a user message in DeepSeek-V4's chat format. Without "
                                   "--model, the built-in tiny model is used (trained on Python source and chat "
                                   "requests for functions: it continues Python code and, with --chat, writes "
                                   "requested functions, in form more than in substance; docs/builtin_model.md).")
    p.add_argument("prompt", help="the prompt text (exactly one BOS token is added)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a chat user turn")
    _add_model_args(p)
    _add_sampling_args(p, temperature=0.0, max_tokens_help=f"default {DEFAULT_MAX_TOKENS}; with the built-in model "
                       f"and no --chat, {BUILTIN_GENERATE_TOKENS}: a function's worth, in seconds on a CPU")
    p.set_defaults(func=cmd_generate)


def _add_chat(sub) -> None:
    p = sub.add_parser("chat", help="interactive multi-turn chat",
                       description="Chat with the model in the terminal (DeepSeek-V4 chat format). Reasoning, when "
                                   "--thinking is on, is shown under [thinking]. /clear resets, /exit quits.")
    p.add_argument("--system", help="system prompt")
    _add_model_args(p)
    _add_sampling_args(p, temperature=None, temperature_help=f"{CHAT_TEMPERATURE}; with the built-in model, 0: on "
                       "its 20 held-out requests, greedy replies end with a def and EOS 19 times, sampled at 1.0 13")
    p.set_defaults(func=cmd_chat)


# Engine options of `serve`, with EngineConfig's defaults written out: the parser is built without importing torch
# (which EngineConfig's module does), and tests/test_serve_cli.py checks these against the dataclass.
SERVE_ENGINE_DEFAULTS = {"max_num_seqs": 16, "max_num_batched_tokens": 2048, "page_size": 256,
                         "memory_fraction": 0.9, "cpu_cache_gib": 4.0}


def _add_serve(sub) -> None:
    from dsv4.builtin import BUILTIN_NAME

    d = SERVE_ENGINE_DEFAULTS
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat, completions, streaming, tools)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=SERVE_DESCRIPTION)
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1, this machine only; 0.0.0.0 exposes the server to the "
                        "network: set --api-key too)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every /v1/* request (default: the "
                                     "DSV4_API_KEY environment variable; none = no authentication)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000)")
    p.add_argument("--served-model-name", help="the model id clients send and /v1/models lists (default: the "
                                               f"--model argument, or '{BUILTIN_NAME}' for the built-in model)")
    p.add_argument("--max-num-seqs", type=_positive(int), default=d["max_num_seqs"],
                   help=f"sequences decoded together, i.e. cache slots (default {d['max_num_seqs']}); more "
                        "requests wait in a queue")
    p.add_argument("--max-num-batched-tokens", type=_positive(int), default=d["max_num_batched_tokens"],
                   help=f"tokens per engine step, prefill chunks included (default {d['max_num_batched_tokens']})")
    p.add_argument("--page-size", type=_positive(int), default=d["page_size"],
                   help=f"tokens per cache page, a multiple of 128 (default {d['page_size']})")
    p.add_argument("--num-pages", type=_positive(int), help="cache pages (default: sized from --memory-fraction "
                                                            "on CUDA, --cpu-cache-gib on CPU)")
    p.add_argument("--memory-fraction", type=_positive(float), default=d["memory_fraction"],
                   help=f"CUDA: fraction of the free memory the cache may take (default {d['memory_fraction']})")
    p.add_argument("--cpu-cache-gib", type=_positive(float), default=d["cpu_cache_gib"],
                   help=f"CPU: cache budget in GiB (default {d['cpu_cache_gib']:g})")
    p.add_argument("--compile-decode", action="store_true",
                   help="CUDA: torch.compile the captured decode steps (faster decode, e.g. 1.45x at batch 1 on the "
                        "Flash-width bench; costs ~35 s of compiling per batch-size bucket at start)")
    p.add_argument("--compile-scope", choices=["step", "block"], default="step",
                   help="with --compile-decode: compile the whole step as one graph (default), or each block kind "
                        "once (much faster start on deep models; fusion stops at block boundaries)")
    p.add_argument("--no-prefill-graphs", dest="prefill_graphs", action="store_const", const=False, default=None,
                   help="CUDA: run prefill chunks as eager steps instead of replaying per-token CUDA graphs per "
                        "token bucket (the default there: 1k prefill 47.9 -> 30.9 ms on the Flash-width bench); "
                        "saves the graphs' memory (one arena shared by the buckets: ~0.6 GB at Flash width) and their "
                        "capture at start")
    p.add_argument("--async-decode", action=argparse.BooleanOptionalAction, default=None,
                   help="launch each steady decode step before reading the step before, so the host's scheduling, "
                        "appending and detokenising overlap the GPU's step (the same tokens; on the Flash-width "
                        "bench, H100: a step 1.73 -> 1.59 ms at batch 1, 3.37 -> 3.03 at 8). Default: on where "
                        "decode steps are captured in CUDA graphs, off elsewhere; --no-async-decode: one step at "
                        "a time")
    p.add_argument("--compile-prefill", action=argparse.BooleanOptionalAction, default=None,
                   help="CUDA: torch.compile the prefill graphs' per-token segments before capturing them (fuses "
                        "their elementwise work: 1k / 8k prefill 30.8 / 163.8 -> 25.9 / 122.6 ms on the Flash-width "
                        "bench, H100; compiles a few graphs per token bucket at start). Default: on with "
                        "--compile-decode, off without")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level (default info)")
    p.set_defaults(func=cmd_serve)


SERVE_DESCRIPTION = """\
Serve the model over HTTP with the OpenAI API (FastAPI + uvicorn). One engine thread batches all requests
continuously; a client that disconnects has its request cancelled.

endpoints:
  GET  /v1/models             the served model (its id is --served-model-name)
  POST /v1/chat/completions   messages -> reply in DeepSeek-V4's chat format; stream, n, max_tokens /
                              max_completion_tokens, temperature, top_p, top_k, min_p, presence_penalty,
                              frequency_penalty, repetition_penalty, seed, stop, logprobs / top_logprobs,
                              tools + tool_choice ("auto" | "none" | "required" | {"type": "function",
                              "function": {"name": ...}}) -> tool_calls parsed from DSML, response_format
                              (json_object | json_schema), stream_options.include_usage, ignore_eos,
                              structured_outputs (vLLM: json | regex | choice | grammar | json_object)
  POST /v1/completions        raw text or token-id prompts (one or a list); same sampling parameters,
                              logprobs = number of top tokens
  GET  /health                {"status": "ok", running, waiting, pages_in_use, ...}; 503 if the engine died
  GET  /metrics               Prometheus: queue, running, tokens/s, TTFT / TPOT / latency histograms, cache use

thinking mode (reasoning returned in `reasoning_content`, streamed as `delta.reasoning_content`):
  "chat_template_kwargs": {"thinking": true}        or   "reasoning_effort": "high" | "max"
  chat_template_kwargs also takes "reasoning_effort" and "drop_thinking" (keep past turns' reasoning: false)

errors: OpenAI-style {"error": {"message", "type", "param", "code"}}; 400 for a bad body (unknown or
unsupported parameters included), 401 without the API key (--api-key / DSV4_API_KEY), 404 for an unknown model,
503 when the engine has stopped.

example:
  dsv4 serve --model /path/to/DeepSeek-V4-Flash --port 8000
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "/path/to/DeepSeek-V4-Flash", "messages": [{"role": "user", "content": "Hi!"}]}'
"""


def _port(text: str) -> int:
    """A TCP port, 1-65535: checked here, since uvicorn only finds a bad one after the model has loaded."""
    value = _positive(int)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be at most 65535, got {text}")
    return value


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
                                   "each decode step and prefill; weight bytes resident over the checkpoint's "
                                   "native bytes; greedy agreement of dsv4's fast path with its reference path. "
                                   "Prints a table and writes "
                                   "JSON with --out. Needs a CUDA GPU (4 layers: ~25 GB; 20 layers: ~80 GB).")
    p.add_argument("--layers", type=_positive(int), default=4,
                   help="blocks kept (default 4: ratios 0, 0, 4, 128); above 4 the depth figures are added "
                        "(per-layer decode time, peak memory, longest context, projected full-Flash TPOT at TP=2)")
    p.add_argument("--context", type=_positive(int), default=512, help="prompt tokens before decoding (default 512)")
    p.add_argument("--decode-batches", type=_int_list, default=(1, 8, 64), help="decode batch sizes (default 1,8,64)")
    p.add_argument("--decode-steps", type=_positive(int), default=16, help="timed decode steps (default 16)")
    p.add_argument("--prefill", type=_int_list, default=(1024, 8192, 32768),
                   help="dsv4 prefill lengths (default 1024,8192,32768)")
    p.add_argument("--hf-prefill", type=_int_list, default=(1024,), help="transformers prefill lengths (default 1024)")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers side")
    p.add_argument("--no-compile", action="store_true",
                   help="capture the decode step without torch.compile (faster start, ~2x slower steps)")
    p.add_argument("--compile-scope", choices=["step", "block"], default="step",
                   help="compile the decode step as one graph (default) or each block kind once (far less compile "
                        "time at --layers 20 and beyond)")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler tables of decode and prefill")
    p.add_argument("--no-prefill-graphs", dest="prefill_graphs", action="store_false",
                   help="time the prefills as eager steps only. By default steps of up to 2048 tokens run as the "
                        "engine runs them on CUDA, through engine/prefill_graphs.py (per-token segments captured per "
                        "token bucket, attention cores eager): JSON dsv4.prefill; the eager step's figures are kept "
                        "in dsv4.prefill_eager")
    p.add_argument("--compile-prefill", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the prefill graphs' per-token segments (per block kind and token bucket) "
                        "before capturing them, as `dsv4 serve --compile-prefill` does. Default: on unless "
                        "--no-compile")
    p.add_argument("--timing-only", action="store_true",
                   help="only the timings (no greedy agreement, per-op effects or op errors): for quick A/B runs, "
                        "e.g. with and without DSV4_FP4_PACKED=1; the JSON then lacks greedy_agreement")
    p.add_argument("--out", help="write the full results as JSON here (e.g. bench/results/h200.json)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    import torch

    if not torch.cuda.is_available():
        raise UsageError("needs a CUDA GPU, and none is available")
    from dsv4.bench.run import BenchOptions, run

    run(BenchOptions(layers=args.layers, context=args.context, decode_batches=args.decode_batches,
                     decode_steps=args.decode_steps, prefill=args.prefill, hf_prefill=args.hf_prefill,
                     transformers=not args.no_transformers, compile=not args.no_compile,
                     compile_scope=args.compile_scope, profile=args.profile, prefill_graphs=args.prefill_graphs,
                     compile_prefill=args.compile_prefill,
                     timing_only=args.timing_only, out=args.out))
    return 0


def _add_parity(sub) -> None:
    p = sub.add_parser("parity", help="dump, compare and bisect intermediate tensors (taps); see docs/parity.md",
                       description="Parity toolkit: record every stage of the forward (taps), compare two "
                                   "recordings tap by tap, compare against transformers, measure precision noise.")
    cmds = p.add_subparsers(dest="parity_command", required=True)
    d = cmds.add_parser("dump", help="record prefill + N greedy decode steps, one safetensors file per step")
    _add_parity_model_args(d)
    d.add_argument("--decode-steps", type=int, default=0, help="greedy decode steps after the prefill (default 0)")
    d.add_argument("--out", required=True, help="output directory")
    d.add_argument("--dtype", dest="dtype_name", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype (default float32)")
    d.add_argument("--no-quant-emulation", action="store_true", help="turn off the FP8/FP4 QAT emulation")
    d.add_argument("--taps", action="append", help="record only taps matching this glob (repeatable)")
    d.add_argument("--inject-bug", help="compute with a known bug on purpose (docs/parity.md): rope-rotate-half, "
                                        "compressed-early")
    c = cmds.add_parser("compare", help="compare two dumps tap by tap; exit 1 on divergence")
    c.add_argument("a", help="reference dump directory (or step file)")
    c.add_argument("b", help="dump directory (or step file) to check")
    c.add_argument("--step", action="append", help="compare only steps whose file name contains this")
    _add_threshold_args(c)
    h = cmds.add_parser("hf", help="compare dsv4 with transformers' DeepseekV4ForCausalLM (fp32, no emulation)")
    _add_parity_model_args(h)
    h.add_argument("--decode-steps", type=int, default=0, help="greedy decode steps after the prefill (default 0)")
    _add_threshold_args(h)
    r = cmds.add_parser("precision", help="distance of the golden precision variants to a float64 reference")
    r.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    r.add_argument("--tokens", dest="tokens_n", type=_positive(int), default=64, help="queries per case (default 64)")
    p.set_defaults(func=cmd_parity)


def _add_parity_model_args(p) -> None:
    p.add_argument("--model", help="checkpoint directory (default: the built-in tiny model)")
    p.add_argument("--device", help="cpu (default) or cuda")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (one BOS added)")
    src.add_argument("--tokens", help="JSON file with a list of token ids")


def _add_threshold_args(p) -> None:
    p.add_argument("--threshold", type=float, default=0.999, help="worst-row cosine below this diverges (0.999)")
    p.add_argument("--min-overlap", type=float, default=0.99, help="index-set overlap below this diverges (0.99)")
    p.add_argument("--around", type=int, help="show only N rows either side of the first divergence")
    p.add_argument("--plot", help="write a layer x tap heatmap to this PNG file")


def cmd_parity(args) -> int:
    from dsv4.parity import commands
    from dsv4.parity.errors import ParityError

    if getattr(args, "decode_steps", 0) < 0:
        raise UsageError(f"--decode-steps must be >= 0, got {args.decode_steps}")
    try:
        return getattr(commands, f"cmd_{args.parity_command}")(args)
    except ParityError as e:
        raise UsageError(str(e)) from None


def _device(args) -> str:
    import torch

    if args.device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device is available")
    return args.device


def _builtin_on_main_rank(args) -> bool:
    """No --model (the built-in model), and this process prints (not a torchrun rank other than 0)."""
    return args.model is None and os.environ.get("RANK", "0") == "0"


def _llm(args, **engine_options):
    """The LLM for --model (a path that does not exist and is not a Hub id is an error before slow imports)."""
    if args.model is not None and not os.path.exists(args.model) and args.model.count("/") != 1:
        raise FileNotFoundError(f"no checkpoint at {args.model}")
    device = _device(args)
    from dsv4.dist.context import torchrun_world

    tp = args.tp or torchrun_world()
    if _builtin_on_main_rank(args):
        print("note: no --model given; using the built-in tiny model (39 MB, trained on Python source only: "
              "it writes Python-like text; docs/builtin_model.md).", file=sys.stderr)
    from dsv4.llm import LLM

    engine_options = {"max_num_seqs": 1} | engine_options
    try:
        return LLM(args.model, device=device, dtype=DTYPES[args.dtype] if args.dtype else None,
                   quant_emulation=not args.no_quant_emulation, max_model_len=args.max_model_len,
                   enable_prefix_caching=not args.no_prefix_caching, tensor_parallel_size=tp,
                   progress=sys.stderr.isatty(), num_speculative_tokens=args.speculative_tokens, **engine_options)
    except ValueError as e:      # EngineConfig's checks (page size, --speculative-tokens with --tp ...)
        raise UsageError(str(e)) from None


CHAT_EXAMPLE = "Implement `reverse(s)` in Python: return the string *s* reversed."


def chat_temperature(args) -> float:
    """The temperature: --temperature (every command but `chat` has a default), else, for `dsv4 chat`, greedy for
    the built-in model (what its card's figures were measured with; on its 20 held-out chat requests, greedy: 19
    replies with a def and EOS, 17 with the requested name; sampled at 1.0, seed 0: 13 and 12), else
    CHAT_TEMPERATURE."""
    if args.temperature is not None:
        return args.temperature
    return 0.0 if args.model is None else CHAT_TEMPERATURE


def _sampling(args):
    from dsv4.engine.sampling import SamplingParams

    try:
        return SamplingParams(temperature=chat_temperature(args), top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                              repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                              frequency_penalty=args.frequency_penalty, seed=args.seed,
                              max_tokens=args.max_new_tokens or DEFAULT_MAX_TOKENS, stop=args.stop or None)
    except ValueError as e:
        raise UsageError(str(e)) from None


def generate_max_tokens(args) -> int:
    """`dsv4 generate`'s token budget: --max-tokens, else a function's worth for the built-in model continuing
    code (the README's first command, in seconds on a CPU), else DEFAULT_MAX_TOKENS."""
    if args.max_new_tokens is not None:
        return args.max_new_tokens
    builtin_code = args.model is None and not (args.chat or args.thinking)
    return BUILTIN_GENERATE_TOKENS if builtin_code else DEFAULT_MAX_TOKENS


def cmd_generate(args) -> int:
    args.max_new_tokens = generate_max_tokens(args)
    params = _sampling(args)
    llm = _llm(args)
    from dsv4 import interactive

    mode = "thinking" if args.thinking else "chat"
    done: dict = {}
    if args.chat or args.thinking:
        from dsv4.chat import encode_messages

        prompt = encode_messages([{"role": "user", "content": args.prompt}], thinking_mode=mode)
        interactive.print_reply(interactive.keep_output(llm.stream(prompt, params), done), mode, sys.stdout)
    else:
        interactive.print_stream(interactive.keep_output(llm.stream(args.prompt, params), done), sys.stdout)
    interactive.note_if_cut(done, sys.stderr)     # stderr: stdout stays the generated text alone
    return 0


def cmd_chat(args) -> int:
    params = _sampling(args)
    if sys.stdin is None or sys.stdin.closed:   # e.g. `dsv4 chat <&-`: input() would fail only after the load
        raise UsageError("standard input is closed: nothing to read the conversation from")
    llm = _llm(args)
    if _builtin_on_main_rank(args):
        # Free-form requests ("write a function that reverses a string") get Python-like noise from a model this
        # small; the phrasing of its chat training data gets a function that ends (docs/builtin_model.md).
        print(f"note: the built-in model answers requests phrased as its training chats were, e.g. {CHAT_EXAMPLE}",
              file=sys.stderr)
    from dsv4 import interactive

    interactive.chat_loop(llm, params, "thinking" if args.thinking else "chat", args.system,
                          prompts=sys.stdin.isatty())         # piped: the replies alone on stdout
    return 0


def cmd_serve(args) -> int:
    from dsv4.builtin import BUILTIN_NAME
    from dsv4.serve import build_app, serve
    from dsv4.serve.launch import off_main_thread

    _check_bindable(args.host, args.port)
    try:               # loaded off the main thread: the engine thread must be the only one that ran CPU ops
        llm = off_main_thread(lambda: _llm(
            args, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
            page_size=args.page_size, num_pages=args.num_pages, memory_fraction=args.memory_fraction,
            cpu_cache_gib=args.cpu_cache_gib, compile_decode=args.compile_decode, compile_scope=args.compile_scope,
            prefill_graphs=args.prefill_graphs, compile_prefill=args.compile_prefill, async_decode=args.async_decode))
    except ValueError as e:              # EngineConfig's checks (page size ...)
        raise UsageError(str(e)) from None
    from dsv4.serve.auth import ENV_VAR, warn_if_exposed

    api_key = args.api_key or os.environ.get(ENV_VAR) or None
    warn_if_exposed(args.host, api_key)
    try:
        app = build_app(llm, args.served_model_name or args.model or BUILTIN_NAME, api_key)
    except ValueError as e:              # the checkpoint's generation_config.json
        raise UsageError(str(e)) from None
    serve(app, args.host, args.port, args.log_level)
    return 0


def _check_bindable(host: str, port: int) -> None:
    """Fail before loading the model (minutes for a large one) when uvicorn could not listen on host:port (in use,
    or an address this machine does not have). The socket is closed at once; uvicorn binds again later."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)     # as uvicorn does
            s.bind(address)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def check_new_output_dir(path: str) -> None:
    """Refuse an --out that is a file or a non-empty directory, before any work: a checkpoint written into another
    one would overwrite it (the built-in model's directory included) or leave its extra shards beside the new ones,
    and files of any other kind would be mixed with the checkpoint's."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--out {path} exists and is not a directory")
    if os.path.isdir(path) and any(os.scandir(path)):
        raise UsageError(f"--out {path} is not empty: give a new or empty directory")


def cmd_synth(args) -> int:
    from dsv4.config import ModelConfig

    cfg = ModelConfig.resolve(args.config)
    if args.layers is not None:
        if args.layers > cfg.n_layers:
            raise UsageError(f"--layers {args.layers}: the config has only {cfg.n_layers} layers")
        cfg = cfg.truncated(args.layers)
    shard_bytes = int(args.shard_gb * 2**30)
    if shard_bytes < 1:
        raise UsageError(f"--shard-gb {args.shard_gb}: less than one byte per shard")
    check_new_output_dir(args.out)
    from dsv4.checkpoint import synthesize
    out = synthesize(cfg, args.out, seed=args.seed, shard_bytes=shard_bytes, progress=True)
    print(f"wrote {out}")
    return 0


def cmd_check(args) -> int:
    from dsv4.checkpoint import open_checkpoint

    cfg, reader = open_checkpoint(args.model)
    print(f"ok: {len(reader)} tensors match the config ({cfg.n_layers} layers, {cfg.n_mtp_layers} MTP)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsv4", description="DeepSeek-V4 (Flash / Pro): generate, chat, serve, fine-tune, check, synthesise, "
                                 "benchmark, compare against other implementations.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_chat(sub)
    _add_serve(sub)
    _add_synth(sub)
    _add_check(sub)
    _add_bench(sub)
    _add_parity(sub)
    from dsv4.train.command import add_parsers as add_train_parsers

    add_train_parsers(sub, _positive, DTYPES)
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
    # Warnings one line each, as the errors are (Python's default adds the warning's source file and line).
    default_format = warnings.formatwarning
    warnings.formatwarning = lambda message, *_, **__: f"dsv4 {args.command}: warning: {message}\n"
    try:
        return args.func(args)
    except KeyboardInterrupt:            # Ctrl-C: a user's choice, not a crash (128 + SIGINT, as shells report it)
        print(f"\ndsv4 {args.command}: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ConfigError, OSError) as e:
        # OSError: a path the user gave that cannot be read or written (missing, a directory where a file is
        # expected or the reverse, no permission); its message names the path.
        error = e
    except Exception as e:
        # NOTE: dsv4.checkpoint pulls in torch, so it is not imported just to name its error: a CheckpointError
        # can only come from code that already imported it.
        if not isinstance(e, _known_errors()):
            raise
        error = e
    finally:
        warnings.formatwarning = default_format
    print(f"dsv4 {args.command}: error: {error}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
