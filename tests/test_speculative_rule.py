"""The verification rule of speculative decoding (engine/speculative.py) on a tiny vocabulary with fixed target and
draft distributions: sampled outputs follow the target distribution (chi-square), a deliberately biased rule is
caught by the same test, greedy rows accept exactly the target's argmax prefix, and every draw is reproducible."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from dsv4.engine import speculative
from dsv4.engine.sampling import SamplingParams, SamplingTensors

V, K, N = 6, 2, 20_000
P_LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0],       # target rows 1, 2 and the bonus row
                         [0.0, 1.5, -0.5, 1.0, 0.2, -2.0],
                         [-1.0, 0.0, 0.5, 2.0, 0.0, 0.3]])
Q_LOGITS = torch.tensor([[0.0, 2.0, 0.5, 1.0, -2.0, 0.0],        # draft rows 1, 2: far from p on purpose
                         [1.0, 0.0, 0.0, -1.0, 0.5, 1.5]])


def run_rule(params: SamplingParams, seed0: int = 0):
    """N independent sequences, each with K drafts drawn from q; -> emitted tokens per sequence."""
    seeds = [seed0 + i for i in range(N)]
    draft_st = SamplingTensors.from_params([params] * N * K, [s for s in seeds for _ in range(K)],
                                           list(range(K)) * N, "cpu")
    drafts, q = speculative.draw(Q_LOGITS.repeat(N, 1), draft_st, None, speculative.DRAFT_SALT)
    st = SamplingTensors.from_params([params] * N * (K + 1), [s for s in seeds for _ in range(K + 1)],
                                     list(range(K + 1)) * N, "cpu")
    rows_d = torch.cat([drafts.view(N, K), torch.full((N, 1), -1)], 1).view(-1)
    rows_q = torch.cat([q.view(N, K, V), torch.zeros(N, 1, V)], 1).view(-1, V)
    p_logits = speculative.processed(P_LOGITS.repeat(N, 1), st, None)
    ok, fallback = speculative.accept(p_logits, rows_q, rows_d, st)
    chosen = torch.where(ok, rows_d, fallback).view(N, K + 1).tolist()
    accepted = speculative.first_rejection(ok.tolist(), [K + 1] * N)
    return [c[:j + 1] for c, j in zip(chosen, accepted, strict=True)], drafts.view(N, K).tolist()


def chi2_pvalues(outs, params) -> list[float]:
    """p-value, per output position, of the emitted tokens against the target's (processed) distribution."""
    st = SamplingTensors.from_params([params] * (K + 1), [0] * (K + 1), [0] * (K + 1), "cpu")
    p = speculative.processed(P_LOGITS, st, None).softmax(-1).double()
    pvals = []
    for i in range(K + 1):
        tokens = torch.tensor([o[i] for o in outs if len(o) > i])
        observed = torch.bincount(tokens, minlength=V).double()
        keep = p[i] > 0
        assert observed[~keep].sum() == 0, f"position {i}: a filtered-out token was emitted"
        expected = p[i][keep] / p[i][keep].sum() * observed.sum()
        pvals.append(chisquare(observed[keep].numpy(), expected.numpy()).pvalue)
    return pvals


SAMPLED = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=4, min_p=0.05)]


@pytest.mark.parametrize("params", SAMPLED, ids=["plain", "temp-topk-minp"])
def test_sampled_outputs_follow_the_target_distribution(params):
    outs, _ = run_rule(params)
    assert min(chi2_pvalues(outs, params)) > 1e-4
    lengths = torch.bincount(torch.tensor([len(o) for o in outs]))
    assert lengths[1] > 0 and lengths[K + 1] > 0, "the test should see both rejections and full acceptance"


def test_a_biased_rule_fails_the_same_test(monkeypatch):
    """Resampling from p instead of norm(max(0, p - q)) after a rejection skews the output towards q's losers."""
    monkeypatch.setattr(speculative, "_residual_logits", lambda p, q: p.log())
    params = SAMPLED[0]
    outs, _ = run_rule(params)
    assert chi2_pvalues(outs, params)[0] < 1e-6


def test_greedy_accepts_the_argmax_prefix_then_the_targets_token():
    params = SamplingParams(temperature=0.0)
    outs, drafts = run_rule(params)
    target = P_LOGITS.argmax(-1).tolist()
    for out, d in zip(outs, drafts, strict=True):
        j = 0
        while j < K and d[j] == target[j]:
            j += 1
        assert out == [*d[:j], target[j]]


def test_draws_are_reproducible_by_seed():
    a, _ = run_rule(SAMPLED[0], seed0=7)
    b, _ = run_rule(SAMPLED[0], seed0=7)
    c, _ = run_rule(SAMPLED[0], seed0=8)
    assert a == b and a != c
