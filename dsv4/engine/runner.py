"""The model runner: turns a scheduled step into one `model.step` call and samples the sequences that reached
their last token. The only place where the engine touches tensors.

Each scheduled entry (sequence, n) feeds tokens `all_ids[num_computed : num_computed + n]` at those positions;
its slot is reset first when the sequence (re)starts from position 0. Logits are computed only at sampling rows.
Sampled results reach the host through `PendingSample` (copies queued behind the sampler, then an event), so a
decode step can be launched ahead of the read of the step before it (`decode_ahead`: async decode, engine.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv4.engine.sampling import Sampler, SamplingTensors, TokenCounts
from dsv4.engine.sequence import Sequence
from dsv4.model.state import ModelState, StepBatch
from dsv4.ops.rowwise import NON_FINITE, finite_flag


@dataclass
class Sampled:
    """What one sequence got from a step."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]          # (token id, logprob), best first; empty unless logprobs requested


@dataclass
class PendingSample:
    """A step's samples on their way to the host (`ModelRunner.read`). Their copies into pinned memory are queued
    right behind the sampler and `ready` is recorded after them: reading waits for this step's work alone, not for
    a step launched after it. `token_ids` stays on the device: the input of a step launched before the read."""

    seqs: list[Sequence]
    token_ids: torch.Tensor               # [n] on the device
    host: list[torch.Tensor]              # ids (then the finite flag, if checked), logprobs, top ids, top logprobs
    checked: bool                         # host[0] ends with the logits' NaN/inf flag
    ready: torch.cuda.Event | None        # CUDA: recorded after the copies


def _fed_ids(seqs: list[Sequence]) -> list[int]:
    """Each sequence's next token to feed, from the host's copy of its ids."""
    return [s.all_ids[s.num_computed] for s in seqs]


def _to_host(t: torch.Tensor) -> torch.Tensor:
    # non_blocking from CUDA: a pinned copy queued on the stream (a CPU tensor is returned as it is)
    return t.to("cpu", non_blocking=True)


class ModelRunner:
    def __init__(self, model, state: ModelState, sampler: Sampler | None = None, graphs=None, speculator=None,
                 prefill=None):
        self.model, self.state, self.graphs = model, state, graphs      # graphs: DecodeGraphs for decode-only steps
        self.step = model.step if prefill is None else prefill.step    # prefill: PrefillGraphs for the others
        self.speculator = speculator     # engine/speculative.py: then run() gives a list of tokens per sequence
        self.device = next(model.parameters()).device
        self.sampler = sampler or Sampler()
        self.counts: TokenCounts | None = None           # allocated on the first request with a penalty
        self.structured = None                           # StructuredDecoding: grammar masks of constrained rows

    def run(self, entries: list[tuple[Sequence, int]]) -> dict[int, Sampled]:
        """Run one step; returns {seq_id: Sampled} for the sequences whose chunk ends at their last token."""
        if not entries:
            return {}
        if self.speculator is not None:
            return self.speculator.run(self, entries)
        if self.graphs is not None and all(n == 1 and s.num_computed > 0 for s, n in entries):
            return self._decode([s for s, _ in entries])
        chunks, ids = [], []
        for seq, n in entries:
            if seq.num_computed == 0:
                self._start(seq)
            chunks.append((seq.slot, seq.num_computed, n, seq.pages))
            ids += seq.all_ids[seq.num_computed:seq.num_computed + n]
        batch = StepBatch.build(chunks, self.device)
        with torch.inference_mode():
            h = self.step(torch.tensor([ids], device=self.device), batch, self.state)
            rows = [c.offset + c.length - 1 for c, (s, n) in zip(batch.seqs, entries, strict=True)
                    if s.num_computed + n == s.num_tokens]
            sampling = [s for s, n in entries if s.num_computed + n == s.num_tokens]
            if not sampling:
                return {}
            logits = self.model.main_logits(h[:, torch.tensor(rows, device=self.device)])[0]
            return self._sample(sampling, logits)

    def _decode(self, seqs: list[Sequence]) -> dict[int, Sampled]:
        """A step of one token per sequence through the fixed-shape decode path (a CUDA graph replay on GPUs).
        The NaN/inf check of the logits is read with the sampled ids (`read`), not by `run` before sampling:
        one device read a step, so the sampler's host work and launches overlap the replay instead of following
        a sync with the GPU idle (bench/NOTES.md, thirty-third session)."""
        return self.read(self._queue_decode(seqs, _fed_ids(seqs)))

    def decode_ahead(self, seqs: list[Sequence], after: PendingSample | None) -> PendingSample:
        """Queue a decode step to be read later (async decode, engine.py). Its input ids are the sampled ids of
        `after`, the step still in flight, taken on the device; with none in flight, the host's."""
        if after is None:
            return self._queue_decode(seqs, _fed_ids(seqs))
        with torch.inference_mode():
            ids = self._ids_after(after, seqs)
        return self._queue_decode(seqs, ids)

    def _ids_after(self, after: PendingSample, seqs: list[Sequence]) -> torch.Tensor:
        """`after`'s sampled ids of `seqs` [n]. Those still running keep their order, so the rows are `after`'s
        first n unless some stopped: then a gather, its index copied in without a sync (pinned)."""
        row = {s.seq_id: i for i, s in enumerate(after.seqs)}
        rows = [row[s.seq_id] for s in seqs]
        if rows == list(range(len(rows))):
            return after.token_ids[:len(rows)]
        index = torch.tensor(rows, pin_memory=self.device.type == "cuda").to(self.device, non_blocking=True)
        return after.token_ids.index_select(0, index)

    def _queue_decode(self, seqs: list[Sequence], ids: list[int] | torch.Tensor) -> PendingSample:
        logits = self.graphs.run(ids, [(s.slot, s.num_computed, s.pages) for s in seqs], check=False)
        with torch.inference_mode():
            return self._queue_sample(seqs, logits, finite=finite_flag(logits))

    def resume(self, seq: Sequence) -> None:
        """Start a sequence from a cached prefix (the engine then loads the prefix's snapshot into its slot)."""
        self._start(seq)
        seq.draft = None                                 # a draft from before a preemption

    def _start(self, seq: Sequence) -> None:
        self.state.reset_slot(seq.slot)
        p = seq.params
        if p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
            if self.counts is None:
                self.counts = TokenCounts(self.state.slots, self.model.cfg.vocab_size, self.device)
            self.counts.start(seq.slot, seq.prompt_ids)
            if seq.output_ids:                           # recomputed after preemption: restore its history
                out = torch.tensor(seq.output_ids, device=self.device)
                self.counts.add(torch.full_like(out, seq.slot), out)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor,
                finite: torch.Tensor | None = None) -> dict[int, Sampled]:
        """Sample and read at once (serial steps)."""
        return self.read(self._queue_sample(seqs, logits, finite))

    def _queue_sample(self, seqs: list[Sequence], logits: torch.Tensor,
                      finite: torch.Tensor | None = None) -> PendingSample:
        """The sampler and the copies of its results, queued. `finite`: the logits' unread NaN/inf flag
        (`finite_flag`, taken before grammar masks write -inf into them), copied with the sampled ids: logits that
        fail it raise in `read` before any token is returned."""
        if self.structured is not None:                  # masks filled on the host while the device computes
            self.structured.apply(logits, [s.seq_id for s in seqs])
        st = SamplingTensors.from_params([s.params for s in seqs], [s.seed for s in seqs],
                                         [s.num_sampled for s in seqs], self.device, [s.slot for s in seqs])
        out = self.sampler(logits, st, self.counts if st.do_penalties else None)
        if self.counts is not None and st.do_penalties:
            self.counts.add(st.slots, out.token_ids)
        ids = out.token_ids if finite is None else torch.cat([out.token_ids, finite.long().view(1)])
        host = [_to_host(t) for t in (ids, out.logprobs, out.top_ids, out.top_logprobs)]
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        return PendingSample(seqs, out.token_ids, host, finite is not None, ready)

    def read(self, pending: PendingSample) -> dict[int, Sampled]:
        """{seq_id: Sampled} of a queued sample, once its copies have landed (the one wait for the device)."""
        if pending.ready is not None:
            pending.ready.synchronize()
        tokens, logprobs, top_ids, top_lp = (t.tolist() for t in pending.host)
        if pending.checked and not tokens.pop():
            raise FloatingPointError(NON_FINITE)
        result = {}
        for i, s in enumerate(pending.seqs):
            k = s.params.logprobs or 0
            result[s.seq_id] = Sampled(tokens[i], logprobs[i], list(zip(top_ids[i][:k], top_lp[i][:k], strict=True)))
        return result
