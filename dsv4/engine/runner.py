"""The model runner: turns a scheduled step into one `model.step` call and samples the sequences that reached
their last token. The only place where the engine touches tensors.

Each scheduled entry (sequence, n) feeds tokens `all_ids[num_computed : num_computed + n]` at those positions;
its slot is reset first when the sequence (re)starts from position 0. Logits are computed only at sampling rows.
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
        The NaN/inf check of the logits is read with the sampled ids (`_sample`), not by `run` before sampling:
        one device read a step, so the sampler's host work and launches overlap the replay instead of following
        a sync with the GPU idle (bench/NOTES.md, thirty-third session)."""
        logits = self.graphs.run([s.all_ids[s.num_computed] for s in seqs],
                                 [(s.slot, s.num_computed, s.pages) for s in seqs], check=False)
        with torch.inference_mode():
            return self._sample(seqs, logits, finite=finite_flag(logits))

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
        """`finite`: the logits' unread NaN/inf flag (`finite_flag`, taken before grammar masks write -inf into
        them), read with the sampled ids: logits that fail it raise before any token is returned."""
        if self.structured is not None:                  # masks filled on the host while the device computes
            self.structured.apply(logits, [s.seq_id for s in seqs])
        st = SamplingTensors.from_params([s.params for s in seqs], [s.seed for s in seqs],
                                         [len(s.output_ids) for s in seqs], self.device, [s.slot for s in seqs])
        out = self.sampler(logits, st, self.counts if st.do_penalties else None)
        if self.counts is not None and st.do_penalties:
            self.counts.add(st.slots, out.token_ids)
        ids = out.token_ids if finite is None else torch.cat([out.token_ids, finite.long().view(1)])
        # One transfer for the whole batch (with the finite flag after the ids).
        tokens = ids.tolist()
        if finite is not None and not tokens.pop():
            raise FloatingPointError(NON_FINITE)
        logprobs = out.logprobs.tolist()
        top_ids, top_lp = out.top_ids.tolist(), out.top_logprobs.tolist()
        result = {}
        for i, s in enumerate(seqs):
            k = s.params.logprobs or 0
            result[s.seq_id] = Sampled(tokens[i], logprobs[i], list(zip(top_ids[i][:k], top_lp[i][:k], strict=True)))
        return result
