"""Speculative decoding with the MTP block: draft k tokens with it, verify them in one target forward.

Drafting (spec §3.8, DeepSeek-V3 shift): MTP position i combines the main model's final hc streams h_i with the
embedding of token i+1 and predicts token i+2. The MTP block keeps its own window ring (one per slot, a
`ModelState` of its own) and is fed at every position the main model processes (prefill included), so its state
is exactly what a run over the accepted tokens gives. Drafts past the first chain the one block on itself: the
next MTP position takes the block's own output streams as "h" (as vLLM and SGLang do with one MTP layer).

Verification: one `model.step` over [pending token, d_1 .. d_k] per decoding sequence, batched with the other
sequences' prefill chunks. When every sequence of the step verifies k drafts and the engine has decode graphs of
T = k + 1 tokens per sequence (engine/graphs.py, `verify_forward`), it is one fixed-shape step (a CUDA-graph
replay on GPUs); otherwise (prefill chunks, shorter drafts) the general (`StepBatch`) path.
Greedy rows accept the longest prefix equal to the target's argmax, then the target's token. Sampled rows use
the standard rejection rule (accept d with probability min(1, p(d)/q(d)), else draw from norm(max(0, p - q)); the
bonus token from p_{k+1}), where p and q are the distributions after the request's processing (penalties with
the drafts counted, temperature, top-k/p, min-p). Every random draw is counter-based (seed, output index, a salt
per use), so seeded requests are reproducible whatever the batch.

Rollback (why a snapshot and a re-feed): the verify forward writes the window ring, the compressors' partial-block
buffers (ratio 4, ratio 128, the indexer's) and paged entries for every draft position. Undoing the fixed-size
state in place would need each compressor's per-position kv/score, which only exists inside the forward; instead
the slot is saved (`ModelState.save_slot`) before the verify and, when a draft is rejected, restored and the
accepted tokens are fed again (one more `model.step` for all rejecting sequences together; none when every draft
was accepted). Paged entries and indexer keys written for rejected positions are left: visibility is by position,
so they are overwritten by the real tokens before any query can see them (tests/test_speculative.py checks this at
compression-block boundaries). The MTP ring is restored after the chained drafts the same way.
The re-feed costs a second forward on steps with a rejection; folding it into the next step needs the model to
skip state writes for a chunk's speculative tail, left for later.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv4.engine.sampling import (
    SamplingTensors,
    TokenCounts,
    _with_logprobs,
    apply_penalties,
    filter_logits,
    mix64,
    race_noise,
)
from dsv4.model.state import ModelState, StepBatch

# Salts that give each random use its own stream (seed ^ salt through the hash).
DRAFT_SALT, ACCEPT_SALT, RESIDUAL_SALT = 0x5D1, 0xACC, 0x2E5


@dataclass
class Draft:
    """A sequence's proposed next tokens and the draft distributions q they were drawn from."""

    tokens: list[int]
    probs: torch.Tensor          # [k, V] processed draft probabilities (one-hot rows for greedy requests)

    def trim(self, n: int) -> None:
        del self.tokens[n:]
        self.probs = self.probs[:n]


# ---------------------------------------------------------------------------------------------------- rules

def uniform(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """U(0, 1) per (seed, step) from the same counter-based hash as the sampler's noise: [n] x [n] -> [n] f64."""
    bits = mix64(mix64(seeds) + steps * 0x632BE59BD9B4E019)
    return ((bits >> 11) & ((1 << 53) - 1)).double().add(0.5) * 2.0**-53


def processed(logits: torch.Tensor, st: SamplingTensors, counts: TokenCounts | None) -> torch.Tensor:
    """What the sampler races on: penalised logits / temperature, filtered (-inf = removed). [n, V]"""
    x = apply_penalties(logits, st, counts) if st.do_penalties else logits
    return filter_logits(x / st.temperature[:, None], st)


def draw(logits: torch.Tensor, st: SamplingTensors, counts: TokenCounts | None, salt: int = 0):
    """Tokens [n] and their distributions [n, V] (one-hot on greedy rows) under the request's processing."""
    x = processed(logits, st, counts)
    race = (x + race_noise(st.seeds ^ salt, st.steps, x.shape[-1])).argmax(-1)
    tokens = torch.where(st.greedy, x.argmax(-1), race)
    probs = torch.where(st.greedy[:, None], torch.nn.functional.one_hot(tokens, x.shape[-1]).float(), x.softmax(-1))
    return tokens, probs


def _residual_logits(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """log norm(max(0, p - q)) (the normaliser is one per row, so it is left out of the race)."""
    return (p - q).clamp(min=0).log()


def accept(p_logits: torch.Tensor, q_probs: torch.Tensor, drafts: torch.Tensor, st: SamplingTensors):
    """The rejection rule, row by row. p_logits [n, V]: processed target logits (`processed`); q_probs [n, V]
    and drafts [n] (-1 on bonus rows, which never accept). -> (accepted [n] bool, token if not accepted [n]).

    Greedy rows: accepted iff the draft is the target's argmax; otherwise the argmax. Sampled rows: accepted iff
    u q(d) < p(d); otherwise a draw from norm(max(0, p - q)) (from p itself on bonus rows)."""
    p = p_logits.softmax(-1)
    bonus = drafts < 0
    d = drafts.clamp(min=0)[:, None]
    u = uniform(st.seeds ^ ACCEPT_SALT, st.steps)
    ok_sampled = u * q_probs.gather(1, d)[:, 0].double() < p.gather(1, d)[:, 0].double()
    argmax = p_logits.argmax(-1)
    ok = torch.where(st.greedy, drafts == argmax, ok_sampled) & ~bonus
    rest = torch.where(bonus[:, None], p_logits, _residual_logits(p, q_probs))
    salts = torch.where(bonus, 0, RESIDUAL_SALT)
    fallback = (rest + race_noise(st.seeds ^ salts, st.steps, p.shape[-1])).argmax(-1)
    return ok, torch.where(st.greedy, argmax, fallback)


def first_rejection(ok: list[bool], sizes: list[int]) -> list[int]:
    """Per sequence (rows in groups of `sizes`): the number of leading accepted rows."""
    out, start = [], 0
    for n in sizes:
        j = 0
        while j < n and ok[start + j]:
            j += 1
        out.append(j)
        start += n
    return out


# ---------------------------------------------------------------------------------------------------- per-row state

def row_counts(counts: TokenCounts | None, slots: list[int], extra: list[list[int]], device) -> TokenCounts | None:
    """Penalty history per row: the slot's history plus `extra` tokens (earlier drafts of the same chain)."""
    if counts is None:
        return None
    rows = TokenCounts.__new__(TokenCounts)
    idx = torch.tensor(slots, device=device)
    rows.seen, rows.output = counts.seen[idx].clone(), counts.output[idx].clone()
    pairs = [(r, t) for r, toks in enumerate(extra) for t in toks]
    if pairs:
        r, t = torch.tensor(pairs, device=device).unbind(1)
        rows.add(r, t)
    return rows


def row_tensors(seqs, steps: list[int], device) -> SamplingTensors:
    """SamplingTensors of one row per (seq, output index); row i reads row i of a `row_counts` table."""
    return SamplingTensors.from_params([s.params for s in seqs], [s.seed for s in seqs], steps, device,
                                       list(range(len(seqs))))


def metrics_of(seqs) -> RequestMetrics:
    return RequestMetrics(sum(s.num_draft_tokens for s in seqs), sum(s.num_accepted_tokens for s in seqs),
                          sum(s.num_spec_steps for s in seqs))


@dataclass
class RequestMetrics:
    """Speculation per request (summed over its n sequences)."""

    num_draft_tokens: int = 0        # drafts proposed (and verified)
    num_accepted_tokens: int = 0     # drafts accepted
    num_spec_steps: int = 0          # verification steps

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_tokens(self) -> float:
        """Accepted drafts per verification step (tokens per step = this + 1)."""
        return self.num_accepted_tokens / self.num_spec_steps if self.num_spec_steps else 0.0


# ---------------------------------------------------------------------------------------------------- the step

@dataclass
class _Entry:
    seq: object
    n: int                    # scheduled (non-draft) tokens
    start: int                # num_computed before the step
    draft: Draft | None       # verified this step
    snapshot: list | None = None
    emitted: list[int] | None = None
    accepted: int = 0


class Speculator:
    """Runs a scheduled step with drafting and verification. Owned by the `ModelRunner` (the state it rolls back)."""

    def __init__(self, model, state: ModelState, k: int, max_model_len: int):
        cfg = model.cfg
        if not cfg.n_mtp_layers:
            raise ValueError("num_speculative_tokens > 0 needs a checkpoint with an MTP block")
        if not 0 < k < cfg.window_size:
            raise ValueError(f"num_speculative_tokens must be in [1, {cfg.window_size - 1}], got {k}")
        self.model, self.state, self.k, self.max_model_len = model, state, k, max_model_len
        self.mtp_state = ModelState(cfg, state.slots, 1, state.page_size, state.dtype, state.device,
                                    layer_ids=[cfg.n_layers])

    def run(self, runner, scheduled: list[tuple[object, int]]) -> dict[int, list]:
        entries = [self._entry(runner, seq, n) for seq, n in scheduled]
        dev = runner.device
        ids, chunks = [], []
        for e in entries:
            toks = e.seq.all_ids[e.start:e.start + e.n] + (e.draft.tokens if e.draft else [])
            ids += toks
            chunks.append((e.seq.slot, e.start, len(toks), e.seq.pages))
        batch = StepBatch.build(chunks, dev)
        with torch.inference_mode():
            h, logits = self._forward(runner, entries, ids, batch)
            out = self._sample(runner, entries, batch, h, logits)
            self._rollback(entries)
            self._feed_mtp_and_draft(runner, entries, batch, h)
        return out

    def _forward(self, runner, entries: list[_Entry], ids: list[int], batch: StepBatch):
        """(hc streams h [1, T, hc, D], logits [T, V] of every row or None: computed by `_row_logits` on demand)."""
        graphs = runner.graphs
        if graphs is not None and all(e.draft is not None and len(e.draft.tokens) + 1 == graphs.tokens_per_seq
                                      for e in entries):
            return graphs.run(ids, [(e.seq.slot, e.start, e.seq.pages) for e in entries])
        return self.model.step(torch.tensor([ids], device=runner.device), batch, self.state), None

    def _row_logits(self, h: torch.Tensor, logits: torch.Tensor | None, rows: list[int]) -> torch.Tensor:
        idx = torch.tensor(rows, device=h.device)
        return self.model.main_logits(h[:, idx])[0] if logits is None else logits[idx]

    def _entry(self, runner, seq, n: int) -> _Entry:
        if seq.num_computed == 0:
            runner._start(seq)
            self.mtp_state.reset_slot(seq.slot)
            seq.draft = None
        ends = seq.num_computed + n == seq.num_tokens
        draft = seq.draft if ends and n == 1 and seq.draft and seq.draft.tokens else None
        seq.draft = None
        e = _Entry(seq, n, seq.num_computed, draft)
        if draft is not None:
            e.snapshot = self.state.save_slot(seq.slot)
        return e

    # -- sampling and verification ------------------------------------------------------------------------
    def _sample(self, runner, entries: list[_Entry], batch: StepBatch, h: torch.Tensor, logits) -> dict[int, list]:
        plain = [(e, c) for e, c in zip(entries, batch.seqs, strict=True) if e.draft is None and self._ends(e)]
        spec = [(e, c) for e, c in zip(entries, batch.seqs, strict=True) if e.draft is not None]
        out = {}
        if plain:
            rows = [c.offset + c.length - 1 for _, c in plain]
            sampled = runner._sample([e.seq for e, _ in plain], self._row_logits(h, logits, rows))
            for e, _ in plain:
                out[e.seq.seq_id] = [sampled[e.seq.seq_id]]
                e.emitted = [sampled[e.seq.seq_id].token_id]
        if spec:
            out.update(self._verify(runner, spec, h, logits))
        return out

    @staticmethod
    def _ends(e: _Entry) -> bool:
        return e.start + e.n == e.seq.num_tokens

    def _verify(self, runner, spec, h: torch.Tensor, all_logits: torch.Tensor | None) -> dict[int, list]:
        from dsv4.engine.runner import Sampled

        dev = runner.device
        seqs, steps, slots, extra, drafts, rows, qs = [], [], [], [], [], [], []
        for e, c in spec:
            k, m = len(e.draft.tokens), len(e.seq.output_ids)
            for i in range(k + 1):
                seqs.append(e.seq)
                steps.append(m + i)
                slots.append(e.seq.slot)
                extra.append(e.draft.tokens[:i])
                drafts.append(e.draft.tokens[i] if i < k else -1)
            rows += range(c.offset + c.length - k - 1, c.offset + c.length)
            qs += [e.draft.probs, torch.zeros_like(e.draft.probs[:1])]
        st = row_tensors(seqs, steps, dev)
        counts = row_counts(runner.counts, slots, extra, dev) if st.do_penalties else None
        logits = self._row_logits(h, all_logits, rows)                                       # [R, V]
        d = torch.tensor(drafts, device=dev)
        ok, fallback = accept(processed(logits, st, counts), torch.cat(qs), d, st)
        chosen = torch.where(ok, d, fallback)
        lp = _with_logprobs(logits, chosen, st.num_logprobs)
        ok_l, tok_l, lp_l = ok.tolist(), chosen.tolist(), lp.logprobs.tolist()
        top_ids, top_lp = lp.top_ids.tolist(), lp.top_logprobs.tolist()
        sizes = [len(e.draft.tokens) + 1 for e, _ in spec]
        result, start = {}, 0
        for (e, _), j, n in zip(spec, first_rejection(ok_l, sizes), sizes, strict=True):
            nlp = e.seq.params.logprobs or 0
            picked = range(start, start + j + 1)
            result[e.seq.seq_id] = [Sampled(tok_l[r], lp_l[r], list(zip(top_ids[r][:nlp], top_lp[r][:nlp],
                                                                          strict=True))) for r in picked]
            e.emitted, e.accepted = [tok_l[r] for r in picked], j
            e.seq.num_spec_steps += 1
            e.seq.num_draft_tokens += n - 1
            e.seq.num_accepted_tokens += j
            start += n
        if runner.counts is not None and st.do_penalties:
            pairs = [(e.seq.slot, t) for e, _ in spec for t in e.emitted]
            s, t = torch.tensor(pairs, device=dev).unbind(1)
            runner.counts.add(s, t)
        return result

    # -- rollback -----------------------------------------------------------------------------------------
    def _rollback(self, entries: list[_Entry]) -> None:
        """Restore the slots of sequences that rejected a draft and feed their accepted tokens again."""
        redo = [e for e in entries if e.draft is not None and e.accepted < len(e.draft.tokens)]
        for e in redo:
            self.state.load_slot(e.seq.slot, e.snapshot)
        if redo:
            ids, chunks = [], []
            for e in redo:
                toks = [e.seq.all_ids[e.start], *e.draft.tokens[:e.accepted]]
                ids += toks
                chunks.append((e.seq.slot, e.start, len(toks), e.seq.pages))
            dev = self.state.device
            self.model.step(torch.tensor([ids], device=dev), StepBatch.build(chunks, dev), self.state)
        for e in entries:
            # The scheduler advances num_computed by the scheduled n; accepted drafts are computed too.
            e.seq.num_computed += e.accepted

    # -- the MTP block ------------------------------------------------------------------------------------
    def _feed_mtp_and_draft(self, runner, entries: list[_Entry], batch: StepBatch, h: torch.Tensor) -> None:
        """Feed the MTP block every position computed this step (h_i with token i+1), then draft from the last
        position of every sequence that sampled."""
        dev = runner.device
        rows, next_ids, chunks, last = [], [], [], []
        for e, c in zip(entries, batch.seqs, strict=True):
            n = e.n + e.accepted                                  # positions start .. start+n-1 are committed
            future = e.seq.all_ids[e.start + 1:e.start + n + 1] if e.emitted is None else \
                e.seq.all_ids[e.start + 1:] + e.emitted
            rows += range(c.offset, c.offset + n)
            next_ids += future[:n]
            chunks.append((e.seq.slot, e.start, n, []))
            last.append(len(rows) - 1)
        mbatch = StepBatch.build(chunks, dev)
        x = self.model.mtp_step(h[:, torch.tensor(rows, device=dev)], torch.tensor([next_ids], device=dev),
                                mbatch, self.mtp_state)
        drafting = [(e, r) for e, r in zip(entries, last, strict=True) if e.emitted is not None
                    and self._budget(e) > 0]
        if drafting:
            self._draft(runner, drafting, x)

    def _budget(self, e: _Entry) -> int:
        """Drafts worth proposing: the next verify emits up to k + 1 tokens, which must fit max_tokens and the
        context."""
        seq = e.seq
        if seq.params.structured_outputs is not None:
            # Grammar-constrained rows are not speculated (k = 0 for them): their token goes through the runner's
            # masked sampling, so the constraint holds exactly; checking drafts against the grammar would add the
            # speed-up (not done yet).
            return 0
        out_after = len(seq.output_ids) + len(e.emitted)
        left = min(seq.params.max_tokens - out_after, self.max_model_len - seq.num_tokens - len(e.emitted))
        return min(self.k, left - 1)

    def _draft(self, runner, drafting, x: torch.Tensor) -> None:
        dev = runner.device
        seqs = [e.seq for e, _ in drafting]
        budgets = [self._budget(e) for e, _ in drafting]
        saved = [self.mtp_state.save_slot(s.slot) for s in seqs]
        pos = [e.start + e.n + e.accepted for e, _ in drafting]          # position of the newest token
        cur = x[:, torch.tensor([r for _, r in drafting], device=dev)]  # [1, B, hc, D]
        tokens, probs = [[] for _ in seqs], [[] for _ in seqs]
        active = list(range(len(seqs)))
        for i in range(max(budgets)):
            if i:       # chain: the block's own output streams stand in for h at the next position
                keep = [a for a in active if budgets[a] > i]
                cur = cur[:, torch.tensor([active.index(a) for a in keep], device=dev)]
                active = keep
                batch = StepBatch.build([(seqs[a].slot, pos[a] + i - 1, 1, []) for a in active], dev)
                ids = torch.tensor([[tokens[a][-1] for a in active]], device=dev)
                cur = self.model.mtp_step(cur, ids, batch, self.mtp_state)
            group = [seqs[a] for a in active]
            st = row_tensors(group, [len(seqs[a].output_ids) + len(drafting[a][0].emitted) + i for a in active], dev)
            extra = [drafting[a][0].emitted + tokens[a] for a in active]
            counts = row_counts(runner.counts, [s.slot for s in group], extra, dev) if st.do_penalties else None
            tok, q = draw(self.model.mtp_logits(cur)[0], st, counts, DRAFT_SALT)
            for a, t, qa in zip(active, tok.tolist(), q.unbind(0), strict=True):
                tokens[a].append(t)
                probs[a].append(qa)
        for s, t, q, snap in zip(seqs, tokens, probs, saved, strict=True):
            self.mtp_state.load_slot(s.slot, snap)
            s.draft = Draft(t, torch.stack(q))
