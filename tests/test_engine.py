"""The engine end to end on the tiny model (fp32): outputs equal an independent stateless loop, do not depend on
batch companions or memory pressure, and every stop rule and error behaves."""

from __future__ import annotations

import pytest
import torch

from dsv4.engine.engine import Engine, RequestError
from dsv4.engine.sampling import SamplingParams
from dsv4.simple_generate import generate_ids


def make_engine(model, tokenizer, **options):
    from dsv4.engine.config import EngineConfig

    options = {"max_num_seqs": 8, "page_size": 128, "num_pages": 64, "max_num_batched_tokens": 256} | options
    return Engine(model, tokenizer, EngineConfig(**options))


def run(engine, prompts, params):
    outs = [engine.add_request(f"r{i}", p, params[i] if isinstance(params, list) else params)
            for i, p in enumerate(prompts)]
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
        assert steps < 10_000, "engine does not terminate"
    return outs


def prompt(n, seed):
    return torch.randint(2, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def test_greedy_equals_the_stateless_full_forward_loop(tiny_model_fp32, tokenizer):
    p = prompt(150, 0)
    want = list(generate_ids(tiny_model_fp32, p, 12, stop_ids=()))
    out = run(make_engine(tiny_model_fp32, tokenizer), [p], GREEDY)[0]
    assert out.token_ids == want and out.finish_reason == "length" and out.finished


def test_batched_chunked_and_preempted_outputs_equal_each_run_alone(tiny_model_fp32, tokenizer):
    prompts = [prompt(n, i) for i, n in enumerate([3, 40, 130, 257, 7, 300, 64, 129, 5, 90])]
    alone = [run(make_engine(tiny_model_fp32, tokenizer), [p], GREEDY)[0].token_ids for p in prompts]
    # 10 requests, 4 slots, a 100-token budget (chunked prefill) and a cache too small for all: preemption.
    engine = make_engine(tiny_model_fp32, tokenizer, max_num_seqs=4, num_pages=6, max_num_batched_tokens=100)
    outs = run(engine, prompts, GREEDY)
    assert [o.token_ids for o in outs] == alone
    assert engine.num_preemptions > 0, "the cache was meant to be too small"
    assert engine.cache.slots.num_used == 0 and engine.cache.pages.num_used == 0


def test_fixed_shape_decode_path_gives_the_same_tokens(tiny_model_fp32, tokenizer):
    """The decode path CUDA graphs capture, run eagerly on CPU: batches padded up to buckets (1, 2, 4, 5) with
    scratch rows, preemption included; greedy tokens equal each request run alone through the general path."""
    prompts = [prompt(n, 20 + i) for i, n in enumerate([3, 40, 130, 17, 7, 64])]
    alone = [run(make_engine(tiny_model_fp32, tokenizer), [p], GREEDY)[0].token_ids for p in prompts]
    engine = make_engine(tiny_model_fp32, tokenizer, max_num_seqs=5, num_pages=5, decode_batch=True)
    assert sorted(engine.runner.graphs.graphs) == [1, 2, 4, 5]
    outs = run(engine, prompts, GREEDY)
    assert [o.token_ids for o in outs] == alone
    assert engine.cache.slots.num_used == 0 and engine.cache.pages.num_used == 0


def test_prefill_graphs_give_the_same_tokens(tiny_model_fp32, tokenizer):
    """General steps through `PrefillGraphs` (engine/prefill_graphs.py), run eagerly on CPU: chunked prefills and
    mixed steps padded up to token buckets (the budget, 100, is the only one here); greedy tokens equal each
    request run alone through `model.step`."""
    prompts = [prompt(n, 30 + i) for i, n in enumerate([3, 40, 130, 257, 7, 90])]
    alone = [run(make_engine(tiny_model_fp32, tokenizer), [p], GREEDY)[0].token_ids for p in prompts]
    engine = make_engine(tiny_model_fp32, tokenizer, max_num_seqs=4, max_num_batched_tokens=100, prefill_graphs=True)
    assert sorted(engine.runner.step.__self__.buckets) == [100]
    outs = run(engine, prompts, GREEDY)
    assert [o.token_ids for o in outs] == alone


@pytest.mark.gpu
def test_cuda_defaults_give_the_same_tokens(tiny_ckpt, tokenizer):
    """The engine's CUDA defaults (captured decode steps, prefill chunks and mixed steps through captured
    `PrefillGraphs` segments padded to token buckets) against each request run alone as eager general steps:
    the same greedy tokens (fp32; the quantisation emulation puts the GEMMs' inputs on the FP8 grid)."""
    import dsv4

    model = dsv4.load_model(tiny_ckpt, device="cuda", dtype=torch.float32, progress=False)
    prompts = [prompt(n, 60 + i) for i, n in enumerate([3, 40, 130, 257, 7, 290])]
    eager = {"cuda_graphs": False, "prefill_graphs": False}
    alone = [run(make_engine(model, tokenizer, **eager), [p], GREEDY)[0].token_ids for p in prompts]
    engine = make_engine(model, tokenizer, max_num_seqs=4, max_num_batched_tokens=300)
    assert engine.runner.graphs is not None and sorted(engine.runner.step.__self__.buckets) == [256, 300]
    assert engine.runner.step.__self__.buckets[256].graphs is not None                 # captured, not eager
    outs = run(engine, prompts, GREEDY)
    assert [o.token_ids for o in outs] == alone


def test_seeded_sampling_ignores_batch_companions(tiny_model_fp32, tokenizer):
    p = prompt(20, 5)
    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    alone = run(make_engine(tiny_model_fp32, tokenizer), [p], sp)[0].token_ids
    others = [prompt(n, 50 + n) for n in (9, 33, 70)]
    batch = run(make_engine(tiny_model_fp32, tokenizer), [*others, p],
                [SamplingParams(temperature=0.8, max_tokens=10)] * 3 + [sp])
    assert batch[-1].token_ids == alone
    other_seed = run(make_engine(tiny_model_fp32, tokenizer), [p], SamplingParams(
        temperature=1.0, top_p=0.9, seed=99, max_tokens=10, ignore_eos=True))[0].token_ids
    assert other_seed != alone


def test_stop_token_ids_eos_and_max_tokens(tiny_model_fp32, tokenizer):
    p = prompt(30, 7)
    free = run(make_engine(tiny_model_fp32, tokenizer), [p], GREEDY)[0].token_ids
    stop_at = free[4]
    out = run(make_engine(tiny_model_fp32, tokenizer), [p],
              SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_at], ignore_eos=True))[0]
    cut = free.index(stop_at) + 1
    assert out.token_ids == free[:cut] and out.finish_reason == "stop" and out.outputs[0].stop_reason == stop_at
    short = run(make_engine(tiny_model_fp32, tokenizer), [p], SamplingParams(temperature=0, max_tokens=3))[0]
    assert len(short.token_ids) <= 3


def test_stop_strings_are_not_emitted(tiny_model_fp32, tokenizer):
    p = prompt(25, 8)
    free = run(make_engine(tiny_model_fp32, tokenizer), [p], GREEDY)[0]
    text = free.text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    if not stop.strip():
        pytest.skip("degenerate random text")
    out = run(make_engine(tiny_model_fp32, tokenizer), [p],
              SamplingParams(temperature=0, max_tokens=12, stop=[stop], ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop
    assert out.text == text[:text.index(stop)]


def test_logprobs_are_the_model_distribution(tiny_model_fp32, tokenizer):
    p = prompt(12, 9)
    out = run(make_engine(tiny_model_fp32, tokenizer), [p],
              SamplingParams(temperature=0, max_tokens=2, logprobs=3, ignore_eos=True))[0]
    with torch.no_grad():
        want = torch.log_softmax(tiny_model_fp32(torch.tensor([p]))[0, -1], -1)
    first = out.logprobs[0]
    assert len(first) == 3 and out.token_ids[0] in first
    for t, lp in first.items():
        assert abs(lp - want[t].item()) < 1e-4


def test_bad_requests_are_clear_errors(tiny_model_fp32, tokenizer):
    engine = make_engine(tiny_model_fp32, tokenizer, max_model_len=200)
    with pytest.raises(RequestError, match="exceeds the context length 200"):
        engine.add_request("a", prompt(190, 1), SamplingParams(max_tokens=20))
    with pytest.raises(RequestError, match="empty"):
        engine.add_request("b", [], SamplingParams())
    with pytest.raises(RequestError, match="token ids"):
        engine.add_request("c", [1, 2, 10**6], SamplingParams())
    engine.add_request("d", [5, 6], SamplingParams(max_tokens=2))
    with pytest.raises(RequestError, match="already in use"):
        engine.add_request("d", [5, 6], SamplingParams())
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    engine.abort("d")
    assert not engine.has_unfinished() and engine.cache.pages.num_used == 0


def test_abort_frees_everything_at_once(tiny_model_fp32, tokenizer):
    engine = make_engine(tiny_model_fp32, tokenizer)
    engine.add_request("x", prompt(200, 3), SamplingParams(max_tokens=50))
    engine.step()
    assert engine.cache.pages.num_used > 0
    engine.abort("x")
    assert engine.cache.pages.num_used == 0 and engine.cache.slots.num_used == 0


def test_nan_logits_are_an_error_not_text(tiny_ckpt, tokenizer):
    import dsv4

    model = dsv4.load_model(tiny_ckpt, quant_emulation=False, progress=False)
    model.head.weight[7, 0] = float("nan")
    engine = make_engine(model, tokenizer)
    engine.add_request("n", prompt(10, 1), SamplingParams(max_tokens=2))
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        engine.step()


def test_an_explicit_context_length_beyond_max_seq_len_is_honoured(tiny_model_fp32, tokenizer):
    """max_seq_len is only the default context (a runtime choice; config.json does not store it)."""
    cfg = tiny_model_fp32.cfg
    longer = cfg.max_seq_len + 512
    engine = make_engine(tiny_model_fp32, tokenizer, max_model_len=longer, num_pages=-(-longer // 128) + 2)
    assert engine.max_model_len == longer
    assert make_engine(tiny_model_fp32, tokenizer).max_model_len == cfg.max_seq_len
    out = run(engine, [prompt(cfg.max_seq_len + 8, 5)], SamplingParams(temperature=0.0, max_tokens=2))[0]
    assert out.finished and len(out.token_ids) == 2


def test_nan_logits_in_a_decode_step_are_an_error_not_text(tiny_ckpt, tokenizer):
    """The fixed-shape decode path (`decode_batch=True`: what CUDA graphs replay) reads its NaN/inf check with the
    sampled ids, after sampling: the error must still come before any token of that step reaches the output."""
    import dsv4

    model = dsv4.load_model(tiny_ckpt, quant_emulation=False, progress=False)
    engine = make_engine(model, tokenizer, decode_batch=True)
    out = engine.add_request("n", prompt(10, 1), SamplingParams(max_tokens=4))
    engine.step()                                               # the prefill step: its token is sampled
    assert len(out.outputs[0].token_ids) == 1
    calls = []
    run = engine.runner.graphs.run
    engine.runner.graphs.run = lambda *a, **k: calls.append(k) or run(*a, **k)
    with torch.no_grad():
        model.head.weight[7, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        engine.step()
    assert calls == [{"check": False}]                          # the decode path ran, and left the check to _sample
    assert out.outputs[0].token_ids == [out.outputs[0].token_ids[0]] and not out.finished
