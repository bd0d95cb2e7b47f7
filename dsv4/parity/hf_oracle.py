"""Independent oracle: run an official-format DeepSeek-V4 checkpoint through transformers' ``DeepseekV4ForCausalLM``.

The bridge has three parts:

* :func:`hf_config_from_dict` translates an official HF ``config.json`` dict (legacy keys ``compress_ratios``,
  ``num_hash_layers``, ``qk_rope_head_dim``, ``rope_scaling``) into a ``DeepseekV4Config``, explicitly and with
  checks for settings the transformers port would silently model differently.
* :func:`load_hf_model` maps official checkpoint names (``layers.0.attn.wq_a.weight`` ...) onto transformers'
  parameter names and loads them strictly: every transformers weight must be assigned and every input tensor must be
  either used or explicitly ignored (``mtp.*``, transformers has no MTP block).
* :func:`hf_forward` runs a full-sequence forward (no cache) and captures the logits, every decoder layer's output
  hyper-connection streams as ``[b, s, hc, D]`` float32, the compressed KV entries, the indexer's top-k picks and
  the MoE routing (expert ids and weights).

:func:`dequantize_checkpoint` reads an official checkpoint directory into float32 tensors (FP8 / FP4 weights
dequantised with ``dsv4.quant``).  See ``docs/hf_oracle.md`` for the mapping table and the known differences between
the transformers port and the official reference.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

MIN_TRANSFORMERS = (5, 8, 1)  # 5.8.0 had wrong mHC / compressed RoPE / YaRN mscale / indexer mask

# Official names that transformers does not model. Everything else must map.
IGNORED_PREFIXES = ("mtp.",)

_COMPRESS_TYPES = {4: "compressed_sparse_attention"}  # any other ratio > 0 -> heavily_compressed_attention

# Official config keys that are dropped on purpose (the oracle is fed dequantised weights, so no quantisation
# settings; the rest is metadata). Everything else is either translated or passed through to DeepseekV4Config.
_DROPPED_KEYS = (
    "quantization_config",
    "expert_dtype",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "architectures",
    "auto_map",
    "_name_or_path",
)


# ----------------------------------------------------------------------------------------------------------------------
# transformers availability
# ----------------------------------------------------------------------------------------------------------------------


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        m = re.match(r"\d+", part)
        out.append(int(m.group(0)) if m else 0)
    return tuple(out)


def transformers_status() -> tuple[bool, str]:
    """(usable, reason): whether an installed transformers >= 5.8.1 with ``DeepseekV4ForCausalLM`` is importable."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on environment
        return False, f"transformers not importable: {e!r}"
    if _version_tuple(transformers.__version__) < MIN_TRANSFORMERS:
        return False, (
            f"transformers {transformers.__version__} < 5.8.1 (deepseek_v4 in 5.8.0 has known-wrong mHC, "
            "compressed-layer RoPE, YaRN mscale and indexer mask)"
        )
    try:
        from transformers import DeepseekV4Config, DeepseekV4ForCausalLM  # noqa: F401
    except ImportError as e:  # pragma: no cover
        return False, f"transformers {transformers.__version__} has no DeepseekV4ForCausalLM: {e!r}"
    return True, f"transformers {transformers.__version__}"


def _require_transformers() -> None:
    ok, reason = transformers_status()
    if not ok:
        raise ImportError(reason)


# ----------------------------------------------------------------------------------------------------------------------
# config translation
# ----------------------------------------------------------------------------------------------------------------------


def hf_config_from_dict(hf_config: dict):
    """Official HF ``config.json`` dict -> ``transformers.DeepseekV4Config`` (eager attention).

    Legacy keys are translated here rather than left to ``DeepseekV4Config.__post_init__`` so that the result does not
    depend on its folding rules:

    * ``compress_ratios`` (n_layers [+ MTP] entries) -> ``layer_types`` for the first ``num_hidden_layers`` entries
      (0 -> sliding_attention, 4 -> compressed_sparse_attention, r>0 otherwise -> heavily_compressed_attention with
      ``compress_rates`` set to r); MTP entries are dropped (no MTP in transformers).
    * ``num_hash_layers`` -> ``mlp_layer_types`` (first k ``hash_moe``, rest ``moe``).
    * ``qk_rope_head_dim`` -> ``partial_rotary_factor = qk_rope_head_dim / head_dim``.
    * ``rope_theta`` / ``compress_rope_theta`` / ``rope_scaling`` -> nested ``rope_parameters``:
      ``main`` = plain RoPE at ``rope_theta`` (sliding-only layers), ``compress`` = YaRN at ``compress_rope_theta``
      with ``attention_factor = 1.0`` (the reference applies no YaRN mscale) when
      ``rope_scaling.original_max_position_embeddings > 0`` (the reference's YaRN switch), plain RoPE otherwise.
    * ``quantization_config`` / ``expert_dtype`` / ``torch_dtype`` are dropped: the oracle takes dequantised weights.

    Raises ``ValueError`` for settings under which transformers' port would compute something different from the
    reference (non-``silu`` act, ``swiglu_limit <= 0``, ``n_shared_experts != 1``, softmax scoring, more than one KV
    head, ``norm_topk_prob`` false, ``topk_method`` other than ``noaux_tc``, several HCA ratios).
    """
    _require_transformers()
    from transformers import DeepseekV4Config

    cfg = dict(hf_config)
    model_type = cfg.pop("model_type", "deepseek_v4")
    if model_type != "deepseek_v4":
        raise ValueError(f"model_type {model_type!r} is not deepseek_v4")
    for k in _DROPPED_KEYS:
        cfg.pop(k, None)

    n = int(cfg["num_hidden_layers"])
    head_dim = int(cfg.get("head_dim", 512))
    problems = []

    # --- attention schedule ---------------------------------------------------------------------------------------
    ratios = cfg.pop("compress_ratios", None)
    cfg.pop("compress_rate_csa", None)
    cfg.pop("compress_rate_hca", None)
    if ratios is not None:
        n_mtp = int(cfg.get("num_nextn_predict_layers", 0) or 0)
        if len(ratios) not in (n, n + n_mtp):
            problems.append(f"len(compress_ratios)={len(ratios)} is neither num_hidden_layers={n} nor +MTP={n + n_mtp}")
        main = [int(r) for r in ratios[:n]]
        hca_rates = sorted({r for r in main if r > 0 and r not in _COMPRESS_TYPES})
        if len(hca_rates) > 1:
            problems.append(f"several heavily-compressed ratios {hca_rates}: transformers has one rate per layer type")
        if any(r < 0 for r in main):
            problems.append(f"negative compress ratio in {main}")
        layer_types = [
            "sliding_attention" if r == 0 else _COMPRESS_TYPES.get(r, "heavily_compressed_attention") for r in main
        ]
        cfg.setdefault("layer_types", layer_types)
        cfg.setdefault(
            "compress_rates",
            {"compressed_sparse_attention": 4, "heavily_compressed_attention": hca_rates[0] if hca_rates else 128},
        )
    # --- MoE schedule ---------------------------------------------------------------------------------------------
    n_hash = cfg.pop("num_hash_layers", None)
    if n_hash is not None:
        n_hash = int(n_hash)
        cfg.setdefault("mlp_layer_types", ["hash_moe"] * min(n, n_hash) + ["moe"] * max(0, n - n_hash))
    # --- RoPE -----------------------------------------------------------------------------------------------------
    rope_head_dim = cfg.pop("qk_rope_head_dim", None)
    if rope_head_dim is not None:
        cfg["partial_rotary_factor"] = int(rope_head_dim) / head_dim
    prf = cfg.get("partial_rotary_factor", 64 / head_dim)
    rope_scaling = cfg.pop("rope_scaling", None)
    if "rope_parameters" not in cfg:
        rope_theta = cfg.get("rope_theta", 10000.0)
        compress_theta = cfg.get("compress_rope_theta", 160000.0)
        main_rope = {"rope_type": "default", "rope_theta": rope_theta, "partial_rotary_factor": prf}
        rs = dict(rope_scaling or {})
        rtype = rs.pop("rope_type", rs.pop("type", "default"))
        orig = int(rs.get("original_max_position_embeddings", 0) or 0)
        if rtype == "yarn" and orig > 0:
            compress_rope = {
                "rope_type": "yarn",
                "rope_theta": compress_theta,
                "partial_rotary_factor": prf,
                "factor": float(rs["factor"]),
                "original_max_position_embeddings": orig,
                "beta_fast": float(rs.get("beta_fast", 32)),
                "beta_slow": float(rs.get("beta_slow", 1)),
                "attention_factor": 1.0,  # reference: no YaRN mscale on cos/sin
            }
        elif rtype in ("yarn", "default", None):
            compress_rope = {"rope_type": "default", "rope_theta": compress_theta, "partial_rotary_factor": prf}
        else:
            problems.append(f"unsupported rope_scaling type {rtype!r} (reference only knows YaRN)")
            compress_rope = {"rope_type": "default", "rope_theta": compress_theta, "partial_rotary_factor": prf}
        cfg["rope_parameters"] = {"main": main_rope, "compress": compress_rope}

    # --- settings the port models differently from the reference ----------------------------------------------------
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg['hidden_act']!r}: reference experts are SwiGLU (silu)")
    if float(cfg.get("swiglu_limit", 10.0)) <= 0:
        problems.append("swiglu_limit <= 0: reference skips the clamp, transformers would clamp to the value")
    if int(cfg.get("n_shared_experts", 1)) != 1:
        problems.append("n_shared_experts != 1: transformers' shared MLP is moe_intermediate_size wide")
    if cfg.get("scoring_func", "sqrtsoftplus") not in ("sqrtsoftplus", "sigmoid"):
        problems.append(
            f"scoring_func={cfg.get('scoring_func')!r}: transformers always renormalises the top-k weights, "
            "the reference does not for softmax"
        )
    if not cfg.get("norm_topk_prob", True):
        problems.append("norm_topk_prob false: transformers always renormalises")
    if cfg.pop("topk_method", "noaux_tc") != "noaux_tc":
        problems.append("topk_method other than noaux_tc")
    if int(cfg.get("num_key_value_heads", 1)) != 1:
        problems.append("num_key_value_heads != 1: DeepSeek-V4 attention has one shared K=V head")
    if problems:
        raise ValueError("config not representable by transformers' DeepseekV4: " + "; ".join(problems))

    config = DeepseekV4Config(**cfg)
    config._attn_implementation = "eager"  # the only backend the port supports (sinks + concatenated compressed KV)
    # sanity: the fields we derived must have survived __post_init__ unchanged
    if ratios is not None and list(config.layer_types) != cfg["layer_types"]:
        raise ValueError(f"layer_types changed by DeepseekV4Config: {config.layer_types} != {cfg['layer_types']}")
    if n_hash is not None and list(config.mlp_layer_types) != cfg["mlp_layer_types"]:
        raise ValueError("mlp_layer_types changed by DeepseekV4Config")
    if config.qk_rope_head_dim != int(head_dim * prf):
        raise ValueError(f"qk_rope_head_dim {config.qk_rope_head_dim} != {int(head_dim * prf)}")
    comp = config.rope_parameters["compress"]
    if comp.get("rope_type") == "yarn" and comp.get("attention_factor") != 1.0:
        raise ValueError(f"compress RoPE must have attention_factor 1.0, got {comp}")
    return config


# ----------------------------------------------------------------------------------------------------------------------
# name mapping
# ----------------------------------------------------------------------------------------------------------------------

# (official regex on the part after "layers.N.", transformers suffix after "model.layers.N.")
_LAYER_RULES: list[tuple[str, str]] = [
    (r"attn_norm\.weight", "input_layernorm.weight"),
    (r"ffn_norm\.weight", "post_attention_layernorm.weight"),
    (r"hc_attn_fn", "attn_hc.fn"),
    (r"hc_attn_base", "attn_hc.base"),
    (r"hc_attn_scale", "attn_hc.scale"),
    (r"hc_ffn_fn", "ffn_hc.fn"),
    (r"hc_ffn_base", "ffn_hc.base"),
    (r"hc_ffn_scale", "ffn_hc.scale"),
    (r"attn\.attn_sink", "self_attn.sinks"),
    (r"attn\.wq_a\.weight", "self_attn.q_a_proj.weight"),
    (r"attn\.q_norm\.weight", "self_attn.q_a_norm.weight"),
    (r"attn\.wq_b\.weight", "self_attn.q_b_proj.weight"),
    (r"attn\.wkv\.weight", "self_attn.kv_proj.weight"),
    (r"attn\.kv_norm\.weight", "self_attn.kv_norm.weight"),
    (r"attn\.wo_a\.weight", "self_attn.o_a_proj.weight"),
    (r"attn\.wo_b\.weight", "self_attn.o_b_proj.weight"),
    (r"attn\.compressor\.ape", "self_attn.compressor.position_bias"),
    (r"attn\.compressor\.wkv\.weight", "self_attn.compressor.kv_proj.weight"),
    (r"attn\.compressor\.wgate\.weight", "self_attn.compressor.gate_proj.weight"),
    (r"attn\.compressor\.norm\.weight", "self_attn.compressor.kv_norm.weight"),
    (r"attn\.indexer\.wq_b\.weight", "self_attn.compressor.indexer.q_b_proj.weight"),
    (r"attn\.indexer\.weights_proj\.weight", "self_attn.compressor.indexer.scorer.weights_proj.weight"),
    (r"attn\.indexer\.compressor\.ape", "self_attn.compressor.indexer.position_bias"),
    (r"attn\.indexer\.compressor\.wkv\.weight", "self_attn.compressor.indexer.kv_proj.weight"),
    (r"attn\.indexer\.compressor\.wgate\.weight", "self_attn.compressor.indexer.gate_proj.weight"),
    (r"attn\.indexer\.compressor\.norm\.weight", "self_attn.compressor.indexer.kv_norm.weight"),
    (r"ffn\.gate\.weight", "mlp.gate.weight"),
    (r"ffn\.gate\.bias", "mlp.gate.e_score_correction_bias"),
    (r"ffn\.gate\.tid2eid", "mlp.gate.tid2eid"),
    (r"ffn\.shared_experts\.w1\.weight", "mlp.shared_experts.gate_proj.weight"),
    (r"ffn\.shared_experts\.w2\.weight", "mlp.shared_experts.down_proj.weight"),
    (r"ffn\.shared_experts\.w3\.weight", "mlp.shared_experts.up_proj.weight"),
]
_LAYER_RULES_RE = [(re.compile(rf"^layers\.(\d+)\.{src}$"), dst) for src, dst in _LAYER_RULES]
_GLOBAL_RULES = {
    "embed.weight": "model.embed_tokens.weight",
    "head.weight": "lm_head.weight",
    "norm.weight": "model.norm.weight",
    "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_base": "model.hc_head.hc_base",
    "hc_head_scale": "model.hc_head.hc_scale",
}
_EXPERT_RE = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.weight$")

# table used by docs/hf_oracle.md (official pattern -> transformers pattern)
NAME_TABLE: list[tuple[str, str]] = (
    [(k, v) for k, v in _GLOBAL_RULES.items()]
    + [(f"layers.N.{s.replace(chr(92), '')}", f"model.layers.N.{d}") for s, d in _LAYER_RULES]
    + [
        ("layers.N.ffn.experts.E.w1.weight", "model.layers.N.mlp.experts.gate_up_proj[E, :I, :]"),
        ("layers.N.ffn.experts.E.w3.weight", "model.layers.N.mlp.experts.gate_up_proj[E, I:, :]"),
        ("layers.N.ffn.experts.E.w2.weight", "model.layers.N.mlp.experts.down_proj[E]"),
        ("mtp.*", "(ignored: transformers does not instantiate MTP)"),
    ]
)


def map_official_name(name: str) -> str | None:
    """Official name -> transformers state-dict key; ``None`` if unknown. Routed experts are handled separately."""
    if name in _GLOBAL_RULES:
        return _GLOBAL_RULES[name]
    for rx, dst in _LAYER_RULES_RE:
        m = rx.match(name)
        if m:
            return f"model.layers.{m.group(1)}.{dst}"
    return None


def convert_state_dict(tensors: dict[str, torch.Tensor], n_experts: int | None = None):
    """Official (dequantised) tensors -> (transformers state dict, ignored names, mapping official -> hf).

    Raises ``ValueError`` naming every tensor that is quantised (``.scale`` entries, FP8 / packed FP4 payloads),
    unknown, or an incomplete routed-expert set.
    """
    out: dict[str, torch.Tensor] = {}
    mapping: dict[str, str] = {}
    ignored: list[str] = []
    unknown: list[str] = []
    quantised: list[str] = []
    experts: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    for name, t in tensors.items():
        if name.startswith(IGNORED_PREFIXES):
            ignored.append(name)
            continue
        if name.endswith(".scale"):  # official block/row scales; hc_*_scale use an underscore
            quantised.append(name)
            continue
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e8m0fnu, torch.int8) or "float4" in str(t.dtype):
            quantised.append(name)
            continue
        m = _EXPERT_RE.match(name)
        if m:
            layer, e, w = int(m.group(1)), int(m.group(2)), m.group(3)
            experts.setdefault(layer, {}).setdefault(e, {})[w] = t
            mapping[name] = f"model.layers.{layer}.mlp.experts." + ("down_proj" if w == "w2" else "gate_up_proj")
            continue
        dst = map_official_name(name)
        if dst is None:
            unknown.append(name)
            continue
        if dst in out:
            raise ValueError(f"two official tensors map to {dst}")
        out[dst] = t
        mapping[name] = dst
    if quantised:
        raise ValueError(f"tensors are not dequantised (pass float weights, no .scale): {sorted(quantised)}")
    if unknown:
        raise ValueError(f"official tensors with no transformers counterpart: {sorted(unknown)}")

    bad = []
    for layer, by_e in sorted(experts.items()):
        ids = sorted(by_e)
        want = list(range(n_experts if n_experts is not None else len(ids)))
        if ids != want:
            bad.append(f"layers.{layer}: expert ids {ids} != {want}")
            continue
        missing = [f"layers.{layer}.ffn.experts.{e}.{w}.weight" for e in ids for w in ("w1", "w2", "w3")
                   if w not in by_e[e]]
        if missing:
            bad.append(f"missing {missing}")
            continue
        # gate_up_proj[e] = cat([w1, w3]) along the output dim (gate first: DeepseekV4Experts._apply_gate chunks
        # gate, up); down_proj[e] = w2.
        out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([by_e[e]["w1"], by_e[e]["w3"]], dim=0) for e in ids]
        )
        out[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack([by_e[e]["w2"] for e in ids])
    if bad:
        raise ValueError("incomplete routed experts: " + "; ".join(bad))
    return out, sorted(ignored), mapping


# ----------------------------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------------------------


def _keep_fp32(name: str, patterns) -> bool:
    # transformers matches _keep_in_fp32_modules_strict with re.search on the parameter name
    # (core_model_loading.build_glob_alternation + dtype_policy_alt.search), i.e. substring semantics.
    return any(re.search(p.replace("*", ".*"), name) for p in patterns)


def load_hf_model(hf_config: dict, tensors: dict[str, torch.Tensor], dtype=torch.float32):
    """Build ``DeepseekV4ForCausalLM`` from an official config dict and official-name, dequantised tensors.

    Strict: every transformers parameter and persistent buffer must be assigned (``tid2eid``,
    ``e_score_correction_bias`` included), with matching shapes; every input tensor is either mapped or listed as
    ignored (``mtp.*``, logged and stored in ``model.dsv4_load_report['ignored']``). Anything else raises
    ``ValueError`` naming the tensors.

    ``dtype``: float32 (default, everything fp32) or a half type, in which case the parameters transformers keeps in
    fp32 when loading with ``from_pretrained(dtype=...)`` (``_keep_in_fp32_modules_strict``) stay fp32.
    """
    _require_transformers()
    from transformers import DeepseekV4ForCausalLM

    config = hf_config_from_dict(hf_config)
    sd, ignored, mapping = convert_state_dict(tensors, n_experts=config.n_routed_experts)

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover
        import contextlib

        no_init_weights = contextlib.nullcontext
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with no_init_weights():
            model = DeepseekV4ForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)

    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    inv = {}
    for off, hf in mapping.items():
        inv.setdefault(hf, []).append(off)
    if missing or unexpected:
        raise ValueError(
            "strict load failed: transformers weights not assigned: "
            f"{missing}; mapped tensors with no transformers target: "
            f"{[(k, inv.get(k)) for k in unexpected]}"
        )
    shape_bad = [
        (k, inv.get(k), tuple(sd[k].shape), tuple(expected[k].shape))
        for k in expected
        if tuple(sd[k].shape) != tuple(expected[k].shape)
    ]
    if shape_bad:
        raise ValueError(f"shape mismatch (hf name, official names, given, expected): {shape_bad}")
    for k, v in sd.items():
        if k.endswith("tid2eid"):
            if v.is_floating_point():
                raise ValueError(f"{inv.get(k)}: tid2eid must be an integer tensor, got {v.dtype}")
            if v.numel() and (int(v.min()) < 0 or int(v.max()) >= config.n_routed_experts):
                raise ValueError(f"{inv.get(k)}: tid2eid values outside [0, {config.n_routed_experts})")
        elif not v.is_floating_point():
            raise ValueError(f"{inv.get(k)} -> {k}: expected a float tensor, got {v.dtype}")

    with torch.no_grad():
        result = model.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()}, strict=True)
    if result.missing_keys or result.unexpected_keys:  # pragma: no cover - guarded above
        raise ValueError(f"load_state_dict: {result}")

    if dtype != torch.float32:
        keep = list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not _keep_fp32(name, keep):
                    p.data = p.data.to(dtype)
            for name, b in model.named_buffers():
                if b.is_floating_point() and not _keep_fp32(name, keep) and not name.endswith("inv_freq"):
                    b.data = b.data.to(dtype)
        model.config.dtype = dtype
    else:
        model.config.dtype = torch.float32
    model.eval()
    if ignored:
        logger.warning(
            "hf_oracle: %d checkpoint tensors intentionally not loaded (transformers has no MTP): %s%s",
            len(ignored),
            ", ".join(ignored[:8]),
            " ..." if len(ignored) > 8 else "",
        )
    model.dsv4_load_report = {"ignored": ignored, "mapping": mapping, "n_assigned": len(sd)}
    return model


# ----------------------------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------------------------


def _capture_hooks(model, captured: dict) -> list:
    """Forward hooks filling ``captured`` (see :func:`hf_forward`); returns the handles."""
    hc, D = model.config.hc_mult, model.config.hidden_size

    def block(i):
        def hook(_module, _inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            if out.dim() != 4 or out.shape[2] != hc or out.shape[3] != D:
                raise RuntimeError(f"layer {i} output has shape {tuple(out.shape)}, expected [b, s, {hc}, {D}]")
            captured["blocks"][i] = out.detach().float().clone()

        return hook

    def store(key, i, pick):
        return lambda _m, _a, output: captured[key].__setitem__(i, pick(output))

    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.register_forward_hook(block(i)))
        # routers return (logits, weights incl. routed_scaling_factor, expert ids), flattened over b*s
        handles.append(layer.mlp.gate.register_forward_hook(store("routing", i, lambda o: (o[2], o[1].float()))))
        compressor = layer.self_attn.compressor
        if compressor is None:  # sliding-only layer
            continue
        # compressors return (compressed KV [b, 1, n, head_dim], block bias)
        handles.append(compressor.register_forward_hook(store("compressed", i, lambda o: o[0][:, 0].float())))
        if hasattr(compressor, "indexer"):  # CSA: [b, s, k] compressed-entry indices, -1 = not yet visible
            handles.append(compressor.indexer.register_forward_hook(store("topk", i, lambda o: o.clone())))
    return handles


@torch.no_grad()
def hf_forward(model, input_ids: torch.LongTensor) -> dict:
    """Full-sequence forward from position 0 without cache.

    Returns a dict of float32 / int64 captures:

    * ``logits`` ``[b, s, V]`` and ``blocks``: per decoder layer its output streams ``[b, s, hc, D]``. transformers
      keeps the hyper-connection streams as ``[B, S, hc_mult, D]`` throughout (``DeepseekV4Model.forward`` expands
      the embedding with ``unsqueeze(2)``), which is already our layout.
    * ``compressed``: ``{layer: [b, n, head_dim]}`` compressed KV entries of CSA / HCA layers (entry ``j`` pools
      tokens ``j*r .. j*r+r-1``).
    * ``topk``: ``{layer: [b, s, index_topk]}`` lightning-indexer picks of CSA layers as compressed-entry indices,
      ``-1`` where fewer entries are visible. NOTE: dsv4's indexer returns rows of its attention KV (entry + offset).
    * ``routing``: ``{layer: (expert ids [b*s, k], weights [b*s, k])}``; the weights include
      ``routed_scaling_factor``. transformers picks with ``topk(sorted=False)``: compare as sets.

    A 1-D ``input_ids`` is treated as batch 1.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    n = len(model.model.layers)
    captured: dict = {"blocks": [None] * n, "compressed": {}, "topk": {}, "routing": {}}
    handles = _capture_hooks(model, captured)
    try:
        out = model(input_ids=input_ids.to(model.lm_head.weight.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if any(c is None for c in captured["blocks"]):
        raise RuntimeError("some decoder layers did not run")
    return {"logits": out.logits.float(), **captured}


# ----------------------------------------------------------------------------------------------------------------------
# checkpoint reading
# ----------------------------------------------------------------------------------------------------------------------


def _checkpoint_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors files in {path}")
    return files


def dequantize_checkpoint(path) -> dict[str, torch.Tensor]:
    """Read an official checkpoint (directory or one file) into float32 tensors keyed by weight name.

    ``X.weight`` + ``X.scale`` pairs become one dequantised ``X.weight``: FP8 e4m3 payloads via
    ``dsv4.quant.dequant_fp8`` (128x128 blocks), int8-packed FP4 payloads via ``dsv4.quant.dequant_fp4`` (per-32
    scales). Other tensors are cast to float32, except integer ones (``tid2eid``) which stay integer.
    Raises on a scale without payload or a quantised payload without scale.
    """
    from safetensors import safe_open

    from dsv4.quant import dequant_fp4, dequant_fp8

    raw: dict[str, torch.Tensor] = {}
    for f in _checkpoint_files(Path(path)):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                if k in raw:
                    raise ValueError(f"tensor {k} appears in several shards")
                raw[k] = fh.get_tensor(k)

    out: dict[str, torch.Tensor] = {}
    errors = []
    for k, t in raw.items():
        if k.endswith(".scale"):
            if k[: -len(".scale")] + ".weight" not in raw:
                errors.append(f"{k}: scale without weight")
            continue
        scale = raw.get(k[: -len(".weight")] + ".scale") if k.endswith(".weight") else None
        if scale is not None:
            if t.dtype == torch.float8_e4m3fn:
                out[k] = dequant_fp8(t, scale, torch.float32).float()
            elif t.dtype == torch.int8 or "float4" in str(t.dtype):
                out[k] = dequant_fp4(t.view(torch.int8), scale, torch.float32).float()
            else:
                errors.append(f"{k}: has a scale but dtype {t.dtype}")
        elif t.dtype in (torch.float8_e4m3fn, torch.int8) or "float4" in str(t.dtype):
            errors.append(f"{k}: quantised dtype {t.dtype} without scale")
        elif t.is_floating_point():
            out[k] = t.float()
        else:
            out[k] = t
    if errors:
        raise ValueError("dequantize_checkpoint: " + "; ".join(errors))
    return out


def load_hf_from_checkpoint(ckpt_dir, dtype=torch.float32):
    """Convenience: ``config.json`` + safetensors of ``ckpt_dir`` -> loaded ``DeepseekV4ForCausalLM``."""
    ckpt_dir = Path(ckpt_dir)
    hf_config = json.loads((ckpt_dir / "config.json").read_text())
    return load_hf_model(hf_config, dequantize_checkpoint(ckpt_dir), dtype=dtype)
