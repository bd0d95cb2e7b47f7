"""Token-level unlikelihood against wrong in-context copies (issue 17; Welleck et al. 2019, "Neural text generation
with unlikelihood training", with a targeted candidate set).

Greedy loops copy: the model sees the last n-1 tokens, finds where that context occurred before and repeats what
followed it. The copy candidate of position t is that token: c_t = x[s + 1] for the most recent s < t (same
document) with x[s-n+2..s] == x[t-n+2..t]. Where c_t exists and is not the target, the term adds
-log(max(1 - p(c_t | x_<=t), eps)); right copies (identifiers, repeated code) are left alone.

Documents: a candidate never crosses a document boundary. A boundary is a sequence start (position 0 of the
flattened batch: `--per-document` packs) or a BOS token (`concat_pack` keeps each document's BOS; the compiled
step's padding tokens are BOS too, each then a one-token document that is never a target).

Vectorised, O(T log T), no host read: each (n-1)-gram is hashed, a stable sort groups equal hashes in position order,
and the previous element of a position's group is its most recent earlier occurrence; the tokens and the document
are then compared for real, so a hash collision can only drop a candidate (never make a wrong one).
"""

from __future__ import annotations

import torch

EPS = 1e-5                 # Welleck et al.'s clamp of 1 - p


def segment_starts(ids: torch.Tensor, positions: torch.Tensor, bos_id: int) -> torch.Tensor:
    """[T] bool: token t starts a document (a sequence start or a BOS)."""
    return (positions == 0) | (ids == bos_id)


def copy_candidates(ids: torch.Tensor, starts: torch.Tensor, n: int = 4, window: int = 0,
                    base: int = 1 << 20) -> torch.Tensor:
    """[T] long: c_t, the token after the most recent earlier occurrence of ids[t-n+2..t] in t's document, or -1.
    window > 0: only occurrences ending at most `window` tokens before t. base: the vocabulary size (> every id;
    the hash is exact, collision-free, while base ** (n-1) * base < 2**63)."""
    if n < 2:
        raise ValueError(f"copy n-gram length must be >= 2, got {n}")
    k, T = n - 1, ids.shape[0]
    t = torch.arange(T, device=ids.device)
    seg = torch.cumsum(starts.long(), 0)
    back = (t - (k - 1)).clamp(min=0)                       # first token of the gram ending at t
    valid = (t >= k - 1) & (seg[back] == seg)               # the gram lies inside one document
    keys = _gram_hash(ids, k, base)
    keys = torch.where(valid, keys, -1 - t)                 # invalid grams: unique negative keys, groups of one
    sorted_keys, order = torch.sort(keys, stable=True)      # equal keys in position order
    prev = torch.full_like(t, -1)
    same = sorted_keys[1:] == sorted_keys[:-1]
    prev[order[1:]] = torch.where(same, order[:-1], -1)
    ok = (prev >= 0) & (seg[prev.clamp(min=0)] == seg)
    for j in range(k):                                      # the hash only proposes: compare the tokens
        ok &= ids[(prev - j).clamp(min=0)] == ids[(t - j).clamp(min=0)]
    if window > 0:
        ok &= t - prev <= window
    return torch.where(ok, ids[(prev + 1).clamp(max=T - 1)], -1)


def _gram_hash(ids: torch.Tensor, k: int, base: int) -> torch.Tensor:
    """[T] int64 >= 0: a polynomial hash of ids[t-k+1..t] (positions before 0 read as 0), modulo M so that
    h * base + id never overflows."""
    mod = (2**63 - 1) // base - base
    T, h = len(ids), torch.zeros_like(ids)
    padded = torch.cat([ids.new_zeros(k - 1), ids])
    for j in range(k):                                      # oldest token first: ids[t-k+1+j]
        h = (h * base + padded[j:j + T]) % mod
    return h


def copy_terms(logp: torch.Tensor, targets: torch.Tensor, cand: torch.Tensor, ignore_index: int,
               eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """From the head's log-probabilities logp [T, V] (a gather and a max, no second [T, V] tensor): the summed
    unlikelihood over the wrong-copy positions (differentiable), and detached statistics [wrong-copy positions,
    summed p(c_t) over them, target positions with any copy candidate, wrong copies that are the argmax (where
    greedy decoding would copy wrongly)] (fp32)."""
    has = (cand >= 0) & (targets != ignore_index)
    wrong = has & (cand != targets)
    lp = logp.gather(1, cand.clamp(min=0).unsqueeze(1)).squeeze(1)          # [T] log p(c_t)
    # -log(clamp(1 - p, min=eps)), 1 - p as -expm1(log p): exact where p is near 1 (1 - exp(lp) cancels there)
    ul = torch.where(wrong, -torch.log(torch.clamp(-torch.expm1(lp), min=eps)), 0.0).sum()
    p = lp.exp()
    top1 = wrong & (lp >= logp.max(-1).values)
    stats = torch.stack([wrong.sum().float(), torch.where(wrong, p, 0.0).sum(), has.sum().float(),
                         top1.sum().float()]).detach()
    return ul, stats
