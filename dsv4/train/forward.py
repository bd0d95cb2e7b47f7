"""The training forward: the inference model's own blocks over a packed batch, with loss and MoE load counts.

Every document of a pack is its own sequence of one flattened `StepBatch` (positions from 0, its own state
slot), so attention never crosses documents. The blocks are called exactly as `Transformer.step` calls them;
the one difference is that each block gets a FRESH `LayerState` of its own, built inside the (optionally
checkpointed) call: the inference state is written in place during the forward, and a recomputation for
gradient checkpointing must see the state as the first pass saw it (empty, for sequences from position 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dsv4.model.moe import Gate, expert_counts
from dsv4.model.state import FreshBatch, ModelState, StepBatch, to_device
from dsv4.train.data import Document, Row
from dsv4.train.greedy_probe import seq_ul_sum
from dsv4.train.unlikelihood import copy_candidates, copy_terms, segment_starts

IGNORE = -100
MTP_PAD_ID = 0        # the token the MTP block's last position reads (its output is never used)


@dataclass
class PackedBatch:
    input_ids: torch.Tensor      # [1, T] every document's tokens, concatenated
    targets: torch.Tensor        # [T] next token where it is a training target, else IGNORE
    batch: StepBatch             # or a FreshBatch: the greedy probe's P equal-length sequences
    docs: list[Document]
    mtp_targets: torch.Tensor | None = None   # [T] the token after next where it is a target (MTP), else IGNORE
    real: torch.Tensor | None = None          # rows packs: [2, T] bool, token t is not padding (main, MTP blocks)

    @property
    def n_targets(self) -> int:
        return int((self.targets != IGNORE).sum())


def packed_batch(docs: list[Document], device) -> PackedBatch:
    """The pack's tokens and targets on `device`, sent in one asynchronous copy (`to_device`: a copy of a host list
    would wait for the GPU queue to drain)."""
    ids, targets, mtp, chunks, first_page = [], [], [], [], 0
    for slot, d in enumerate(docs):
        # Each document owns its own pages: a shared page would mix two documents' caches.
        chunks.append((slot, 0, len(d), list(range(first_page, first_page + _pages(len(d))))))
        first_page += _pages(len(d))
        ids += d.ids
        targets += _shifted_targets(d, 1)
        mtp += _shifted_targets(d, 2)
    rows = to_device(torch.tensor([ids, targets, mtp], dtype=torch.long), device)
    return PackedBatch(rows[0:1], rows[1], StepBatch.build(chunks, device), docs, rows[2])


def rows_batch(rows: list[Row], device) -> PackedBatch:
    """A rows pack (`data.row_packs`: rows of equal length, each a sequence from position 0) as one [rows, length]
    `FreshBatch`: per layer one attention call for all rows. Targets as `packed_batch`'s per row; `real` marks the
    tokens before each row's padding (the MTP block's position i reads token i + 1: one fewer)."""
    s = len(rows[0])
    if any(len(r) != s for r in rows):
        raise ValueError(f"rows of a rows pack must have one length, got {sorted({len(r) for r in rows})}")
    ids, targets, mtp, real, real_mtp = [], [], [], [], []
    for r in rows:
        ids += r.ids
        targets += _shifted_targets(r, 1)
        mtp += _shifted_targets(r, 2)
        real += [1] * r.real + [0] * (s - r.real)
        n_mtp = max(r.real - 1, 0)                        # an empty row (train/compiled.pad_rows): none
        real_mtp += [1] * n_mtp + [0] * (s - n_mtp)
    host = to_device(torch.tensor([ids, targets, mtp, real, real_mtp], dtype=torch.long), device)
    return PackedBatch(host[0:1], host[1], FreshBatch.build(len(rows), s, device), rows, host[2],
                       host[3:5].bool())


def _shifted_targets(d: Document, shift: int) -> list[int]:
    """Per position i of d: token i + shift where it is a training target (mask), else IGNORE (also the last
    `shift` positions)."""
    return [t if m else IGNORE for t, m in zip(d.ids[shift:], d.mask[shift:], strict=True)] + [IGNORE] * min(
        shift, len(d))


def _pages(n: int, page_size: int = 128) -> int:
    return -(-n // page_size)


def layer_state(model, layer_id: int, batch: StepBatch | FreshBatch):
    """An empty state for one block, sized for this batch (pages for every sequence, one slot each); None for a
    `FreshBatch` (its attention keeps no state)."""
    if isinstance(batch, FreshBatch):
        return None
    pages = sum(_pages(s.length) for s in batch.seqs)
    return ModelState(model.cfg, len(batch.seqs), max(pages, 1), 128, model.dtype, batch.positions.device,
                      layer_ids=[layer_id]).layers[0]


def hidden(model, pb: PackedBatch, grad_ckpt: bool) -> torch.Tensor:
    """Final hc streams [1, T, hc, D]: embedding, then every block (as `Transformer.step` runs them)."""
    h = model.embed(pb.input_ids).unsqueeze(2).repeat(1, 1, model.cfg.hc_mult, 1)
    for layer in model.layers:
        def run(h, layer=layer):
            return layer(h, pb.input_ids, pb.batch, layer_state(model, layer.layer_id, pb.batch))
        h = _maybe_checkpoint(run, h, grad_ckpt)
    return h


def mtp_loss_sum(model, h: torch.Tensor, pb: PackedBatch, depth: int = 0,
                 grad_ckpt: bool = False) -> tuple[torch.Tensor, int]:
    """Summed CE of the MTP block (DeepSeek-V3 shift: position i sees h_i and token i+1, predicts token i+2),
    one document at a time (each from position 0); `grad_ckpt`: each document's under activation checkpointing.
    The block runs over all n positions of the document, as the main blocks do: the last one pairs h_{n-1} with a
    padding token (MTP_PAD_ID) and predicts nothing. Attention is causal, so the other positions are those of the
    n-1 position run; the equal length lets a padded pack's MTP block reuse one compiled shape (train/compiled.py:
    one token fewer compiled every block graph again)."""
    if isinstance(pb.batch, FreshBatch):
        return _rows_mtp_loss_sum(model, h, pb, depth, grad_ckpt)
    total, count = h.new_zeros((), dtype=torch.float32), 0
    for seq, d in zip(pb.batch.seqs, pb.docs, strict=True):
        n = seq.length
        if n < 3:
            continue
        hd = h[:, seq.offset:seq.offset + n]
        ids = pb.input_ids[:, seq.offset:seq.offset + n]
        tgt = pb.mtp_targets[seq.offset:seq.offset + n - 2]            # ids[0, 2:] where d.mask[2:], else IGNORE

        def doc_loss(hd, ids=ids, tgt=tgt, n=n):
            logits = model.mtp_forward(hd, F.pad(ids[:, 1:], (0, 1), value=MTP_PAD_ID), depth)[0, :n - 2]
            return F.cross_entropy(logits.float(), tgt, ignore_index=IGNORE, reduction="sum")
        total = total + _maybe_checkpoint(doc_loss, hd, grad_ckpt)
        count += sum(d.mask[2:])          # counted on the host: a device count would sync the GPU every document
    return total, count


def _rows_mtp_loss_sum(model, h: torch.Tensor, pb: PackedBatch, depth: int,
                       grad_ckpt: bool) -> tuple[torch.Tensor, int]:
    """`mtp_loss_sum` of a rows batch: the MTP block over all rows at once (each row its own sequence, as
    `mtp_forward` runs a [b, s] batch); a row's last position reads `MTP_PAD_ID` and its last two predict nothing."""
    b, s = pb.batch.b, pb.batch.s
    ids = pb.input_ids.view(b, s)

    def rows_loss(h):
        logits = model.mtp_forward(h.view(b, s, *h.shape[2:]), F.pad(ids[:, 1:], (0, 1), value=MTP_PAD_ID),
                                   depth, fresh=True)
        return F.cross_entropy(logits.reshape(b * s, -1).float(), pb.mtp_targets, ignore_index=IGNORE,
                               reduction="sum")
    return _maybe_checkpoint(rows_loss, h, grad_ckpt), sum(sum(d.mask[2:]) for d in pb.docs)


def _maybe_checkpoint(fn, x: torch.Tensor, grad_ckpt: bool):
    """fn(x), under activation checkpointing if asked (and autograd is on).
    early_stop=False: the recomputation runs the whole function, so every rank re-issues the same collectives
    (expert parallel exchange, train/ep.py) even where ranks need different saved tensors."""
    if grad_ckpt and torch.is_grad_enabled():
        return checkpoint(fn, x, use_reentrant=False, early_stop=False)
    return fn(x)


class LoadCounter:
    """Counts how many tokens each routed expert receives, per MoE layer, through forward hooks on the gates.
    The counts stay on the gates' device (int64) and are read once a step by the trainer: a read per gate and
    forward would make the host wait for the GPU ~7 times a forward."""

    def __init__(self, model: nn.Module):
        self.gates = [(n, m) for n, m in model.named_modules() if isinstance(m, Gate)]
        self.counts = {n: torch.zeros(m.weight.shape[0], dtype=torch.long, device=m.weight.device)
                       for n, m in self.gates}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in self.gates]
        self.enabled = True
        self.rows: dict[str, int | None] = {}      # per gate: count only its first rows tokens (the rest is padding)
        self.real: dict[str, torch.Tensor | None] = {}   # per gate: or only the tokens this mask marks (rows packs)
        self.real_tokens(None)

    def real_tokens(self, n: int | None) -> None:
        """The next forwards run packs padded after their first n tokens (None: not padded): count only those.
        An MTP block's position i reads token i+1, so its real positions are one fewer (unpadded: all but the last,
        which reads `MTP_PAD_ID`)."""
        self.rows = {name: (-1 if n is None else n - 1) if name.startswith("mtp.") else n for name, _ in self.gates}
        self.real = {name: None for name, _ in self.gates}

    def real_mask(self, real: torch.Tensor | None) -> None:
        """The next forwards run a rows batch whose padding `real` [2, T] leaves out (row 0: the main blocks' tokens,
        row 1: the MTP block's positions); None: count every token."""
        self.real_tokens(None)
        if real is not None:
            self.real = {name: real[1] if name.startswith("mtp.") else real[0] for name, _ in self.gates}

    def _hook(self, name: str):
        def hook(module, args, out):
            if self.enabled:                  # switched off around backward (checkpoint recomputation)
                real = self.real[name]
                if real is None:
                    ids = out[1][:self.rows[name]]
                    self.counts[name] += expert_counts(ids, len(self.counts[name]))
                else:                         # weighted by the mask: a boolean index would sync the host
                    ids = out[1].long()
                    self.counts[name].scatter_add_(0, ids.flatten(), real[:, None].expand_as(ids).flatten().long())
        # NOTE: never traced into a compiled block (train/compiled.py): Dynamo mis-traced the in-place count update
        # of a tensor it does not own; a graph break at each gate instead.
        return torch.compiler.disable(hook)

    def take(self) -> dict[str, torch.Tensor]:
        out = {n: c.clone() for n, c in self.counts.items()}
        for c in self.counts.values():
            c.zero_()
        return out


class TrainStep(nn.Module):
    """Wraps the model so the whole training forward runs inside one `__call__` (what FSDP2 hooks into).
    forward(pack) -> (summed main CE, summed MTP CE or None, number of MTP targets, copy terms or None).
    copy_ngram > 0 (train/unlikelihood.py): the copy terms are [summed unlikelihood of the wrong in-context copies
    (differentiable; computed detached when `unlikelihood` is 0), then `copy_terms`' statistics]; the trainer
    weights the first by `unlikelihood`."""

    def __init__(self, model: nn.Module, grad_ckpt: bool = True, mtp_weight: float = 0.0, unlikelihood: float = 0.0,
                 copy_ngram: int = 0, copy_window: int = 0):
        super().__init__()
        self.model, self.grad_ckpt, self.mtp_weight = model, grad_ckpt, mtp_weight
        self.unlikelihood, self.copy_ngram, self.copy_window = unlikelihood, copy_ngram, copy_window

    def forward(self, pb: PackedBatch, task: str = "loss", repeats: torch.Tensor | None = None, first: int = 0,
                state: ModelState | None = None):
        """task "loss": the training losses above. The greedy probe's (train/greedy_probe.py), through this same
        `__call__` so that FSDP gathers the weights: "greedy": the argmax token [P] after each of the batch's P
        sequences; "greedy_step": the same for one engine step (`Transformer.step`: a prefill `StepBatch` or a
        `DecodeBatch` of one token per sequence) that reads and advances `state`; "seq_ul": the summed
        sequence-level unlikelihood of the tokens at positions >= first that `repeats` [P, S] marks (the batch
        holds P sequences of S tokens)."""
        if task == "greedy":
            return self._greedy_next(pb)
        if task == "greedy_step":
            h = self.model.step(pb.input_ids, pb.batch, state)
            if isinstance(pb.batch, StepBatch):
                h = h[:, to_device(torch.tensor([s.offset + s.length - 1 for s in pb.batch.seqs]), h.device)]
            return self.model.main_logits(h, check_finite=False)[0].argmax(-1)                # [P]
        if task == "seq_ul":
            return self._seq_ul(pb, repeats, first)
        h = hidden(self.model, pb, self.grad_ckpt)

        def main_loss(h):
            logits = self.model.main_logits(h, check_finite=False)[0]   # [T, V] fp32; the trainer checks the loss
            return F.cross_entropy(logits, pb.targets, ignore_index=IGNORE, reduction="sum")
        # checkpointed, the head keeps no fp32 [T, V] logits and log-probabilities (48 KB a token at V = 6144)
        if self.copy_ngram:
            ce, copy = self._main_and_copy_loss(h, pb)
        else:
            ce, copy = _maybe_checkpoint(main_loss, h, self.grad_ckpt), None
        if not self.mtp_weight:
            return ce, None, 0, copy
        mtp, n = mtp_loss_sum(self.model, h, pb, grad_ckpt=self.grad_ckpt)
        return ce, mtp, n, copy

    def _main_and_copy_loss(self, h: torch.Tensor, pb: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The main CE and the copy terms from one log-softmax (`F.cross_entropy` is exactly log_softmax +
        nll_loss, so the CE and its gradient are bit-identical to the plain path). The MTP head gets no copy term:
        greedy output is the main head's choice (an MTP draft is verified by it)."""
        cfg = self.model.cfg
        with torch.no_grad():                   # integer work, outside the checkpoint (not recomputed)
            starts = segment_starts(pb.input_ids[0], pb.batch.positions, cfg.bos_token_id)
            cand = copy_candidates(pb.input_ids[0], starts, self.copy_ngram, self.copy_window, cfg.vocab_size)

        def loss(h):
            logp = F.log_softmax(self.model.main_logits(h, check_finite=False)[0], dim=-1)     # [T, V] fp32
            ce = F.nll_loss(logp, pb.targets, ignore_index=IGNORE, reduction="sum")
            ul, stats = copy_terms(logp if self.unlikelihood else logp.detach(), pb.targets, cand, IGNORE)
            return ce, torch.cat([ul.view(1), stats])
        return _maybe_checkpoint(loss, h, self.grad_ckpt)

    def _greedy_next(self, pb: PackedBatch) -> torch.Tensor:
        h = hidden(self.model, pb, False)
        if isinstance(pb.batch, FreshBatch):
            last = h.view(pb.batch.b, pb.batch.s, *h.shape[2:])[:, -1].unsqueeze(0)        # [1, P, hc, D]
        else:
            last = h[:, to_device(torch.tensor([s.offset + s.length - 1 for s in pb.batch.seqs]), h.device)]
        return self.model.main_logits(last, check_finite=False)[0].argmax(-1)             # [P]

    def _seq_ul(self, pb: PackedBatch, repeats: torch.Tensor, first: int) -> torch.Tensor:
        """Position t - 1 predicts token t: the head runs only over positions first - 1 .. S - 2."""
        P, S = repeats.shape
        h = hidden(self.model, pb, self.grad_ckpt)
        tokens = pb.input_ids.view(P, S)[:, first:]

        def loss(h):
            hv = h.view(P, S, *h.shape[2:])[:, first - 1:S - 1]
            logp = F.log_softmax(self.model.main_logits(hv, check_finite=False), dim=-1)     # [P, L, V] fp32
            return seq_ul_sum(logp, tokens, repeats[:, first:])
        return _maybe_checkpoint(loss, h, self.grad_ckpt)
