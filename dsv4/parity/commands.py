"""The `dsv4 parity ...` commands: load, run, print. Argument parsing lives in dsv4/cli.py.

Exit codes: 0 agreement, 1 divergence (so `dsv4 parity compare` can gate CI), 2 bad input (raised as
errors the CLI turns into one line).
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from dsv4.parity.errors import ParityError


def _load(args, dtype_default: str = "float32", emulation: bool | None = None):
    import torch

    from dsv4.checkpoint.hub import resolve_model
    from dsv4.loader import load_model

    if (args.device or "cpu").startswith("cuda") and not torch.cuda.is_available():
        raise ParityError(f"--device {args.device}: no CUDA device is available (the default is cpu)")
    path = resolve_model(args.model)
    dtype = getattr(torch, getattr(args, "dtype_name", None) or dtype_default)
    quant = (not args.no_quant_emulation) if emulation is None else emulation
    model = load_model(path, device=args.device or "cpu", dtype=dtype, quant_emulation=quant,
                       progress=sys.stderr.isatty())
    return path, model


def read_tokens(args, model_path, vocab_size: int) -> list[int]:
    """--tokens FILE.json (a JSON list of ids) or --prompt TEXT (tokenised with one BOS)."""
    from dsv4.parity.dump import check_tokens

    if args.tokens is not None:
        try:
            tokens = json.loads(Path(args.tokens).read_text())
        except json.JSONDecodeError as e:
            raise ParityError(f"--tokens {args.tokens}: not JSON ({e})") from None
        if not isinstance(tokens, list):
            raise ParityError(f"--tokens {args.tokens}: expected a JSON list of token ids")
    else:
        from dsv4.tokenizer import encode_prompt, load_tokenizer

        tokens = encode_prompt(load_tokenizer(model_path), args.prompt)
    check_tokens(tokens, vocab_size)
    return tokens


def cmd_dump(args) -> int:
    from dsv4.parity import bugs
    from dsv4.parity.dump import dump

    path, model = _load(args)
    tokens = read_tokens(args, path, model.cfg.vocab_size)
    info = {"model": str(args.model or "builtin"), "inject_bug": args.inject_bug}
    bug = bugs.inject(args.inject_bug) if args.inject_bug else contextlib.nullcontext()
    with bug:
        manifest = dump(model, tokens, args.decode_steps, args.out, info, args.taps)
    n = sum(s["n_taps"] for s in manifest["steps"])
    print(f"wrote {len(manifest['steps'])} steps ({n} taps) of {len(tokens)} prompt tokens to {args.out}")
    return 0


def _report_and_exit(report, args) -> int:
    from dsv4.parity.table import render

    print(render(report, args.threshold, args.min_overlap, args.around))
    if args.plot:
        from dsv4.parity.plot import heatmap

        heatmap(report, args.plot)
        print(f"heatmap: {args.plot}")
    return 0 if report.ok else 1


def check_threshold_args(args) -> None:
    """Cosines and overlaps lie in [-1, 1] and [0, 1]: --threshold 99.9 (a percentage) would flag identical dumps,
    --around -1 would show no row; say so before comparing anything."""
    if not -1.0 <= args.threshold <= 1.0:
        raise ParityError(f"--threshold {args.threshold}: a worst-row cosine, between -1 and 1 (default 0.999)")
    if not 0.0 <= args.min_overlap <= 1.0:
        raise ParityError(f"--min-overlap {args.min_overlap}: a fraction of the picks, between 0 and 1 (default 0.99)")
    if args.around is not None and args.around < 0:
        raise ParityError(f"--around {args.around}: a number of rows, >= 0")


def cmd_compare(args) -> int:
    from dsv4.parity.compare import compare_dumps

    check_threshold_args(args)
    return _report_and_exit(compare_dumps(args.a, args.b, args.threshold, args.min_overlap, args.step), args)


def cmd_hf(args) -> int:
    from dsv4.parity.compare import Report, compare_steps
    from dsv4.parity.dump import record_steps
    from dsv4.parity.hf_oracle import load_hf_from_checkpoint, transformers_status
    from dsv4.parity.hf_taps import hf_step_taps
    from dsv4.parity.taps import stage_of

    check_threshold_args(args)
    ok, why = transformers_status()
    if not ok:
        raise ParityError(f"dsv4 parity hf needs transformers >= 5.8.1 with DeepseekV4ForCausalLM: {why}")
    path, model = _load(args, emulation=False)
    tokens = read_tokens(args, path, model.cfg.vocab_size)
    ours = list(record_steps(model, tokens, args.decode_steps))
    hf = load_hf_from_checkpoint(path)
    theirs = hf_step_taps(hf, model.cfg, [t for s in ours for t in s.tokens], [(s.start, len(s.tokens)) for s in ours])
    report = Report()
    for step, hf_taps in zip(ours, theirs, strict=True):
        compare_steps(step.file_name.removesuffix(".safetensors"), step.taps, hf_taps, report, args.threshold,
                      args.min_overlap)
    stages = sorted({stage_of(n.split(":", 1)[1])[1] for n in report.only_a})
    report.notes.append(f"not compared ({len(report.only_a)} taps): transformers computes {', '.join(stages)} "
                        "inside functions, no module output to capture")
    report.only_a = []
    return _report_and_exit(report, args)


def cmd_precision(args) -> int:
    from dsv4.ops.golden import precision_report, render_precision

    print(render_precision(precision_report(seed=args.seed, tokens=args.tokens_n)))
    return 0
