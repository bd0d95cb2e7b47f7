"""Dumps: the taps of a prefill and N greedy decode steps, one safetensors file per step plus a manifest.

A dump directory holds `step_000_prefill.safetensors`, `step_001.safetensors`, ... and `manifest.json`. Each
safetensors file is self-describing: its metadata carries the tap order (forward order; safetensors itself
sorts names), the step's input tokens and first position. Any implementation that writes the same names and
layouts (docs/parity.md) can be compared with `dsv4 parity compare`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dsv4.model.state import ModelState, StepBatch
from dsv4.parity.errors import ParityError
from dsv4.parity.taps import SCHEMA_VERSION, Recorder

PAGE = 128


@dataclass
class Step:
    """One recorded step: its input tokens at positions start.., the taps in forward order, the greedy pick."""

    index: int
    start: int
    tokens: list[int]
    taps: dict[str, torch.Tensor]
    next_token: int

    @property
    def file_name(self) -> str:
        return "step_000_prefill.safetensors" if self.index == 0 else f"step_{self.index:03d}.safetensors"


def check_tokens(tokens: list[int], vocab_size: int) -> None:
    if not tokens:
        raise ParityError("no input tokens")
    bad = [t for t in tokens if not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise ParityError(f"token ids outside the model's vocabulary [0, {vocab_size}): {bad[:10]}")


@torch.no_grad()
def record_steps(model, tokens: list[int], decode_steps: int, include: list[str] | None = None) -> Iterator[Step]:
    """Prefill `tokens`, then `decode_steps` greedy decode steps, through `model.step` (batch 1); yields each
    step's taps. The prefill records every position (logits included)."""
    check_tokens(tokens, model.cfg.vocab_size)
    device = model.embed.weight.device
    total = len(tokens) + decode_steps
    n_pages = math.ceil(total / PAGE)
    state = ModelState(model.cfg, 1, n_pages, PAGE, model.dtype, device)
    pages = list(range(n_pages))
    start, feed = 0, list(tokens)
    for index in range(decode_steps + 1):
        batch = StepBatch.build([(0, start, len(feed), pages)], device)
        with Recorder(include) as rec:
            logits = model.main_logits(model.step(torch.tensor([feed], device=device), batch, state))
        nxt = int(logits[0, -1].argmax())
        yield Step(index, start, feed, rec.tensors, nxt)
        start, feed = start + len(feed), [nxt]


def write_step(step: Step, out_dir: Path) -> Path:
    meta = {"tap_order": json.dumps(list(step.taps)), "tokens": json.dumps(step.tokens), "start": str(step.start),
            "schema_version": str(SCHEMA_VERSION)}
    path = out_dir / step.file_name
    save_file(step.taps, str(path), metadata=meta)
    return path


def dump(model, tokens: list[int], decode_steps: int, out_dir, info: dict | None = None,
         include: list[str] | None = None) -> dict:
    """Record and write a dump; returns the manifest (also written as manifest.json)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = []
    for step in record_steps(model, tokens, decode_steps, include):
        if step.index == 0:
            if not step.taps:         # the prefill records every tap: none kept = a --taps glob that matches none
                raise ParityError(f"--taps {' '.join(include or [])}: no tap matches (names look like 'embed', "
                                  "'layers.3.attn.q', 'layers.*.ffn.*'; docs/parity.md lists them)")
            _remove_old_steps(out)
        write_step(step, out)
        steps.append({"file": step.file_name, "start": step.start, "tokens": step.tokens,
                      "next_token": step.next_token, "n_taps": len(step.taps)})
    manifest = {"schema_version": SCHEMA_VERSION, **(info or {}), "dtype": str(model.dtype).removeprefix("torch."),
                "quant_emulation": model.quant_emulation, "prompt_tokens": list(tokens),
                "generated": [s["next_token"] for s in steps], "steps": steps}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _remove_old_steps(out: Path) -> None:
    """Delete the step files of an earlier dump into the same directory: `compare` reads every step_*.safetensors,
    so a longer earlier dump's files would be compared as if this run had written them."""
    for old in out.glob("step_*.safetensors"):
        old.unlink()


@dataclass
class StepFile:
    """A step read back: taps in forward order and the metadata written with them."""

    name: str
    taps: dict[str, torch.Tensor]
    tokens: list[int] | None
    start: int | None


def read_step(path: Path) -> StepFile:
    # A truncated file (a dump killed mid-write) or another file passed by mistake is bad input, one line: not a
    # safetensors traceback.
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = list(f.keys())
            order = json.loads(meta["tap_order"]) if "tap_order" in meta else names
            taps = {n: f.get_tensor(n) for n in order if n in names}
        tokens = json.loads(meta["tokens"]) if "tokens" in meta else None
        start = int(meta["start"]) if "start" in meta else None
    except (SafetensorError, ValueError) as e:       # ValueError: metadata that is not JSON / an int
        raise ParityError(f"{path}: not a readable step file ({e})") from None
    if sorted(order) != sorted(names):
        raise ParityError(f"{path}: metadata tap_order does not list the file's tensors")
    return StepFile(path.name, taps, tokens, start)


def step_files(path) -> list[Path]:
    """The step files of a dump directory (sorted), or [path] for a single safetensors file."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no dump at {path}")
    files = sorted(path.glob("step_*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no step_*.safetensors files")
    return files
