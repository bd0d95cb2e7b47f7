"""Random checkpoints in the exact official on-disk format, streamed to disk at any size.

The plan comes first: `inventory(cfg)` gives every tensor, which are grouped (a `.scale` stays with its
`.weight`, since both come from one random matrix) and packed greedily into shards, MTP blocks last like the
official checkpoint. Each shard's safetensors header is then known before any value exists, so values are generated
in row chunks and written straight to their offsets: peak memory is one chunk (~64 MiB of fp32) plus the
quantiser's temporaries, whatever the model size.

Values are deterministic per (seed, tensor name), independent of sharding and chunking: each group gets its own
generator seeded by a stable hash of its name, and the chunk height depends only on the tensor's shape.
Distributions aim at a numerically sane model, not a trained one (see `_normal`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from dsv4.checkpoint.inventory import FP8_BLOCK, SAFETENSORS_DTYPES, TensorSpec, inventory
from dsv4.checkpoint.reader import INDEX_NAME
from dsv4.config import ModelConfig
from dsv4.quant import quant_fp4, quant_fp8

CHUNK_ELEMS = 2**24  # fp32 values generated at once (64 MiB)
DTYPE_RANK = {name: i for i, name in enumerate(SAFETENSORS_DTYPES)}
Chunk = tuple[str, int, torch.Tensor]  # (tensor name, first row, rows of that tensor)


def synthesize(cfg: ModelConfig, out_dir: str | os.PathLike, seed: int = 0, shard_bytes: int = 5 * 2**30,
               progress: bool = True) -> Path:
    """Write a random checkpoint of `cfg` (shards, index, config.json, inference/config.json) to `out_dir`."""
    if shard_bytes < 1:
        raise ValueError(f"shard_bytes must be positive, got {shard_bytes}")
    out = Path(out_dir)
    (out / "inference").mkdir(parents=True, exist_ok=True)
    specs = inventory(cfg)
    shards = plan_shards(specs, shard_bytes)
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    bar = tqdm(total=sum(s.nbytes for s in specs.values()), unit="B", unit_scale=True, disable=not progress,
               desc="synthesize")
    for file, groups in zip(files, shards, strict=False):
        names = [n for g in groups for n in g]
        chunks = (c for g in groups for c in _generate(cfg, seed, g, specs))
        write_safetensors(out / file, {n: specs[n] for n in names}, chunks, on_write=bar.update)
    bar.close()
    weight_map = {n: file for file, groups in zip(files, shards, strict=False) for g in groups for n in g}
    _write_json(out / INDEX_NAME, {"metadata": {"total_size": sum(s.nbytes for s in specs.values())},
                                   "weight_map": dict(sorted(weight_map.items()))})
    _write_json(out / "config.json", cfg.to_hf())
    _write_json(out / "inference" / "config.json", cfg.to_inference())
    return out


# ---------------------------------------------------------------------------------------------- planning
def tensor_groups(specs: dict[str, TensorSpec]) -> list[list[str]]:
    """Tensors generated together: each `x.scale` joins the `x.weight` just before it (inventory order)."""
    groups: list[list[str]] = []
    for name in specs:
        if name.endswith(".scale") and groups and groups[-1][0] == name[: -len("scale")] + "weight":
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def plan_shards(specs: dict[str, TensorSpec], shard_bytes: int) -> list[list[list[str]]]:
    """Shards as lists of groups, packed greedily up to `shard_bytes` (a larger group gets a shard alone).

    The main model goes first and the MTP blocks last, so MTP tensors sit in the last shard(s) as in the
    official files, while a small model still fits one shard.
    """
    groups = tensor_groups(specs)
    groups = [g for g in groups if not g[0].startswith("mtp.")] + [g for g in groups if g[0].startswith("mtp.")]
    shards: list[list[list[str]]] = []
    size = 0
    for g in groups:
        nbytes = sum(specs[n].nbytes for n in g)
        if not shards or (size + nbytes > shard_bytes and size > 0):
            shards.append([])
            size = 0
        shards[-1].append(g)
        size += nbytes
    return shards


# ---------------------------------------------------------------------------------------------- writing
def write_safetensors(path: Path, specs: dict[str, TensorSpec], chunks: Iterable[Chunk], on_write=None) -> None:
    """Write a safetensors file whose header is fixed by `specs`, filling data from row `chunks` in any order.

    Layout and header bytes match `safetensors.torch.save_file` (tensors by descending dtype rank, then name),
    which keeps every offset aligned. Written to a temporary name and renamed, so a crash leaves no torn shard.
    """
    header, begin = _header(specs)
    tmp = path.with_name(path.name + ".tmp")
    written = 0
    with open(tmp, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + sum(s.nbytes for s in specs.values()))
        for name, row, t in chunks:
            spec = specs[name]
            if t.dtype != spec.torch_dtype or t.shape[1:] != spec.shape[1:] or row + len(t) > spec.shape[0]:
                raise ValueError(f"{name}: {t.dtype} {list(t.shape)} at row {row} does not fit {spec}")
            row_bytes = spec.nbytes // spec.shape[0] if spec.shape else spec.nbytes
            f.seek(8 + len(header) + begin[name] + row * row_bytes)
            f.write(t.contiguous().view(torch.uint8).numpy().data)
            written += t.numel() * t.element_size()
            if on_write:
                on_write(t.numel() * t.element_size())
    if written != sum(s.nbytes for s in specs.values()):
        raise RuntimeError(f"{path}: wrote {written} data bytes, expected {sum(s.nbytes for s in specs.values())}")
    os.replace(tmp, path)


def _header(specs: dict[str, TensorSpec]) -> tuple[bytes, dict[str, int]]:
    """(header JSON padded to 8 bytes, data offset of each tensor)."""
    order = sorted(specs, key=lambda n: (-DTYPE_RANK[specs[n].dtype], n))
    meta: dict = {"__metadata__": {"format": "pt"}}
    begin, offset = {}, 0
    for name in order:
        begin[name] = offset
        offset += specs[name].nbytes
        meta[name] = {"dtype": specs[name].dtype, "shape": list(specs[name].shape),
                      "data_offsets": [begin[name], offset]}
    text = json.dumps(meta, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8), begin


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- values
def synthesize_tensors(cfg: ModelConfig, seed: int = 0, device="cpu", keep=None) -> dict[str, torch.Tensor]:
    """The same random checkpoint, in memory on `device` (official names, dtypes and shapes): benchmarks build
    full-width models straight on the GPU this way. Values are deterministic per (seed, name, device type); the
    CPU values equal those `synthesize` writes. `keep(name)` False skips a tensor (e.g. another rank's experts)."""
    specs = inventory(cfg)
    out: dict[str, torch.Tensor] = {}
    for group in tensor_groups(specs):
        if keep is not None and not keep(group[0]):
            continue
        for name in group:
            out[name] = torch.empty(specs[name].shape, dtype=specs[name].torch_dtype, device=device)
        for name, row, t in _generate(cfg, seed, group, specs, device):
            out[name][row:row + t.shape[0]] = t
    return out


def _generator(seed: int, name: str, device="cpu") -> torch.Generator:
    # A stable hash: Python's hash() of a str is salted per process.
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def _generate(cfg: ModelConfig, seed: int, group: list[str], specs: dict[str, TensorSpec],
              device="cpu") -> Iterator[Chunk]:
    name, spec = group[0], specs[group[0]]
    gen = _generator(seed, name, device)
    if name.endswith("tid2eid"):
        yield from _tid2eid(name, spec, cfg.n_routed_experts, gen)
        return
    out_features = spec.shape[0]
    in_features = spec.shape[1] * 2 if spec.dtype == "I8" else math.prod(spec.shape[1:])  # I8 = packed FP4
    mean, std = _normal(name, in_features)
    for row, rows in _row_chunks(out_features, in_features):
        values = torch.randn(rows, *_logical_tail(spec), generator=gen, device=gen.device) * std + mean
        yield from _encode(group, row, values, spec.dtype)


def _logical_tail(spec: TensorSpec) -> tuple[int, ...]:
    return (spec.shape[1] * 2,) if spec.dtype == "I8" else spec.shape[1:]


def _row_chunks(n_rows: int, row_elems: int) -> Iterator[tuple[int, int]]:
    # Whole 128-row blocks, so FP8 block scales of a chunk are exactly rows of the full scale tensor.
    step = max(FP8_BLOCK, CHUNK_ELEMS // max(row_elems, 1) // FP8_BLOCK * FP8_BLOCK)
    for row in range(0, n_rows, step):
        yield row, min(step, n_rows - row)


def _encode(group: list[str], row: int, values: torch.Tensor, dtype: str) -> Iterator[Chunk]:
    """Cast fp32 `values` to the on-disk format of `group` (weight [+ scale])."""
    if dtype == "F8_E4M3":
        weight, scale = quant_fp8(values)
        yield group[0], row, weight
        yield group[1], row // FP8_BLOCK, scale
    elif dtype == "I8":
        weight, scale = quant_fp4(values)
        yield group[0], row, weight
        yield group[1], row, scale
    else:
        yield group[0], row, values.to(SAFETENSORS_DTYPES[dtype])


def _normal(name: str, fan_in: int) -> tuple[float, float]:
    """(mean, std) of a tensor's values, chosen so activations stay O(1) through every block."""
    if name == "embed.weight":
        return 0.0, 1.0  # consumed through RMSNorms, so only its direction matters
    if name.endswith("norm.weight"):
        return 1.0, 0.02
    if name.endswith("attn_sink"):
        return 0.0, 1.0  # a per-head logit competing with O(1) attention scores
    if name.endswith(".ape"):
        return 0.0, 0.02  # small positional bias on the compressor's gate logits
    if name.endswith("gate.bias"):
        return 0.0, 0.01  # only nudges which experts win
    if name.endswith("_fn"):
        # hc mixes m = (X @ fn^T) * rsqrt(mean X^2) ~ N(0, 1) for this std.
        return 0.0, fan_in**-0.5
    if name.endswith("_base"):
        return 0.0, 0.1  # sigmoid(0) = 0.5: pre ~ 0.5, post = 2 sigmoid ~ 1, comb ~ uniform Sinkhorn mix
    if name.endswith("_scale"):
        return 0.1, 0.01  # damps m so the mixes stay near their base values
    # Every linear (head, gate and experts included): N(0, 1/fan_in) keeps unit-RMS inputs at unit RMS.
    # Routed/shared experts: w1, w3 give a, u ~ N(0, 1), silu(a) * u has RMS ~0.6, w2 keeps it O(1).
    return 0.0, fan_in**-0.5


def _tid2eid(name: str, spec: TensorSpec, n_experts: int, gen: torch.Generator) -> Iterator[Chunk]:
    """Per token id, `k` distinct experts: the first k of a random permutation of the experts."""
    vocab, k = spec.shape
    step = max(1, CHUNK_ELEMS // n_experts)
    for row in range(0, vocab, step):
        rows = min(step, vocab - row)
        perm = torch.rand(rows, n_experts, generator=gen, device=gen.device).argsort(dim=1)
        yield name, row, perm[:, :k].to(torch.int64).contiguous()
