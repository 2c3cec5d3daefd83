"""Time of one GUNN layer against its number of segments P, at a fixed width.

    python benchmarks/segment_sweep.py                        # 240 channels, P = 20 .. 240
    python benchmarks/segment_sweep.py --json sweep.json --plot sweep.png

A layer of N channels in P segments of n = N / P channels, expansion K, does
per pixel

    1x1 GEMMs (shortcut, conv1, conv3)   P * (N (K + 1) n + K n^2)  =  N^2 (K + 1) + K N^2 / P
    3x3 convolution                      P * 9 (K n)^2              =  9 K^2 N^2 / P

multiply-adds: the same or less at P = N than at P = 20. A backend whose time
follows the arithmetic is as fast at P = N as at P = 20; one that pays a fixed
cost per segment grows linearly with P. For every P and every available
backend (``reference``, ``native``, ``triton`` where it runs) this measures
forward and forward+backward with ``seq_update.py``'s measurements: median
(p20-p80) of the timed calls after warm-up, and the accuracy check against the
float64 reference on the same weights. The table gives each median's ratio to
the first P of the same backend, and the speedup over the reference at the
same P. The exit status is 1 when a run failed or mismatched.
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import arguments
import gunn_ext
import plot_results
import report_json
import seq_update
from gunn_ext.backends import NAMES as BACKEND_NAMES

DEFAULT_SEGMENTS = (20, 40, 60, 80, 120, 240)
DEFAULTS = {"cpu": {"size": 16, "batch": 8, "repeats": 10, "warmup": 2},
            "cuda": {"size": 32, "batch": 64, "repeats": 20, "warmup": 5}}
STAGES = ("forward", "forward_backward")


def _segment_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive ints, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive ints, got {text!r}")
    return sorted(set(values))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--channels", type=arguments.positive_int, default=240)
    parser.add_argument("--segments", type=_segment_list, default=list(DEFAULT_SEGMENTS),
                        help="comma list of P, each dividing --channels (default "
                             f"{','.join(map(str, DEFAULT_SEGMENTS))}); ratios are to the smallest")
    parser.add_argument("--size", type=arguments.positive_int, help="height = width (default 16 on CPU, 32 on GPU)")
    parser.add_argument("--batch", type=arguments.positive_int, help="default 8 on CPU, 64 on GPU")
    parser.add_argument("--expansion", type=arguments.positive_int, default=2)
    parser.add_argument("--mode", choices=("train", "eval"), default="train")
    parser.add_argument("--dtype", choices=tuple(seq_update.DTYPES), default="float32")
    parser.add_argument("--channels-last", action="store_true", help="channels_last inputs (default NCHW)")
    parser.add_argument("--device", type=arguments.torch_device, help="default: cuda if available, else cpu")
    parser.add_argument("--backends", help=f"comma list from {', '.join(BACKEND_NAMES)}; "
                                           "default: every available backend")
    parser.add_argument("--repeats", type=arguments.positive_int, help="default 10 on CPU, 20 on GPU")
    parser.add_argument("--warmup", type=arguments.nonnegative_int, help="default 2 on CPU, 5 on GPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write every raw number and the metadata here")
    parser.add_argument("--plot", type=Path, help="write a PNG of time against P here")
    args = parser.parse_args(argv)

    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device} asked for, but torch sees no CUDA GPU")
    for name, value in DEFAULTS.get(args.device.type, DEFAULTS["cpu"]).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    uneven = [p for p in args.segments if args.channels % p]
    if uneven:
        parser.error(f"--segments: each P must divide --channels ({args.channels}); {uneven} do not")
    if args.backends is None:
        args.backends = gunn_ext.available_backends(args.device)
    else:
        args.backends = [n.strip() for n in args.backends.split(",") if n.strip()]
        unknown = [n for n in args.backends if n not in BACKEND_NAMES]
        if unknown:
            parser.error(f"--backends: unknown {unknown}; expected names from {list(BACKEND_NAMES)}")
    args.backends = ["reference"] + [n for n in dict.fromkeys(args.backends) if n != "reference"]
    if args.plot:
        plot_results.check_available(parser)
    return args


def layer_args(args: argparse.Namespace, segments: int) -> argparse.Namespace:
    """``seq_update.py``'s arguments for the layer with ``segments`` segments."""
    return seq_update.parse_args([
        "--channels", str(args.channels), "--segments", str(segments), "--size", str(args.size),
        "--batch", str(args.batch), "--expansion", str(args.expansion), "--mode", args.mode,
        "--dtype", args.dtype, "--device", str(args.device), "--backends", ",".join(args.backends),
        "--no-compile", "--repeats", str(args.repeats), "--warmup", str(args.warmup),
        "--seed", str(args.seed)] + (["--channels-last"] if args.channels_last else []))


def sweep(args: argparse.Namespace) -> list[dict]:
    """One row per (P, backend), in the order of ``args.segments`` then ``args.backends``."""
    rows = []
    for k, segments in enumerate(args.segments, 1):
        seq_update.progress.print(f"[bold]P = {segments}[/] ({k}/{len(args.segments)}, "
                                  f"{args.channels // segments} channels per segment)")
        results, _ = seq_update.run_backends(layer_args(args, segments))
        for r in results:
            rows.append({"segments": segments, "channels_per_segment": args.channels // segments,
                         **vars(r)})
    return rows


def _median(row: dict | None, stage: str) -> float | None:
    if row is None or row[stage] is None:
        return None
    return row[stage]["median_ms"]


def build_table(rows: list[dict], args: argparse.Namespace, info: dict) -> Table:
    first = args.segments[0]
    table = Table(title=(f"GUNN layer, {args.channels} channels, expansion {args.expansion}, shortcut on; "
                         f"input {args.batch}x{args.channels}x{args.size}x{args.size} {args.dtype}"
                         f"{' channels_last' if args.channels_last else ''} on "
                         f"{args.device}, {args.mode} mode; median (p20-p80) of {args.repeats} after "
                         f"{args.warmup} warm-up"),
                  title_justify="left", caption_justify="left",
                  caption=(f"vs P={first}: the median over the same backend's at P = {first}; "
                           f"speedup: the reference's median over the backend's at the same P\n"
                           f"{seq_update.describe_machine(info)}"))
    for header in ("P", "n", "backend", "forward ms", "fwd+bwd ms", f"fwd vs P={first}",
                   f"fwd+bwd vs P={first}", "speedup fwd", "speedup fwd+bwd", "status"):
        table.add_column(header, overflow="fold")
    by_key = {(row["segments"], row["backend"]): row for row in rows}
    for row in rows:
        base = by_key.get((first, row["backend"]))
        reference = by_key.get((row["segments"], "reference"))
        if row["error"]:
            status = "[bold red]FAILED[/]"
        elif row["mismatch"]:
            status = "[bold red]MISMATCH[/]"
        else:
            status = "[green]ok[/]"
        table.add_row(
            str(row["segments"]), str(row["channels_per_segment"]), row["backend"],
            seq_update.format_ms(row["forward"]), seq_update.format_ms(row["forward_backward"]),
            *(seq_update.format_ratio(_median(row, stage), _median(base, stage)) for stage in STAGES),
            *(seq_update.format_ratio(_median(reference, stage), _median(row, stage)) for stage in STAGES),
            status)
    return table


def build_report(rows: list[dict], args: argparse.Namespace, info: dict) -> dict:
    options = report_json.options(args)
    return {
        "benchmark": "segment_sweep",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "args": options,
        "machine": info,
        "segments": args.segments,
        "backends": args.backends,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 180)
    info = seq_update.machine_info(args.device)
    seq_update.warn_if_busy(info)
    rows = sweep(args)
    console.print(build_table(rows, args, info))
    for row in rows:
        if row["error"]:
            console.print(f"[bold red]FAILED: {row['backend']} at P = {row['segments']}: "
                          f"{escape(row['error'])}[/]")
        elif row["mismatch"]:
            console.print(f"[bold red]MISMATCH: {row['backend']} at P = {row['segments']} differs from "
                          f"the float64 reference by {row['error_y']:.2e} (y) / {row['error_dx']:.2e} (dx)[/]")
    report = build_report(rows, args, info)
    seq_update.save_report(report, args, plot_results.plot_sweep, console)
    return report


def exit_status(report: dict) -> int:
    return int(any(row["error"] or row["mismatch"] for row in report["rows"]))


if __name__ == "__main__":
    sys.exit(exit_status(main()))
