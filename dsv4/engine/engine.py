"""The engine loop: schedule -> run -> postprocess, one step at a time.

`Engine.step()` asks the scheduler which sequences run and how many tokens each feeds, lets the runner execute
them in one model call, then appends the sampled tokens, streams their text and applies the stop rules.
Finished and aborted sequences give their slot and pages back in the same step.
Async decode (`EngineConfig.async_decode`; bench/NOTES.md, thirty-fourth session): a steady decode step is
launched before the tokens of the step before it are read, so the host's scheduling, launches and appends overlap
the GPU's step, and `step()` returns each step's tokens one call later. Every other step runs serially, after the
step in flight (if any) is drained.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from dsv4.engine.config import EngineConfig, cache_pages
from dsv4.engine.detokenizer import TextStream
from dsv4.engine.outputs import CompletionOutput, RequestOutput
from dsv4.engine.pages import CacheManager
from dsv4.engine.prefix_cache import PrefixCache, SlotStates
from dsv4.engine.runner import ModelRunner, PendingSample, Sampled
from dsv4.engine.sampling import SamplingParams, request_seeds
from dsv4.engine.scheduler import ScheduledStep, Scheduler
from dsv4.engine.sequence import Sequence
from dsv4.engine.structured import StructuredDecoding, StructuredOutputError
from dsv4.model.state import ModelState

log = logging.getLogger("dsv4.engine")


class RequestError(ValueError):
    """A request the engine cannot serve (the server maps it to a 4xx)."""


@dataclass
class _Request:
    output: RequestOutput
    seqs: list[Sequence]
    streams: list[TextStream]


@dataclass
class _Inflight:
    """An async decode step: launched, its progress not yet accounted and its tokens not yet read."""

    scheduled: ScheduledStep
    sample: PendingSample


class Engine:
    def __init__(self, model, tokenizer, econf: EngineConfig | None = None):
        econf = econf or EngineConfig()
        self.model, self.tokenizer, self.econf = model, tokenizer, econf
        cfg = model.cfg
        # An explicit max_model_len is honoured: positions have no table (RoPE is computed per position) and
        # max_seq_len is only the default (the reference's runtime choice, 4096); capping silently hid it.
        self.max_model_len = econf.max_model_len or cfg.max_seq_len
        pages = cache_pages(cfg, econf, self.max_model_len)
        device = next(model.parameters()).device
        # The fixed-shape decode path is single-rank for now: under TP the Driver replays `StepBatch` steps.
        single = econf.tensor_parallel_size == 1
        spec = econf.num_speculative_tokens > 0         # graphs of k + 1 tokens per sequence (engine/speculative.py)
        capture = econf.cuda_graphs and device.type == "cuda" and single
        fixed = capture or (econf.decode_batch and single)
        # The fixed-shape decode path pads batches with rows that write to one scratch slot and page (the last).
        self.state = ModelState(cfg, econf.max_num_seqs + fixed, pages + fixed, econf.page_size, model.dtype, device)
        prefix = None
        if econf.enable_prefix_caching and econf.tensor_parallel_size == 1:   # followers' slots: dist/worker.py
            prefix = PrefixCache(econf.page_size, econf.max_prefix_snapshots, self.state)
        self.cache = CacheManager(econf.max_num_seqs, pages, econf.page_size, prefix)
        self.scheduler = Scheduler(self.cache, econf.max_num_seqs, econf.max_num_batched_tokens, self.max_model_len)
        graphs = None
        if fixed:
            from dsv4.engine.graphs import DecodeGraphs, decode_logits, verify_forward

            graphs = DecodeGraphs(model, self.state, econf.max_num_seqs,
                                  -(-self.max_model_len // econf.page_size), capture=capture,
                                  compile=econf.compile_decode and capture, compile_scope=econf.compile_scope,
                                  tokens_per_seq=econf.num_speculative_tokens + 1,
                                  forward=verify_forward if spec else decode_logits)
        speculator = None
        if spec:
            from dsv4.engine.speculative import Speculator

            speculator = Speculator(model, self.state, econf.num_speculative_tokens, self.max_model_len)
        prefill = None
        if (capture if econf.prefill_graphs is None else econf.prefill_graphs) and single and not spec:
            from dsv4.engine.prefill_graphs import MAX_GRAPH_TOKENS, PrefillGraphs, buckets_up_to

            sizes = buckets_up_to(min(econf.max_num_batched_tokens, MAX_GRAPH_TOKENS))
            prefill = PrefillGraphs(model, sizes, capture=capture,
                                    compile="inductor" if econf.prefill_compiled() and capture else None)
        self.runner = ModelRunner(model, self.state, graphs=graphs, speculator=speculator, prefill=prefill)
        self.structured = StructuredDecoding(tokenizer, cfg.vocab_size, cfg.eos_token_id)
        self.runner.structured = self.structured
        if prefix is not None and speculator is not None:   # the drafter's window ring is per slot state too
            prefix.state = SlotStates(self.state, speculator.mtp_state)
        self.requests: dict[str, _Request] = {}
        self.num_preemptions = 0
        self._by_seq: dict[int, tuple[_Request, int]] = {}
        self.async_decode = _async_decode(econf, capture, graphs is not None and not spec)
        self._inflight: _Inflight | None = None

    # ------------------------------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    prompt: str | None = None) -> RequestOutput:
        self._check(request_id, prompt_ids, params)
        seqs = [Sequence(list(prompt_ids), params, seed=s) for s in request_seeds(params)]
        if params.structured_outputs is not None:
            try:    # a cache hit when the caller compiled it already (the server does, off this thread)
                for seq in seqs:
                    self.structured.add(seq.seq_id, params.structured_outputs)
            except StructuredOutputError as e:
                for seq in seqs:
                    self.structured.remove(seq.seq_id)
                raise RequestError(str(e)) from e
        for seq in seqs:
            try:
                self.scheduler.add(seq)
            except ValueError as e:
                for added in seqs[:seqs.index(seq)]:
                    self.scheduler.abort(added.seq_id)
                for added in seqs:
                    self.structured.remove(added.seq_id)
                raise RequestError(str(e)) from e
        outs = [CompletionOutput(i, logprobs=[] if params.logprobs is not None else None) for i in range(len(seqs))]
        req = _Request(RequestOutput(request_id, prompt, list(prompt_ids), outs), seqs,
                       [TextStream(self.tokenizer, stop=params.stop, prompt_ids=prompt_ids) for _ in seqs])
        self.requests[request_id] = req
        for i, seq in enumerate(seqs):
            self._by_seq[seq.seq_id] = (req, i)
        return req.output

    def _check(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        vocab = self.model.cfg.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_ids):
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise RequestError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                               f"context length {self.max_model_len}")

    def abort(self, request_id: str) -> None:
        """Cancel a request; its slots and pages are free when this returns."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for i, seq in enumerate(req.seqs):
            if not seq.is_finished:
                self.scheduler.abort(seq.seq_id)
                req.output.outputs[i].finish_reason = "abort"
            self._by_seq.pop(seq.seq_id, None)
            self.structured.remove(seq.seq_id)
        req.output.finished = True
        self._drop_if_idle()

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ------------------------------------------------------------------------------------------ the loop
    def step(self) -> list[RequestOutput]:
        """One engine step; returns the requests that progressed (finished ones for the last time). With async
        decode these are the requests of the step before, read while this one runs."""
        touched: dict[str, _Request] = {}
        if self._inflight is not None:
            self._account(self._inflight.scheduled)
        if self._can_run_ahead():
            self._step_ahead(touched)
        elif self._inflight is not None:
            # Drain, and nothing more: the serial step needs every token on the host, and so a caller that adds or
            # aborts requests between steps sees every state the serial engine shows, in the same order.
            self._collect(touched)
        else:
            self._step_serial(touched)
        outputs = self._progressed(touched)
        self._drop_if_idle()
        return outputs

    def _step_serial(self, touched: dict[str, _Request]) -> None:
        scheduled = self.scheduler.schedule()
        self.num_preemptions += len(scheduled.preempted)
        self._started(scheduled.newly_started)
        sampled = self.runner.run(scheduled.entries)
        self._account(scheduled)
        self._append_all(sampled, touched)

    def _step_ahead(self, touched: dict[str, _Request]) -> None:
        """Launch a decode step of every running sequence, then read the step in flight while it runs."""
        scheduled = self.scheduler.schedule()       # `_can_run_ahead`: nobody admitted or preempted
        seqs, prev = [seq for seq, _ in scheduled.entries], self._inflight
        sample = self.runner.decode_ahead(seqs, prev.sample if prev is not None else None)
        for seq in seqs:
            seq.num_inflight += 1
        if prev is not None:
            self._collect(touched)
        self._inflight = _Inflight(scheduled, sample)

    def _drop_if_idle(self) -> None:
        """With no request left, the step in flight holds only the discarded tokens of finished sequences: never
        read (its work is queued; whatever reuses its pages and slots queues behind it)."""
        if self._inflight is not None and not self.requests:
            for seq in self._inflight.sample.seqs:
                seq.num_inflight -= 1
            self._inflight = None

    def _can_run_ahead(self) -> bool:
        """May the next step be launched before the tokens of the one in flight are read? Only where it is the step
        the serial scheduler would make, give or take the sequences that just stopped: nobody waiting, every running
        sequence decoding one token within the budget, no grammar whose masks need the tokens, and the pages it
        grows free without evicting a cached block or preempting."""
        running = self.scheduler.running
        if not self.async_decode or not running or self.scheduler.waiting:
            return False
        if len(running) > self.scheduler.max_num_batched_tokens:
            return False
        if any(s.num_pending != 1 or not s.num_computed or s.seq_id in self.structured for s in running):
            return False
        return sum(self.cache.pages_needed(s, s.num_computed + 1) for s in running) <= self.cache.pages.num_clean

    def _account(self, scheduled: ScheduledStep) -> None:
        """The step has run (or is queued ahead of anything launched later): advance the sequences' computed
        tokens, cache the blocks they completed (snapshots queue behind the step)."""
        self.scheduler.update_after_step(scheduled)
        self.cache.after_step([seq for seq, _ in scheduled.entries])

    def _collect(self, touched: dict[str, _Request]) -> None:
        """Read the step in flight and append its tokens."""
        inflight, self._inflight = self._inflight, None
        sampled = self.runner.read(inflight.sample)
        for seq in inflight.sample.seqs:
            seq.num_inflight -= 1
        self._append_all(sampled, touched)

    def _append_all(self, sampled: dict[int, Sampled | list[Sampled]], touched: dict[str, _Request]) -> None:
        for seq_id, s in sampled.items():
            if seq_id not in self._by_seq:      # async decode: its request finished or was aborted since the launch
                continue
            req, i = self._by_seq[seq_id]
            for token in s if isinstance(s, list) else [s]:     # speculation: several tokens per step
                if not req.seqs[i].is_finished:                  # tokens past a stop or max_tokens are dropped
                    self._append(req, i, token)
            if self.runner.speculator is not None:
                from dsv4.engine.speculative import metrics_of

                req.output.metrics = metrics_of(req.seqs)
            touched[req.output.request_id] = req

    def _progressed(self, touched: dict[str, _Request]) -> list[RequestOutput]:
        for req in touched.values():
            if all(seq.is_finished for seq in req.seqs):
                req.output.finished = True
                del self.requests[req.output.request_id]
                for seq in req.seqs:
                    self._by_seq.pop(seq.seq_id, None)
        return [req.output for req in touched.values()]

    def _started(self, seqs: list[Sequence]) -> None:
        """Newly admitted sequences: restore the slot of those starting from a cached prefix; report the hit."""
        for seq in seqs:
            saved = self.cache.prefix.take_restore(seq) if self.cache.prefix is not None else None
            if saved is not None:
                self.runner.resume(seq)
                self.cache.prefix.state.load_slot(seq.slot, saved)
            req, i = self._by_seq[seq.seq_id]
            if i == 0 and req.output.num_cached_tokens is None:
                req.output.num_cached_tokens = seq.num_cached_tokens

    def _append(self, req: _Request, i: int, s: Sampled) -> None:
        seq, out, stream = req.seqs[i], req.output.outputs[i], req.streams[i]
        p = seq.params
        seq.output_ids.append(s.token_id)
        if seq.seq_id in self.structured and not self.structured.accept(seq.seq_id, s.token_id):
            log.warning("sequence %d: the grammar rejected token %d; unconstrained from here", seq.seq_id, s.token_id)
        out.token_ids.append(s.token_id)
        out.cumulative_logprob += s.logprob
        if out.logprobs is not None:
            out.logprobs.append({s.token_id: s.logprob, **dict(s.top)})
        stop_id = s.token_id in p.stop_token_ids or (s.token_id == self.model.cfg.eos_token_id and not p.ignore_eos)
        delta, stopped = stream.add(s.token_id) if not stop_id else ("", False)
        stop_str = stream.stop_str if stopped else None
        out.text += delta
        if stop_id or stop_str is not None:
            out.stop_reason = s.token_id if stop_id else stop_str
            self._finish(seq, out, stream, "stop")
        elif len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, out, stream, "length")

    def _finish(self, seq: Sequence, out: CompletionOutput, stream: TextStream, reason: str) -> None:
        if reason != "stop" or out.stop_reason is None or isinstance(out.stop_reason, int):
            out.text += stream.finish()
        out.finish_reason = reason
        self.structured.remove(seq.seq_id)
        self.scheduler.finish(seq, reason)

    def generate_all(self, progress=None) -> None:
        """Step until every added request has finished."""
        while self.has_unfinished():
            for out in self.step():
                if progress is not None and out.finished:
                    progress(out)


def _async_decode(econf: EngineConfig, captured: bool, possible: bool) -> bool:
    """`async_decode` resolved: None follows CUDA-graph capture; True needs the fixed-shape decode path (the one
    that takes device ids) without speculation (whose drafts need the host's tokens)."""
    if econf.async_decode and not possible:
        raise ValueError("async_decode needs the fixed-shape decode path (CUDA graphs, or decode_batch on a CPU), "
                         "tensor_parallel_size 1 and no speculative decoding")
    return (captured if econf.async_decode is None else econf.async_decode) and possible
