"""Build a model and load an official-format checkpoint into it, strictly.

The model is built on the meta device, every checkpoint tensor is streamed from the memory-mapped
safetensors files to its parameter of the same name (converted only where the reference converts: bf16 -> fp32 for
norms, gate and head), and the state dict is assigned with `strict=True`. Quantised weights stay as stored, scales
beside them: FP8 / FP4 linears and FP8 `attn.wo_a` too, which the reference dequantises at conversion (the model's
`BlockDiagLinear` decodes it per call: the same values, half the bytes). The checkpoint's inventory is checked
against its config first, so a wrong file fails before anything is loaded, with one error that names every offender
(missing, unexpected, mis-shaped and mis-typed tensors together).
"""

from __future__ import annotations

import os

import torch
from tqdm.auto import tqdm

from dsv4.checkpoint import CheckpointError, CheckpointReader, inventory, open_checkpoint
from dsv4.checkpoint.errors import problem_report
from dsv4.config import ModelConfig
from dsv4.dist import SINGLE, ParallelContext
from dsv4.dist.sharding import ShardedReader, check_tp, owns
from dsv4.model.pairs import pack_pairs
from dsv4.model.parallel import shard_model
from dsv4.model.transformer import Transformer
from dsv4.ops.registry import env_switch


def build_model(cfg: ModelConfig, dtype: torch.dtype = torch.float32, device="meta",
                quant_emulation: bool = True) -> Transformer:
    """An un-initialised model (parameters on `device`, meta by default)."""
    with torch.device(device):
        model = Transformer(cfg, dtype)
    return model.set_quant_emulation(quant_emulation)


def _convert(name: str, tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    if tensor.dtype == param.dtype:
        return tensor
    if tensor.is_floating_point() and param.is_floating_point() and tensor.element_size() >= 2:
        return tensor.to(param.dtype)
    if not tensor.is_floating_point() and not param.is_floating_point():
        return tensor.to(param.dtype)           # tid2eid: I64 on disk
    raise CheckpointError(f"{name}: cannot load a {tensor.dtype} tensor into a {param.dtype} parameter")


def _held_bf16(tensor: torch.Tensor, param: torch.Tensor, hold_bf16: bool) -> bool:
    """A bf16-stored matrix that the module computes with in fp32 (the compressors' wkv / wgate, the router's gate):
    a 16-bit model holds it as stored, half the bytes of the fp32 copy and the same values (its products upcast
    it, or take it to the tensor cores as it is: `ops.widened_dense`). Training widens it back (`prepare_full`)."""
    return hold_bf16 and tensor.dtype == torch.bfloat16 and param.dtype == torch.float32 and tensor.dim() == 2


def _check_names(reader: CheckpointReader, params: dict[str, torch.Tensor]) -> None:
    """Every parameter has its checkpoint tensor (same name) and every checkpoint tensor is a parameter."""
    missing = [name for name in params if name not in reader]
    if missing:
        raise CheckpointError(f"{len(missing)} model parameters have no checkpoint tensor: {missing[:50]}")
    unused = sorted(set(reader.keys()) - set(params))
    if unused:
        raise CheckpointError(f"{len(unused)} checkpoint tensors are not used by the model: {unused[:50]}")


def load_model(path: str | os.PathLike, device="cpu", dtype: torch.dtype | str = torch.float32,
               quant_emulation: bool = True, progress: bool = True, parallel: ParallelContext = SINGLE) -> Transformer:
    """Load an official-format checkpoint: a directory (sharded with an index, or one `.safetensors` file) or a
    `.safetensors` file with `config.json` beside it. `forward(input_ids [b, s])` gives fp32 logits [b, s, V].
    `device`: a torch device or its name ("cpu", "cuda:1"); `dtype`: a floating torch dtype or its name
    ("bfloat16", "float32", ...), the compute dtype of the non-quantised weights.
    With a `parallel` context of world size > 1, loads (reading only) rank `parallel.rank`'s share (spec §5.4)."""
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a checkpoint directory or .safetensors file (str or os.PathLike), "
                        f"got {type(path).__name__}")
    # Both are checked before the checkpoint is read: a bad device would otherwise fail only at the first tensor.
    dtype = torch_dtype(dtype)
    check_device(device)
    cfg, reader = open_checkpoint(path)
    return _load(cfg, reader, device, dtype, quant_emulation, progress, parallel)


def torch_dtype(dtype) -> torch.dtype:
    """A floating-point torch dtype, given as itself or by its name in `torch` ("bfloat16", "half", ...), the
    names `dsv4.LLM(dtype=...)` takes too."""
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype or its name (e.g. 'bfloat16', 'float32'), "
                        f"got {dtype!r}")
    return resolved


def check_device(device) -> None:
    """Raise ValueError for a device that torch cannot parse or that is not there (torch would raise a
    RuntimeError or, for CUDA on a CPU-only build, an AssertionError, deep inside the first allocation)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch device or its name ('cpu', 'cuda', 'cuda:1'), got {device!r}") from e
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device!r}: no CUDA device is available (use device='cpu')")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {device!r}: only {count} CUDA device(s) are available")


def load_tensors(cfg: ModelConfig, tensors: dict[str, torch.Tensor], device=None, dtype: torch.dtype = torch.bfloat16,
                 quant_emulation: bool = True, progress: bool = False,
                 parallel: ParallelContext = SINGLE) -> Transformer:
    """A model from official-format tensors already in memory (e.g. `synthesize_tensors` on a GPU), checked as
    strictly as a checkpoint on disk. The tensors are used in place where no conversion is needed. With a
    `parallel` context, only this rank's routed experts are expected (split tensors come whole and are sliced)."""
    expected = {n: s for n, s in inventory(cfg).items() if owns(n, cfg.n_routed_experts, parallel)}
    groups = {
        "missing": [f"{n}: expected {s}" for n, s in expected.items() if n not in tensors],
        "unexpected": sorted(n for n in tensors if n not in expected),
        "wrong shape": [f"{n}: expected {list(expected[n].shape)}, found {list(t.shape)}"
                        for n, t in tensors.items() if n in expected and tuple(t.shape) != expected[n].shape],
        "wrong dtype": [f"{n}: expected {expected[n].torch_dtype}, found {t.dtype}"
                        for n, t in tensors.items() if n in expected and t.dtype != expected[n].torch_dtype],
    }
    if any(groups.values()):
        raise CheckpointError(problem_report("the tensors do not match the config", groups))
    device = device or next(iter(tensors.values())).device
    return _load(cfg, _Tensors(tensors), device, dtype, quant_emulation, progress, parallel)


class _Tensors(dict):
    """A name -> tensor dict with the reader's `get`."""

    def get(self, name):
        return self[name]

    get_slice = get


def _load(cfg: ModelConfig, reader, device, dtype: torch.dtype, quant_emulation: bool, progress: bool,
          parallel: ParallelContext = SINGLE) -> Transformer:
    dtype = torch_dtype(dtype)
    model = build_model(cfg, dtype, "meta", quant_emulation)
    if parallel.world > 1:
        check_tp(cfg, parallel.world)
        shard_model(model, parallel)
        reader = ShardedReader(reader, cfg.n_routed_experts, parallel)
    params = dict(model.named_parameters())
    state = {}
    _check_names(reader, params)
    hold_bf16, held = dtype in (torch.bfloat16, torch.float16), []
    for name in tqdm(params, desc="loading", unit="tensor", disable=not progress):
        tensor = reader.get(name)
        if _held_bf16(tensor, params[name], hold_bf16):
            held.append(name)
        else:
            tensor = _convert(name, tensor, params[name])
        state[name] = tensor.to(device)
    model.load_state_dict(state, strict=True, assign=True)
    model.held_bf16 = tuple(held)
    # NOTE: strict loading covers parameters and persistent buffers only; anything else built on the meta
    # device would fail much later, far from its cause.
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{len(left)} model tensors are still on the meta device after loading: {left[:50]}")
    model.requires_grad_(False)                   # an inference model; training turns on what it trains
    del state
    if torch.device(device).type == "cuda" and env_switch("DSV4_PAIRS", default=True):
        pack_pairs(model)                         # one call per pair of linears reading one input (DSV4_PAIRS=0: off)
    return model.eval()
