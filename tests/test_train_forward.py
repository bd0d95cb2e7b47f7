"""The training forward is the inference model: same logits, packing without cross-talk, checkpointing exact.

Tolerances: the fp32 model accumulates its GEMMs in float64 and is batch-invariant (ops.acc_dtype), so a
document's logits are compared with `assert_close` at fp32 defaults whether run alone or packed with others.
"""

from __future__ import annotations

import random

import pytest
import torch

import dsv4
from dsv4.train.data import Document
from dsv4.train.forward import IGNORE, TrainStep, hidden, packed_batch
from dsv4.train.params import LoRALinear, prepare_full, prepare_lora, storage_roundtrip


def _docs(lengths, seed=0):
    rng = random.Random(seed)
    return [Document([rng.randrange(512) for _ in range(n)], [i % 3 != 0 for i in range(n)]) for n in lengths]


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "qat-emulation"])
def model(request, tiny_ckpt):
    return dsv4.load_model(tiny_ckpt, dtype=torch.float32, quant_emulation=request.param, progress=False)


def test_packed_training_forward_matches_inference(model):
    """Three documents packed into one batch (one crosses an HCA block) == each run alone through forward()."""
    docs = _docs([40, 140, 9])
    pb = packed_batch(docs, "cpu")
    with torch.no_grad():
        logits = model.main_logits(hidden(model, pb, grad_ckpt=False))[0]
        for seq, d in zip(pb.batch.seqs, docs, strict=True):
            alone = model(torch.tensor([d.ids]))[0]
            torch.testing.assert_close(logits[seq.offset:seq.offset + seq.length], alone)


def test_documents_of_different_page_counts_get_disjoint_pages(model):
    """A short document before a long one (1 then 3 cache pages): every document owns its pages, and the long
    one's compressed entries (HCA blocks past the first page) match running it alone."""
    docs = _docs([40, 300], seed=1)
    pb = packed_batch(docs, "cpu")
    pages = [p for seq in pb.batch.seqs for p in seq.pages]
    assert sorted(pages) == list(range(1 + 3))
    with torch.no_grad():
        logits = model.main_logits(hidden(model, pb, grad_ckpt=False))[0]
        seq = pb.batch.seqs[1]
        torch.testing.assert_close(logits[seq.offset:seq.offset + seq.length], model(torch.tensor([docs[1].ids]))[0])


def test_targets_follow_the_mask():
    docs = _docs([5, 4])
    pb = packed_batch(docs, "cpu")
    want = []
    for d in docs:
        want += [t if m else IGNORE for t, m in zip(d.ids[1:], d.mask[1:], strict=True)] + [IGNORE]
    assert pb.targets.tolist() == want
    assert pb.n_targets == sum(d.n_targets for d in docs)


def test_full_prep_keeps_logits_and_qat_sees_the_stored_weights(tiny_ckpt):
    """Dequantised trainable weights give the loaded model's logits; the QAT round trip of unchanged weights is
    exact (their values are already on the FP8 / FP4 grids)."""
    ids = torch.tensor([_docs([30])[0].ids])
    base = dsv4.load_model(tiny_ckpt, dtype=torch.float32, quant_emulation=True, progress=False)
    with torch.no_grad():
        want = base(ids)
        for qat in (False, True):
            m = prepare_full(dsv4.load_model(tiny_ckpt, dtype=torch.float32, quant_emulation=True, progress=False),
                             qat=qat)
            torch.testing.assert_close(m(ids), want, rtol=0, atol=0)
    w = m.layers[0].ffn.experts[0].w1.weight
    assert torch.equal(storage_roundtrip(w, "fp4"), w) and m.layers[0].ffn.experts[0].w1.fmt == "fp4"
    trained = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "layers.0.attn.wq_a.weight" in trained and "embed.weight" in trained
    assert not any(".indexer." in n or "tid2eid" in n or "gate.bias" in n for n in trained)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_ckpt):
    m = prepare_full(dsv4.load_model(tiny_ckpt, dtype=torch.float32, quant_emulation=False, progress=False))
    pb = packed_batch(_docs([20, 33]), "cpu")
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        ce, _, _, _ = TrainStep(m, grad_ckpt=ckpt)(pb)
        ce.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 50
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)


def test_lora_starts_at_the_base_model(tiny_ckpt):
    ids = torch.tensor([_docs([25])[0].ids])
    m = dsv4.load_model(tiny_ckpt, dtype=torch.float32, quant_emulation=True, progress=False)
    with torch.no_grad():
        want = m(ids)
        prepare_lora(m, rank=4, targets=("attn", "shared", "experts"))
        torch.testing.assert_close(m(ids), want, rtol=0, atol=0)
    trained = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trained and all(".lora_" in n for n in trained)
    assert isinstance(m.layers[1].attn.wq_b, LoRALinear) and not isinstance(m.layers[1].attn.indexer.wq_b,
                                                                           LoRALinear)
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        prepare_lora(m, rank=2, targets=("nope",))
