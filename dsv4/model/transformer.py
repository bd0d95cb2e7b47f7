"""The whole DeepSeek-V4 model (spec §3.1, §3.8): embedding, hc streams, blocks, hc_head, norm, head; MTP.

`Transformer.forward(input_ids)` runs fresh sequences from position 0 and returns fp32 logits for every
position (the reference computes only the last one; `last_only=True` does the same).
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4.config import ModelConfig
from dsv4.model.block import Block, _hc_params
from dsv4.model.hyper import hc_head
from dsv4.model.moe import MoE
from dsv4.model.primitives import Head, Linear, RMSNorm, weight_formats
from dsv4.model.state import FreshBatch, ModelState, StepBatch, fresh_state
from dsv4.ops.rowwise import NON_FINITE, all_finite
from dsv4.parity.taps import tap, tap_scope


class MTPBlock(Block):
    """Multi-token prediction block `mtp.i` (a sliding-window, non-hash block with its own input mix)."""

    def __init__(self, cfg, layer_id: int, dense_fmt: str, expert_fmt: str, dtype: torch.dtype):
        super().__init__(cfg, layer_id, dense_fmt, expert_fmt, dtype)
        self.tap_name = f"mtp.{layer_id - cfg.n_layers}"
        self.e_proj = Linear(cfg.dim, cfg.dim, dense_fmt, dtype)
        self.h_proj = Linear(cfg.dim, cfg.dim, dense_fmt, dtype)
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        _hc_params(self, "hc_head", cfg.hc_mult, cfg.hc_mult * cfg.dim)

    def mix_input(self, embedded: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """e_proj(enorm(e)) broadcast to every stream + h_proj(hnorm(h)): [b, s, hc, D]."""
        return self.e_proj(self.enorm(embedded)).unsqueeze(2) + self.h_proj(self.hnorm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        dense_fmt, expert_fmt = weight_formats(cfg)
        # NOTE: an empty weight, not nn.Embedding's normal_ init: on the meta device that init goes through
        # torch._refs, which imports Dynamo (~1.3 s of every start-up); the loader assigns the weight anyway.
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim, _weight=torch.empty(cfg.vocab_size, cfg.dim, dtype=dtype))
        self.layers = nn.ModuleList(Block(cfg, i, dense_fmt, expert_fmt, dtype) for i in range(cfg.n_layers))
        self.mtp = nn.ModuleList(MTPBlock(cfg, cfg.n_layers + i, dense_fmt, expert_fmt, dtype)
                                 for i in range(cfg.n_mtp_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = Head(cfg.dim, cfg.vocab_size, dtype)
        _hc_params(self, "hc_head", cfg.hc_mult, cfg.hc_mult * cfg.dim)

    @property
    def quant_emulation(self) -> bool:
        return all(m.quant_emulation for m in self.modules() if m is not self and hasattr(m, "quant_emulation"))

    def set_quant_emulation(self, on: bool) -> Transformer:
        """Switch the QAT emulation (act quant, KV FP8 fake-quant, Hadamard + FP4 indexer) on or off."""
        for m in self.modules():
            if m is not self and hasattr(m, "quant_emulation"):
                m.quant_emulation = on
        return self

    def prepare_fixed_shape_decode(self, device) -> Transformer:
        """Build what the fixed-shape decode path reads lazily now, outside any torch.compile trace or CUDA-graph
        capture (which cannot create parameters or copy from the host): the routed experts' stacked weights and
        the RoPE frequency tables on `device`."""
        for m in self.modules():
            if isinstance(m, MoE) and all(e is not None for e in m.experts):
                m.stacked_experts()
            if hasattr(m, "rotary"):
                m.rotary.cis(torch.zeros(1, dtype=torch.long, device=device))
        return self

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final hc streams [b, s, hc, D] (before hc_head) of fresh sequences starting at position 0."""
        b, s = input_ids.shape
        state, batch = fresh_state(self.cfg, b, s, self.dtype, input_ids.device)
        return self.step(input_ids.reshape(1, -1), batch, state).view(b, s, self.cfg.hc_mult, self.cfg.dim)

    def step(self, input_ids: torch.Tensor, batch: StepBatch, state: ModelState, layer_fn=None) -> torch.Tensor:
        """One engine step: input_ids [1, T] of a flattened batch (prefill chunks and decode tokens of many
        sequences) -> final hc streams [1, T, hc, D]; reads and advances every sequence's decode state.
        `layer_fn(layer, h, input_ids, batch, layer_state)`, if given, runs each block in place of calling it (the
        decode graphs pass a compiled one: engine/graphs.py `compiled_blocks`)."""
        tap_scope("")
        embedded = self.embed(input_ids)
        tap("embed", embedded)
        h = embedded.unsqueeze(2).repeat(1, 1, self.cfg.hc_mult, 1)
        for layer, layer_state in zip(self.layers, state.layers, strict=True):
            h = layer(h, input_ids, batch, layer_state) if layer_fn is None else layer_fn(layer, h, input_ids, batch,
                                                                                         layer_state)
            tap("block.out", h)
        tap_scope("")
        return h

    def main_logits(self, h: torch.Tensor, check_finite: bool = True) -> torch.Tensor:
        """fp32 logits of the main head for hc streams h [..., hc, D]; non-finite values are an error.
        `check_finite=False` skips the check, which reads the device (a GPU sync): training checks its loss once
        a step instead (`Trainer.train_step`)."""
        out = self.logits(h, self.norm, self.hc_head_fn, self.hc_head_scale, self.hc_head_base)
        if check_finite and not all_finite(out):
            raise FloatingPointError(NON_FINITE)
        return out

    def logits(self, h: torch.Tensor, norm: RMSNorm, fn, scale, base) -> torch.Tensor:
        x = hc_head(h, fn, scale, base, self.cfg)
        tap("hc_head", x)
        y = norm(x)
        tap("norm", y)
        out = self.head.logits(y)
        tap("logits", out)
        return out

    def forward(self, input_ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """input_ids [b, s] (a fresh sequence from position 0) -> fp32 logits [b, s, vocab] ([b, 1, vocab])."""
        h = self.hidden(input_ids)
        return self.main_logits(h[:, -1:] if last_only else h)

    def mtp_forward(self, h: torch.Tensor, input_ids: torch.Tensor, depth: int = 0,
                    fresh: bool = False) -> torch.Tensor:
        """MTP logits. DeepSeek-V3 convention: position i combines the main stream h_i with token i+1 and
        predicts token i+2, so pass h[:, :-1] and input_ids[:, 1:] (positions restart at 0). fresh: the b sequences
        as one `FreshBatch` (one attention call, no decode state; the training rows' path) instead of a state
        with b slots (attended one by one)."""
        block = self.mtp[depth]
        b, s = input_ids.shape
        if fresh:
            batch, layer = FreshBatch.build(b, s, input_ids.device), None
        else:
            state, batch = fresh_state(self.cfg, b, s, self.dtype, input_ids.device, layer_ids=[block.layer_id])
            layer = state.layers[0]
        x = block.mix_input(self.embed(input_ids), h).reshape(1, b * s, self.cfg.hc_mult, self.cfg.dim)
        x = block(x, input_ids.reshape(1, -1), batch, layer).view(b, s, self.cfg.hc_mult, self.cfg.dim)
        return self.logits(x, block.norm, block.hc_head_fn, block.hc_head_scale, block.hc_head_base)

    def mtp_step(self, h: torch.Tensor, next_ids: torch.Tensor, batch: StepBatch, state: ModelState,
                 depth: int = 0) -> torch.Tensor:
        """The MTP block over a flattened batch (speculative drafting): position i takes the hc streams h [1, T,
        hc, D] of position i and token i+1 (`next_ids` [1, T]); `state` holds only this block's layer.
        -> the block's output hc streams [1, T, hc, D]."""
        block = self.mtp[depth]
        x = block.mix_input(self.embed(next_ids), h)
        return block(x, next_ids, batch, state.layers[0])

    def mtp_logits(self, x: torch.Tensor, depth: int = 0) -> torch.Tensor:
        """fp32 logits of the MTP head for its output streams x [..., hc, D] (the head weight is shared)."""
        block = self.mtp[depth]
        return self.logits(x, block.norm, block.hc_head_fn, block.hc_head_scale, block.hc_head_base)
