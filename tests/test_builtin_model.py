"""The trained built-in model (`dsv4/builtin_model/`): format, held-out perplexity, and a pinned greedy
continuation through the engine, so a numerics regression shows up the way a user would notice it.

Tolerances:
* perplexity: the model (fp32, QAT emulation on, as `dsv4 generate` runs it on CPU) scored HELDOUT_PPL on the
  held-out stdlib text when it was trained (`scripts/train_builtin.py --install`). The threshold allows 3% on
  top: summation-order differences between CPUs change it by ~1e-6 relative, while a real regression (a RoPE,
  scale or routing mistake) multiplies it (a random model scores ~4000, a one-layer mistake typically >= 1.5x).
* continuation: greedy ids must equal the committed ones exactly. The fp32 GEMMs accumulate in float64 and are
  batch-invariant (ops.acc_dtype), so prefill vs decode and alone vs batched give the same logits bit for bit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import dsv4
from dsv4.builtin import BUILTIN_SPECIALS, builtin_config, builtin_model_path
from dsv4.checkpoint import CheckpointReader

DATA = Path(__file__).resolve().parent / "data"
HELDOUT_PPL = 153.41              # measured by scripts/train_builtin.py --install (fp32, emulation on)
PPL_MARGIN = 1.03
WINDOW = 512                      # tokens per scored window (BOS + 511), as in scripts/train_builtin.py


@pytest.fixture(scope="module")
def expected():
    return json.loads((DATA / "builtin_expected.json").read_text())


@pytest.fixture(scope="module")
def llm():
    return dsv4.LLM(max_num_seqs=4, num_pages=16, page_size=128)


def test_shipped_checkpoint_has_every_feature_and_fits(expected):
    path = builtin_model_path()
    cfg = dsv4.ModelConfig.from_file(path)
    assert cfg == builtin_config().replace(max_seq_len=cfg.max_seq_len)   # config files do not store it
    assert set(cfg.layer_kinds) == {"sliding", "csa", "hca"} and cfg.n_mtp_layers == 1
    assert 0 < cfg.n_hash_layers < cfg.n_layers and cfg.n_shared_experts == 1          # hash and top-k MoE
    assert cfg.dtype == "fp8" and cfg.expert_dtype == "fp4" and cfg.hc_mult > 1
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    assert size <= 25 * 2**20, f"{size / 2**20:.1f} MiB"
    reader = CheckpointReader(path)
    assert {"F8_E4M3", "I8", "F8_E8M0"} <= {reader.spec(n).dtype for n in reader}   # FP8, packed FP4, scales
    dsv4.load_model(path, progress=False)                                          # strict
    from dsv4.tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    assert tok.get_vocab_size() == cfg.vocab_size
    assert [tok.token_to_id(s) for s in BUILTIN_SPECIALS] == list(range(len(BUILTIN_SPECIALS)))


def test_heldout_perplexity(llm):
    """Held-out stdlib files (never trained on): perplexity below the trained model's value + margin."""
    ids = llm.tokenizer.encode((DATA / "builtin_heldout.py.txt").read_text(), add_special_tokens=False).ids
    nll, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), WINDOW - 1):
            window = [0, *ids[start:start + WINDOW - 1]]
            logits = llm.model(torch.tensor([window]))[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, torch.tensor(window[1:]), reduction="sum").item()
            n += len(window) - 1
    ppl = math.exp(nll / n)
    assert n > 2000 and ppl < HELDOUT_PPL * PPL_MARGIN, f"held-out perplexity {ppl:.3f} (trained: {HELDOUT_PPL})"


def test_greedy_continuation_alone_and_batched(llm, expected):
    """The pinned prompt's greedy continuation (prefill + decode through the engine), alone and batched with
    other prompts of other lengths, equals the committed ids and text."""
    greedy = dsv4.SamplingParams(temperature=0, max_tokens=len(expected["token_ids"]), ignore_eos=True)
    alone = llm.generate(expected["prompt"], greedy)[0]
    others = ["import os\n", "class Stack:\n    def push(self, item):\n"]
    batched = llm.generate([others[0], expected["prompt"], others[1]], greedy)
    assert alone.token_ids == expected["token_ids"] and alone.text == expected["text"]
    assert batched[1].token_ids == expected["token_ids"]
    assert [o.token_ids for o in batched[::2]] == [llm.generate(p, greedy)[0].token_ids for p in others]


def test_chat_runs_on_the_builtin_model(llm):
    """`dsv4 chat`'s path: the V4 chat markers are single tokens of the built-in tokenizer, and a reply comes
    back (the model was trained on code only, so its content is Python-like, not an answer)."""
    for i, marker in enumerate(BUILTIN_SPECIALS):
        assert llm.tokenizer.encode(f"x{marker}y", add_special_tokens=False).ids[1:-1] == [i], marker
    out = llm.chat([{"role": "user", "content": "hi"}], dsv4.SamplingParams(temperature=0, max_tokens=8))[0]
    assert isinstance(out.message["content"], str) and len(out.token_ids) >= 1
