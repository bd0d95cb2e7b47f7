"""`ops.ref.float64_weight`: `dense`'s float64 copy of an fp32 CPU weight, kept between calls outside autograd.
Every product equals the uncached `F.linear(x.double(), w.double())` bit for bit, also after the weight changes in
place (through itself, a view, an optimizer step) or is reassigned; autograd-recorded and compiled calls keep
no copy."""

from __future__ import annotations

import gc

import torch
import torch.nn.functional as F

from dsv4.ops import ref


def _uncached(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x.double(), w.detach().clone().double()).float()


def _check(x: torch.Tensor, w: torch.Tensor) -> None:
    assert torch.equal(ref.dense(x, w, torch.float32), _uncached(x, w))


@torch.no_grad()
def test_a_weight_changed_in_place_is_converted_again():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(3, 40, 64, generator=gen)
    w = base[1]                                     # a view, like the experts' parameters in their stacks
    x = torch.randn(5, 64, generator=gen)
    _check(x, w)
    first = ref.float64_weight(w)
    assert ref.float64_weight(w) is first           # kept: the second call converts nothing
    for write in (lambda: w.mul_(3), lambda: base.add_(1), lambda: w.copy_(torch.randn(40, 64, generator=gen)),
                  lambda: w[0, :7].zero_()):
        write()                                    # each bumps the version counter (shared with the base)
        _check(x, w)
    assert ref.float64_weight(w) is not first


def test_optimizer_steps_and_data_assignment_are_seen():
    gen = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(64, 48, bias=False)
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    x = torch.randn(4, 64, generator=gen)
    for _ in range(3):
        with torch.no_grad():
            _check(x, lin.weight)                   # cached here (no autograd recording)
        loss = ref.dense(x, lin.weight, torch.float32).square().sum()   # recorded: converts, keeps nothing
        loss.backward()
        assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        _check(x, lin.weight)
        lin.weight.data = torch.randn(48, 64, generator=gen)            # new storage: the data pointer changes
        _check(x, lin.weight)


def test_no_copy_kept_while_recording_or_compiling_and_copies_die_with_their_weight():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 32, generator=gen)
    w = torch.randn(16, 32, generator=gen, requires_grad=True)
    ref.dense(x, w, torch.float32).sum().backward()
    assert w not in ref._FLOAT64_COPIES and w.grad is not None

    def f(x, w):
        return ref.dense(x, w, torch.float32)
    v = torch.randn(16, 32, generator=gen)
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(f, backend="eager", fullgraph=True)(x, v)
    torch._dynamo.reset()
    assert torch.equal(got, _uncached(x, v)) and v not in ref._FLOAT64_COPIES

    gc.collect()                                    # other tests' garbage gone: only v's entry comes and goes
    n = len(ref._FLOAT64_COPIES)
    with torch.no_grad():
        _check(x, v)
    assert v in ref._FLOAT64_COPIES and len(ref._FLOAT64_COPIES) == n + 1
    del v
    gc.collect()
    assert len(ref._FLOAT64_COPIES) == n


def test_a_copy_kept_in_inference_mode_serves_a_recorded_input():
    """The engine steps in inference mode; a frozen weight's copy kept there may later meet an input that
    autograd records (fine-tuning earlier layers), which saves the copy for backward: it must be a normal tensor."""
    gen = torch.Generator().manual_seed(3)
    w, x = torch.randn(8, 16, generator=gen), torch.randn(2, 16, generator=gen, requires_grad=True)
    with torch.inference_mode():
        ref.dense(x.detach(), w, torch.float32)
    assert w in ref._FLOAT64_COPIES
    x2 = x.detach().clone().requires_grad_()
    y, want = ref.dense(x, w, torch.float32), F.linear(x2.double(), w.double()).float()
    y.square().sum().backward()
    want.square().sum().backward()
    assert torch.equal(y, want) and torch.equal(x.grad, x2.grad)
