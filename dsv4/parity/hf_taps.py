"""transformers' `DeepseekV4ForCausalLM` captured under dsv4's tap names (`dsv4 parity hf`).

One full-sequence forward without cache (the oracle of docs/hf_oracle.md) over every token dsv4 saw; forward
hooks pick the module outputs that correspond to a tap, and the result is cut into dsv4's steps (a decode step
at position p = row p; compressed entries = those complete by then). Where transformers has no module
boundary at a tap, its own functions finish the job:
* `attn.q` / `attn.window_kv`: the output of `q_b_norm` / `kv_norm`, rotated by transformers'
  `apply_rotary_pos_emb` with the layer's cos/sin (taken from the attention's keyword arguments);
* `attn.out_pre_inverse_rope`: the result of `eager_attention_forward`, wrapped for the duration;
* `attn.indexer.scores`: the scorer's output with the causal mask its indexer applies (-inf, like dsv4's tap).
Not captured (transformers computes them inside a function): `hc_*_pre.weights`, `attn.indexer.keys`.
"""

from __future__ import annotations

import contextlib

import torch

# taps laid out [T, ...] (token dim 0); every other per-token tap is [1, T, ...]
_TOKEN_DIM0 = ("attn.indexer.topk", "ffn.routing.ids", "ffn.routing.weights", "ffn.experts_out")


def _layer_hooks(i: int, layer, cap: dict, rope) -> list:
    p = f"layers.{i}."
    attn = layer.self_attn
    cos_sin = {}

    def put(name, value):
        cap[p + name] = value.detach().float() if value.is_floating_point() else value.detach()

    # NOTE: a forward hook that returns something replaces the module's output: every hook here returns None.
    def hc(prefix):
        def hook(_m, _a, out):
            for part, value in zip(("post", "comb", "x"), out, strict=True):
                put(f"{prefix}.{part}", value)
        return hook

    def routing(_m, _a, out):
        put("ffn.routing.ids", out[2])
        put("ffn.routing.weights", out[1])

    def grab_rope(_m, _args, kwargs):
        cos_sin["v"] = kwargs["position_embeddings"][attn.rope_layer_type]

    hooks = [layer.attn_hc.register_forward_hook(hc("hc_attn_pre")),
             attn.register_forward_pre_hook(grab_rope, with_kwargs=True),
             attn.q_b_norm.register_forward_hook(
                 lambda _m, _a, q: put("attn.q", rope(q, *cos_sin["v"]).transpose(1, 2))),
             attn.kv_norm.register_forward_hook(
                 lambda _m, _a, kv: put("attn.window_kv", rope(kv.unsqueeze(1), *cos_sin["v"])[:, 0])),
             attn.o_a_proj.register_forward_pre_hook(
                 lambda _m, a: put("attn.out", a[0].unflatten(-1, (-1, attn.head_dim)).flatten(2, 3))),
             attn.o_b_proj.register_forward_hook(lambda _m, _a, out: put("attn.wo", out)),
             layer.ffn_hc.register_forward_hook(hc("hc_ffn_pre")),
             layer.mlp.gate.register_forward_hook(routing),
             layer.mlp.register_forward_hook(lambda _m, _a, out: put("ffn.experts_out", out.flatten(0, 1))),
             layer.register_forward_hook(lambda _m, _a, out: put("block.out", out))]
    comp = attn.compressor
    if comp is not None:
        hooks.append(comp.register_forward_hook(lambda _m, _a, out: put("attn.compressed", out[0][0, 0])))
    if comp is not None and hasattr(comp, "indexer"):
        hooks.append(comp.indexer.scorer.register_forward_hook(
            lambda _m, _a, out: put("attn.indexer.scores", _causal(out, comp.compress_rate))))
        hooks.append(comp.indexer.register_forward_hook(lambda _m, _a, out: put("attn.indexer.topk", out[0])))
    return hooks


def _causal(scores: torch.Tensor, ratio: int) -> torch.Tensor:
    """[1, S, E] scores with entries not yet complete at each position set to -inf."""
    visible = (torch.arange(scores.shape[1], device=scores.device) + 1) // ratio
    return scores.masked_fill(torch.arange(scores.shape[2], device=scores.device) >= visible[:, None], float("-inf"))


@contextlib.contextmanager
def _attention_core_capture(module, calls: list):
    """Wrap transformers' eager attention so its per-layer output [b, s, H, d] is recorded in call order."""
    original = module.eager_attention_forward

    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(out[0].detach().float())
        return out

    module.eager_attention_forward = wrapper
    try:
        yield
    finally:
        module.eager_attention_forward = original


@torch.no_grad()
def hf_full_taps(hf, tokens: list[int]) -> dict[str, torch.Tensor]:
    """Taps of one full-sequence forward, dsv4 names, prefill layouts (T = every token)."""
    import transformers.models.deepseek_v4.modeling_deepseek_v4 as modeling

    cap: dict[str, torch.Tensor] = {}
    core = hf.model
    hooks = [core.embed_tokens.register_forward_hook(lambda _m, _a, out: cap.__setitem__("embed", out.float())),
             core.hc_head.register_forward_hook(lambda _m, _a, out: cap.__setitem__("hc_head", out.float())),
             core.norm.register_forward_hook(lambda _m, _a, out: cap.__setitem__("norm", out.float()))]
    for i, layer in enumerate(core.layers):
        hooks += _layer_hooks(i, layer, cap, modeling.apply_rotary_pos_emb)
    calls: list[torch.Tensor] = []
    try:
        with _attention_core_capture(modeling, calls):
            cap["logits"] = hf(input_ids=torch.tensor([tokens]), use_cache=False).logits.float()
    finally:
        for h in hooks:
            h.remove()
    if len(calls) != len(core.layers):
        raise RuntimeError(f"expected one eager attention call per layer, saw {len(calls)}")
    for i, out in enumerate(calls):
        cap[f"layers.{i}.attn.out_pre_inverse_rope"] = out
    return cap


def cut_step(full: dict[str, torch.Tensor], cfg, start: int, n: int) -> dict[str, torch.Tensor]:
    """The part of full-sequence taps that one step (positions start .. start+n-1) of dsv4 records."""
    from dsv4.parity.taps import stage_of

    out = {}
    end = start + n
    for name, t in full.items():
        scope, stage = stage_of(name)
        ratio = cfg.compress_ratios[int(scope.split(".")[1])] if scope else 0
        if stage == "attn.compressed":
            out[name] = t[: end // ratio]
        elif stage == "attn.indexer.scores":
            out[name] = t[:, start:end, : end // ratio]
        elif stage == "attn.indexer.topk":
            out[name] = t[start:end, : min(cfg.index_topk, end // ratio)]
        elif stage in _TOKEN_DIM0:
            out[name] = t[start:end]
        else:
            out[name] = t[:, start:end]
    return out


def hf_step_taps(hf, cfg, tokens: list[int], steps: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
    """transformers' taps for each dsv4 step (start, n) of one sequence `tokens`."""
    full = hf_full_taps(hf, tokens)
    return [cut_step(full, cfg, start, n) for start, n in steps]
