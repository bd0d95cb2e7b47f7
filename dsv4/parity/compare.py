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

import json
from dataclasses import dataclass, field
from pathlib import Path

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
    missing_steps: list[str] = field(default_factory=list)   # step files only one dump has: B stopped early?
    precision: tuple = (None, None)                            # A's and B's compute dtype (`precision_class`)

    @property
    def first_divergence(self) -> TapResult | None:
        return next((r for r in self.rows if r.divergent), None)

    @property
    def ok(self) -> bool:
        """Every compared tap agrees and no step is missing: a dump that stopped after its prefill is not a match."""
        return self.first_divergence is None and not self.missing_steps


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
    from dsv4.parity.dump import read_step

    pairs, missing = _pair_step_files(path_a, path_b, steps)
    report = Report(missing_steps=missing)
    for i, (fa, fb) in enumerate(pairs):
        label = fa.stem
        a, b = read_step(fa), read_step(fb)
        if i == 0:
            report.notes += setup_notes(path_a, path_b, a.taps, b.taps, min_cosine)
            report.precision = (precision_class(a.taps), precision_class(b.taps))
        if a.tokens is not None and b.tokens is not None and (a.tokens != b.tokens or a.start != b.start):
            report.notes.append(f"{label}: the inputs differ (A {_short(a.tokens)} at {a.start}, "
                                f"B {_short(b.tokens)} at {b.start}): its taps differ for that reason alone")
        compare_steps(label, a.taps, b.taps, report, min_cosine, min_overlap)
    if not report.rows:
        # "OK: 0 taps agree" would pass a CI gate having compared nothing.
        raise ParityError(f"{path_a} and {path_b} have no tap in common (tap names: docs/parity.md)")
    return report


def precision_class(taps: dict) -> torch.dtype | None:
    """The least precise floating dtype of a step's taps: its compute dtype (fp32-only taps such as the routing
    weights are recorded in fp32 whatever the model computes in)."""
    floats = {t.dtype for t in taps.values() if t.is_floating_point()}
    return max(floats, key=_eps) if floats else None


def _manifest(path) -> dict:
    path = Path(path)
    file = (path.parent if path.is_file() else path) / "manifest.json"
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError):     # another implementation's dump has none: nothing to say
        return {}
    return manifest if isinstance(manifest, dict) else {}


def setup_notes(path_a, path_b, taps_a: dict, taps_b: dict, min_cosine: float) -> list[str]:
    """Notes on differences of setup rather than of code: the taps differ because of them, not (only) a bug."""
    notes = []
    pa, pb = precision_class(taps_a), precision_class(taps_b)
    if pa is not None and pb is not None and pa != pb:
        # The default threshold separates bugs from the noise of ONE precision class (two runs, two kernels of a
        # class); across classes the coarser one's rounding alone can cross it, most on short rows.
        coarse = dtype_name(max(pa, pb, key=_eps))
        notes.append(f"A computes in {dtype_name(pa)}, B in {dtype_name(pb)}: the threshold (worst-row cosine "
                     f"{min_cosine}) assumes both sides compute in one precision class, so {coarse} "
                     "rounding alone can cross it (short rows first: indexer scores, routing weights); a tap that "
                     "is not far worse than its neighbours is precision, not a bug (`dsv4 parity precision` shows "
                     "the noise of each class); dump both in one dtype to bisect a bug")
    ma, mb = _manifest(path_a), _manifest(path_b)
    for key in ("model", "quant_emulation"):
        if key in ma and key in mb and ma[key] != mb[key]:
            notes.append(f"the dumps were made with different settings: {key} {ma[key]} (A) vs {mb[key]} (B); "
                         "the taps differ for that reason too")
    return notes


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _pair_step_files(path_a, path_b, steps: list[str] | None) -> tuple[list[tuple[Path, Path]], list[str]]:
    """(A/B step files to compare, matched by file name; the step files only one side has). Two single files are
    compared whatever their names; a single file against a dump directory is compared with its namesake."""
    from dsv4.parity.dump import step_files

    files_a, files_b = step_files(path_a), step_files(path_b)
    if steps:
        # filter before pairing, so that the steps left out on purpose are not reported as missing
        files_a = [f for f in files_a if any(s in f.stem for s in steps)]
        files_b = [f for f in files_b if any(s in f.stem for s in steps)]
        if not files_a or not files_b:
            raise ParityError(f"--step {' '.join(steps)}: no step file of {path_a if not files_a else path_b} "
                              "matches (names: step_000_prefill, step_001, ...)")
    if Path(path_a).is_file() and Path(path_b).is_file():
        return [(files_a[0], files_b[0])], []
    if Path(path_a).is_file() or Path(path_b).is_file():
        # one step file against a dump directory: its namesake, and the directory's other steps are not "missing"
        name = (files_a if Path(path_a).is_file() else files_b)[0].name
        files_a, files_b = [f for f in files_a if f.name == name], [f for f in files_b if f.name == name]
        if not files_a or not files_b:
            raise ParityError(f"{path_b if files_a else path_a} has no step file named {name}")
        return [(files_a[0], files_b[0])], []
    by_name = {f.name: f for f in files_b}
    pairs = [(f, by_name[f.name]) for f in files_a if f.name in by_name]
    if not pairs:
        raise ParityError(f"{path_a} and {path_b} have no step file in common")
    names_a = {f.name for f in files_a}
    missing = [f"{f.name} (only in A)" for f in files_a if f.name not in by_name]
    missing += [f"{f.name} (only in B)" for f in files_b if f.name not in names_a]
    return pairs, missing


def _short(tokens: list[int]) -> str:
    return str(tokens) if len(tokens) <= 6 else f"[{', '.join(map(str, tokens[:3]))}, ... {len(tokens)} tokens]"
