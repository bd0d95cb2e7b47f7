"""Rank 0 drives, the other ranks follow: how the engine runs a tensor-parallel model unchanged.

The engine (scheduler, sampler, detokeniser, and the server above it) lives on rank 0 only and is handed a `Driver`
in place of the model: it has the model's `cfg`, `dtype`, `parameters()`, `step` and `main_logits`. Each call is
first announced to the followers as a small command on a gloo control group, then run locally, so every rank runs
the same model call on the same inputs and the model's collectives pair up.
* Followers keep their own decode state (window and compressed KV are computed redundantly on every rank, spec
  §5.4), created to the same shape as rank 0's, and reset a slot whenever a chunk starts at position 0: exactly
  when the runner resets it on rank 0.
* `main_logits` gets hidden rows rank 0 already picked, so rank 0 broadcasts them (a few KiB per sampled row)
  before the vocabulary-parallel head gathers the logits.
NOTE: the control group is separate from the model's group so an idle follower can wait for hours without
hitting the model group's timeout. A symmetric error (non-finite logits: every rank sees the same logits) leaves
the followers following; any other follower error ends its process.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import torch
import torch.distributed as dist

from dsv4.dist.context import ParallelContext
from dsv4.model.state import ModelState, StepBatch

CONTROL_TIMEOUT = timedelta(days=365)
log = logging.getLogger(__name__)


def control_group():
    """The gloo group of the driver's commands; every rank must call this at the same point (after init)."""
    return dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)


def _chunks(batch: StepBatch) -> list[tuple[int, int, int, list[int]]]:
    return [(s.slot, s.start, s.length, list(s.pages)) for s in batch.seqs]


class Driver:
    """Rank 0's stand-in for the model: announces each call to the followers, then runs it."""

    def __init__(self, model, tp: ParallelContext, control, on_close=None):
        self.model, self.tp, self.control, self._on_close = model, tp, control, on_close
        self.cfg, self.dtype = model.cfg, model.dtype
        self.closed = False

    def __getattr__(self, name):                       # anything else (quant_emulation, layers, ...) = the model's
        if name == "model":                            # not set yet (unpickling, copying): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)

    def parameters(self, *args, **kwargs):
        return self.model.parameters(*args, **kwargs)

    def _send(self, command: tuple) -> None:
        if self.closed:
            raise RuntimeError("the tensor-parallel group is closed")
        dist.broadcast_object_list([command], src=0, group=self.control)

    def step(self, input_ids: torch.Tensor, batch: StepBatch, state: ModelState) -> torch.Tensor:
        shape = (id(state), state.slots, state.pages, state.page_size, str(state.dtype))
        self._send(("step", input_ids.reshape(-1).tolist(), _chunks(batch), shape))
        return self.model.step(input_ids, batch, state)

    def main_logits(self, h: torch.Tensor) -> torch.Tensor:
        h = h.contiguous()
        self._send(("logits", tuple(h.shape)))
        return self.model.main_logits(self.tp.broadcast(h))

    def close(self) -> None:
        """Release the followers (they leave their loop) and call `on_close` (joins / tears down the group)."""
        if self.closed:
            return
        try:
            self._send(("stop",))
        finally:
            self.closed = True
            if self._on_close is not None:
                self._on_close()


def follow(model, tp: ParallelContext, control) -> None:
    """A follower rank's loop: run what rank 0 announces until it says stop."""
    device = next(model.parameters()).device
    state, shape = None, None
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=control)
        command = box[0]
        if command[0] == "stop":
            return
        try:
            with torch.inference_mode():
                if command[0] == "step":
                    _, ids, chunks, new_shape = command
                    if new_shape != shape:
                        state = None                       # free the old state before allocating the new one
                        state, shape = _state(model, new_shape, device), new_shape
                    for slot, start, _n, _pages in chunks:
                        if start == 0:
                            state.reset_slot(slot)
                    model.step(torch.tensor([ids], device=device), StepBatch.build(chunks, device), state)
                elif command[0] == "logits":
                    h = tp.broadcast(torch.empty(command[1], dtype=model.dtype, device=device))
                    model.main_logits(h)
                else:
                    raise RuntimeError(f"unknown command {command[0]!r} from rank 0")
        except FloatingPointError as e:                # rank 0 raised the same error; keep following
            log.warning("rank %d: %s", tp.rank, e)


def _state(model, shape, device) -> ModelState:
    _, slots, pages, page_size, dtype = shape
    return ModelState(model.cfg, slots, pages, page_size, getattr(torch, dtype.removeprefix("torch.")), device)
