"""Charts of benchmark reports: ``seq_update.py`` and ``segment_sweep.py``.

    python benchmarks/plot_results.py report.json chart.png

``seq_update``: bars per backend for forward, forward+backward and memory.
``segment_sweep``: time against the number of segments P, log-log, one line
per backend and pass. Points are medians; whiskers span p20 to p80. Failed
runs are left out. Needs matplotlib (the ``bench`` extra).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from gunn_ext.extras import MissingExtra, require

FEATURE = "charts (--plot, plot_results.py)"
MIB = 2.0 ** 20
MEMORY_TITLES = {"saved_bytes": "saved for backward (MiB)",
                 "peak_bytes": "peak during forward+backward (MiB)"}


def pyplot():
    """``matplotlib.pyplot`` with the file-only backend, or :class:`MissingExtra`."""
    matplotlib = require("matplotlib", "bench", FEATURE)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def check_available(parser: argparse.ArgumentParser) -> None:
    """Exit with one line naming the extra when charts cannot be drawn (before any measuring)."""
    try:
        pyplot()
    except MissingExtra as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")


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
    plt = pyplot()
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


def plot_sweep(report: dict, path: str | Path) -> None:
    """Write a PNG of time against P (log-log): one line per backend and pass."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7.5, 5))
    drawn = 0
    for k, backend in enumerate(report["backends"]):
        for stage, style, label in (("forward", "-o", "forward"),
                                    ("forward_backward", "--s", "fwd+bwd")):
            points = [(row["segments"], row[stage]) for row in report["rows"]
                      if row["backend"] == backend and not row["error"] and row[stage]]
            if not points:
                continue
            p = [segments for segments, _ in points]
            median = [stats["median_ms"] for _, stats in points]
            whiskers = [[stats["median_ms"] - stats["p20_ms"] for _, stats in points],
                        [stats["p80_ms"] - stats["median_ms"] for _, stats in points]]
            axis.errorbar(p, median, yerr=whiskers, fmt=style, color=f"C{k}", capsize=3,
                          label=f"{backend} {label}")
            drawn += 1
    if not drawn:
        raise ValueError("report has no successful run to plot")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xticks(report["segments"], [str(p) for p in report["segments"]])
    axis.minorticks_off()
    axis.set_xlabel("segments P")
    axis.set_ylabel("ms (median, p20-p80)")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8)
    args, machine = report["args"], report["machine"]
    where = machine.get("gpu") or machine["cpu"]
    axis.set_title(f"{args['channels']} channels, {args['batch']}x{args['size']}x{args['size']} "
                   f"{args['dtype']}, {args['mode']}; {where}, torch {machine['torch']}", fontsize=9)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


PLOTTERS = {"seq_update": plot_results, "segment_sweep": plot_sweep}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="JSON written by seq_update.py or segment_sweep.py --json")
    parser.add_argument("output", type=Path, help="PNG to write")
    args = parser.parse_args(argv)
    check_available(parser)
    report = json.loads(args.report.read_text())
    kind = report.get("benchmark")
    if kind not in PLOTTERS:
        parser.error(f"report: expected a report of {sorted(PLOTTERS)}, got benchmark={kind!r}")
    PLOTTERS[kind](report, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
