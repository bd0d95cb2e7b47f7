"""Which part of each checkpoint tensor a tensor-parallel rank holds (spec §5.4), and a reader that reads only that.

The table is convert.py's: the lookup key is the last name component for names containing `hc`, `attn_sink` or
`ape`, else the second-to-last; keys in `SPLIT_DIMS` are cut into contiguous equal slices along that dim (weights
and their FP8 `.scale` alike, the scale along its block dim); routed expert E goes whole to rank E // (E_total /
world); everything else is replicated. `ShardedReader` serves a rank's slices through safetensors' lazy
`get_slice`, so a split tensor is never materialised whole.
NOTE: a slice of an FP8 weight must start on a 128 block or lie inside one block, else no slice of the scale grid
describes it; `check_tp` says so before anything is loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from dsv4.dist.context import ParallelContext, TPError

SPLIT_DIMS = {"embed": 0, "wq_b": 0, "wo_a": 0, "wo_b": 1, "head": 0, "attn_sink": 0, "weights_proj": 0}
BLOCK = 128                                          # FP8 weight block (128 x 128 per e8m0 scale)
_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def table_key(name: str) -> str:
    parts = name.split(".")
    if any(k in name for k in ("hc", "attn_sink", "ape")):
        return parts[-1]
    return parts[-2] if len(parts) > 1 else parts[0]


@dataclass(frozen=True)
class Rule:
    kind: str                 # "split" | "expert" | "replicate"
    dim: int = 0              # split: the dim cut
    expert: int = -1          # expert: its index


def rule(name: str) -> Rule:
    m = _EXPERT.search(name)
    if m:
        return Rule("expert", expert=int(m.group(1)))
    key = table_key(name)
    if key in SPLIT_DIMS:
        return Rule("split", dim=SPLIT_DIMS[key])
    return Rule("replicate")


def owns(name: str, n_experts: int, tp: ParallelContext) -> bool:
    """Whether rank `tp.rank` holds (part of) tensor `name`."""
    r = rule(name)
    return r.kind != "expert" or tp.owner(r.expert, n_experts) == tp.rank


def scale_range(lo: int, hi: int, name: str) -> tuple[int, int]:
    """Scale blocks covering weight rows [lo, hi) of a split FP8 weight; the slice must start on a block or sit
    inside one (then the local weight's block 0 is that block)."""
    if lo % BLOCK and lo // BLOCK != (hi - 1) // BLOCK:
        raise TPError(f"{name}: the tensor-parallel slice [{lo}, {hi}) cuts FP8 {BLOCK}x{BLOCK} scale blocks")
    return lo // BLOCK, (hi - 1) // BLOCK + 1


class ShardedReader:
    """The reader API the loader uses (`keys`, `in`, `get`), restricted to one rank's tensors and slices."""

    def __init__(self, reader, n_experts: int, tp: ParallelContext):
        if n_experts % tp.world:
            raise TPError(f"n_routed_experts={n_experts} is not divisible by the tensor-parallel size {tp.world}")
        self.reader, self.tp, self.n_experts = reader, tp, n_experts
        self._keys = [n for n in reader.keys() if owns(n, n_experts, tp)]
        self._owned = set(self._keys)

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, name: object) -> bool:
        return name in self._owned

    def get(self, name: str) -> torch.Tensor:
        if name not in self._owned:
            raise KeyError(f"tensor {name!r} does not belong to tensor-parallel rank {self.tp.rank}")
        r = rule(name)
        if r.kind != "split":
            return self.reader.get(name)
        lo, hi = self.local_range(name, r.dim)
        index = (slice(None),) * r.dim + (slice(lo, hi),)
        source = self.reader.get_slice(name)
        # An in-memory source gives a view: copy it so the full tensor can be freed after loading.
        return source[index].clone() if isinstance(source, torch.Tensor) else source[index]

    def local_range(self, name: str, dim: int) -> tuple[int, int]:
        """[lo, hi) of this rank along `dim` of tensor `name` (for a `.scale`, in blocks of its weight)."""
        if name.endswith(".scale"):
            weight = name[: -len("scale")] + "weight"
            lo, hi = self.tp.split(_shape(self.reader.get_slice(weight))[dim], weight)
            return scale_range(lo, hi, weight)
        return self.tp.split(_shape(self.reader.get_slice(name))[dim], name)


def _shape(sl) -> tuple[int, ...]:
    return tuple(sl.shape) if isinstance(sl, torch.Tensor) else tuple(sl.get_shape())


def check_tp(cfg, world: int) -> None:
    """Raise one TPError listing every reason `cfg` cannot run at tensor-parallel size `world`."""
    from dsv4.checkpoint.inventory import inventory

    if world == 1:
        return
    problems = [f"{what}={n} is not divisible by {world}" for what, n in [
        ("n_heads", cfg.n_heads), ("o_groups", cfg.o_groups), ("index_n_heads", cfg.index_n_heads),
        ("vocab_size", cfg.vocab_size), ("n_routed_experts", cfg.n_routed_experts)] if n % world]
    specs = inventory(cfg)
    for full, spec in specs.items():
        r, name = rule(full), re.sub(r"^(layers|mtp)\.\d+\.", r"\1.N.", full)    # one line per kind of tensor
        if r.kind != "split" or full[: -len("weight")] + "scale" not in specs:
            continue
        size = spec.shape[r.dim] // world
        try:
            for rank in range(world):
                scale_range(rank * size, (rank + 1) * size, name)
        except TPError as e:
            problems.append(str(e))
        # A quantised weight cut along its input dim also cuts the 128-wide activation-quantisation blocks.
        if r.dim == 1 and size % BLOCK:
            problems.append(f"{name}: input slices of {size} are not a multiple of the FP8 activation block {BLOCK}")
    if problems:
        head = f"this model cannot run with tensor-parallel size {world}:\n  "
        raise TPError(head + "\n  ".join(dict.fromkeys(problems)))
