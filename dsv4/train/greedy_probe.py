"""Greedy-repetition probe and sequence-level unlikelihood (issue 17; Welleck et al. 2019, "Neural text generation
with unlikelihood training", section 5.2: the sequence-level term on the model's own continuations).

Every `greedy_probe_every` steps the trainer cuts P prefixes of the step's pack, continues each greedily by L tokens
with the training model (no grad, one full-sequence forward per new token: no KV cache, the P prefixes as one
[P, S] batch, `FreshBatch`: every layer's attention is one call for all P; or, with `probe_cache`, one prefill into
decode state and then one token per sequence a step, `greedy_continue_cached`: the same tokens in the tests, 9.4x
faster for the built-in v2 model on 2 CPU cores at 8 x (32 + 64)) and logs how much the continuations repeat
themselves:
  greedy_seq_rep4: the fraction of continuation 4-grams (the gram ending at each continuation position, prefix
      tokens included) equal to a 4-gram ending earlier in prefix + continuation (Welleck's seq-rep-4);
  greedy_distinct4: `distinct_4gram_ratio` of each continuation alone (scripts/eval_builtin.py's acceptance
      figure), averaged over the prefixes.
With `seq_unlikelihood` ALPHA > 0 the same sequences get a forward with grad and the term
  ALPHA * sum_{t in continuation, repeat[t]} -log(max(1 - p(x_t | x_<t), eps)) / (P * L * world)
which lowers p of every token that completes an earlier 4-gram of its own sequence.

Everything stays on the device (the 4-gram comparison is an [S, S] equality per sequence, S = P's prefix +
continuation, ~100 tokens): the statistics travel in the step's one read.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.model.state import FreshBatch
from dsv4.train.data import Document, Row
from dsv4.train.unlikelihood import EPS

NGRAM = 4


def distinct_4gram_ratio(ids: list[int]) -> float:
    """Distinct 4-grams / 4-grams of `ids` (0.0 without any): issue 17's greedy acceptance figure."""
    grams = [tuple(ids[i:i + 4]) for i in range(len(ids) - 3)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeat_mask(ids: torch.Tensor, n: int = NGRAM) -> torch.Tensor:
    """[P, S] bool: ids[p, t] completes an n-gram ids[p, t-n+1..t] equal to one ending at an earlier s (s < t;
    overlapping occurrences count)."""
    if ids.shape[1] < n:
        return torch.zeros_like(ids, dtype=torch.bool)
    grams = ids.unfold(1, n, 1)                                            # [P, G, n], gram g ends at g + n - 1
    G = grams.shape[1]
    same = (grams[:, :, None, :] == grams[:, None, :, :]).all(-1)          # [P, G, G]
    earlier = torch.ones(G, G, dtype=torch.bool, device=ids.device).tril(-1)
    return F.pad((same & earlier).any(-1), (n - 1, 0), value=False)


def probe_stats(ids: torch.Tensor, repeats: torch.Tensor, first: int) -> torch.Tensor:
    """[2] fp64 sums over the P sequences: repeated continuation 4-grams (seq-rep-4's numerator over P * L) and the
    continuations' distinct 4-grams (each over its L - 3 grams: `distinct_4gram_ratio`, summed over rows)."""
    cont = ids[:, first:]
    distinct = cont.shape[0] * (cont.shape[1] - NGRAM + 1) - repeat_mask(cont).sum()     # first occurrences
    return torch.stack([repeats[:, first:].sum(), distinct]).double()


def seq_ul_sum(logp: torch.Tensor, tokens: torch.Tensor, repeats: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """sum over repeats of -log(max(1 - p(token), eps)); logp [..., V] predicts tokens [...] (mask repeats [...])."""
    lp = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    # 1 - p as -expm1(log p): exact where p is near 1
    return torch.where(repeats, -torch.log(torch.clamp(-torch.expm1(lp), min=eps)), 0.0).sum()


def probe_prefixes(docs: list[Document], count: int, length: int, bos_id: int) -> list[list[int]]:
    """`count` prefixes of `length` tokens: BOS + length - 1 tokens of the pack (its documents' ids in order, cycled
    if shorter) from starts spread evenly over it. Deterministic given the pack. A window may cross a document
    boundary (a BOS inside it), as concatenated training packs do."""
    ids = [t for d in docs for t in d.ids]
    if not ids:
        raise ValueError("the greedy probe needs a non-empty pack")
    w = length - 1
    while len(ids) < w:
        ids = [*ids, *ids]
    span = len(ids) - w + 1                                   # starts 0 .. len - w
    return [[bos_id, *ids[s:s + w]] for s in (i * span // count for i in range(count))]


def row_prefixes(rows: list[Row], count: int, length: int, bos_id: int) -> list[list[int]]:
    """`count` prefixes of a rows pack (`data.row_packs`): the first `length` tokens of its rows, each a document
    start at position 0 (what a prompt is), rows taken in turn (cycled when fewer than `count`). Rows with fewer
    than `length` tokens before their padding are skipped; if all are, `probe_prefixes` of their tokens."""
    starts = [r.ids[:length] for r in rows if r.real >= length]
    if not starts:
        return probe_prefixes([Document(r.ids[:r.real], r.mask[:r.real]) for r in rows], count, length, bos_id)
    return [starts[i % len(starts)] for i in range(count)]


def mix_prompts(starts: list[list[int]], prompts: list[list[int]], share: float, offset: int) -> list[list[int]]:
    """`starts` with its last round(share * len) entries replaced by `prompts` (cycled from `offset`): a probe can
    continue given prompts (e.g. chat requests through the assistant marker, so the greedy tokens are a reply)
    beside the pack's own starts. Every prompt must be as long as the starts (one [P, s] batch)."""
    k = round(share * len(starts))
    if not k:
        return starts
    if not prompts:
        raise ValueError("a probe prompt share > 0 needs prompts")
    s = len(starts[0])
    bad = [len(q) for q in prompts if len(q) != s]
    if bad:
        raise ValueError(f"probe prompts must have the prefix length {s}; got lengths {sorted(set(bad))}")
    return starts[:len(starts) - k] + [prompts[(offset + j) % len(prompts)] for j in range(k)]


def sequences_batch(P: int, S: int, device) -> FreshBatch:
    """P sequences of S tokens from position 0, run as one [P, S] batch: per layer one attention call, not P (the
    flattened `StepBatch` attends sequence by sequence: ~P x the kernels per forward, see bench/notes)."""
    return FreshBatch.build(P, S, device)


@torch.no_grad()
def greedy_continue(step_module: nn.Module, prefixes: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """prefixes [P, s] -> [P, s + new_tokens]: greedy continuations, one full forward of every sequence per token
    through `step_module(..., task="greedy")` (so FSDP gathers what the forward needs). No host read here."""
    from dsv4.train.forward import PackedBatch

    P, s = prefixes.shape
    ids = torch.cat([prefixes, prefixes.new_zeros(P, new_tokens)], 1)
    for k in range(new_tokens):
        cur = ids[:, :s + k].reshape(1, -1)
        ids[:, s + k] = step_module(PackedBatch(cur, None, sequences_batch(P, s + k, ids.device), []), task="greedy")
    return ids


@torch.no_grad()
def greedy_continue_cached(step_module: nn.Module, prefixes: torch.Tensor, new_tokens: int,
                           graphs: bool = False) -> torch.Tensor:
    """`greedy_continue` through decode state, as the engine generates: one prefill of the P prefixes into a fresh
    `ModelState`, then one [1, P] decode step per new token (`task="greedy_step"`, through `step_module` so FSDP
    gathers the weights). Work per token is one token per sequence instead of the whole sequence again. The same
    model and the same arithmetic classes; the attention of the decode rows runs other kernels than the full
    forward's, so a near-tie may pick another token (tests/test_train_rows.py compares the two).
    graphs=True (one process, no FSDP): the decode steps replay one captured step (`engine.graphs.DecodeGraphs`,
    on a CPU the same step run eagerly). Why: an eager step of the built-in model is ~3k small kernels, host-bound
    at ~90 ms a token on the H200 (measured: no faster than the full-forward probe, 7-9 s a probe); replayed, the
    launches cost ~nothing. The captured step pads the MoE groups to all rows (`MoE.routed_batched`), so its
    tokens may differ from the eager step's at near-ties too."""
    from dsv4.model.state import DecodeBatch, ModelState, StepBatch
    from dsv4.train.forward import PackedBatch

    model = step_module.model
    P, s = prefixes.shape
    page = 128
    per_seq = -(-(s + new_tokens) // page)
    dev = prefixes.device
    scratch = int(graphs)                           # the captured steps' padding rows write a slot and a page more
    state = ModelState(model.cfg, P + scratch, P * per_seq + scratch, page, model.dtype, dev)
    pages = [list(range(b * per_seq, (b + 1) * per_seq)) for b in range(P)]
    ids = torch.cat([prefixes, prefixes.new_zeros(P, new_tokens)], 1)
    prefill = StepBatch.build([(b, 0, s, pages[b]) for b in range(P)], dev)
    ids[:, s] = step_module(PackedBatch(prefixes.reshape(1, -1), None, prefill, []), task="greedy_step", state=state)
    if graphs and new_tokens > 1:
        from dsv4.engine.graphs import DecodeGraphs

        steps = DecodeGraphs(model, state, P, per_seq, sizes=[P])

        def next_tokens(last, rows):
            return steps.run(last, rows).argmax(-1)
    else:
        def next_tokens(last, rows):
            batch = DecodeBatch.build(rows, per_seq, dev)
            return step_module(PackedBatch(last.reshape(1, -1), None, batch, []), task="greedy_step", state=state)
    for k in range(1, new_tokens):        # token s + k from token s + k - 1 at position s + k - 1
        ids[:, s + k] = next_tokens(ids[:, s + k - 1], [(b, s + k - 1, pages[b]) for b in range(P)])
    return ids


@contextlib.contextmanager
def preserved_rng_and_modes(model: nn.Module):
    """Restore the RNG states (CPU and the current CUDA device) and every module's training flag on exit: a probe
    must leave the training step exactly as it found it."""
    cpu = torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
        for m, flag in modes:
            m.training = flag
