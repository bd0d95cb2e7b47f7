"""The benchmark run: build, check and time dsv4 and transformers on one GPU; print a table; write JSON.

Top-level keys (issue 16): `decode_bs{1,8,64}_floor_ratio` (each decode step over its HBM floor),
`prefill_{1k,8k}_floor_ratio` (over the larger of the bf16 compute time and the weight-read time),
`weight_bytes_resident` / `weight_bytes_resident_over_native` (allocator bytes holding the model, after load and
after every run, over the checkpoint's native bytes), `greedy_agreement` (random-weight bench model) and
`greedy_agreement_builtin_model` (trained), `op_errors_vs_float64`; with `--layers` > 4 also `deep_layers`,
`deep_per_layer_decode_ms`, `deep_peak_mem_gib`, `deep_longest_context`, `projected_full_flash_tp2_tpot_bs1_ms`.
"""

from __future__ import annotations

import gc
import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from dsv4 import ops
from dsv4.bench import floor
from dsv4.bench.timing import (
    Dsv4Decoder,
    HFDecoder,
    cuda_time,
    dsv4_prefill,
    hf_prefill,
    pipelined_time,
    replay_median,
    summary,
)
from dsv4.config import ModelConfig
from dsv4.engine.prefill_graphs import MAX_GRAPH_TOKENS, PrefillGraphs

RECORDED_ENV = ("DSV4_", "TORCHINDUCTOR_", "TRITON_")


@dataclass
class BenchOptions:
    layers: int = 4
    context: int = 512
    decode_batches: tuple[int, ...] = (1, 8, 64)
    decode_steps: int = 16
    prefill: tuple[int, ...] = (1024, 8192, 32768)
    prefill_chunk: int = 8192
    hf_prefill: tuple[int, ...] = (1024,)
    transformers: bool = True
    compile: bool = True             # torch.compile the captured decode step (inductor fusion)
    compile_scope: str = "step"      # "step" (one graph) or "block" (a graph per block kind: engine/graphs.py)
    agreement_steps: int = 64
    seed: int = 0
    profile: bool = False
    prefill_graphs: bool = True      # prefill steps of <= MAX_GRAPH_TOKENS through engine/prefill_graphs.py, as
                                     # the engine runs them on CUDA (JSON prefill; the eager step's figures:
                                     # prefill_eager); False: eager only
    compile_prefill: bool | None = None  # torch.compile the prefill graphs' segments (EngineConfig.compile_prefill;
                                     # None: as `compile`, the decode step's)
    timing_only: bool = False        # skip the agreement, per-op effect and op error measurements
    out: str | None = None
    log: list[str] = field(default_factory=list)


def _say(opts: BenchOptions, text: str) -> None:
    print(text, flush=True)
    opts.log.append(text)


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def run(opts: BenchOptions) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("dsv4 bench: needs a CUDA GPU")
    if opts.compile_prefill is None:
        opts = replace(opts, compile_prefill=opts.compile)
    dev = torch.device("cuda")
    cfg = ModelConfig.preset("flash").truncated(opts.layers)
    res: dict = {"gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__, "layers": opts.layers,
                 "compress_ratios": list(cfg.compress_ratios[: cfg.n_layers]), "context": opts.context,
                 "fast_ops": ops.fast_ops_status(), "compile": opts.compile, "compile_scope": opts.compile_scope,
                 "prefill_graphs": opts.prefill_graphs, "compile_prefill": opts.compile_prefill,
                 # the switches set (a figure measured with one on is not the default path's): ours, and the
                 # compiler's own (e.g. TORCHINDUCTOR_ENABLE_PDL), which change the compiled step as much
                 "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(RECORDED_ENV)}}
    bw = floor.copy_bandwidth(dev)
    res["copy_bandwidth_TBps"] = bw / 1e12
    _say(opts, f"{res['gpu']}: copy bandwidth {bw / 1e12:.2f} TB/s")
    t0 = time.time()
    from dsv4.checkpoint.synth import synthesize_tensors
    from dsv4.loader import load_tensors

    tensors = synthesize_tensors(cfg, opts.seed, dev)
    res["params"] = sum(t.numel() * (2 if t.dtype == torch.int8 else 1) for t in tensors.values())
    model = load_tensors(cfg, tensors, dev, torch.bfloat16, quant_emulation=True)
    del tensors                                  # transformers' run synthesises them again (same seed)
    _free()
    res["weight_bytes_native"] = floor.native_bytes(cfg)
    res["weight_bytes_after_load"] = torch.cuda.memory_allocated(dev)
    _say(opts, f"synthesised + loaded {res['params'] / 1e9:.1f} B params in {time.time() - t0:.0f} s: "
               f"{res['weight_bytes_after_load'] / 1e9:.2f} GB resident for {res['weight_bytes_native'] / 1e9:.2f} "
               f"GB native")
    if opts.profile:
        res["profile"] = _profile(model, opts)
    res["dsv4"] = _dsv4_runs(model, cfg, opts, bw)
    if opts.layers > 4:
        _deep(model, cfg, opts, res)
    _free()
    # Anything a fast path kept beside the weights (a copy made on first use) shows after the runs.
    res["weight_bytes_after_runs"] = torch.cuda.memory_allocated(dev)
    res["weight_bytes_resident"] = max(res["weight_bytes_after_load"], res["weight_bytes_after_runs"])
    res["weight_bytes_resident_over_native"] = res["weight_bytes_resident"] / res["weight_bytes_native"]
    _say(opts, f"weights resident after the runs: {res['weight_bytes_after_runs'] / 1e9:.2f} GB "
               f"({res['weight_bytes_resident_over_native']:.3f}x native)")
    if not opts.timing_only:
        res["greedy_agreement"] = _agreement(model, opts)
        res["op_effects_on_logits"] = _op_effects(model, opts)
        res["greedy_agreement_builtin_model"] = _agreement_builtin(opts)
        res["op_errors_vs_float64"] = _op_errors(dev)
        for name, err in res["op_errors_vs_float64"].items():
            _say(opts, f"op error vs float64: {name}: {err:.2e}")
    del model
    _free()
    if opts.transformers:
        res["transformers"] = _hf_runs(cfg, synthesize_tensors(cfg, opts.seed, dev), opts, dev)
    _ratios(res, opts)
    res["log"] = opts.log
    if opts.out:
        Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.out).write_text(json.dumps(res, indent=2) + "\n")
    print(table(res))
    return res


def _dsv4_runs(model, cfg, opts: BenchOptions, bw: float) -> dict:
    out = {"decode": {}, "prefill": {}}
    eager = Dsv4Decoder(model, 1, opts.context, 10, seed=opts.seed)
    out["decode_eager_bs1"] = summary(cuda_time(eager.step, 6))
    _say(opts, f"dsv4 decode bs1, eager general path: {out['decode_eager_bs1']['median_s'] * 1e3:.2f} ms/step")
    del eager
    _free()
    for b in opts.decode_batches:
        t0 = time.time()
        dec = Dsv4Decoder(model, b, opts.context, 2 * opts.decode_steps + 4, seed=opts.seed, graphs=True,
                          compile=opts.compile, compile_scope=opts.compile_scope)
        _say(opts, f"dsv4 decode bs{b}: prefill + capture{' + compile' if opts.compile else ''} "
                   f"{time.time() - t0:.0f} s")
        t = _decode_times(dec, b, opts.decode_steps)
        fl = floor.decode_floor(cfg, b, opts.context, bw)
        t.update(floor_s=fl["floor_s"], floor_bytes=fl["bytes"], tok_per_s=b / t["median_s"])
        out["decode"][b] = t
        _say(opts, f"dsv4 decode bs{b}: {t['median_s'] * 1e3:.2f} ms/step {t['mode']} (floor "
                   f"{fl['floor_s'] * 1e3:.3f} ms)" + (f"; serially {t['serial']['median_s'] * 1e3:.2f} ms, the "
                                                      f"captured step alone {t['replay_s'] * 1e3:.2f} ms"
                                                      if "replay_s" in t else ""))
        del dec
        _free()
    for n in opts.prefill:
        try:
            t = summary(cuda_time(dsv4_prefill(model, n, opts.prefill_chunk, opts.seed), 1 if n > 8192 else 3))
        except (torch.OutOfMemoryError, RuntimeError) as e:         # recorded; the other figures still come
            t = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            _say(opts, f"dsv4 prefill {n}, eager step: {t['error']}")
        _free()
        if opts.prefill_graphs and (min(n, opts.prefill_chunk) <= MAX_GRAPH_TOKENS or opts.compile_prefill):
            # the engine's path: captured segments for steps of up to MAX_GRAPH_TOKENS; longer ones eager, or with
            # compile_prefill its dynamic-shape compiled segments
            out.setdefault("prefill_eager", {})[n] = t
            if "median_s" in t:
                _say(opts, f"dsv4 prefill {n}, eager step: {t['median_s'] * 1e3:.1f} ms")
            t = _prefill_graphs(model, n, opts)
        fl = floor.prefill_floor(cfg, n, bw)
        t.update(floor_s=fl["floor_s"], floor=fl)
        if "median_s" in t:
            t["tok_per_s"] = n / t["median_s"]
            _say(opts, f"dsv4 prefill {n}: {t['median_s'] * 1e3:.1f} ms ({t['tok_per_s']:.0f} tok/s; floor "
                       f"{fl['floor_s'] * 1e3:.2f} ms: compute {fl['compute_s'] * 1e3:.2f}, "
                       f"weights {fl['read_s'] * 1e3:.2f})")
        out["prefill"][n] = t
    return out


def _decode_times(dec: Dsv4Decoder, b: int, steps: int) -> dict:
    """The decode step as the engine runs it by default: with captured steps (CUDA), pipelined (`pipelined_time`:
    async decode's overlap of the host's work with the GPU's step; `median_s`), beside the serial step (`serial`:
    each step's check read before the next is launched, the engine with async decode off) and the captured step
    replayed alone (`replay_s`); without them (CPU), the serial step alone."""
    serial = summary(cuda_time(dec.step, steps))
    replay = _replay_alone(dec, b, steps)
    if replay is None:
        return {**serial, "mode": "serial"}
    return {"median_s": pipelined_time(dec, steps), "mode": "pipelined", "serial": serial, "replay_s": replay}


def _replay_alone(dec: Dsv4Decoder, b: int, reps: int) -> float | None:
    """Median seconds of the captured step replayed back to back (same inputs: it rewrites the same cache rows),
    without the host's work between steps. A decode step (`dec.step`, as the engine runs one) reads its NaN/inf
    check after sampling, a sync: the host then builds the next step's inputs and launches the replay while the
    GPU waits.
    The difference between the two figures is that exposed host time. None without a captured graph (CPU)."""
    graph = dec.graphs.graphs[b].graph if dec.graphs is not None else None
    if graph is None:
        return None
    return replay_median(graph, reps)


def _prefill_graphs(model, n: int, opts: BenchOptions) -> dict:
    """The prefill of n tokens through `PrefillGraphs` (one bucket: the chunk size, up to MAX_GRAPH_TOKENS; longer
    chunks: no bucket, the compiled segments at their length), timed as the default is."""
    graphs, size = None, min(n, opts.prefill_chunk)
    try:
        graphs = PrefillGraphs(model, sizes=(size,) if size <= MAX_GRAPH_TOKENS else (),
                               compile="inductor" if opts.compile_prefill else None)
        t = summary(cuda_time(dsv4_prefill(model, n, opts.prefill_chunk, opts.seed, graphs.step),
                              1 if n > 8192 else 3))
        t["path"] = "prefill graphs" if graphs.buckets else "compiled segments, uncaptured"
    except (torch.OutOfMemoryError, RuntimeError) as e:
        t = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        _say(opts, f"dsv4 prefill {n} through prefill graphs: {t['error']}")
    del graphs
    _free()
    return t


FULL_FLASH_LAYERS = 43
ALL_REDUCE_S = 15e-6            # assumed: one bf16 all-reduce of a few tokens' hidden state over NVLink (latency)


def _deep(model, cfg, opts: BenchOptions, res: dict) -> None:
    """Depth figures: per-layer decode time (step minus the head, over the layers), peak memory, the longest
    context the free memory holds, and a labelled projection of full Flash's TPOT at TP=2."""
    from dsv4.model.state import layer_bytes_per_page

    dev = next(model.parameters()).device
    head = {}
    for b in opts.decode_batches:
        y = torch.randn(1, b, cfg.hc_mult, cfg.dim, device=dev, dtype=torch.bfloat16)     # hc streams
        with torch.inference_mode():
            head[b] = summary(cuda_time(lambda y=y: model.main_logits(y), 10))["median_s"]
    per_layer = {b: (t["median_s"] - head[b]) / cfg.n_layers * 1e3 for b, t in res["dsv4"]["decode"].items()}
    page = 256
    per_token = sum(layer_bytes_per_page(cfg, r, page, torch.bfloat16) for r in cfg.compress_ratios[: cfg.n_layers])
    per_token = per_token / page
    free, _ = torch.cuda.mem_get_info(dev)
    reserve = 8 * 2**30                                       # activations of an 8k prefill chunk and the allocator
    capacity = int((free - reserve) // per_token) if free > reserve else 0     # tokens of decode state that fit
    model_max = int(cfg.original_seq_len * cfg.rope_factor)
    res.update(deep_layers=cfg.n_layers, deep_per_layer_decode_ms=per_layer, deep_head_ms={b: h * 1e3 for b, h in
               head.items()}, deep_peak_mem_gib=torch.cuda.max_memory_allocated(dev) / 2**30,
               deep_cache_bytes_per_token=per_token,
               deep_context_capacity_tokens=capacity,
               # the model's own limit: YaRN stretches the original context by rope_factor (Flash: 64k x 16 = 1M)
               deep_model_max_context=model_max,
               deep_longest_context=min(capacity, model_max),
               deep_prefill_ok={n: "median_s" in t for n, t in res["dsv4"]["prefill"].items()})
    if 1 in per_layer:
        tpot = FULL_FLASH_LAYERS * (per_layer[1] / 2 + 2 * ALL_REDUCE_S * 1e3) + head[1] * 1e3 / 2
        res["projected_full_flash_tp2_tpot_bs1_ms"] = tpot
        res["projection_assumptions"] = (
            f"{FULL_FLASH_LAYERS} layers x (measured per-layer bs1 decode time / 2, i.e. each rank reads half of a "
            f"layer's weight bytes at the same efficiency: heads split, experts split whole between ranks, "
            f"replicated parts small) + 2 all-reduces per layer at {ALL_REDUCE_S * 1e6:.0f} us each (latency-bound "
            f"NVLink all-reduce of one token's hidden state; not measured: no multi-GPU machine) + the head split "
            f"over 2 ranks; MTP not run; context {opts.context}")
    _say(opts, f"deep ({cfg.n_layers} layers): per-layer decode ms {per_layer}, peak {res['deep_peak_mem_gib']:.1f} "
               f"GiB, longest context ~{res['deep_longest_context']} tokens (memory holds {capacity}), projected full "
               f"Flash TP=2 bs1 TPOT {res.get('projected_full_flash_tp2_tpot_bs1_ms', float('nan')):.2f} ms")


def _profile(model, opts: BenchOptions) -> dict:
    """torch.profiler tables (top ops by CUDA and by CPU time) of 4 decode steps at batch 1 (the fixed-shape step,
    compiled when the bench compiles, run without graph capture so its kernels show) and one 1k prefill."""
    from torch.profiler import ProfilerActivity, profile

    dec = Dsv4Decoder(model, 1, opts.context, 8, seed=opts.seed, graphs=True, capture=False, compile=opts.compile,
                      compile_scope=opts.compile_scope)
    prefill = dsv4_prefill(model, 1024, opts.prefill_chunk, opts.seed)
    dec.step()
    prefill()
    out = {}
    for name, fn in [("decode_bs1_x4", lambda: [dec.step() for _ in range(4)]), ("prefill_1k", prefill)]:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        ka = prof.key_averages()
        launches = sum(e.count for e in ka if "CUDA" in str(getattr(e, "device_type", "")))
        out[name] = {"by_cuda": ka.table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=60),
                     "by_cpu": ka.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60),
                     "cuda_kernels_per_call": launches // (4 if name.startswith("decode") else 1)}
        _say(opts, f"--- profile {name} (by CUDA time)\n{out[name]['by_cuda']}")
        _say(opts, f"--- profile {name} (by self CPU time)\n{out[name]['by_cpu']}")
    return out


# Prompts for the trained built-in model (it continues Python code): real text gives real top-1 margins.
BUILTIN_PROMPTS = ("def fibonacci(n):\n", "import os\n\n\ndef walk(path):\n", "class Stack:\n    def __init__(self):\n",
                   "def read_config(filename):\n    with open(filename) as f:\n")


def _agreement_builtin(opts: BenchOptions) -> dict:
    """The same agreement measure on the trained built-in model (bf16 on the GPU, every fast op applies), one run
    per prompt: with trained weights the top-1 margins are real, unlike the random benchmark weights."""
    import dsv4
    from dsv4.builtin import builtin_model_path
    from dsv4.tokenizer import encode_prompt, load_tokenizer

    dev = "cuda" if torch.cuda.is_available() else "cpu"          # CPU: the tests' smoke run
    model = dsv4.load_model(builtin_model_path(), device=dev, dtype=torch.bfloat16, progress=False)
    tok = load_tokenizer(builtin_model_path())
    runs = []
    for text in BUILTIN_PROMPTS:
        ids = torch.tensor([encode_prompt(tok, text, model.cfg.bos_token_id)])
        runs.append(_agreement(model, opts, prompt=ids))
    same, steps = sum(r["same"] for r in runs), sum(r["steps"] for r in runs)
    control = sum(r["control_twin_decode_path"]["same"] for r in runs)
    _say(opts, f"greedy agreement, built-in trained model: fast {same}/{steps}, control {control}/{steps}")
    del model
    _free()
    return {"fraction": same / steps, "same": same, "steps": steps, "control_fraction": control / steps,
            "prompts": list(BUILTIN_PROMPTS), "runs": runs}


def _agreement(model, opts: BenchOptions, prompt: torch.Tensor | None = None) -> dict:
    """Greedy tokens of the fast path (CUDA-graph decode, fast ops) vs the reference path (general step path, ops
    forced to their plain twins), the reference teacher-forced with the fast path's tokens.
    Control: the same measure for a second plain-twin path (the fixed-shape decode step run eagerly with the twins),
    which differs from the reference only in summation order: how often two equally exact paths disagree on this
    model is the floor of the measure (random weights have tiny top-1 margins)."""
    context = opts.context if prompt is None else prompt.shape[1]
    fast = Dsv4Decoder(model, 1, context, opts.agreement_steps + 1, seed=opts.seed + 1, graphs=True,
                       compile=opts.compile, compile_scope=opts.compile_scope, prompt=prompt)
    fast_logits = _greedy(fast, opts.agreement_steps)
    del fast
    with ops.reference_only():
        control = Dsv4Decoder(model, 1, context, opts.agreement_steps + 1, seed=opts.seed + 1, graphs=True,
                              capture=False, prompt=prompt)
        control_logits = _greedy(control, opts.agreement_steps, [x.argmax(-1) for x in fast_logits])
        del control
        ref = Dsv4Decoder(model, 1, context, opts.agreement_steps + 1, seed=opts.seed + 1, prompt=prompt)
        want = [_step_logits(ref, x.argmax(-1)) for x in fast_logits]
    _free()
    out = _compare(want, fast_logits)
    out["control_twin_decode_path"] = _compare(want, control_logits)
    return out


def _greedy(dec: Dsv4Decoder, steps: int, forced: list | None = None) -> list[torch.Tensor]:
    """Logits [1, V] of `steps` decode steps through the decoder's graphs; tokens greedy unless `forced`."""
    logits = []
    with torch.inference_mode():
        for i in range(steps):
            logits.append(dec.graphs.run(dec.tokens, [(0, dec.pos, dec.pages[0])]).clone())
            dec.tokens = (logits[-1].argmax(-1) if forced is None else forced[i]).view(1, 1)
            dec.pos += 1
    return logits


def _compare(want: list[torch.Tensor], got: list[torch.Tensor]) -> dict:
    """Per step: same argmax?, the reference's top-1 margin, logit cosine."""
    same, margins, cos = [], [], []
    for w, g in zip(want, got, strict=True):
        top2 = w.topk(2, dim=-1).values[0]
        margins.append((top2[0] - top2[1]).item())
        same.append(bool(torch.equal(w.argmax(-1), g.argmax(-1))))
        cos.append(torch.nn.functional.cosine_similarity(w.double(), g.double(), dim=-1).item())
    n = len(same)
    srt = sorted(cos)
    return {"steps": n, "same": sum(same), "fraction": sum(same) / n, "near_ties": sum(m < 1e-3 for m in margins),
            "logit_cosine_min": srt[0], "logit_cosine_median": srt[n // 2],
            "per_step_same": same, "per_step_ref_margin": margins, "per_step_cosine": cos}


def _op_effects(model, opts: BenchOptions) -> dict:
    """Each fast op's effect on one decode step's logits: from one prefilled state, the fixed-shape step (eager)
    with all ops on their twins, with only one op fast, with all fast, and compiled; relative L2 distance,
    cosine and same argmax against the all-twin logits. With the QAT emulation on and off."""
    import contextlib

    from dsv4.engine.graphs import DecodeGraphs, decode_logits
    from dsv4.model.state import DecodeBatch

    names = [n for n in ops.registry.fast_op_names() if n != "moe_grouped"]
    variants = {"all twins": names, **{f"only {n} fast": [m for m in names if m != n] for n in names},
                "all fast": []}
    out = {}
    for emulation in (True, False):
        model.set_quant_emulation(emulation)
        with ops.reference_only():
            dec = Dsv4Decoder(model, 1, opts.context, 4, seed=opts.seed + 2)
        batch = DecodeBatch.build([(0, dec.pos, dec.pages[0])], len(dec.pages[0]), dec.dev)
        got = {}
        for label, off in variants.items():
            with ops.reference_only(*off) if off else contextlib.nullcontext(), torch.inference_mode():
                got[label] = decode_logits(model, dec.tokens, batch, dec.state.clone())
        if dec.dev.type == "cuda":          # is cuBLAS's split-K bf16 reduction (allowed by default) the difference?
            flag = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
            with ops.reference_only(*[m for m in names if m != "linear"]), torch.inference_mode():
                got["only linear fast, fp32 split-K reduction"] = decode_logits(model, dec.tokens, batch,
                                                                               dec.state.clone())
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = flag
        if emulation and opts.compile:
            graphs = DecodeGraphs(model, dec.state.clone(), 1, len(dec.pages[0]), capture=False, sizes=[1],
                                  compile=True)
            got["all fast, compiled"] = graphs.run(dec.tokens, [(0, dec.pos, dec.pages[0])])
        want = got["all twins"].double()
        rows = {}
        for label, logits in got.items():
            d = logits.double()
            rows[label] = {"rel_l2": ((d - want).norm() / want.norm()).item(),
                           "cosine": torch.nn.functional.cosine_similarity(d, want, dim=-1).item(),
                           "same_argmax": bool(torch.equal(d.argmax(-1), want.argmax(-1)))}
            _say(opts, f"op effect (emulation {'on' if emulation else 'off'}) {label}: rel L2 "
                       f"{rows[label]['rel_l2']:.2e}, cosine {rows[label]['cosine']:.6f}, same argmax "
                       f"{rows[label]['same_argmax']}")
        out[f"emulation_{'on' if emulation else 'off'}"] = rows
        del dec
        _free()
    model.set_quant_emulation(True)
    return out


def _op_errors(dev) -> dict:
    """Each fast op against float64 on fresh random inputs at Flash dimensions: relative error (Frobenius), keyed
    by the implementation that ran (`ops.registry.which`; before this was checked, these figures were the twins':
    the fast paths apply without autograd only, so the ops run under inference mode, as in the model)."""
    from dsv4.ops import golden
    from dsv4.quant import fake_quant_fp8, quant_fp4, quant_fp8

    gen = torch.Generator(dev).manual_seed(0)
    out = {}
    x = fake_quant_fp8(torch.randn(64, 4096, generator=gen, device=dev), 128).bfloat16()
    w8, s8 = quant_fp8(torch.randn(2048, 4096, generator=gen, device=dev) / 64)
    exact = x.double() @ ops.dequant_weight(w8, s8, "fp8").double().T
    _fast_error(out, "linear fp8", exact, x, w8, s8, "fp8", False)
    wa, sa = quant_fp8(torch.randn(8 * 1024, 4096, generator=gen, device=dev) / 64)       # Flash's wo_a, 8 groups
    xa = torch.randn(8, 8, 4096, generator=gen, device=dev).bfloat16()
    exact = torch.einsum("mgk,grk->mgr", xa.double(), ops.dequant_weight(wa, sa, "fp8").double().view(8, 1024, 4096))
    _fast_error(out, "block_diag_linear fp8 (wo_a)", exact, xa, wa, sa, "fp8")
    ws = [quant_fp4(torch.randn(2048, 4096, generator=gen, device=dev) / 64) for _ in range(4)]
    w4, s4 = torch.stack([w for w, _ in ws]), torch.stack([s for _, s in ws])
    ids = torch.randint(0, 4, (64,), generator=gen, device=dev)
    exact = torch.einsum("pk,pnk->pn", x.double(), torch.stack([ops.dequant_weight(w4[i], s4[i], "fp4").double()
                                                                for i in ids.tolist()]))
    _fast_error(out, "pair_linear fp4", exact, x, ids, w4, s4, "fp4")
    eid, order = ids.sort(stable=True)
    _fast_error(out, "grouped_linear fp4", exact[order], x[order], eid, w4, s4, "fp4")
    args = [t.to(dev) if torch.is_tensor(t) else t for t in golden.realistic_attention_inputs(0, 64)]
    exact = golden.attention_fp32(*[t.double() if torch.is_tensor(t) and t.is_floating_point() else t
                                    for t in args], acc=torch.float64)
    _fast_error(out, "sparse_attention (64-query chunk)", exact, *args)
    return out


def _fast_error(out: dict, label: str, exact: torch.Tensor, *args) -> None:
    """out["<label>: <implementation>"] = relative error of ops.<op>(*args) (op: label's first word)."""
    from dsv4.ops.registry import which

    op = label.split()[0]
    with torch.inference_mode():
        got = getattr(ops, op)(*args)
        out[f"{label}: {which(op, *args)}"] = _rel(got, exact)


def _rel(got: torch.Tensor, exact: torch.Tensor) -> float:
    return ((got.double() - exact).norm() / exact.norm()).item()


def _step_logits(dec: Dsv4Decoder, forced):
    from dsv4.model.state import StepBatch

    batch = StepBatch.build([(0, dec.pos, 1, dec.pages[0])], dec.dev)
    with torch.inference_mode():
        logits = dec.model.main_logits(dec.model.step(dec.tokens, batch, dec.state))[0]
    dec.tokens = (logits.argmax(-1) if forced is None else forced).view(1, 1)
    dec.pos += 1
    return logits


def _hf_runs(cfg, tensors, opts: BenchOptions, dev) -> dict:
    from dsv4.bench.hf_model import build_hf_model

    out = {"decode": {}, "prefill": {}}
    try:
        hf = build_hf_model(cfg, tensors, dev)
    except Exception as e:                                  # report, keep the dsv4 figures
        _say(opts, f"transformers: could not build the model: {e!r}"[:500])
        return {"error": repr(e)[:500]}
    import transformers

    out["version"] = transformers.__version__
    for b in opts.decode_batches:
        dec = HFDecoder(hf, b, opts.context, opts.seed)
        t = summary(cuda_time(dec.step, min(opts.decode_steps, 8)))
        t["tok_per_s"] = b / t["median_s"]
        out["decode"][b] = t
        _say(opts, f"transformers decode bs{b}: {t['median_s'] * 1e3:.2f} ms/step")
        del dec
        _free()
    for n in opts.hf_prefill:
        t = summary(cuda_time(hf_prefill(hf, n, opts.seed), 3))
        t["tok_per_s"] = n / t["median_s"]
        out["prefill"][n] = t
        _say(opts, f"transformers prefill {n}: {t['median_s'] * 1e3:.1f} ms")
    del hf
    _free()
    return out


def _ratios(res: dict, opts: BenchOptions) -> None:
    d, h = res["dsv4"], res.get("transformers", {})
    if 1 in d["decode"]:
        one = d["decode"][1]
        res["decode_bs1_ms"] = one["median_s"] * 1e3
        res["decode_bs1_floor_ms"] = one["floor_s"] * 1e3
        res["decode_bs1_floor_ratio"] = one["median_s"] / one["floor_s"]
        if 1 in h.get("decode", {}):
            res["decode_bs1_speedup_vs_transformers"] = h["decode"][1]["median_s"] / one["median_s"]
        if 64 in d["decode"]:
            res["decode_bs64_over_bs1_throughput"] = d["decode"][64]["tok_per_s"] / one["tok_per_s"]
    for b, t in d["decode"].items():
        res[f"decode_bs{b}_floor_ratio"] = t["median_s"] / t["floor_s"]
        if "serial" in t:                    # the engine with async decode off: the host's work between steps
            res[f"decode_bs{b}_serial_ms"] = t["serial"]["median_s"] * 1e3
            res[f"decode_bs{b}_serial_floor_ratio"] = t["serial"]["median_s"] / t["floor_s"]
        if "replay_s" in t:                  # the step without the host's exposed work (`_replay_alone`)
            res[f"decode_bs{b}_replay_ms"] = t["replay_s"] * 1e3
    for n, t in d["prefill"].items():
        if "median_s" in t:
            res[f"prefill_{_size_name(n)}_floor_ratio"] = t["median_s"] / t["floor_s"]
    if 1024 in d["prefill"] and 1024 in h.get("prefill", {}) and "median_s" in d["prefill"][1024]:
        res["prefill_1k_speedup_vs_transformers"] = h["prefill"][1024]["median_s"] / d["prefill"][1024]["median_s"]
    if isinstance(res.get("greedy_agreement"), dict):
        res["greedy_agreement_detail"] = res["greedy_agreement"]
        res["greedy_agreement"] = res["greedy_agreement"]["fraction"]


def _size_name(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def table(res: dict) -> str:
    rows = [("metric", "dsv4", "transformers", "ratio / target")]
    d, h = res["dsv4"], res.get("transformers", {})
    for b, t in d["decode"].items():
        ht = h.get("decode", {}).get(b)
        theirs = f"{ht['median_s'] * 1e3:.2f}" if ht else "-"
        rows.append((f"decode bs{b} ms/step", f"{t['median_s'] * 1e3:.2f}", theirs,
                     f"{ht['median_s'] / t['median_s']:.1f}x" if ht else "-"))
    for n, t in d["prefill"].items():
        ht = h.get("prefill", {}).get(n)
        mine = f"{t['median_s'] * 1e3:.1f}" if "median_s" in t else "OOM"
        rows.append((f"prefill {n} ms", mine, f"{ht['median_s'] * 1e3:.1f}" if ht else "-",
                     f"{ht['median_s'] / t['median_s']:.1f}x" if ht and "median_s" in t else "-"))
    for n, t in d.get("prefill_eager", {}).items():
        rows.append((f"prefill {n} ms, eager step", f"{t['median_s'] * 1e3:.1f}" if "median_s" in t else "error",
                     "-", "-"))
    for key, target in [("decode_bs1_floor_ratio", "<= 1.5"), ("decode_bs8_floor_ratio", "<= 1.5"),
                        ("decode_bs64_floor_ratio", "<= 1.5"), ("prefill_1k_floor_ratio", "<= 2"),
                        ("prefill_8k_floor_ratio", "<= 2"), ("weight_bytes_resident_over_native", "<= 1.05"),
                        ("decode_bs1_speedup_vs_transformers", ""), ("prefill_1k_speedup_vs_transformers", ""),
                        ("greedy_agreement", ">= 0.99 (trained model: greedy_agreement_builtin_model)")]:
        if key in res:
            rows.append((key, f"{res[key]:.3f}", "", target))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
