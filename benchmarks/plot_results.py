"""Bar chart of a ``seq_update.py`` report: times and memory per backend.

    python benchmarks/plot_results.py results.json chart.png

Bars are medians; whiskers span p20 to p80. Failed backends are left out.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MIB = 2.0 ** 20
MEMORY_TITLES = {"saved_bytes": "saved for backward (MiB)",
                 "peak_bytes": "peak during forward+backward (MiB)"}


def _time_panel(axis, results: list[dict], stage: str, title: str) -> None:
    names = [r["backend"] for r in results]
    medians = [r[stage]["median_ms"] for r in results]
    whiskers = [[r[stage]["median_ms"] - r[stage]["p20_ms"] for r in results],
                [r[stage]["p80_ms"] - r[stage]["median_ms"] for r in results]]
    axis.bar(names, medians, yerr=whiskers, capsize=4, color="tab:blue")
    axis.set_title(title)
    axis.set_ylabel("ms")


def _memory_panel(axis, results: list[dict], key: str, input_bytes: int) -> None:
    names = [r["backend"] for r in results]
    values = [r["memory"][key] / MIB for r in results]
    bars = axis.bar(names, values, color="tab:orange")
    axis.bar_label(bars, labels=[f"{r['memory'][key] / input_bytes:.1f}x input" for r in results],
                   fontsize=8)
    axis.set_title(MEMORY_TITLES.get(key, key))
    axis.set_ylabel("MiB")


def plot_results(report: dict, path: str | Path) -> None:
    """Write a PNG with forward, forward+backward and memory panels."""
    results = [r for r in report["results"] if not r["error"]]
    if not results:
        raise ValueError("report has no successful backend to plot")
    key = report["memory_metric"]
    figure, axes = plt.subplots(1, 3, figsize=(3 + 3.2 * len(results), 4.5))
    _time_panel(axes[0], results, "forward", "forward")
    _time_panel(axes[1], results, "forward_backward", "forward + backward")
    _memory_panel(axes[2], results, key, report["input_bytes"])
    args, machine = report["args"], report["machine"]
    where = machine.get("gpu") or machine["cpu"]
    figure.suptitle(f"{args['layer'].upper()} {args['channels']} ch / {args['segments']} segments, "
                    f"{args['batch']}x{args['size']}x{args['size']} {args['dtype']}, {args['mode']}; "
                    f"{where}, torch {machine['torch']}", fontsize=10)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Plot a seq_update.py JSON report.")
    parser.add_argument("report", type=Path)
    parser.add_argument("output", type=Path)
    args = parser.parse_args(argv)
    plot_results(json.loads(args.report.read_text()), args.output)


if __name__ == "__main__":
    main()
