"""Training curves from ``metrics.jsonl``: one run, or several compared (Figure 3 of
the paper compares SUNN-15 and GUNN-15 this way)."""
from __future__ import annotations

from pathlib import Path

from ..extras import require
from .metrics import read_records

PLOT_FEATURE = "training curves (--plot, python -m gunn_ext.train plot)"


def epoch_records(run_dir: str | Path) -> list[dict]:
    records = [r for r in read_records(run_dir) if r["kind"] == "epoch"]
    if not records:
        raise ValueError(f"{run_dir} has no finished epoch to plot yet")
    return records


def _figure():
    matplotlib = require("matplotlib", "train", PLOT_FEATURE)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, error_ax) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, label in ((loss_ax, "cross-entropy loss"), (error_ax, "error (%)")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    return plt, fig, loss_ax, error_ax


def _draw(loss_ax, error_ax, records: list[dict], label: str, color=None) -> None:
    epochs = [r["epoch"] for r in records]
    for ax, key, scale in ((loss_ax, "loss", 1.0), (error_ax, "acc", None)):
        for split, style in (("train", "--"), ("test", "-")):
            values = [r[f"{split}_{key}"] for r in records]
            if scale is None:
                values = [100.0 * (1.0 - v) for v in values]
            ax.plot(epochs, values, style, color=color, label=f"{label} {split}")


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Loss and error vs epoch (train dashed, test solid) -> ``<run>/curves.png``."""
    run_dir = Path(run_dir)
    output = Path(output) if output else run_dir / "curves.png"
    plt, fig, loss_ax, error_ax = _figure()
    _draw(loss_ax, error_ax, epoch_records(run_dir), run_dir.name, color="C0")
    loss_ax.legend()
    error_ax.legend()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output


def plot_comparison(run_dirs: list[str | Path], output: str | Path,
                    labels: list[str] | None = None) -> Path:
    """Several runs on the same axes, e.g. ``plot_comparison([sunn15_run, gunn15_run], ...)``."""
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"got {len(labels)} labels for {len(run_dirs)} runs")
    labels = labels or [Path(r).name for r in run_dirs]
    plt, fig, loss_ax, error_ax = _figure()
    for k, (run_dir, label) in enumerate(zip(run_dirs, labels)):
        _draw(loss_ax, error_ax, epoch_records(run_dir), label, color=f"C{k}")
    loss_ax.legend()
    error_ax.legend()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output
