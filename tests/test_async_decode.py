"""Async decode (engine/engine.py; bench/NOTES.md, thirty-fourth session) against the serial engine on the tiny
model (fp32), forced on with the CPU's fixed-shape decode path: the same request mix run both ways gives identical
tokens, text, finish and stop reasons, and logprobs (to the bit where the two engines' steps have the same shapes,
to rounding where not: the CPU's step is not batch-invariant), through stops of every kind, arrivals, aborts,
batch growth and shrink, page-boundary crossings, the prefix cache, preemption and a grammar; a stopped
sequence's extra token is never shown and its pages come back; NaN logits still raise before their step's tokens
are returned."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dsv4.engine.config import EngineConfig
from dsv4.engine.engine import Engine
from dsv4.engine.sampling import SamplingParams


def make_engine(model, tokenizer, async_decode: bool | None, **options):
    options = {"max_num_seqs": 8, "page_size": 128, "num_pages": 32, "max_num_batched_tokens": 256,
               "decode_batch": True, "async_decode": async_decode} | options
    return Engine(model, tokenizer, EngineConfig(**options))


def tokens(n, seed):
    return torch.randint(2, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(max_tokens, **kw):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **{"ignore_eos": True} | kw)


def seeded(max_tokens, seed, **kw):
    return SamplingParams(temperature=0.8, top_p=0.9, seed=seed, max_tokens=max_tokens, ignore_eos=True, **kw)


class Ahead:
    """Counts the steps `decode_ahead` launched with their ids from the step in flight (on the device)."""

    def __init__(self, engine):
        self.from_device = 0
        inner = engine.runner.decode_ahead

        def counted(seqs, after):
            self.from_device += after is not None
            return inner(seqs, after)

        engine.runner.decode_ahead = counted


def drive(engine, start, events=()):
    """Add `start` [(rid, prompt, params)], then step to the end; `events` [((rid, n), action)] run once request
    rid has n tokens in its first completion (or finished): ("add", rid, prompt, params) or ("abort", rid).
    Conditions are on what the caller sees, as a server's would be. Returns (outputs by rid, a snapshot of each
    output taken when `step()` first reported it finished)."""
    outs = {rid: engine.add_request(rid, p, sp) for rid, p, sp in start}
    pending, at_finish = list(events), {}
    for _ in range(10_000):
        for event in [e for e in pending if _due(outs, *e[0])]:
            pending.remove(event)
            action, rid, *args = event[1]
            if action == "add":
                outs[rid] = engine.add_request(rid, *args)
            else:
                engine.abort(rid)
        if not engine.has_unfinished() and not pending:
            break
        for out in engine.step():
            if out.finished and out.request_id not in at_finish:
                at_finish[out.request_id] = outcome(out)
        engine.scheduler.check_invariants()
    assert not engine.has_unfinished() and not pending, "engine does not terminate"
    return outs, at_finish


def _due(outs, rid, n):
    return rid in outs and (len(outs[rid].outputs[0].token_ids) >= n or outs[rid].finished)


def outcome(out):
    return (out.finished, out.num_cached_tokens,
            [(c.token_ids, c.text, c.finish_reason, c.stop_reason, c.logprobs, c.cumulative_logprob)
             for c in out.outputs])


def both_ways(model, tokenizer, start, events=(), exact=True, **options):
    """(serial engine, its outputs), (async engine, its outputs): every output identical (`exact=False`: logprobs
    to rounding), none changed after it was reported finished, and no page, slot or cached block left differently."""
    runs = []
    for on in (False, True):
        engine = make_engine(model, tokenizer, on, **options)
        ahead = Ahead(engine)
        outs, at_finish = drive(engine, start, events)
        assert {rid: outcome(o) for rid, o in outs.items() if rid in at_finish} == at_finish
        assert (ahead.from_device > 0) == on, "async decode did not run (or ran when off)"
        runs.append((engine, {rid: outcome(o) for rid, o in outs.items()}))
    (serial, want), (fast, got) = runs
    assert got == want if exact else _rounded(got) == _rounded(want)
    for engine in (serial, fast):
        engine.cache.check_invariants()
        assert engine.cache.slots.num_used == 0 and engine.cache.pages.num_used == 0
    assert fast.cache.pages.num_free == serial.cache.pages.num_free
    assert fast.cache.pages.num_clean == serial.cache.pages.num_clean               # the same blocks cached
    assert fast.num_preemptions == serial.num_preemptions
    return runs


def _rounded(outcomes):
    """Logprobs to 6 significant digits: a request added while a step is in flight joins one decode step later
    than serially (that step was launched before it came), so companions' tokens are computed in other batches
    (a pure decode step instead of a mixed one), and on a CPU the engine's steps are batch-invariant only to
    rounding (it is so serially too: a request alone and beside others)."""
    def lps(c):
        tops = None if c[4] is None else [{t: float(f"{lp:.6g}") for t, lp in d.items()} for d in c[4]]
        return (*c[:4], tops, float(f"{c[5]:.6g}"))
    return {rid: (o[0], o[1], [lps(c) for c in o[2]]) for rid, o in outcomes.items()}


@pytest.fixture
def eos_model(tiny_model_fp32, monkeypatch):
    """The tiny model with a settable EOS id (the engine reads `model.cfg.eos_token_id`)."""
    def set_eos(token_id):
        monkeypatch.setattr(tiny_model_fp32, "cfg", dataclasses.replace(tiny_model_fp32.cfg, eos_token_id=token_id))
    return tiny_model_fp32, set_eos


@pytest.fixture(params=["one-bucket", "buckets"])
def exact(request, monkeypatch):
    """"one-bucket": every decode step padded to one batch size, so the serial and the async step have the same
    shape; "buckets" (the engine's powers of two): an async step also holds the rows of the sequences that stopped
    at the step before, which can lift it into the next bucket, and on a CPU a row's bits depend on the bucket
    (as serially, a request's with and without companions): logprobs then agree to rounding."""
    if request.param == "one-bucket":
        from dsv4.engine import graphs

        monkeypatch.setattr(graphs, "buckets_up_to", lambda max_batch: [max_batch])
    return request.param == "one-bucket"


def test_outputs_equal_the_serial_engine_through_stops_aborts_and_prefix_hits(eos_model, tokenizer, exact):
    """Every kind of stop at a different step, batch shrink, an abort, n = 2, logprobs and penalties, a page
    boundary crossed while decoding, a prefix-cache hit (a 128-token budget admits "hit" a step after "long"
    computed the shared block): identical, to the bit where the steps' shapes are (`exact`)."""
    model, set_eos = eos_model
    p_stop, p_str, p_eos = tokens(126, 1), tokens(30, 2), tokens(70, 3)
    free, _ = drive(make_engine(model, tokenizer, False),
                    [("a", p_stop, greedy(12)), ("b", p_str, greedy(12)), ("c", p_eos, greedy(12))])
    text = free["b"].text
    stop_str = text[len(text) // 2: len(text) // 2 + 2]
    assert stop_str.strip(), "degenerate random text"
    set_eos(free["c"].token_ids[5])
    shared = tokens(130, 4)
    start = [("long", shared, greedy(16, logprobs=1)),
             ("hit", shared[:128] + tokens(20, 7), greedy(6)),
             ("stop_id", p_stop, greedy(12, stop_token_ids=[free["a"].token_ids[3]])),  # crosses position 128
             ("stop_str", p_str, greedy(12, stop=[stop_str])),
             ("eos", p_eos, greedy(12, ignore_eos=False)),
             ("sampled", tokens(40, 5), seeded(10, 7, logprobs=2)),
             ("n2", tokens(60, 6), seeded(8, 11, n=2, repetition_penalty=1.2, presence_penalty=0.5))]
    events = [(("sampled", 4), ("abort", "n2"))]
    (_, want), _ = both_ways(model, tokenizer, start, events, exact, max_num_batched_tokens=128)
    reasons = [want[r][2][0][2] for r in ("stop_id", "stop_str", "eos", "n2", "long")]
    assert reasons == ["stop", "stop", "stop", "abort", "length"]
    assert want["stop_str"][2][0][3] == stop_str and want["eos"][2][0][3] == model.cfg.eos_token_id
    assert want["hit"][1] == 128


def test_requests_arriving_mid_decode_get_the_serial_tokens(tiny_model_fp32, tokenizer):
    """Arrivals (batch growth; a prefix-cache hit; one whose token after its last lands on a new page) while
    others decode and stop. An arrival joins a step later than serially: tokens, text and stops identical,
    logprobs to rounding (`_rounded`)."""
    shared = tokens(130, 4)
    start = [("long", shared, greedy(20)), ("sampled", tokens(40, 5), seeded(12, 7, logprobs=2)),
             ("short", tokens(126, 1), greedy(4))]
    events = [(("long", 3), ("add", "hit", shared[:128] + tokens(20, 7), greedy(6))),
              (("short", 4), ("add", "boundary", tokens(120, 8), greedy(9))),         # extra token on page 2
              (("boundary", 2), ("add", "late", tokens(9, 9), seeded(5, 3, logprobs=0)))]
    (_, want), _ = both_ways(tiny_model_fp32, tokenizer, start, events, exact=False)
    assert want["hit"][1] == 128 and all(o[0] for o in want.values())


def test_preemption_and_chunked_prefill_with_a_tight_cache_equal_serial(tiny_model_fp32, tokenizer):
    """4 slots, 6 pages and a 100-token budget: preemption and chunked prefill, so the engine keeps switching
    between async and serial steps (each switch drains the step in flight)."""
    start = [(f"r{i}", tokens(n, 20 + i), greedy(24) if i % 2 else seeded(24, i))
             for i, n in enumerate([3, 40, 130, 257, 7, 120, 64, 129])]
    (serial, _), _ = both_ways(tiny_model_fp32, tokenizer, start, max_num_seqs=4, num_pages=6,
                               max_num_batched_tokens=100)
    assert serial.num_preemptions > 0, "the cache was meant to be too small"


def test_a_stopped_sequences_extra_token_is_never_shown_and_its_pages_come_back(tiny_model_fp32, tokenizer):
    """120 prompt tokens + 9: serially the last token fed is at position 127 (page 1); async, the token after the
    last is fed at 128, on a second page grown for it and freed with the rest in the call that reads the last
    token. Its companion runs on."""
    start = [("short", tokens(120, 30), greedy(9)), ("companion", tokens(50, 31), greedy(20))]
    engine = make_engine(tiny_model_fp32, tokenizer, True)
    short = engine.add_request(*start[0])
    engine.add_request(*start[1])
    seq = engine.requests["short"].seqs[0]
    launched, reported = [], []
    inner = engine.runner.decode_ahead
    engine.runner.decode_ahead = lambda seqs, after: launched.append(len(seq.pages)) or inner(seqs, after)
    while engine.has_unfinished():
        reported += [list(o.token_ids) for o in engine.step() if o.request_id == "short"]
        engine.scheduler.check_invariants()
        if short.finished:
            assert seq.pages == [] and seq.slot is None
    assert max(launched) == 2 and all(len(r) <= 9 for r in reported) and reported[-1] == short.token_ids
    assert engine._inflight is None and engine.cache.pages.num_used == 0         # nothing left running unread
    both_ways(tiny_model_fp32, tokenizer, start)


def test_a_grammar_in_the_batch_keeps_steps_serial_and_outputs_equal(monkeypatch):
    """A constrained request's masks need its tokens on the host: while it runs every step is serial; once it
    finished, its companions run ahead. The built-in model and tokenizer (`dsv4.LLM`), one engine run both ways
    (one bucket: the steps' shapes equal, see `exact`)."""
    import dsv4
    from dsv4.engine import graphs
    from dsv4.engine.structured import StructuredOutputsParams

    monkeypatch.setattr(graphs, "buckets_up_to", lambda max_batch: [max_batch])
    llm = dsv4.LLM(dtype=torch.float32, max_num_seqs=4, decode_batch=True, async_decode=True,
                   enable_prefix_caching=False)
    ahead = Ahead(llm.engine)
    so = StructuredOutputsParams(choice=["alpha", "beta"])
    prompts = ["import os", "def f():", "x = 1"]
    params = [SamplingParams(max_tokens=8, seed=1), SamplingParams(max_tokens=8, seed=3, structured_outputs=so),
              SamplingParams(max_tokens=12, seed=2, logprobs=1)]
    runs = []
    for on in (False, True):
        llm.engine.async_decode = on
        runs.append([outcome(o) for o in llm.generate(prompts, params, use_tqdm=False)])
    assert runs[1] == runs[0] and runs[0][1][2][0][1] in ("alpha", "beta")
    assert ahead.from_device > 0


def test_nan_logits_in_an_async_step_raise_before_its_tokens_are_returned(tiny_ckpt, tokenizer):
    """The step launched with NaN logits is read one call later: that call raises, and no token of it (nor of the
    step launched behind it) reached the output."""
    import dsv4

    model = dsv4.load_model(tiny_ckpt, quant_emulation=False, progress=False)
    engine = make_engine(model, tokenizer, True)
    out = engine.add_request("n", tokens(10, 1), SamplingParams(max_tokens=4))
    engine.step()                                               # the prefill step (serial): its token is read
    first = list(out.outputs[0].token_ids)
    assert len(first) == 1
    with torch.no_grad():
        model.head.weight[7, 0] = float("nan")
    assert engine.step() == []                                  # launched ahead, nothing read yet
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        engine.step()
    assert out.outputs[0].token_ids == first and not out.finished


def test_the_switch_follows_capture_by_default_and_needs_the_fixed_shape_path(tiny_model_fp32, tokenizer):
    """None by default: on where decode steps are captured (CUDA: batch-invariant there, the GPU test below, run in
    the thirty-fifth session), so off on a CPU (a row's bits depend on the padded bucket there); True needs the
    fixed-shape path and no speculation, and says so."""
    assert EngineConfig().async_decode is None
    assert not Engine(tiny_model_fp32, tokenizer, EngineConfig(decode_batch=True, num_pages=8)).async_decode
    assert not make_engine(tiny_model_fp32, tokenizer, None).async_decode
    assert make_engine(tiny_model_fp32, tokenizer, True).async_decode
    with pytest.raises(ValueError, match="fixed-shape decode path"):
        make_engine(tiny_model_fp32, tokenizer, True, decode_batch=False)
    with pytest.raises(ValueError, match="speculative"):
        make_engine(tiny_model_fp32, tokenizer, True, num_speculative_tokens=1)


@pytest.mark.gpu
def test_cuda_async_decode_equals_serial_with_the_engines_buckets(tiny_ckpt, tokenizer):
    """The question that kept `async_decode` off by default until it passed (thirty-fifth session): on CUDA
    (captured steps, power-of-two buckets, bf16 with the QAT emulation, the production path) is the async engine
    bit-identical to the serial one? An async step's bucket can be larger (the rows of sequences that stopped at
    the step before), so this holds only if the captured step is batch-invariant across buckets."""
    import dsv4

    model = dsv4.load_model(tiny_ckpt, device="cuda", dtype=torch.bfloat16, quant_emulation=True, progress=False)
    shared = tokens(130, 4)
    start = [("long", shared, greedy(16, logprobs=1)), ("hit", shared[:128] + tokens(20, 7), greedy(6)),
             ("stop_id", tokens(126, 1), greedy(12, stop_token_ids=[300])), ("b", tokens(30, 2), greedy(7)),
             ("c", tokens(70, 3), greedy(5)), ("sampled", tokens(40, 5), seeded(10, 7, logprobs=2)),
             ("n2", tokens(60, 6), seeded(8, 11, n=2, repetition_penalty=1.2))]
    both_ways(model, tokenizer, start, [(("sampled", 4), ("abort", "n2"))], device="cuda",
              max_num_batched_tokens=128)
