"""The built-in model v2's training history: the chain of GPU runs that made the installed weights.

The v2 weights come from several `scripts/train_builtin_gpu.py` runs, each continuing the previous one's model
(`--init`), not from one run: the card must report the whole chain (steps, tokens, time, settings, one loss curve),
not the last run alone. The chain is a JSON list (default `bench/results/builtin_v2_lineage.json`), oldest first:
    [{"run": "run11", "perf": "bench/results/.../perf.json", "metrics": ".../metrics.jsonl",
      "eval": ".../eval.json" (optional), "note": "what changed in this run (data, packing, losses)"}, ...]
paths relative to the repository root. The first run starts from `dsv4 synth`'s random weights (no --init), every
later one has --init. Used by scripts/install_builtin.py (--lineage) and scripts/builtin_card.py.
Check one: PYTHONPATH=. python3 scripts/builtin_lineage.py [LINEAGE.json] [--png OUT.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT = REPO / "bench" / "results" / "builtin_v2_lineage.json"


def load(path: Path = DEFAULT, root: Path = REPO) -> list[dict]:
    """The chain's entries with their records read: perf (dict), metrics (list of step records), eval (or None)."""
    entries = json.loads(Path(path).read_text())
    if not entries:
        raise ValueError(f"{path}: an empty lineage")
    runs = []
    for e in entries:
        missing = [k for k in ("run", "perf", "metrics") if k not in e]
        if missing:
            raise ValueError(f"{path}: entry {e.get('run', '?')} lacks {missing}")
        metrics = [json.loads(line) for line in (root / e["metrics"]).read_text().splitlines() if line.strip()]
        runs.append({**e, "perf": json.loads((root / e["perf"]).read_text()), "metrics": metrics,
                     "eval": json.loads((root / e["eval"]).read_text()) if e.get("eval") else None})
    check_chain(runs, path)
    return runs


def check_chain(runs: list[dict], where="lineage") -> None:
    """The first run from random weights, every later one a continuation; each run's metrics are its own."""
    for i, r in enumerate(runs):
        init = r["perf"]["settings"]["args"].get("init")
        if i == 0 and init:
            raise ValueError(f"{where}: the first run ({r['run']}) continues {init}: the chain must start from "
                             "random weights (add the runs before it)")
        if i and not init:
            raise ValueError(f"{where}: {r['run']} starts from random weights, so the runs before it did not "
                             "make its model")
        if r["metrics"] and len(r["metrics"]) != r["perf"]["steps"]:
            raise ValueError(f"{where}: {r['run']} has {len(r['metrics'])} metrics records for "
                             f"{r['perf']['steps']} steps")


def check_last(runs: list[dict], perf: dict, where) -> None:
    """The chain must end with the run being installed (same steps, tokens and final loss as its perf.json)."""
    last, key = runs[-1]["perf"], ("steps", "tokens", "final_loss")
    theirs, ours = {k: last.get(k) for k in key}, {k: perf.get(k) for k in key}
    if theirs != ours:
        raise ValueError(f"the lineage ends with {runs[-1]['run']} ({theirs}), not with the run in {where} ({ours}): "
                         "add that run to the lineage")


def totals(runs: list[dict]) -> dict:
    return {"runs": len(runs), "steps": sum(r["perf"]["steps"] for r in runs),
            "tokens": sum(r["perf"]["tokens"] for r in runs),
            "train_minutes": sum(r["perf"]["train_s"] for r in runs) / 60,
            "devices": sorted({r["perf"]["device"] for r in runs})}


def _flags(args: dict) -> str:
    out = []
    if args.get("row_len"):
        out.append(f"rows of {args['row_len']}")
    else:
        out.append(f"{args.get('seq_len')}-token packs")
    for key, name in (("unlikelihood", "copy-UL"), ("seq_unlikelihood", "seq-UL"), ("chat_repeat", "chat ×")):
        v = args.get(key)
        if v and not (key == "chat_repeat" and v == 1):
            out.append(f"{name} {v:g}")
    return ", ".join(out)


def table(runs: list[dict]) -> str:
    """Markdown: one row per run, then the totals."""
    head = ("| run | from | steps | tokens | minutes | tokens/s (steady) | s/step | peak | lr | settings | "
            "held-out ppl after | what changed |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for i, r in enumerate(runs):
        p, a = r["perf"], r["perf"]["settings"]["args"]
        peak = f"{p['peak_mem_gib']:.1f} GiB" if p.get("peak_mem_gib") is not None else "-"
        ppl = f"{r['eval']['heldout_ppl']:.2f}" if r.get("eval") and "heldout_ppl" in r["eval"] else "-"
        rows.append(f"| {r['run']} | {runs[i - 1]['run'] if i else 'random (`dsv4 synth`, seed 0)'} | {p['steps']} | "
                    f"{p['tokens']:,} | {p['train_s'] / 60:.1f} | {p['tok_per_s_steady']:,.0f} | "
                    f"{p['step_s_median']:.3f} | {peak} | {a['lr']:g} | {_flags(a)} | {ppl} | {r.get('note', '')} |")
    t = totals(runs)
    rows.append(f"| **all** | | **{t['steps']:,}** | **{t['tokens']:,}** | **{t['train_minutes']:.1f}** "
                "| | | | | | | |")
    return head + "\n".join(rows) + "\n"


def plot(runs: list[dict], png: Path, title: str = "built-in model v2: training loss, every run") -> Path:
    """Loss (log scale) against cumulative tokens across the chain, a dotted line where each run starts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4), dpi=110)
    seen = 0
    for i, r in enumerate(runs):
        xs, loss, mtp, at = [], [], [], seen
        for m in r["metrics"]:
            at += m["tokens"]
            xs.append(at / 1e6)
            loss.append(m["loss"])
            mtp.append(m.get("mtp_loss"))
        ax.plot(xs, loss, color="tab:blue", lw=0.8, label="loss" if i == 0 else None)
        if any(v is not None for v in mtp):
            ax.plot(xs, mtp, color="tab:orange", lw=0.6, alpha=0.6, label="MTP loss" if i == 0 else None)
        ax.axvline(seen / 1e6, color="gray", ls=":", lw=0.8)
        ax.text(seen / 1e6, 0.98, f" {r['run']}", transform=ax.get_xaxis_transform(), va="top", fontsize=7,
                color="gray")
        seen = at
    ax.set_yscale("log")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("cross-entropy (nats / target token)")
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return Path(png)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("lineage", nargs="?", default=str(DEFAULT))
    ap.add_argument("--png", help="also draw the chain's loss curve here")
    args = ap.parse_args(argv)
    runs = load(Path(args.lineage))
    print(table(runs), end="")
    if args.png:
        print(f"wrote {plot(runs, Path(args.png))}")


if __name__ == "__main__":
    main()
