"""Training records: `metrics.jsonl` (one JSON object per optimiser step) and the loss-curve PNG."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def expert_load(counts: dict[str, torch.Tensor]) -> dict:
    """Per MoE layer: tokens per routed expert and max/mean imbalance (1.0 = perfectly balanced)."""
    out = {}
    for name, c in counts.items():
        layer = name.removesuffix(".ffn.gate")
        mean = c.float().mean().item()
        out[layer] = {"tokens": c.tolist(), "max_over_mean": round(c.max().item() / mean, 4) if mean else None}
    return out


class MetricsLog:
    def __init__(self, out_dir: str | os.PathLike, resume_step: int = 0):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():                          # keep the records before the resumed step only
            kept = [line for line in self.path.read_text().splitlines() if line.strip()
                    and json.loads(line)["step"] < resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss(metrics_path: str | os.PathLike, png_path: str | os.PathLike, title: str = "training loss") -> Path:
    """Loss (log scale) against step, learning rate on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, [r["loss"] for r in records], label="loss", color="tab:blue")
    if any("mtp_loss" in r for r in records):
        ax.plot(steps, [r.get("mtp_loss") for r in records], label="MTP loss", color="tab:orange", alpha=0.7)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / target token)")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, [r["lr"] for r in records], color="tab:gray", ls="--", lw=0.8, label="lr")
    ax2.set_ylabel("learning rate")
    ax.set_title(title)
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right")
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)
