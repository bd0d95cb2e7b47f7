"""The benchmark's CPU-checkable parts: the HBM-floor byte counts and the layer-by-layer transformers build."""

from __future__ import annotations

import pytest
import torch

from dsv4.bench import floor
from dsv4.config import ModelConfig


def test_floor_bytes_of_the_flash_benchmark_model():
    """TARGETS.md estimates ~1.04 GB of layer weights + 1.06 GB of head for 4 Flash layers at batch 1."""
    cfg = ModelConfig.preset("flash").truncated(4)
    parts = floor.decode_weight_bytes(cfg, 1)
    assert parts["head"] == 129280 * 4096 * 2
    layers = parts["dense"] + parts["routed_experts"]
    assert 0.9e9 < layers < 1.2e9, layers
    # one FP4 expert: 3 matrices of 2048 x 4096 values at 4 bits + one e8m0 byte per 32 values
    assert parts["routed_experts"] == pytest.approx(4 * 6 * 3 * (2048 * 4096 // 2 + 2048 * 4096 // 32))


def test_distinct_experts_and_cache_bytes():
    assert floor.expected_distinct_experts(256, 6, 1) == pytest.approx(6)
    assert floor.expected_distinct_experts(256, 6, 64) == pytest.approx(256 * (1 - (250 / 256) ** 64))
    cfg = ModelConfig.preset("flash").truncated(4)               # ratios 0, 0, 4, 128
    ring = 128 * 512 * 2
    want = 4 * ring + (min(1024 // 4, 512) * 512 + 1024 // 4 * 128) * 2 + 1024 // 128 * 512 * 2
    assert floor.decode_cache_bytes(cfg, 1, 1024) == want


def test_hf_model_built_layer_by_layer_runs_the_same_weights(tiny_ckpt):
    from dsv4.parity.hf_oracle import dequantize_checkpoint, hf_forward, load_hf_model, transformers_status

    ok, why = transformers_status()
    if not ok:
        pytest.skip(why)
    from dsv4.bench.hf_model import build_hf_model
    from dsv4.checkpoint import open_checkpoint

    cfg, reader = open_checkpoint(tiny_ckpt)
    tensors = {n: reader.get(n) for n in reader}
    ours = build_hf_model(cfg, tensors, "cpu")
    oracle = load_hf_model(cfg.to_hf(), dequantize_checkpoint(tiny_ckpt), dtype=torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = ours(input_ids=ids).logits.float()
    want = hf_forward(oracle, ids)["logits"]
    assert torch.equal(got, want.to(got.dtype))


def test_ratios_and_table_of_a_timing_only_run():
    """`--timing-only` leaves out the agreement measures: the ratios and the table are still made, without a
    greedy_agreement key (nothing invented for what was not measured)."""
    from dsv4.bench.run import BenchOptions, _ratios, table

    t = {"median_s": 2e-3, "floor_s": 5e-4, "tok_per_s": 500.0}
    res = {"dsv4": {"decode": {1: t, 64: {**t, "median_s": 2e-2, "tok_per_s": 3200.0}},
                    "prefill": {1024: {"median_s": 0.04, "floor_s": 0.004}, 8192: {"error": "OOM", "floor_s": 0.03}}},
           "transformers": {"decode": {1: {"median_s": 0.025}}, "prefill": {1024: {"median_s": 0.043}}}}
    res["dsv4"]["decode"][1]["replay_s"] = 1.5e-3                 # the captured step alone (GPU runs only)
    res["dsv4"]["decode"][1]["serial"] = {"median_s": 2.5e-3}      # the serial step beside the pipelined one
    _ratios(res, BenchOptions(timing_only=True))
    assert res["decode_bs1_floor_ratio"] == 4.0 and res["decode_bs64_over_bs1_throughput"] == 6.4
    assert res["decode_bs1_replay_ms"] == 1.5 and "decode_bs64_replay_ms" not in res
    assert res["decode_bs1_serial_ms"] == 2.5 and res["decode_bs1_serial_floor_ratio"] == 5.0
    assert "decode_bs64_serial_ms" not in res
    assert res["decode_bs64_floor_ratio"] == 40.0 and abs(res["prefill_1k_floor_ratio"] - 10.0) < 1e-12
    assert "prefill_8k_floor_ratio" not in res                     # not measured: no ratio invented
    assert abs(res["prefill_1k_speedup_vs_transformers"] - 1.075) < 1e-12 and "greedy_agreement" not in res
    assert "decode_bs1_speedup_vs_transformers" in table(res) and "greedy_agreement" not in table(res)
    assert "eager step" not in table(res)              # the eager step's rows, when timed beside the default
    res["dsv4"]["prefill_eager"] = {1024: {"median_s": 0.05}, 8192: {"error": "OOM"}}
    lines = table(res).splitlines()
    assert any(line.startswith("prefill 1024 ms, eager step") and "50.0" in line for line in lines)
    assert any(line.startswith("prefill 8192 ms, eager step") and "error" in line for line in lines)


def test_prefill_floor_is_the_larger_of_compute_and_weight_reads():
    """At Flash width (4 layers) a 1k prefill reads every expert (the weight read bounds it) and an 8k prefill
    is compute-bound; FLOPs count 2 per active weight element per token (dense + k routed experts), the head once,
    plus attention, which grows faster than linearly with the length."""
    from dsv4.bench import floor
    from dsv4.config import ModelConfig

    cfg = ModelConfig.preset("flash").truncated(4)
    el = floor.active_weight_elements(cfg)
    assert el["routed"] == 3 * cfg.n_activated_experts * cfg.dim * cfg.moe_inter_dim * cfg.n_layers
    assert el["head"] == cfg.vocab_size * cfg.dim
    one, eight = floor.prefill_floor(cfg, 1024, 4.2e12), floor.prefill_floor(cfg, 8192, 4.2e12)
    assert one["floor_s"] == one["read_s"] > one["compute_s"]
    assert eight["floor_s"] == eight["compute_s"] > eight["read_s"]
    assert eight["attention_flops"] > 8 * one["attention_flops"]
    assert abs(one["flops"] - 2 * 1024 * (el["dense"] + el["routed"]) - 2 * el["head"] - one["attention_flops"]) < 1
    assert floor.native_bytes(cfg) == sum(s.nbytes for s in floor.inventory(cfg).values())


def test_deep_figures_time_the_head_on_hc_streams(tiny_cfg, monkeypatch):
    """`dsv4 bench --layers N` depth figures (bench/run.py `_deep`): the head is timed on hyper-connection streams
    [1, batch, hc, D] as the decode step feeds it (the H200 run of 2026-12-03 crashed feeding it [1, batch, D])."""
    import dsv4.bench.run as run
    from dsv4.checkpoint.synth import synthesize_tensors
    from dsv4.loader import load_tensors

    model = load_tensors(tiny_cfg, synthesize_tensors(tiny_cfg, 0, torch.device("cpu")), torch.device("cpu"),
                         torch.bfloat16, quant_emulation=False)
    shapes = []

    def fake_cuda_time(fn, n):                  # CPU stand-in for the CUDA-event timer: runs fn once
        shapes.append(tuple(fn().shape))
        return [1e-3] * n

    monkeypatch.setattr(run, "cuda_time", fake_cuda_time)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (64 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda dev=None: 2**30)
    opts = run.BenchOptions(decode_batches=(1, 2), prefill=(), log=[])
    res = {"dsv4": {"decode": {1: {"median_s": 3e-3}, 2: {"median_s": 4e-3}}, "prefill": {}}}
    run._deep(model, tiny_cfg, opts, res)
    assert shapes == [(1, 1, tiny_cfg.vocab_size), (1, 2, tiny_cfg.vocab_size)]
    assert res["deep_per_layer_decode_ms"][1] == pytest.approx((3e-3 - 1e-3) / tiny_cfg.n_layers * 1e3)
    assert res["deep_longest_context"] > 0 and "projected_full_flash_tp2_tpot_bs1_ms" in res
    # the longest context is the smaller of what memory holds and the model's YaRN-stretched limit
    assert res["deep_model_max_context"] == tiny_cfg.original_seq_len * tiny_cfg.rope_factor
    assert res["deep_longest_context"] == min(res["deep_context_capacity_tokens"], res["deep_model_max_context"])


@pytest.mark.gpu
def test_pipelined_decode_gives_the_serial_tokens_and_still_checks(tiny_ckpt):
    """The bench's pipelined decode (`step(defer_check=True)`, each step's NaN/inf check read a step later) runs
    the same captured steps as the serial one: the same greedy tokens. A failed check still raises, a step later
    at the latest (at `finish()` for the last)."""
    import dsv4
    from dsv4.bench.timing import Dsv4Decoder, pipelined_time

    model = dsv4.load_model(tiny_ckpt, device="cuda", dtype=torch.bfloat16, quant_emulation=True)
    serial, piped = (Dsv4Decoder(model, 2, 40, 24, seed=3, graphs=True) for _ in range(2))
    want = [serial.step().clone() for _ in range(6)]
    got = [piped.step(defer_check=True).clone() for _ in range(6)]
    piped.finish()
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    assert pipelined_time(piped, 4) > 0
    piped._queue_check(torch.tensor(False, device="cuda"))          # a step whose logits were not all finite
    with pytest.raises(FloatingPointError):
        piped.finish()
