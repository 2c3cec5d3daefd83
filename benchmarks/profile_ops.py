"""Where a layer's time goes: device time by kernel name, and the number of launches.

    python benchmarks/profile_ops.py --json profile.json                # GPU: GUNN-15 shapes, batch 64
    python benchmarks/profile_ops.py --device cpu --shapes 24/2/8 --batch 2   # a dry run on the CPU

For each backend (default ``native`` and ``triton``), each shape
``CHANNELS/SEGMENTS/SIZE`` (default 240/20/32 and 360/30/8, the first and last
GUNN-15 layers) and each pass (``forward``, as in training, and
``forward+backward``), ``torch.profiler`` records ``--calls`` calls after
``--warmup`` calls (so CUDA graph replay has settled) and reports per call:

- the device time of every kernel name, the top ``--top``, with its share of the
  total and the number of launches;
- the number of kernels (memory copies and sets counted apart) and of host
  launch calls (``cudaLaunchKernel``, ``cuLaunchKernel``, ``cudaGraphLaunch``, ...).

On the CPU the same tables hold the self CPU time of each operator and the
number of operator calls. The layer is a GUNN layer with expansion 2, one
bottleneck per unit, the shortcut branch and BatchNorm in training mode. A
backend that is not available is skipped with a line that says why.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import arguments
import report_json
import seq_update
from gunn_ext import GUNNLayer, backends

DEFAULT_SHAPES = ("240/20/32", "360/30/8")
DEFAULT_BACKENDS = ("native", "triton")
PASSES = {"forward": seq_update.forward, "forward+backward": seq_update.forward_backward}
NAME_WIDTH = 90


@dataclass(frozen=True)
class Shape:
    channels: int
    segments: int
    size: int

    def __str__(self) -> str:
        return f"{self.channels}/{self.segments}/{self.size}"


def _shape(text: str) -> Shape:
    try:
        channels, segments, size = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CHANNELS/SEGMENTS/SIZE such as 240/20/32, got {text!r}") from None
    if min(channels, segments, size) < 1 or channels % segments:
        raise argparse.ArgumentTypeError(f"expected positive ints with SEGMENTS dividing CHANNELS, got {text!r}")
    return Shape(channels, segments, size)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--shapes", type=_shape, nargs="+", default=[_shape(s) for s in DEFAULT_SHAPES],
                        metavar="CHANNELS/SEGMENTS/SIZE", help=f"default {' '.join(DEFAULT_SHAPES)}")
    parser.add_argument("--backends", default=",".join(DEFAULT_BACKENDS),
                        help=f"comma list from {', '.join(backends.NAMES)} (default native,triton)")
    parser.add_argument("--batch", type=arguments.positive_int, default=64)
    parser.add_argument("--dtype", choices=tuple(seq_update.DTYPES), default="float32")
    parser.add_argument("--device", type=arguments.torch_device, help="default: cuda if available, else cpu")
    parser.add_argument("--calls", type=arguments.positive_int, default=3, help="profiled calls (3)")
    parser.add_argument("--warmup", type=arguments.nonnegative_int, default=3, help="calls before profiling (3)")
    parser.add_argument("--top", type=arguments.positive_int, default=15, help="kernel names listed (15)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write every profile and the metadata here")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device} asked for, but torch sees no CUDA GPU")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    args.backends = [n.strip() for n in args.backends.split(",") if n.strip()]
    unknown = [n for n in args.backends if n not in backends.NAMES]
    if unknown:
        parser.error(f"--backends: unknown {unknown}; expected names from {list(backends.NAMES)}")
    return args


def unavailable_reason(name: str, device: torch.device) -> str | None:
    try:
        backends.resolve(name, device.type)
    except ValueError as exc:
        return str(exc)
    return None


def is_launch_call(name: str) -> bool:
    """A host call that starts work on the device: the runtime's or the driver's launches."""
    return name.startswith("cu") and "Launch" in name


def is_copy(name: str) -> bool:
    return name.startswith(("Memcpy", "Memset"))


def tally(events, calls: int, device: torch.device, top: int) -> dict:
    """Per-call totals of a profile: time and count by name, launches, the top names."""
    time_us: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.Counter()
    host_launches: dict[str, int] = collections.Counter()
    on_device = device.type != "cpu"
    for event in events:
        if on_device:
            if event.device_type == DeviceType.CPU:
                if is_launch_call(event.name):
                    host_launches[event.name] += 1
                continue
            time_us[event.name] += event.time_range.elapsed_us()
        else:
            time_us[event.name] += event.self_cpu_time_total
        count[event.name] += 1
    total_us = sum(time_us.values())
    ranked = sorted(time_us, key=time_us.get, reverse=True)
    return {
        "launched": "kernels" if on_device else "operators",
        "time": "device time by kernel" if on_device else "self CPU time by operator",
        "time_ms_per_call": total_us / calls / 1e3,
        "launches_per_call": sum(n for name, n in count.items() if not is_copy(name)) / calls,
        "copies_per_call": sum(n for name, n in count.items() if is_copy(name)) / calls,
        "host_launch_calls_per_call": {name: n / calls for name, n in sorted(host_launches.items())},
        "distinct_names": len(time_us),
        "top": [{"name": name, "time_ms_per_call": time_us[name] / calls / 1e3,
                 "share": time_us[name] / total_us if total_us else 0.0,
                 "count_per_call": count[name] / calls} for name in ranked[:top]],
    }


def profile_pass(layer: torch.nn.Module, step, x: torch.Tensor, dy: torch.Tensor,
                 args: argparse.Namespace) -> dict:
    for _ in range(args.warmup):
        step(layer, x, dy)
    activities = [ProfilerActivity.CPU]
    if args.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize(args.device)
    with profile(activities=activities) as prof:
        for _ in range(args.calls):
            step(layer, x, dy)
        if args.device.type == "cuda":
            torch.cuda.synchronize(args.device)
    return tally(prof.events(), args.calls, args.device, args.top)


def profile_backend(name: str, shape: Shape, args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(args.seed)
    dtype = seq_update.DTYPES[args.dtype]
    layer = GUNNLayer(shape.channels, shape.segments, expansion=2, shortcut=True, backend=name)
    layer = layer.to(args.device, dtype).train()
    generator = torch.Generator().manual_seed(args.seed + 1)
    size = (args.batch, shape.channels, shape.size, shape.size)
    x = torch.randn(size, generator=generator).to(args.device, dtype).requires_grad_()
    dy = torch.randn(size, generator=generator).to(args.device, dtype)
    rows = []
    for pass_name, step in PASSES.items():
        row = {"backend": name, "shape": str(shape), "pass": pass_name}
        try:
            row.update(profile_pass(layer, step, x, dy, args))
            row["error"] = None
        except Exception as exc:  # reported; the other profiles still run
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
    return rows


def print_profile(console: Console, row: dict) -> None:
    head = f"{row['backend']} {row['shape']} {row['pass']}"
    if row["error"]:
        console.print(f"[bold red]FAILED: {head}: {row['error']}[/]")
        return
    launches = ", ".join(f"{name} {n:g}" for name, n in row["host_launch_calls_per_call"].items()) or "-"
    table = Table(title=f"{head}: {row['time_ms_per_call']:.3f} ms ({row['time']}), "
                        f"{row['launches_per_call']:g} {row['launched']} and {row['copies_per_call']:g} "
                        f"copies per call; host launch calls per call: {launches}",
                  title_justify="left")
    for column in ("name", "ms per call", "share", "count per call"):
        table.add_column(column, overflow="fold")
    for entry in row["top"]:
        name = entry["name"] if len(entry["name"]) <= NAME_WIDTH else entry["name"][:NAME_WIDTH - 3] + "..."
        table.add_row(name, f"{entry['time_ms_per_call']:.3f}", f"{100 * entry['share']:.1f}%",
                      f"{entry['count_per_call']:g}")
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 160)
    info = seq_update.machine_info(args.device)
    rows, skipped = [], {}
    for name in args.backends:
        reason = unavailable_reason(name, args.device)
        if reason is not None:
            skipped[name] = reason
            console.print(f"skipped {name}: {reason}")
            continue
        for shape in args.shapes:
            seq_update.progress.print(f"profiling {name} at {shape}, batch {args.batch} ...")
            for row in profile_backend(name, shape, args):
                print_profile(console, row)
                rows.append(row)
    console.print(seq_update.describe_machine(info))
    if args.json:
        options = report_json.options(args)
        options["shapes"] = [str(s) for s in args.shapes]
        report = {"benchmark": "profile_ops",
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                  "args": options, "machine": info,
                  "skipped": skipped, "profiles": rows}
        report_json.write(args.json, report)
        console.print(f"wrote {args.json}")
    return int(any(row["error"] for row in rows))


if __name__ == "__main__":
    sys.exit(main())
