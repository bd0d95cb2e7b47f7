"""Plain-text rendering of a comparison `Report` (aligned columns, stable for docs and logs)."""

from __future__ import annotations

from dsv4.parity.compare import Report, TapResult, dtype_name

HEADER = ("step", "tap", "shape", "cosine", "max|A-B|", "rel err", "bf16 diff%", "overlap", "")


def fmt_cosine(c: float | None) -> str:
    if c is None:
        return "-"
    if c == 1.0:
        return "1"
    return f"1-{1 - c:.1e}" if c > 0.999 else f"{c:.4f}"


def _num(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _cells(r: TapResult, first: bool) -> tuple[str, ...]:
    mark = "<< FIRST DIVERGENCE" if first else ("x" if r.divergent else "")
    if r.problem:
        mark = f"{mark} ({r.problem})".strip()
    return (r.step, r.name, "x".join(map(str, r.shape)) or "scalar", fmt_cosine(r.cosine), _num(r.max_abs, ".2e"),
            _num(r.rel_err, ".2e"), _num(r.mismatch_pct, ".2f"), _num(r.overlap, ".3f"), mark)


def render(report: Report, min_cosine: float, min_overlap: float, around: int | None = None) -> str:
    """The table (every row, or `around` rows either side of the first divergence) and a verdict."""
    first = report.first_divergence
    rows = report.rows
    if around is not None and first is not None:
        i = rows.index(first)
        rows = rows[max(0, i - around): i + around + 1]
    table = [HEADER] + [_cells(r, r is first) for r in rows]
    widths = [max(len(row[c]) for row in table) for c in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) if c < 3 or c == 8 else cell.rjust(w)
                       for c, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip() for row in table]
    if around is not None and first is not None and len(rows) < len(report.rows):
        lines.append(f"... ({len(report.rows)} taps compared, {len(rows)} shown)")
    lines += [f"note: {n}" for n in report.notes]
    for side, names in (("A", report.only_a), ("B", report.only_b)):
        if names:
            lines.append(f"only in {side} ({len(names)}): {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}")
    n_bad = sum(r.divergent for r in report.rows)
    if report.missing_steps:
        lines.append(f"step files in only one dump: {', '.join(report.missing_steps)}")
    if report.ok:
        # say it in the verdict too: a B that names its taps differently shares few with A, and "OK" alone hides it
        skipped = len(report.only_a) + len(report.only_b)
        unmatched = f"; {skipped} taps in only one dump not compared" if skipped else ""
        lines.append(f"OK: {len(report.rows)} taps agree (cosine >= {min_cosine}, index overlap >= {min_overlap})"
                     f"{unmatched}")
    elif first is None:
        # every compared tap agrees, but a step is missing: a dump that stopped early must not pass a CI gate
        lines.append(f"INCOMPLETE: {len(report.rows)} taps agree, but {len(report.missing_steps)} step file(s) are "
                     "in only one dump (listed above); compare only the common steps with --step")
    else:
        why = first.problem or (f"overlap {first.overlap:.3f} < {min_overlap}" if first.overlap is not None
                                else f"cosine {fmt_cosine(first.cosine)} < {min_cosine}{_precision_hint(report)}")
        lines.append(f"DIVERGED: {n_bad} of {len(report.rows)} taps; first: {first.step} {first.name} ({why})")
    return "\n".join(lines)


def _precision_hint(report: Report) -> str:
    """Says which precision class the threshold assumed when the two sides compute in different ones."""
    a, b = report.precision
    if a is None or b is None or a == b:
        return ""
    return f"; the threshold assumes one precision class, A is {dtype_name(a)} and B {dtype_name(b)}: see the note"
