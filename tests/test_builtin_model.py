"""The trained built-in model (`dsv4/builtin_model/`): format, held-out perplexity, a pinned greedy continuation
through the engine and a chat reply that ends its turn, so a numerics regression shows up the way a user would
notice it. The figures come from tests/data/builtin_expected.json, written when the model was installed
(`scripts/install_builtin.py` for v2, `scripts/train_builtin.py --install` for v1), so these tests follow whichever
model is installed.

Tolerances:
* perplexity: the model (fp32, QAT emulation on, as `dsv4 generate` runs it on CPU) scored `heldout_ppl` on the
  held-out text when it was installed. The threshold allows 3% on top: summation-order differences between CPUs
  change it by ~1e-6 relative, while a real regression (a RoPE, scale or routing mistake) multiplies it (a random
  model scores about its vocabulary size, a one-layer mistake typically >= 1.5x).
* continuation and chat reply: greedy ids must equal the committed ones exactly. The fp32 GEMMs accumulate in
  float64 and are batch-invariant (ops.acc_dtype), so prefill vs decode and alone vs batched give the same logits
  bit for bit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import dsv4
from dsv4.builtin import BUILTIN_SPECIALS, BUILTIN_VERSION, builtin_config, builtin_model_path
from dsv4.checkpoint import CheckpointReader

DATA = Path(__file__).resolve().parent / "data"
PPL_MARGIN = 1.03
MAX_BYTES = 40e6                  # issue 17: the package carries at most 40 MB of safetensors


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
    assert BUILTIN_VERSION == expected["version"]
    assert set(cfg.layer_kinds) == {"sliding", "csa", "hca"} and cfg.n_mtp_layers == 1
    assert 0 < cfg.n_hash_layers < cfg.n_layers and cfg.n_shared_experts == 1          # hash and top-k MoE
    assert cfg.dtype == "fp8" and cfg.expert_dtype == "fp4" and cfg.hc_mult > 1
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    assert size <= MAX_BYTES, f"{size / 1e6:.1f} MB"
    reader = CheckpointReader(path)
    assert {"F8_E4M3", "I8", "F8_E8M0"} <= {reader.spec(n).dtype for n in reader}   # FP8, packed FP4, scales
    dsv4.load_model(path, progress=False)                                          # strict
    from dsv4.tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    assert tok.get_vocab_size() == cfg.vocab_size
    assert [tok.token_to_id(s) for s in BUILTIN_SPECIALS] == list(range(len(BUILTIN_SPECIALS)))


def test_heldout_perplexity(llm, expected):
    """Held-out stdlib files (never trained on): perplexity below the installed model's value + margin."""
    ids = llm.tokenizer.encode((DATA / "builtin_heldout.py.txt").read_text(), add_special_tokens=False).ids
    nll, n, size = 0.0, 0, expected["window"]        # tokens per scored window (BOS + size - 1)
    with torch.no_grad():
        for start in range(0, len(ids), size - 1)[:expected.get("heldout_windows")]:
            window = [0, *ids[start:start + size - 1]]
            logits = llm.model(torch.tensor([window]))[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, torch.tensor(window[1:]), reduction="sum").item()
            n += len(window) - 1
    ppl = math.exp(nll / n)
    assert n > 2000 and ppl < expected["heldout_ppl"] * PPL_MARGIN, \
        f"held-out perplexity {ppl:.3f} (installed: {expected['heldout_ppl']})"


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
    back (whatever its content: v1 was trained on code only)."""
    for i, marker in enumerate(BUILTIN_SPECIALS):
        assert llm.tokenizer.encode(f"x{marker}y", add_special_tokens=False).ids[1:-1] == [i], marker
    out = llm.chat([{"role": "user", "content": "hi"}], dsv4.SamplingParams(temperature=0, max_tokens=8))[0]
    assert isinstance(out.message["content"], str) and len(out.token_ids) >= 1


def test_chat_reply_ends_its_turn(llm, expected):
    """A held-out chat request (its function was never trained on) gets the pinned reply: a function, then EOS,
    within the pinned reply's length + a little."""
    chat = expected.get("chat")
    if chat is None:
        pytest.skip("no pinned chat reply for the installed model (v1 never saw EOS or the chat format)")
    out = llm.chat(chat["messages"], dsv4.SamplingParams(temperature=0, max_tokens=chat["max_tokens"]))[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == llm.model.cfg.eos_token_id
    assert "def " in out.message["content"]
    assert "parse_error" not in out.message, out.message    # the EOS the engine left out of .text is the reply's end
    assert out.token_ids == chat["token_ids"]


def test_the_chat_hint_example_gets_a_function_that_ends(llm, expected):
    """`dsv4 chat` on the built-in model tells the user how to phrase a request (`cli.CHAT_EXAMPLE`): its example must
    itself get the named function and EOS, greedily, as the CLI runs it, or the hint misleads."""
    from dsv4.cli import CHAT_EXAMPLE

    if expected.get("chat") is None:
        pytest.skip("the installed model was not trained on chats")
    out = llm.chat([{"role": "user", "content": CHAT_EXAMPLE}], dsv4.SamplingParams(temperature=0, max_tokens=256))[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == llm.model.cfg.eos_token_id, out.message
    assert "def reverse(s):" in out.message["content"], out.message
