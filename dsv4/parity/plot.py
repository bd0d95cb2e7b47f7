"""Layer x stage heatmap of a comparison: colour = 1 - agreement (cosine, or set overlap for index taps), worst
step, on a log scale; divergent cells are crossed, taps absent from a layer are blank."""

from __future__ import annotations

import math

from dsv4.parity.compare import Report
from dsv4.parity.taps import stage_of, stage_order

FLOOR = 1e-16          # 1 - agreement below this (fp64 noise, identical tensors) is drawn as the floor


def grid(report: Report) -> tuple[list[str], list[str], list[list[float]], list[list[bool]]]:
    """(row labels = scopes, column labels = stages, 1 - worst agreement per cell (nan = absent), divergent)."""
    worst: dict[tuple[str, str], tuple[float, bool]] = {}
    for r in report.rows:
        scope, stage = stage_of(r.name)
        agree = r.overlap if r.overlap is not None else (r.cosine if r.cosine is not None else 0.0)
        old = worst.get((scope, stage), (1.0, False))
        worst[(scope, stage)] = (min(old[0], agree), old[1] or r.divergent)
    known = stage_order()
    stages = sorted({s for _, s in worst}, key=lambda s: (known.index(s) if s in known else len(known), s))
    scopes = sorted({sc for sc, _ in worst}, key=lambda sc: (sc != "", sc.split(".")[0],
                                                             int(sc.split(".")[1]) if sc else -1))
    values = [[1 - worst[(sc, st)][0] if (sc, st) in worst else math.nan for st in stages] for sc in scopes]
    bad = [[worst.get((sc, st), (1.0, False))[1] for st in stages] for sc in scopes]
    return [sc or "(global)" for sc in scopes], stages, values, bad


def heatmap(report: Report, path, title: str = "") -> None:
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("--plot needs matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    rows, cols, values, bad = grid(report)
    shown = [[v if math.isnan(v) else max(v, FLOOR) for v in row] for row in values]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(cols) + 2), max(2.5, 0.45 * len(rows) + 1.5)))
    im = ax.imshow(shown, norm=LogNorm(vmin=FLOOR, vmax=1.0), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=70, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    for i, row in enumerate(bad):
        for j, b in enumerate(row):
            if b:
                ax.text(j, i, "x", ha="center", va="center", color="red", fontsize=10, fontweight="bold")
    fig.colorbar(im, ax=ax, label="1 - worst agreement (cosine / overlap)")
    ax.set_title(title or "parity: 1 - agreement per layer and stage (x = diverged)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
