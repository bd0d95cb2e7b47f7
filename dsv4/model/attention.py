"""Attention of DeepSeek-V4 (spec §3.4): one shared KV head, sliding window + compressed entries, sinks.

Per layer type: "sliding" reads the last `window_size` tokens; "hca" (ratio 128) also reads every complete
compressed block; "csa" (ratio 4) also reads the indexer's top-k compressed entries. Every query gets one
index list into a KV row tensor (-1 = masked), the contract shared with the fused kernels.
NOTE: K and V are the same 512-d vector; the output is de-rotated by the query's own position; q gets a
weightless per-head RMS normalisation (rsqrt, in the compute dtype) after wq_b.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4 import ops
from dsv4.model.compressor import Compressor
from dsv4.model.indexer import Indexer
from dsv4.model.pairs import paired
from dsv4.model.primitives import BlockDiagLinear, Linear, RMSNorm
from dsv4.model.rope import Rotary
from dsv4.model.state import DecodeBatch, FreshBatch, LayerState, SeqChunk, StepBatch, gather_rows, page_ids, write_rows
from dsv4.ops.ref import mean_square
from dsv4.parity.taps import tap


def window_indices(start: int, n: int, window: int, device) -> torch.Tensor:
    """[n, window] rows for queries at positions start..start+n-1 into [ring (window rows) ; the n new rows]:
    position u < start sits in ring row u % window, u >= start in row window + u - start; -1 before position 0.
    Each query sees positions p-window+1 .. p, oldest first, so every query's list has the same layout whatever
    its chunk: the fixed-shape decode step's (`Attention._decode_window`), and a chunked prefill's."""
    p = torch.arange(start, start + n, device=device).unsqueeze(1)
    u = p - window + 1 + torch.arange(window, device=device)
    rows = torch.where(u < start, u % window, window + u - start)
    return torch.where(u < 0, -1, rows)


def block_indices(start: int, n: int, ratio: int, offset: int, device) -> torch.Tensor:
    """[n, (start+n) // ratio]: every compressed entry whose block is complete at query p, + offset; else -1."""
    j = torch.arange((start + n) // ratio, device=device)
    visible = torch.arange(start + 1, start + n + 1, device=device).unsqueeze(1) // ratio
    return torch.where(j >= visible, -1, j + offset)


def gather_pages(pool: torch.Tensor, pages: list[int], n: int) -> torch.Tensor:
    """The first n rows of a sequence's paged store: pool [pages, per_page, d] -> [n, d]."""
    used = pages[: -(-n // pool.shape[1])] if n else []
    return gather_rows(pool, page_ids(used, pool.device).unsqueeze(0))[0, :n]


def scatter_pages(pool: torch.Tensor, pages: list[int], first: int, rows: torch.Tensor) -> None:
    """Write rows [m, d] as entries first..first+m-1 of a sequence's paged store."""
    per_page = pool.shape[1]
    j = torch.arange(first, first + rows.shape[0], device=pool.device)
    page = page_ids(pages, pool.device)[j // per_page]
    pool[page, j % per_page] = rows.to(pool.dtype)


class Attention(nn.Module):
    PAIRS = (("wq_a", "wkv"),)          # linears of one input, packed into one buffer on CUDA (`model/pairs.py`)

    def __init__(self, cfg, layer_id: int, dense_fmt: str, dtype: torch.dtype):
        super().__init__()
        self.n_heads, self.head_dim, self.groups = cfg.n_heads, cfg.head_dim, cfg.o_groups
        self.rope_dim, self.window, self.eps = cfg.rope_head_dim, cfg.window_size, cfg.norm_eps
        self.ratio = cfg.compress_ratios[layer_id]
        self.softmax_scale = cfg.head_dim ** -0.5
        self.quant_emulation = True
        self.rotary = Rotary(cfg, compressed=self.ratio > 0)
        self.attn_sink = nn.Parameter(torch.empty(cfg.n_heads, dtype=torch.float32))
        self.wq_a = Linear(cfg.dim, cfg.q_lora_rank, dense_fmt, dtype)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
        self.wq_b = Linear(cfg.q_lora_rank, cfg.n_heads * cfg.head_dim, dense_fmt, dtype)
        self.wkv = Linear(cfg.dim, cfg.head_dim, dense_fmt, dtype)
        self.kv_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        # grouped: each group of heads to its own o_lora_rank slice; held as stored (FP8), never act-quantised
        self.wo_a = BlockDiagLinear(cfg.n_heads * cfg.head_dim // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank,
                                    dense_fmt, dtype, groups=cfg.o_groups)
        self.wo_b = Linear(cfg.o_groups * cfg.o_lora_rank, cfg.dim, dense_fmt, dtype)
        if self.ratio:
            self.compressor = Compressor(cfg, self.ratio, cfg.head_dim, rotate=False, rotary=self.rotary)
        if self.ratio == 4:
            self.indexer = Indexer(cfg, self.rotary, dense_fmt, dtype)

    def queries_and_kv(self, x: torch.Tensor, cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q, qr, kv): `queries` and `window_kv` of one x, their first linears (wq_a, wkv: same input) in one FP8
        call where the loader packed them (`model/pairs.py`)."""
        qa, kva = paired(self.wq_a, self.wkv, x)
        return *self.queries(x, cis, qa), self.window_kv(x, cis, kva)

    def queries(self, x: torch.Tensor, cis: torch.Tensor, qa: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(q [b, s, H, d] rotated, q LoRA latent qr [b, s, q_lora] for the indexer). `qa`: wq_a(x) if computed."""
        qr = self.q_norm(self.wq_a(x) if qa is None else qa)
        q = self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim))
        q = q * torch.rsqrt(mean_square(q) + self.eps)
        return self.rotary(q, cis, owned=True), qr

    def window_kv(self, x: torch.Tensor, cis: torch.Tensor, kva: torch.Tensor | None = None) -> torch.Tensor:
        """[b, s, d] per-token KV: kv_norm, RoPE, FP8 fake-quant of the nope dims (emulation). `kva`: wkv(x) if
        computed."""
        kv = self.rotary(self.kv_norm(self.wkv(x) if kva is None else kva), cis)
        return ops.fake_quant_kv(kv, self.rope_dim) if self.quant_emulation else kv

    def forward(self, x: torch.Tensor, cis: torch.Tensor, batch: StepBatch, state: LayerState) -> torch.Tensor:
        """A flattened step x [1, T, D] (rotations cis [1, T, rd/2]) -> [1, T, D], reading and updating `state`."""
        if isinstance(batch, DecodeBatch):
            return self.decode(x, cis, batch, state)
        if isinstance(batch, FreshBatch):
            return self.fresh(x, cis, batch)
        return self.output(self.core(self.project(x, cis), batch, state, x.dtype), cis)

    def project(self, x: torch.Tensor, cis: torch.Tensor) -> tuple:
        """The general step's per-token work before attention, x [1, T, D] -> (q, kv, comp, index): queries,
        window KV, the compressor's and the indexer's projections. Rows are independent (a prefill step may run
        this on padded rows: `engine/prefill_graphs.py`); `core` reads the first T rows."""
        q, qr, kv = self.queries_and_kv(x, cis)
        tap("attn.q", q)
        tap("attn.window_kv", kv)
        comp = self.compressor.project(x) if self.ratio else None
        index = None
        if self.ratio == 4:
            index = (self.indexer.weights(x), self.indexer.queries(qr, cis), self.indexer.compressor.project(x))
        return q, kv, comp, index

    def core(self, proj: tuple, batch: StepBatch, state: LayerState, dtype: torch.dtype) -> torch.Tensor:
        """Each sequence's attention over `project`'s rows, reading and updating its state -> the attention op's
        output [1, T, H, d] (before `output`): the step's stateful, per-sequence part."""
        q, kv, comp, index = proj
        outs = []
        for seq in batch.seqs:
            sl = slice(seq.offset, seq.offset + seq.length)
            outs.append(self._attend(seq, state, q[:, sl], kv[:, sl], dtype,
                                     None if comp is None else [t[0, sl] for t in comp],
                                     None if index is None else [t[:, sl] for t in index[:2]] +
                                     [[t[0, sl] for t in index[2]]]))
        return torch.cat(outs, dim=1)

    def _attend(self, seq: SeqChunk, state: LayerState, q, kv, dtype, comp, index) -> torch.Tensor:
        """One sequence: q [1, n, H, d], kv [1, n, d] -> attention output [1, n, H, d]; updates its state."""
        n, window = seq.length, self.window
        rows = [state.ring[seq.slot], kv[0]]
        idx = window_indices(seq.start, n, window, q.device)
        if self.ratio:
            entries = self._compressed_entries(self.compressor, state.entries, state.compressor, seq, comp, dtype)
            tap("attn.compressed", entries)
            base = window + n
            if self.ratio == 4:
                w, iq, icomp = index
                keys = self._compressed_entries(self.indexer.compressor, state.index_keys, state.index_compressor,
                                                seq, icomp, dtype)
                tap("attn.indexer.keys", keys)
                picked = self.indexer.select(w, iq, keys.unsqueeze(0), seq.start, base)[0]
                tap("attn.indexer.topk", picked, index_offset=base)
            else:       # HCA: every entry whose block is complete at the query (block_indices), as a dense tail
                visible = torch.arange(seq.start + 1, seq.start + n + 1, device=q.device) // self.ratio
                o = ops.sparse_attention_dense_tail(q, torch.cat(rows).unsqueeze(0), self.attn_sink,
                                                    idx.unsqueeze(0), entries.unsqueeze(0), visible.unsqueeze(0),
                                                    self.softmax_scale)
                return self._write_ring(seq, state, kv, o)
            rows.append(entries)
            idx = torch.cat([idx, picked], dim=-1)
        o = ops.sparse_attention(q, torch.cat(rows).unsqueeze(0), self.attn_sink, idx.unsqueeze(0),
                                 self.softmax_scale)
        return self._write_ring(seq, state, kv, o)

    def fresh(self, x: torch.Tensor, cis: torch.Tensor, batch: FreshBatch) -> torch.Tensor:
        """`forward` for b fresh sequences of s tokens (x [1, b*s, D]) as one batch: one attention call per layer
        whatever b, no decode state. Each sequence's KV rows and index lists are `_attend`'s from an empty state
        (the ring's W rows are zeros no query reads: the same row numbers)."""
        b, s, window, dtype = batch.b, batch.s, self.window, x.dtype
        q, qr, kv = self.queries_and_kv(x, cis)
        qb, kvb = q.view(b, s, *q.shape[2:]), kv.view(b, s, -1)
        rows = [kvb.new_zeros(b, window, kvb.shape[-1]), kvb]
        idx = window_indices(0, s, window, x.device).expand(b, s, window)
        if self.ratio:
            entries = self.compressor.fresh(*(t.view(b, s, -1) for t in self.compressor.project(x)), dtype)
            base = window + s
            if self.ratio != 4:     # HCA: every entry whose block is complete at the query, as a dense tail
                visible = (torch.arange(1, s + 1, device=x.device) // self.ratio).expand(b, s)
                o = ops.sparse_attention_dense_tail(qb, torch.cat(rows, dim=1), self.attn_sink, idx.contiguous(),
                                                    entries, visible.contiguous(), self.softmax_scale)
                return self.output(o.reshape(1, b * s, *o.shape[2:]), cis)
            keys = self.indexer.compressor.fresh(
                *(t.view(b, s, -1) for t in self.indexer.compressor.project(x)), dtype)
            w, iq = self.indexer.weights(x), self.indexer.queries(qr, cis)
            picked = self.indexer.select(w.view(b, s, -1), iq.view(b, s, *iq.shape[2:]), keys, 0, base)
            rows.append(entries)
            idx = torch.cat([idx, picked], dim=-1)
        o = ops.sparse_attention(qb, torch.cat(rows, dim=1), self.attn_sink, idx.contiguous(), self.softmax_scale)
        return self.output(o.reshape(1, b * s, *o.shape[2:]), cis)

    def _write_ring(self, seq: SeqChunk, state: LayerState, kv: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Keep the chunk's last `window` KV rows in the sequence's ring; pass the attention output o through."""
        n, window = seq.length, self.window
        keep = min(n, window)                                     # the ring keeps the last `window` tokens
        pos = torch.arange(seq.start + n - keep, seq.start + n, device=kv.device)
        state.ring[seq.slot, pos % window] = kv[0, n - keep:].to(state.ring.dtype)
        return o

    def decode(self, x: torch.Tensor, cis: torch.Tensor, batch: DecodeBatch, state: LayerState) -> torch.Tensor:
        """T new tokens per sequence (x [1, B*T, D]) with fixed shapes and no host synchronisation (CUDA-graph
        capturable); the same function as `forward` on the equivalent `StepBatch`. KV rows per sequence are
        [ring after this step's writes | the T-1 ring rows those writes overwrote | compressed entries], and every
        query reads them through its own index list, masked by position: its window, causal among the new tokens,
        entries whose block is complete at its own position."""
        b, t = batch.slots.shape[0], batch.tokens_per_seq
        if t > self.window:
            raise ValueError(f"a decode step of {t} tokens per sequence exceeds the window ({self.window})")
        pos, table = batch.positions.view(b, t), batch.page_table
        q, qr, kv = self.queries_and_kv(x, cis)
        kv = kv[0].view(b, t, -1)                                               # [B, T, d]
        ring, idx = self._decode_window(kv, pos, batch.slots, state, x.dtype)
        rows, idx = [ring], [idx]
        if self.ratio:
            self._decode_entries(self.compressor, state.entries, state.compressor, x, batch)
            seen = ((pos + 1) // self.ratio).unsqueeze(-1)                     # [B, T, 1] visible entries
            base = ring.shape[1]
            if self.ratio == 4:
                self._decode_entries(self.indexer.compressor, state.index_keys, state.index_compressor, x, batch)
                keys = gather_rows(state.index_keys, table).to(x.dtype)        # [B, n, d_index]
                iq = self.indexer.queries(qr, cis)[0]                              # [B*T, h, d_index]
                # summed over the tensor-parallel ranks' heads, as in `Indexer.select`: every rank picks alike
                score = self.indexer.summed_scores(self.indexer.weights(x)[0].view(b, t, -1),
                                                   iq.view(b, t, *iq.shape[1:]), keys, seen.squeeze(-1))   # [B, T, n]
                k = min(self.indexer.topk, keys.shape[1])
                pick = score.sort(dim=-1, descending=True, stable=True).indices[..., :k]     # [B, T, k]
                rows.append(gather_rows(state.entries, table, pick.flatten(1)).to(x.dtype))  # [B, T*k, d]
                cols = base + k * torch.arange(t, device=x.device).unsqueeze(1) + torch.arange(k, device=x.device)
                idx.append(torch.where(pick < seen, cols, -1))
            else:
                entries = gather_rows(state.entries, table).to(x.dtype)
                rows.append(entries)
                j = torch.arange(entries.shape[1], device=x.device)
                idx.append(torch.where(j < seen, base + j, -1))                 # [B, T, n]
        o = ops.sparse_attention(q[0].view(b, t, *q.shape[2:]), torch.cat(rows, dim=1), self.attn_sink,
                                 torch.cat(idx, dim=-1), self.softmax_scale)
        return self.output(o.view(1, b * t, *o.shape[2:]), cis)

    def _decode_window(self, kv: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, state: LayerState,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new rows kv [B, T, d] (positions pos [B, T]) into the ring; -> (rows [B, W+T-1, d] = the ring
        after the writes, then the T-1 rows they overwrote; idx [B, T, W], each query's window oldest first, -1
        before position 0: the layout of `window_indices` in the general step, so that the attention sums add the
        same terms in the same places in both steps).
        NOTE: the overwritten rows (positions p+i-W, i >= 1) are still in the window of the queries before p+i, so
        they are read before the writes."""
        w = self.window
        arange = torch.arange(w, device=pos.device)
        if pos.shape[1] == 1:       # plain decode: nothing overwritten is still needed (and fewer kernels per layer)
            state.ring[slots, pos[:, 0] % w] = kv[:, 0].to(state.ring.dtype)  # overwrites position p - W
            u = pos - w + 1 + arange                                           # [B, W] positions, oldest first
            return state.ring[slots].to(dtype), torch.where(u >= 0, u % w, -1).unsqueeze(1)
        overwritten = state.ring[slots.unsqueeze(1), pos[:, 1:] % w]           # [B, T-1, d], BEFORE the writes
        state.ring[slots.unsqueeze(1), pos % w] = kv.to(state.ring.dtype)      # token p+i replaces p+i-W
        last = pos[:, -1:]
        held = torch.cat([last - (last - arange) % w, pos[:, 1:] - w], dim=1)  # [B, W+T-1] position of each row
        held, query = held.unsqueeze(1), pos.unsqueeze(2)                      # [B, 1, n], [B, T, 1]
        ok = (held <= query) & (held > query - w) & (held >= 0)
        # masked rows first, then oldest first; the last W: the list `forward` (window_indices) makes of the same
        # rows (a query sees at most W of them)
        # (masked_fill with a Python scalar: no host tensor, so this stays capturable in a CUDA graph)
        order = held.masked_fill(~ok, torch.iinfo(held.dtype).min).argsort(dim=-1, stable=True)
        rows = torch.cat([state.ring[slots], overwritten], dim=1).to(dtype)
        return rows, torch.where(ok.gather(-1, order), order, -1)[..., pos.shape[1] - 1:]

    @staticmethod
    def _decode_entries(compressor, pool, cstate, x, batch: DecodeBatch) -> None:
        """Feed each sequence's T tokens to a compressor, in order (a loop over the static T); store the entries
        of the blocks they complete."""
        b, t = batch.slots.shape[0], batch.tokens_per_seq
        kv, score = (p[0].view(b, t, -1) for p in compressor.project(x))
        pos = batch.positions.view(b, t)
        for i in range(t):
            entries, complete = compressor.decode(kv[:, i], score[:, i], pos[:, i], batch.slots, cstate, x.dtype)
            j = pos[:, i] // compressor.ratio
            old = gather_rows(pool, batch.page_table, j.unsqueeze(1))[:, 0]
            write_rows(pool, batch.page_table, j, torch.where(complete[:, None], entries.to(pool.dtype), old))

    @staticmethod
    def _compressed_entries(compressor, pool, cstate, seq: SeqChunk, proj, dtype) -> torch.Tensor:
        """Pool this chunk's completed blocks into the paged store; return all of the sequence's entries."""
        pooled, first = compressor.step(proj[0], proj[1], seq.start, cstate, seq.slot)
        if pooled.shape[0]:
            scatter_pages(pool, seq.pages, seq.start // compressor.ratio, compressor.finish(pooled, first, dtype))
        return gather_pages(pool, seq.pages, (seq.start + seq.length) // compressor.ratio).to(dtype)

    def output(self, o: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
        """De-rotate, grouped low-rank wo_a (per group of heads), then wo_b."""
        b, s = o.shape[:2]
        tap("attn.out_pre_inverse_rope", o)
        o = self.rotary(o, cis, inverse=True, owned=True)    # the attention op's fresh output: ours
        tap("attn.out", o)
        o = self.wo_a(o.view(b, s, self.groups, -1))        # [b, s, G, o_lora_rank]
        out = self.wo_b(o.flatten(2))
        tap("attn.wo", out)
        return out
