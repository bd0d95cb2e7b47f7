"""The HBM floor of a decode step: the bytes one step must read at least, over the measured copy bandwidth.

Weights count in their native checkpoint formats (FP8 + e8m0 scales, FP4 packed + scales, bf16 where the checkpoint
is bf16, fp32 hc/sink/ape): that is the least any implementation must read. Per step: every non-expert weight of
every layer once, the routed experts that the batch touches, the shared expert, the LM head, and each sequence's
cache (window ring + compressed entries + indexer keys of CSA layers). MTP weights are not read by a decode step.
"""

from __future__ import annotations

import re

import torch

from dsv4.checkpoint import inventory


def expected_distinct_experts(n_experts: int, k: int, tokens: int) -> float:
    """E[# distinct experts] when each of `tokens` tokens picks k of n uniformly (random weights route ~uniformly)."""
    return n_experts * (1 - (1 - k / n_experts) ** tokens)


def decode_weight_bytes(cfg, batch: int) -> dict[str, float]:
    """Bytes of weights one decode step of `batch` tokens reads, by kind."""
    out = {"dense": 0.0, "routed_experts": 0.0, "embed": 0.0, "head": 0.0}
    per_expert = {}
    for name, spec in inventory(cfg).items():
        if name.startswith("mtp."):
            continue
        m = re.match(r"layers\.(\d+)\.ffn\.experts\.(\d+)\.", name)
        if m:
            per_expert.setdefault(int(m.group(1)), 0)
            if int(m.group(2)) == 0:
                per_expert[int(m.group(1))] += spec.nbytes
        elif name == "embed.weight":
            out["embed"] += batch * spec.nbytes / spec.shape[0]
        elif name == "head.weight":
            out["head"] += spec.nbytes
        elif name.endswith("tid2eid"):
            out["dense"] += batch * spec.nbytes / spec.shape[0]
        else:
            out["dense"] += spec.nbytes
    touched = expected_distinct_experts(cfg.n_routed_experts, cfg.n_activated_experts, batch)
    out["routed_experts"] = sum(per_expert.values()) * touched
    return out


def decode_cache_bytes(cfg, batch: int, context: int, dtype=torch.bfloat16) -> float:
    """Cache bytes read by one decode step of `batch` sequences at `context` tokens each (bf16 cache)."""
    size = torch.empty((), dtype=dtype).element_size()
    per_seq = 0
    for ratio in cfg.compress_ratios[: cfg.n_layers]:
        rows = min(context, cfg.window_size)
        if ratio == 128:
            rows += context // 128
        elif ratio == 4:
            rows += min(context // 4, cfg.index_topk)                      # attention reads only the picked ones
            per_seq += context // 4 * cfg.index_head_dim * size            # the indexer scores every key
        per_seq += rows * cfg.head_dim * size
    return batch * per_seq


def decode_floor(cfg, batch: int, context: int, bandwidth: float) -> dict:
    """{bytes by kind, total bytes, floor seconds} for one decode step at `bandwidth` bytes/s."""
    parts = decode_weight_bytes(cfg, batch)
    parts["cache"] = decode_cache_bytes(cfg, batch, context)
    total = sum(parts.values())
    return {"bytes": parts, "total_bytes": total, "floor_s": total / bandwidth}


def copy_bandwidth(device, nbytes: int = 2 * 2**30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * src.numel() * src.element_size() / times[len(times) // 2]


H200_BF16_DENSE_FLOPS = 790e12       # the bf16 dense-GEMM rate measured on this GPU kind (device notes)


def active_weight_elements(cfg) -> dict[str, float]:
    """Weight elements one token multiplies (main model, not MTP): dense (every non-expert matrix, the shared
    expert), routed (k experts' three matrices), head. FP4 tensors count two elements per stored byte."""
    out = {"dense": 0.0, "routed": 0.0, "head": 0.0}
    for name, spec in inventory(cfg).items():
        if name.startswith("mtp.") or name == "embed.weight" or name.endswith(("tid2eid", ".scale", "bias")):
            continue
        n = spec.numel * (2 if spec.torch_dtype == torch.int8 else 1)
        if len(spec.shape) < 2:                                         # norms, sinks: no matrix product
            continue
        m = re.match(r"layers\.\d+\.ffn\.experts\.(\d+)\.", name)
        if m:
            if int(m.group(1)) < cfg.n_activated_experts:
                out["routed"] += n
        elif name == "head.weight":
            out["head"] += n
        else:
            out["dense"] += n
    return out


def attention_flops(cfg, n_tokens: int) -> float:
    """FLOPs of the attention products of a fresh n-token prefill (causal): per query and head, q.k and p.v over
    the rows it reads (window, plus the compressed entries it sees: all of them on ratio-128 layers, the top-k
    on ratio-4 layers), and the ratio-4 indexer's scores against every visible indexer key."""
    total = 0.0
    for ratio in cfg.compress_ratios[: cfg.n_layers]:
        for pos in range(0, n_tokens, 64):                              # 64-token strides: a close enough sum
            rows = min(pos + 1, cfg.window_size)
            if ratio == 128:
                rows += (pos + 1) // 128
            elif ratio == 4:
                rows += min((pos + 1) // 4, cfg.index_topk)
                total += 64 * 2 * cfg.index_n_heads * cfg.index_head_dim * ((pos + 1) // 4)
            total += 64 * 4 * cfg.n_heads * cfg.head_dim * rows
    return total


def prefill_floor(cfg, n_tokens: int, bandwidth: float, flops: float = H200_BF16_DENSE_FLOPS) -> dict:
    """The floor of a fresh n-token prefill: the larger of the bf16 compute time of its FLOPs (2 per weight element
    per token for the dense and routed matrices, attention included; the head runs for the last token only)
    and the time to read the weights it touches (native bytes: every dense weight, the experts its tokens reach)."""
    el = active_weight_elements(cfg)
    matmul = 2 * n_tokens * (el["dense"] + el["routed"]) + 2 * el["head"]
    attn = attention_flops(cfg, n_tokens)
    parts = decode_weight_bytes(cfg, n_tokens)
    weight_bytes = parts["dense"] + parts["routed_experts"] + parts["head"] + parts["embed"]
    compute_s, read_s = (matmul + attn) / flops, weight_bytes / bandwidth
    return {"flops": matmul + attn, "attention_flops": attn, "compute_s": compute_s, "weight_bytes": weight_bytes,
            "read_s": read_s, "floor_s": max(compute_s, read_s)}


def native_bytes(cfg) -> int:
    """Bytes of the checkpoint's tensors in their stored formats (the model a bench builds, MTP included)."""
    return sum(spec.nbytes for spec in inventory(cfg).values())
