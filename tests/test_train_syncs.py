"""Host reads of device data per training step (issue 17): each makes the host wait for the GPU's launch queue to
drain, so host and GPU time add up instead of overlapping. `SyncCounter` (scripts/bench/train_step_ops.py) counts
on the CPU what would read the GPU on CUDA; the GPU test counts the real synchronisations.

A step reads the device once (`read_step_values`: the losses, grad norm and expert loads for its record) plus once
per MoE layer and forward in the batched routed experts (the padded group width is a shape): per pack, each main
MoE layer once and the MTP block's once per document (the MTP runs document by document; the GPU script
concatenates each pack into one document). Nothing per gate, page list or loss.
"""

from __future__ import annotations

import random
import warnings

import pytest
import torch
from bench_scripts import load

import dsv4
from dsv4.model.moe import MoE
from dsv4.train.data import Document, PackStream
from dsv4.train.loop import TrainConfig, Trainer
from dsv4.train.params import prepare_full

train_step_ops = load("train_step_ops")
SyncCounter = train_step_ops.SyncCounter

PACKS_PER_STEP = 2


def _trainer(ckpt, out, device="cpu", dtype=torch.float32, docs_per_pack=3):
    """The tiny QAT model with MTP and the gate-bias update, `docs_per_pack` documents in each of 2 packs a step."""
    m = prepare_full(dsv4.load_model(ckpt, device=device, dtype=dtype, quant_emulation=True, progress=False),
                     qat=True)
    rng = random.Random(0)
    packs = [[Document(ids := [0] + [rng.randrange(2, 512) for _ in range(rng.randrange(20, 150))],
                       [rng.random() < 0.9 for _ in ids]) for _ in range(docs_per_pack)] for _ in range(4)]
    cfg = TrainConfig(max_steps=10, lr=1e-3, warmup_steps=1, seq_len=512, packs_per_step=PACKS_PER_STEP,
                      grad_ckpt=False, mtp_weight=0.3, bias_update_rate=1e-3)
    return Trainer(m, PackStream(packs, PACKS_PER_STEP, 0), cfg, out, progress=False)


def _allowed(trainer) -> int:
    """For the trainer's next step: the one read plus one per batched MoE layer and forward (main MoE layers once
    per pack, the MTP block's once per document of >= 3 tokens)."""
    main_moe = sum(isinstance(m, MoE) for m in trainer.model.layers.modules())
    packs = trainer.stream.step(trainer.step)
    return 1 + len(packs) * main_moe + sum(len(d) >= 3 for p in packs for d in p)


def _sites(counter) -> set[str]:
    return {s.split(":")[0] + " " + s.split()[1] for s in counter.sites}


@pytest.mark.parametrize("docs_per_pack", [1, 4])
def test_host_reads_per_training_step_stay_at_the_step_read_and_the_moe_widths(tiny_ckpt, tmp_path, docs_per_pack):
    """One step reads the device 1 + packs x (main MoE layers) + MTP documents times (here 11 / 17): only
    `read_step_values` and `MoE.routed_batched`'s group width. Before issue 17 also a read per gate and forward,
    per document (MTP targets), per pack (losses), per page list and layer, the grad norm, the logits check and the
    QAT encoders' checks: 75 / 131 here."""
    trainer = _trainer(tiny_ckpt, tmp_path, docs_per_pack=docs_per_pack)
    trainer.train_step()                                         # the first step creates the optimizer state
    allowed = _allowed(trainer)
    counter = train_step_ops.step_syncs(trainer)
    assert counter.total <= allowed, counter.sites
    assert _sites(counter) <= {"train/loop.py read_step_values", "model/moe.py routed_batched"}, counter.sites


def test_sync_counter_counts_each_kind_of_read():
    """Every way of reading the device is counted once at its call site; reads of host tensors are not."""
    x = torch.arange(6.0, device=torch.device("cpu"))       # a torch.device: the training device
    with SyncCounter() as counter:
        x.sum().item()
        bool(x[0])
        int(x[1])
        float(x[2])
        x.tolist()
        x.cpu()
        x.numpy()
        torch.nonzero(x)
        x[x > 2]
        torch.unique(x)
        torch.bincount(x.long())
        x.repeat_interleave(x.long())
        torch.tensor([1, 2], device=x.device)
        host = torch.zeros(3)                                    # host tensors: no read
        host.tolist(), host.sum().item(), host[host > 0], torch.tensor([1.0, 2.0]).tolist()
        host.to(x.device, non_blocking=True)                     # pinned on CUDA: asynchronous
        x.repeat_interleave(x.long(), output_size=15)            # sized by the caller: no read
    kinds = sorted(s.rsplit("[", 1)[1].rstrip("]") for s in counter.sites.elements())
    assert kinds == sorted(["item"] * 4 + ["tolist", "cpu", "numpy", "nonzero", "bool index", "_unique2", "bincount",
                                          "repeat_interleave", "tensor(list, device=)"]), kinds


def test_step_values_read_once_equal_the_item_reads():
    """`read_step_values` returns exactly what reading each value with `.item()` / `.tolist()` returns."""
    from dsv4.train.loop import read_step_values

    sums = torch.tensor([123.456789, 1e-30], dtype=torch.float64)
    norm = torch.tensor(3.6195705, dtype=torch.float32)
    counts = {"a": torch.tensor([0, 5, 2**40]), "b": torch.tensor([7])}
    got = read_step_values(sums, norm, counts)
    assert got.sums == sums.tolist() and got.grad_norm == norm.item()
    assert got.counts.keys() == counts.keys() and all(torch.equal(got.counts[n], counts[n]) for n in counts)


@pytest.mark.gpu
def test_training_step_synchronisations_on_cuda(tiny_ckpt, tmp_path):
    """On CUDA (bf16, the Triton/fused training paths): the synchronisations that torch's sync debug mode reports
    in one training step after a warm-up step stay within the same bound as the CPU count."""
    trainer = _trainer(tiny_ckpt, tmp_path, device="cuda", dtype=torch.bfloat16)
    trainer.train_step()
    torch.cuda.synchronize()
    allowed = _allowed(trainer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.train_step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    # torch's notice that the debug mode is a prototype (once per process: the first test to use the mode sees it)
    # is not a synchronisation
    syncs = [f"{w.filename}:{w.lineno}" for w in caught
             if "synchroniz" in str(w.message).lower() and "prototype feature" not in str(w.message)]
    assert len(syncs) <= allowed, "\n".join(syncs)


def test_sync_free_helpers_equal_what_they_replace():
    """`expert_counts` == `torch.bincount(minlength=)`, `page_ids` == `torch.tensor(pages)` (runs of consecutive
    pages by arange, others as before, empty lists), `to_device` == `.to(device)`: the same values and dtypes."""
    from dsv4.model.moe import expert_counts
    from dsv4.model.state import page_ids, to_device

    ids = torch.randint(0, 6, (37, 2), generator=torch.Generator().manual_seed(9))
    assert torch.equal(expert_counts(ids, 8), torch.bincount(ids.flatten(), minlength=8))
    for pages in ([3, 4, 5, 6], [7], [2, 4, 5], [5, 4], []):
        got, want = page_ids(pages, "cpu"), torch.tensor(pages, dtype=torch.long)
        assert got.dtype == want.dtype and torch.equal(got, want), pages
    x = torch.arange(5)
    assert torch.equal(to_device(x, "cpu"), x)
