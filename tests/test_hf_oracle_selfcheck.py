"""Self-check of the transformers oracle (dsv4.parity.hf_oracle) against DeepSeek's official reference.

The official tiny checkpoint is dequantised, loaded into transformers' DeepseekV4ForCausalLM through the bridge, and
the 392 reference tokens are run as one full sequence (fp32, no quantisation emulation). Expected: the logits of
``reference_quant_off_fp32.safetensors`` (row p = logits after token p; rows >= 320 came from the reference's decode
steps) and the prefill block outputs ``hidden_prefill.{0..3}`` ([320, hc, D]).
"""

from __future__ import annotations

import json

import paths
import pytest
import torch

from dsv4.parity.hf_oracle import transformers_status

REF_DIR = paths.OFFICIAL_TINY
CKPT = REF_DIR / "ckpt"
REF = REF_DIR / "reference_quant_off_fp32.safetensors"

_ok, _why = transformers_status()
pytestmark = [
    pytest.mark.skipif(not _ok, reason=f"needs transformers >= 5.8.1 with DeepseekV4ForCausalLM: {_why}"),
]


@pytest.fixture(scope="module")
def oracle_run():
    from safetensors.torch import load_file

    from dsv4.parity.hf_oracle import dequantize_checkpoint, hf_forward, load_hf_model

    hf_config = json.loads((CKPT / "config.json").read_text())
    model = load_hf_model(hf_config, dequantize_checkpoint(CKPT), dtype=torch.float32)
    ref = load_file(str(REF))
    out = hf_forward(model, ref["input_ids"])
    return model, ref, out


def test_load_report(oracle_run):
    model, _, _ = oracle_run
    report = model.dsv4_load_report
    assert report["ignored"], "the mtp.* tensors must be reported as ignored"
    assert all(name.startswith("mtp.") for name in report["ignored"])
    assert report["n_assigned"] == len(model.state_dict())


def test_logits_match_reference(oracle_run):
    _, ref, out = oracle_run
    logits = out["logits"]
    assert logits.dtype == torch.float32
    assert logits.shape == (1, *ref["logits"].shape)
    logits = logits[0]
    diff = (logits - ref["logits"]).abs().max().item()
    mismatched = (logits.argmax(-1) != ref["logits"].argmax(-1)).nonzero().flatten().tolist()
    print(f"max |dlogit| = {diff:.3e}; argmax mismatches at {mismatched}")
    assert diff < 1e-4
    assert not mismatched


def test_block_outputs_match_reference(oracle_run):
    _, ref, out = oracle_run
    blocks = out["blocks"]
    n_prefill = int(ref["hidden_prefill.0"].shape[0])
    assert len(blocks) == 4
    for i, block in enumerate(blocks):
        expected = ref[f"hidden_prefill.{i}"].double()
        assert block.dtype == torch.float32
        assert block.shape == (1, ref["logits"].shape[0], *expected.shape[1:])  # [b, s, hc, D]
        got = block[0, :n_prefill].double()
        cos = torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0).item()
        max_abs = (got - expected).abs().max().item()
        print(f"block {i}: cosine {cos:.9f}, max |d| {max_abs:.3e}")
        assert cos >= 0.99999, f"block {i}: cosine {cos}"
