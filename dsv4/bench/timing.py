"""Timed runs of dsv4 and transformers: prefill, and decode steps after a prefill, with CUDA events (medians)."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from dsv4.engine.sampling import argmax_rows
from dsv4.model.state import ModelState, StepBatch
from dsv4.ops.rowwise import NON_FINITE, all_finite, finite_flag

PAGE = 256


def cuda_time(fn: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls (after one warm-up call), timed with CUDA events."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def pipelined_time(dec: Dsv4Decoder, steps: int) -> float:
    """Seconds per step of `steps` captured decode steps launched back to back, each one's NaN/inf check read a
    step later (`Dsv4Decoder.step(defer_check=True)`: what the engine's async decode does). The clock starts
    behind one step already in flight, so it measures the steady rate: the GPU's step plus whatever host time is
    not hidden behind it."""
    dec.step(defer_check=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        dec.step(defer_check=True)
    end.record()
    dec.finish()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / steps


def capture_graph(fn) -> torch.cuda.CUDAGraph:
    """fn captured in a CUDA graph, after one warm-up call on a side stream (compiles and allocations outside it)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def cold_graph_time(fn, flush: torch.Tensor, reps: int = 40) -> float:
    """Median seconds of one CUDA-graph replay of fn with the L2 flushed (`flush`: a large buffer zeroed) before
    each replay: the cold-cache time of a kernel as a captured decode step runs it."""
    return replay_median(capture_graph(fn), reps, before=flush.zero_)


def replay_median(graph: torch.cuda.CUDAGraph, reps: int, before=None) -> float:
    """Median seconds of `reps` replays of a captured graph (CUDA events around each), `before()` ahead of each."""
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


class Dsv4Decoder:
    """`batch` sequences prefilled to `context` tokens (in chunks), then greedy decode steps through `model.step`."""

    def __init__(self, model, batch: int, context: int, max_steps: int, chunk: int = 4096, seed: int = 0,
                 graphs: bool = False, compile: bool = False, capture: bool = True, compile_scope: str = "step",
                 prompt: torch.Tensor | None = None):
        cfg, dev = model.cfg, next(model.parameters()).device
        self.model, self.batch, self.pos, self.dev = model, batch, context, dev
        per_seq = -(-(context + max_steps + 1) // PAGE)
        self.pages = [list(range(b * per_seq, (b + 1) * per_seq)) for b in range(batch)]
        # one more slot and page: the scratch space of CUDA-graph padding rows
        self.state = ModelState(cfg, batch + 1, batch * per_seq + 1, PAGE, model.dtype, dev)
        gen = torch.Generator().manual_seed(seed)
        given = prompt is not None
        if prompt is None:                          # random tokens; else `prompt` [batch, context] token ids
            prompt = torch.randint(2, cfg.vocab_size, (batch, context), generator=gen)
        with torch.inference_mode():
            for b in range(batch):
                for s in range(0, context, chunk):
                    n = min(chunk, context - s)
                    h = model.step(prompt[b:b + 1, s:s + n].to(dev), StepBatch.build([(b, s, n, self.pages[b])], dev),
                                   self.state)
        self.tokens = torch.randint(2, cfg.vocab_size, (1, batch), generator=gen).to(dev)
        if given:                                   # a real prompt: continue it greedily
            with torch.inference_mode():
                self.tokens = model.main_logits(h[:, -1:]).argmax(-1).view(1, batch)
        self.history: list[torch.Tensor] = []
        self._pending: tuple[torch.Tensor, torch.cuda.Event] | None = None   # a deferred check (`defer_check`)
        self.graphs = None
        if graphs:
            from dsv4.engine.graphs import DecodeGraphs

            self.graphs = DecodeGraphs(model, self.state, batch, per_seq, sizes=[batch], compile=compile,
                                       capture=capture, compile_scope=compile_scope)
        del h

    def step(self, defer_check: bool = False) -> torch.Tensor:
        """One greedy step. Serially (the engine with async decode off) the NaN/inf check is read after sampling:
        a sync, so the host builds the next step's inputs while the GPU idles. `defer_check` (captured steps only:
        the engine's async decode, its default where steps are captured) queues the check's flag into pinned
        memory and reads the step before's instead: the next step is launched while this one runs. `finish()`
        reads the last one."""
        if self.graphs is not None:
            rows = [(b, self.pos, self.pages[b]) for b in range(self.batch)]
            with torch.inference_mode():
                logits = self.graphs.run(self.tokens, rows, check=False)
                self.tokens = argmax_rows(logits).view(1, -1)
                if defer_check:
                    self._queue_check(finite_flag(logits))
                elif not all_finite(logits):
                    raise FloatingPointError(NON_FINITE)
        else:
            batch = StepBatch.build([(b, self.pos, 1, self.pages[b]) for b in range(self.batch)], self.dev)
            with torch.inference_mode():
                h = self.model.step(self.tokens, batch, self.state)
                self.tokens = self.model.main_logits(h).argmax(-1)
        self.pos += 1
        self.history.append(self.tokens)
        return self.tokens

    def _queue_check(self, flag: torch.Tensor) -> None:
        """Copy this step's finite flag to pinned memory (two buffers, alternating), then read the step before's."""
        if not hasattr(self, "_flags"):     # pinned: made on the first deferred check (CUDA only)
            self._flags = [torch.ones((), dtype=torch.bool, pin_memory=True) for _ in range(2)]
        host = self._flags[self.pos % 2]
        with torch.inference_mode():        # the buffers are inference tensors when made in a step's context
            host.copy_(flag, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self.finish()
        self._pending = (host, done)

    def finish(self) -> None:
        """Read the deferred check of the last step run with `defer_check` (if any): waits for that step."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending[1].synchronize()
            if not bool(pending[0]):
                raise FloatingPointError(NON_FINITE)


def bench_model(layers: int = 4, device: str | torch.device = "cuda", tiny: bool = False):
    """The bench's model for scripts: Flash's width (`tiny`: `tiny_config`'s, to try a script on a CPU), its first
    `layers` blocks, synthesised official-format weights (seed 0), bf16 with the act-quant emulation on."""
    from dsv4.checkpoint.synth import synthesize_tensors
    from dsv4.config import ModelConfig, tiny_config
    from dsv4.loader import load_tensors

    dev = torch.device(device)
    cfg = (tiny_config() if tiny else ModelConfig.preset("flash")).truncated(layers)
    return load_tensors(cfg, synthesize_tensors(cfg, 0, dev), dev, torch.bfloat16, quant_emulation=True)


def fresh_sequence(model, n_tokens: int, seed: int = 0) -> tuple[ModelState, list[int], torch.Tensor]:
    """(state with one slot, its page list, random token ids [1, n_tokens]) for one fresh sequence's prefill."""
    cfg, dev = model.cfg, next(model.parameters()).device
    pages = list(range(-(-n_tokens // PAGE)))
    state = ModelState(cfg, 1, len(pages), PAGE, model.dtype, dev)
    ids = torch.randint(2, cfg.vocab_size, (1, n_tokens), generator=torch.Generator().manual_seed(seed)).to(dev)
    return state, pages, ids


def dsv4_prefill(model, n_tokens: int, chunk: int, seed: int = 0, step=None) -> Callable[[], torch.Tensor]:
    """A callable running one fresh sequence's prefill of `n_tokens` (in `chunk`-token steps) -> last logits.
    `step`: what runs each chunk (default `model.step`; e.g. `PrefillGraphs.step`)."""
    dev = next(model.parameters()).device
    state, pages, ids = fresh_sequence(model, n_tokens, seed)
    step = step or model.step

    def run():
        state.reset_slot(0)
        with torch.inference_mode():
            for s in range(0, n_tokens, chunk):
                n = min(chunk, n_tokens - s)
                h = step(ids[:, s:s + n], StepBatch.build([(0, s, n, pages)], dev), state)
            return model.main_logits(h[:, -1:])
    return run


class HFDecoder:
    """transformers: prefill `context` tokens with its cache, then greedy decode steps."""

    def __init__(self, model, batch: int, context: int, seed: int = 0):
        vocab = model.config.vocab_size
        dev = next(model.parameters()).device
        ids = torch.randint(2, vocab, (batch, context), generator=torch.Generator().manual_seed(seed)).to(dev)
        self.model = model
        with torch.inference_mode():
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        self.past, self.tokens = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

    def step(self) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model(input_ids=self.tokens, past_key_values=self.past, use_cache=True, logits_to_keep=1)
        self.past, self.tokens = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return self.tokens


def hf_prefill(model, n_tokens: int, seed: int = 0) -> Callable[[], torch.Tensor]:
    dev = next(model.parameters()).device
    ids = torch.randint(2, model.config.vocab_size, (1, n_tokens),
                        generator=torch.Generator().manual_seed(seed)).to(dev)

    def run():
        with torch.inference_mode():
            return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
    return run


def write_results(results, path: str | None, echo: bool = True) -> None:
    """Print each result as a JSON line (`echo`); with `path`, also write them all there (bench scripts' --json)."""
    for r in results if echo else ():
        print(json.dumps(r), flush=True)
    if path:
        Path(path).write_text(json.dumps(results, indent=1) + "\n")
