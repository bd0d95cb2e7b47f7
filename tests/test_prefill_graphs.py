"""`engine.prefill_graphs.PrefillGraphs` (per-token segments per padded token bucket, eager attention cores) against
`model.step`, the general step it stands in for.

With capture off (and on a CPU) the segments run eagerly on the padded rows: the same data flow the GPU replays.
A step of exactly a bucket's size runs `model.step`'s ops in the same order: equal bits, hidden states and decode
state alike. A padded step adds rows to per-token products, whose summation order a library may choose by the row
count: fp32 models here (float64 accumulation in the twins) then agree to cosine >= 0.99999 with the same argmax,
the bound of the other step-equivalence tests (tests/test_decode_batch.py). On CUDA the replays must equal the
eager segments bit for bit (same kernels, same shapes).
"""

from __future__ import annotations

import pytest
import torch

from dsv4.engine.prefill_graphs import PrefillGraphs
from dsv4.model.state import ModelState, StepBatch

PAGE, PAGES = 128, 4


def _state(model):
    return ModelState(model.cfg, 3, 3 * PAGES, PAGE, model.dtype, next(model.parameters()).device)


def _pages(slot):
    return list(range(slot * PAGES, (slot + 1) * PAGES))


def _close(got, want, what):
    cos = torch.nn.functional.cosine_similarity(got.double().flatten(1), want.double().flatten(1), dim=-1)
    assert cos.min().item() >= 0.99999, (what, cos.min().item())


def _state_tensors(state):
    """Every tensor of the decode state: rings, paged entries and index keys, and the compressors' buffers."""
    out = []
    for layer in state.layers:
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor):
                out.append(value)
            elif hasattr(value, "__dict__"):                              # CompressorState
                out += [t for t in vars(value).values() if isinstance(t, torch.Tensor)]
    return out


@torch.no_grad()
def test_segments_equal_the_general_step(model):
    """Sequence A: a 128-token chunk (a bucket's exact size: equal bits, state included), then 100 tokens (padded
    to 128); then a mixed step: A's next 20 tokens with B's first 30 (one step of two sequences, padded to 64);
    then greedy decode steps through `model.step` on both states must agree."""
    graphs = PrefillGraphs(model, sizes=(64, 128), capture=False)
    ref_state, got_state = _state(model), _state(model)
    gen = torch.Generator().manual_seed(3)
    steps = [[(0, 0, 128)], [(0, 128, 100)], [(0, 228, 20), (1, 0, 30)]]
    for i, rows in enumerate(steps):
        ids = torch.randint(2, model.cfg.vocab_size, (1, sum(n for _, _, n in rows)), generator=gen)
        batch = StepBatch.build([(slot, start, n, _pages(slot)) for slot, start, n in rows], "cpu")
        want = model.step(ids, batch, ref_state)
        got = graphs.step(ids, batch, got_state)
        assert got.shape == want.shape
        if i == 0:
            assert torch.equal(got, want)
            tensors = list(zip(_state_tensors(got_state), _state_tensors(ref_state), strict=True))
            assert len(tensors) >= 2 * len(model.layers)                 # rings, entries, compressor buffers
            for a, b in tensors:
                assert torch.equal(a.nan_to_num(), b.nan_to_num())
        else:
            _close(got[0], want[0], f"step {i}")
    tokens = torch.tensor([[5, 7]])
    for step in range(6):                               # the decode state each path left behind
        batch = StepBatch.build([(0, 248 + step, 1, _pages(0)), (1, 30 + step, 1, _pages(1))], "cpu")
        want = model.main_logits(model.step(tokens, batch, ref_state))[0]
        got = model.main_logits(model.step(tokens, batch, got_state))[0]
        _close(got, want, f"decode {step}")
        assert torch.equal(got.argmax(-1), want.argmax(-1)), step
        tokens = want.argmax(-1).unsqueeze(0)


@torch.no_grad()
def test_buckets_share_one_arena_sized_by_the_largest_segment(model):
    """The segments and cores of every bucket exchange data through one arena, not through outputs kept per
    segment and core outputs kept per layer (for Flash's 43 layers ~6 GB of core outputs alone at a 2k bucket):
    two regions, each the largest segment's outputs at the largest bucket, and one core output of the largest
    bucket, whatever the depth and the number of buckets; every bucket's views lie in it."""
    from dsv4.engine.prefill_graphs import output_bytes, segment

    assert len(model.layers) >= 3
    graphs = PrefillGraphs(model, sizes=(32, 64), capture=False)
    gen = torch.Generator().manual_seed(5)
    for n in (50, 20):                                  # one step in each bucket
        ids = torch.randint(2, model.cfg.vocab_size, (1, n), generator=gen)
        graphs.step(ids, StepBatch.build([(0, 0, n, _pages(0))], "cpu"), _state(model))
    cfg, arena = model.cfg, graphs.buckets[64].arena
    ids, positions = torch.zeros(1, 64, dtype=torch.long), torch.zeros(64, dtype=torch.long)
    attn = [torch.zeros(1, 64, cfg.n_heads, cfg.head_dim, dtype=model.dtype)] * len(model.layers)
    largest, prev = 0, None
    for i in range(len(model.layers) + 1):
        prev = segment(model, i, ids, positions, prev, attn)
        largest = max(largest, output_bytes(prev))
    assert [p.numel() for p in arena.parts] == [largest, largest]
    assert arena.attn.shape == (1, 64, cfg.n_heads, cfg.head_dim)
    storages = {p.untyped_storage().data_ptr() for p in [*arena.parts, arena.attn]}
    for bucket in graphs.buckets.values():
        assert bucket.arena is arena and len(bucket.views) == len(model.layers) + 1
        for t in [*bucket.attn_out, *(v for views in bucket.views.values() for v in views
                                     if isinstance(v, torch.Tensor))]:
            assert t.untyped_storage().data_ptr() in storages


@torch.no_grad()
def test_compiled_sides_share_a_graph_per_block_kind_and_are_bit_identical(tmp_path):
    """`compile=`: each block's two per-token sides through one compiled function (static shapes per bucket), so
    layers whose side has the same kind reuse one graph: the input side (norms, q / kv / compressor / indexer
    projections) follows the attention ratio (0, 4, 128: three graphs for ratios 0, 4, 128, 4, 128), the output
    side (output projection, mHC, MoE) the routing (hash, top-k: two graphs); hidden states and decode state equal
    the uncompiled segments' bit for bit, exact and padded. The
    counting backend runs Dynamo's traced graphs as they are (inductor's CPU code generator fails on this model in
    torch 2.13; GPUs generate Triton)."""
    from compile_helpers import five_layer_model, graph_counter

    model, (counting, graphs) = five_layer_model(tmp_path), graph_counter()
    cfg = model.cfg
    plain, compiled = PrefillGraphs(model, sizes=(32,), capture=False), PrefillGraphs(model, sizes=(32,),
                                                                                      capture=False, compile=counting)
    want_state, got_state = _state(model), _state(model)
    gen = torch.Generator().manual_seed(6)
    # exact, then padded; 32 tokens: 8 ratio-4 entries for the indexer's top-4, the window passed, and two of the
    # experts' 32-row chunks (a Python loop, unrolled in the trace: tracing time grows with the bucket)
    for start, n in [(0, 32), (32, 22)]:
        ids = torch.randint(2, cfg.vocab_size, (1, n), generator=gen)
        batch = StepBatch.build([(0, start, n, _pages(0))], "cpu")
        assert torch.equal(compiled.step(ids, batch, got_state), plain.step(ids, batch, want_state)), (start, n)
    for a, b in zip(_state_tensors(got_state), _state_tensors(want_state), strict=True):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())
    assert len(graphs) == 3 + 2, len(graphs)           # one bucket: 10 sides, 5 graphs


@torch.no_grad()
def test_steps_longer_than_every_bucket_run_the_segments_at_their_length(tiny_model_fp32):
    """With `compile`, a step longer than every bucket runs the segments unpadded and uncaptured through sides
    compiled with dynamic token counts (`_long_step`): its data flow, here through the plain sides, is `model.step`
    bit for bit, decode state included. (The compiled sides' own check is the GPU test below: on a CPU the experts'
    twin loops over row chunks in Python, which Dynamo specialises per token count, and tracing takes minutes.)"""
    model = tiny_model_fp32
    graphs = PrefillGraphs(model, sizes=(32,), capture=False)
    graphs.long_sides = graphs.buckets[32].sides                # what compile= would compile, uncompiled
    called = []
    long_step = graphs._long_step
    graphs._long_step = lambda *a: called.append(1) or long_step(*a)
    want_state, got_state = _state(model), _state(model)
    gen = torch.Generator().manual_seed(8)
    for start, n in [(0, 40), (40, 150)]:
        ids = torch.randint(2, model.cfg.vocab_size, (1, n), generator=gen)
        batch = StepBatch.build([(0, start, n, _pages(0))], "cpu")
        assert torch.equal(graphs.step(ids, batch, got_state), model.step(ids, batch, want_state)), (start, n)
    assert len(called) == 2
    for a, b in zip(_state_tensors(got_state), _state_tensors(want_state), strict=True):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())
    ids = torch.randint(2, model.cfg.vocab_size, (1, 20), generator=gen)      # fits the bucket: padded, as before
    batch = StepBatch.build([(0, 190, 20, _pages(0))], "cpu")
    _close(graphs.step(ids, batch, got_state)[0], model.step(ids, batch, want_state)[0], "bucket step")
    assert len(called) == 2


@torch.no_grad()
def test_longer_steps_and_recorded_steps_take_the_general_step(tiny_model_fp32):
    from dsv4.parity.taps import Recorder

    model = tiny_model_fp32
    graphs = PrefillGraphs(model, sizes=(32,), capture=False)
    ids = torch.randint(2, model.cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(4))
    batch = StepBatch.build([(0, 0, 40, _pages(0))], "cpu")
    assert torch.equal(graphs.step(ids, batch, _state(model)), model.step(ids, batch, _state(model)))
    with Recorder() as rec:                             # taps: the segments skip the per-block "block.out" tap
        graphs.step(ids[:, :20], StepBatch.build([(0, 0, 20, _pages(0))], "cpu"), _state(model))
    assert any(name.endswith("block.out") for name in rec.tensors), "recorded steps must run model.step"


@pytest.mark.gpu
@torch.no_grad()
def test_replays_equal_the_eager_segments_on_cuda(tiny_ckpt):
    """bf16 on CUDA with the quantisation emulation: each replay equals the same padded segments run eagerly, bit
    for bit (the GPU's fast ops are not all row-invariant, so the comparison is with the padded eager run, as the
    decode graphs' test does); against `model.step` the cosine bound of a bf16 model."""
    import dsv4

    model = dsv4.load_model(tiny_ckpt, device="cuda", dtype=torch.bfloat16, progress=False)
    captured, eager = PrefillGraphs(model, sizes=(64, 128)), PrefillGraphs(model, sizes=(64, 128), capture=False)
    states = [_state(model) for _ in range(3)]
    gen = torch.Generator().manual_seed(5)
    for start, n in [(0, 128), (128, 100), (228, 50)]:
        ids = torch.randint(2, model.cfg.vocab_size, (1, n), generator=gen).cuda()
        batch = StepBatch.build([(0, start, n, _pages(0))], "cuda")
        got, again, want = (captured.step(ids, batch, states[0]), eager.step(ids, batch, states[1]),
                            model.step(ids, batch, states[2]))
        assert torch.equal(got, again), (start, n)
        cos = torch.nn.functional.cosine_similarity(got.double().flatten(1), want.double().flatten(1), dim=-1)
        assert cos.min().item() >= 0.999, (start, n, cos.min().item())


@pytest.mark.gpu
@torch.no_grad()
@pytest.mark.parametrize("emulation", [False, True], ids=["emulation-off", "emulation-on"])
def test_compiled_replays_match_the_general_step_on_cuda(tiny_ckpt, emulation):
    """`compile="inductor"` (EngineConfig.compile_prefill) against `model.step`, exact and padded, and the same decode
    state's effect on the next step. Inductor fuses element-wise work (its Triton kernels contract products into
    FMAs) and may sum in another order, so the check is in fp32, where that rounding is ~1e-7 (1 - cosine of a
    token's final hc streams: <= 6e-8 measured) and a semantic error (a lost state write, a wrong mask, padding
    leaking into the state) moves the streams of every token it reaches by O(1). But rounding that small still tips
    a discrete choice where two candidates are that close (a routing pick, the indexer's top-k, an FP8 rounding
    with the emulation), and the tipped token's keys reach later tokens through attention and the compressors.
    Measured on H100s (`scripts/bench/compiled_prefill_cases.py`; bench/results/h100_s26/): emulation off, one
    token at 8.4e-4 (token 34 of the padded (128, 100) step; the same padded segments run eagerly agree with
    `model.step` there to 3e-16) and every other within 6e-8; emulation on, 19 tokens of the long (150, 140) step
    from token 98 on, at most 4.5e-4. So the bound is per token in two classes: every token within 5e-3 (six times
    the largest flip seen; bf16's amplified rounding alone reaches 1.6e-2 here, a semantic error O(1)), the mean
    over all tokens within 1e-4 (the runs above: ~2e-6 and ~1e-5; a systematic error reaches most tokens), and the
    same next token from each step's last position where that position is within rounding (1e-5; a tipped token's
    next token may differ).
    Not in bf16: there 1-ulp changes are amplified into flips everywhere (`scripts/bench/compiled_side_diff.py`:
    every traced side and module call bit-equal to eager on CUDA but for RoPE's form, and cosine 0.998 from that)."""
    import dsv4

    torch._dynamo.reset()
    model = dsv4.load_model(tiny_ckpt, device="cuda", dtype=torch.float32, quant_emulation=emulation,
                            progress=False)
    # one bucket (every step below fills it or pads into it): each bucket compiles its five side graphs with
    # inductor, slow in fp32 (the first case took most of a 270 s call on an H100); the bucket choice is the CPU tests'
    compiled = PrefillGraphs(model, sizes=(128,), compile="inductor")
    states = [_state(model) for _ in range(2)]
    gen = torch.Generator().manual_seed(7)

    gaps = []                               # every checked token's 1 - cosine

    def check(got, want, start, n):         # final hc streams [1, n, hc, D]: each token's, then the next token
        cos = torch.nn.functional.cosine_similarity(got.double().flatten(2), want.double().flatten(2), dim=-1)[0]
        assert cos.min().item() >= 1 - 5e-3, (start, n, cos.argmin().item(), cos.min().item())
        gaps.append(1 - cos)
        if cos[-1].item() >= 1 - 1e-5:
            head = [model.logits(h[:, -1:], model.norm, model.hc_head_fn, model.hc_head_scale, model.hc_head_base)
                    for h in (got, want)]
            assert torch.equal(head[0].argmax(-1), head[1].argmax(-1)), (start, n)

    for start, n in [(0, 128), (128, 100), (228, 50), (278, 1)]:
        ids = torch.randint(2, model.cfg.vocab_size, (1, n), generator=gen).cuda()
        batch = StepBatch.build([(0, start, n, _pages(0))], "cuda")
        check(compiled.step(ids, batch, states[0]), model.step(ids, batch, states[1]), start, n)
    # longer than every bucket: the dynamic-shape sides, one compilation for every length (the fast ops are opaque
    # custom ops on CUDA, so nothing specialises on the token count)
    from torch._dynamo.utils import counters

    start, seen, states = 0, [], [_state(model) for _ in range(2)]
    for n in (150, 140, 160):                           # 450 positions: within the slot's 4 pages
        ids = torch.randint(2, model.cfg.vocab_size, (1, n), generator=gen).cuda()
        batch = StepBatch.build([(0, start, n, _pages(0))], "cuda")
        check(compiled.step(ids, batch, states[0]), model.step(ids, batch, states[1]), start, n)
        seen.append(counters["stats"]["unique_graphs"])
        start += n
    assert seen[0] == seen[-1], seen                    # no recompilation for new lengths
    gaps = torch.cat(gaps)
    assert gaps.mean().item() <= 1e-4, (gaps.mean().item(), (gaps > 1e-5).sum().item(), gaps.numel())
