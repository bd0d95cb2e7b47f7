"""Comparing two dumps tap by tap, in forward order, and finding the first divergence.

A is the reference: relative errors are relative to A. Metrics per tap (float64):
* cosine: the WORST row's cosine, a row being one vector of the last dim (a head's q, a token's logits): a bug
  that touches a few positions stays visible where a whole-tensor cosine would average it away;
* max |A-B|, relative error ||A-B|| / ||A||, and the percentage of elements that differ after rounding both
  to bf16 (0% = bf16-identical);
* index taps (top-k picks, expert ids): mean per-row set overlap |A ∩ B| / max(|A|, |B|) (-1 = no entry), the
  percentage of rows whose sets differ, and the weights that follow them are matched by index first.
Non-finite values (masked scores are -inf) must match exactly; a tap whose inf/NaN pattern differs diverges.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dsv4.parity.errors import ParityError
from dsv4.parity.taps import INDEX_STAGES, PAIRED_STAGES, stage_of

DEFAULT_MIN_COSINE = 0.999
DEFAULT_MIN_OVERLAP = 0.99


@dataclass
class TapResult:
    step: str
    name: str
    shape: tuple
    cosine: float | None = None
    max_abs: float | None = None
    rel_err: float | None = None
    mismatch_pct: float | None = None       # bf16-rounded elements (or index rows) that differ
    overlap: float | None = None
    problem: str | None = None               # shapes / dtypes / inf patterns that differ
    divergent: bool = False


@dataclass
class Report:
    rows: list[TapResult] = field(default_factory=list)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def first_divergence(self) -> TapResult | None:
        return next((r for r in self.rows if r.divergent), None)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]) if t.dim() else t.reshape(1, 1)


def row_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of every row (float64); identical rows (all-zero ones included) are exactly 1, a row against an
    all-zero row 0."""
    a, b = _rows(a).double(), _rows(b).double()
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    cos = ((a * b).sum(-1) / (na * nb).clamp_min(torch.finfo(torch.float64).tiny)).clamp(-1.0, 1.0)
    cos = torch.where((na == 0) | (nb == 0), 0.0, cos)
    return torch.where((a == b).all(-1), 1.0, cos)


def set_overlap(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(mean per-row overlap of the index sets, % of rows whose sets differ); -1 entries are ignored."""
    a, b = _rows(a).long(), _rows(b).long()
    hits = ((a.unsqueeze(-1) == b.unsqueeze(-2)) & (a >= 0).unsqueeze(-1)).any(-1).sum(-1)
    size = torch.maximum((a >= 0).sum(-1), (b >= 0).sum(-1))
    frac = torch.where(size == 0, 1.0, hits / size.clamp_min(1))
    return frac.mean().item(), 100.0 * (frac < 1).double().mean().item()


def align_by_index(weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Reorder each row of `weights` by ascending `ids` (so two picks in different orders line up)."""
    order = _rows(ids).argsort(dim=-1)
    return _rows(weights).gather(-1, order).reshape(weights.shape)


def compare_tensors(step: str, name: str, a: torch.Tensor, b: torch.Tensor, min_cosine: float,
                    min_overlap: float) -> TapResult:
    r = TapResult(step, name, tuple(a.shape))
    if a.shape != b.shape:
        r.problem, r.divergent = f"shape {tuple(a.shape)} vs {tuple(b.shape)}", True
        return r
    if stage_of(name)[1] in INDEX_STAGES or not (a.is_floating_point() or b.is_floating_point()):
        r.overlap, r.mismatch_pct = set_overlap(a, b)
        r.divergent = r.overlap < min_overlap
        return r
    a64, b64 = a.double(), b.double()
    fin_a, fin_b = torch.isfinite(a64), torch.isfinite(b64)
    if not torch.equal(fin_a, fin_b) or not torch.equal(a64[~fin_a].nan_to_num(0.0), b64[~fin_b].nan_to_num(0.0)):
        r.problem = "inf/NaN pattern differs"
    a64, b64 = a64.where(fin_a & fin_b, 0.0), b64.where(fin_a & fin_b, 0.0)
    diff = a64 - b64
    r.cosine = row_cosine(a64, b64).min().item() if a.numel() else 1.0
    r.max_abs = diff.abs().max().item() if a.numel() else 0.0
    r.rel_err = (diff.norm() / a64.norm()).item() if a64.norm() > 0 else float(diff.norm() > 0)
    same = a.to(torch.bfloat16).view(torch.int16) == b.to(torch.bfloat16).view(torch.int16)
    r.mismatch_pct = 100.0 * (1 - same.double().mean().item()) if a.numel() else 0.0
    r.divergent = r.problem is not None or r.cosine < min_cosine
    return r


def compare_steps(step: str, a: dict, b: dict, report: Report, min_cosine: float, min_overlap: float) -> None:
    """Append the comparison of one step's taps (dicts in forward order; A's order wins) to `report`."""
    for name, ta in a.items():
        if name not in b:
            report.only_a.append(f"{step}:{name}")
            continue
        tb = b[name]
        paired = PAIRED_STAGES.get(stage_of(name)[1])
        if paired:
            ids = name[: len(name) - len(stage_of(name)[1])] + paired
            if ids in a and ids in b and a[ids].shape == ta.shape and b[ids].shape == tb.shape:
                ta, tb = align_by_index(ta, a[ids]), align_by_index(tb, b[ids])
        report.rows.append(compare_tensors(step, name, ta, tb, min_cosine, min_overlap))
    report.only_b += [f"{step}:{n}" for n in b if n not in a]


def compare_dumps(path_a, path_b, min_cosine: float = DEFAULT_MIN_COSINE, min_overlap: float = DEFAULT_MIN_OVERLAP,
                  steps: list[str] | None = None) -> Report:
    """Compare two dumps (directories of step files, or two single step files) step by step."""
    from dsv4.parity.dump import read_step, step_files

    files_a, files_b = step_files(path_a), step_files(path_b)
    if len(files_a) == 1 and len(files_b) == 1:
        pairs = [(files_a[0], files_b[0])]
    else:
        by_name = {f.name: f for f in files_b}
        pairs = [(f, by_name[f.name]) for f in files_a if f.name in by_name]
        missing = [f.name for f in files_a if f.name not in by_name] + [f.name for f in files_b
                                                                         if f.name not in {g.name for g in files_a}]
        if not pairs:
            raise ParityError(f"{path_a} and {path_b} have no step file in common")
    report = Report()
    if len(pairs) < max(len(files_a), len(files_b)):
        report.notes.append(f"step files in only one dump: {', '.join(missing)}")
    for fa, fb in pairs:
        label = fa.stem
        if steps and not any(s in label for s in steps):
            continue
        a, b = read_step(fa), read_step(fb)
        if a.tokens is not None and b.tokens is not None and (a.tokens != b.tokens or a.start != b.start):
            report.notes.append(f"{label}: the inputs differ (A {_short(a.tokens)} at {a.start}, "
                                f"B {_short(b.tokens)} at {b.start}): its taps differ for that reason alone")
        compare_steps(label, a.taps, b.taps, report, min_cosine, min_overlap)
    return report


def _short(tokens: list[int]) -> str:
    return str(tokens) if len(tokens) <= 6 else f"[{', '.join(map(str, tokens[:3]))}, ... {len(tokens)} tokens]"
