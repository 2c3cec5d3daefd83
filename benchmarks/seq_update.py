"""Speed and memory of one GUNN (or SUNN) layer across backends.

    python benchmarks/seq_update.py --segments 30 [--no-compile] [--json out.json] [--plot out.png]

The layer has ``channels = 12 * segments`` channels (the paper's n = 12 per
segment) on ``size x size`` maps, expansion 2, one bottleneck per unit and
the shortcut branch, as in the last GUNN-15 layer (360 channels, 30 segments,
8x8). Every backend runs a deep copy of the same layer; ``compile`` is
``torch.compile`` of the reference backend. For each one it measures

``forward``           ``y = layer(x)`` with autograd recording, as in training
``forward+backward``  ``y = layer(x); y.backward(dy)``
``memory``            on a GPU, the peak bytes allocated during forward+backward
                      above what the inputs and parameters already hold; on
                      every device, the bytes autograd saves for backward
                      (unique storages, the layer's parameters and buffers left out)

Times are the median (with p20 and p80) of ``--repeats`` calls after
``--warmup`` calls, cycling through a few inputs so caches do not flatter;
on a GPU they come from CUDA events. Outputs ``y`` and input gradients
``dx`` are compared with the reference run in float64 on the same weights::

    err(a) = ||a - a_64|| / ||a_64||      (Frobenius norms)

A backend is flagged as a mismatch when ``err > 2 err_reference + floor``:
it must be about as accurate as the naive loop in the same precision. The
floor for ``y`` is 1e-12 in float64, 1e-5 in float32, 1e-3 in float16 and
1e-2 in bfloat16. For ``dx`` it is 1e-12, 1e-2, 6e-2 and 1.5e-1: below
float64, a value within rounding of zero may take the other side of a ReLU
than in float64, in any implementation (the naive loop included, when its
rounding falls the other way). The gradient of that element then changes by
O(1), and ``dx`` by about 1e-3 relative for one such value. A wrong kernel
is off by O(1).
The exit status is 1 when a backend failed or mismatched.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import gunn_ext
import plot_results
import report_json
from arguments import nonnegative_int, positive_int, torch_device
from gunn_ext import GUNNLayer, SUNNLayer, conventions, cuda_graphs
from gunn_ext.backends import NAMES as BACKEND_NAMES

COMPILE = "compile"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16, "float64": torch.float64}
CHANNELS_PER_SEGMENT = 12
ROTATING_INPUTS = 4
DEFAULTS = {"cpu": {"batch": 16, "repeats": 20, "warmup": 3},
            "cuda": {"batch": 64, "repeats": 100, "warmup": 10}}
ERROR_FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
GRADIENT_ERROR_FLOOR = {torch.float64: 1e-12, torch.float32: 1e-2, torch.float16: 6e-2,
                        torch.bfloat16: 1.5e-1}
MIB = 2.0 ** 20

progress = Console(stderr=True, highlight=False)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segments", type=positive_int, default=30)
    parser.add_argument("--channels", type=positive_int,
                        help=f"default: {CHANNELS_PER_SEGMENT} x segments")
    parser.add_argument("--size", type=positive_int, default=8, help="height = width")
    parser.add_argument("--batch", type=positive_int, help="default: 16 on CPU, 64 on GPU")
    parser.add_argument("--expansion", type=positive_int, default=2)
    parser.add_argument("--bottlenecks", type=positive_int, default=1, help="bottlenecks per update unit")
    parser.add_argument("--no-shortcut", dest="shortcut", action="store_false")
    parser.add_argument("--layer", choices=("gunn", "sunn"), default="gunn")
    parser.add_argument("--mode", choices=("train", "eval"), default="train",
                        help="train: BatchNorm uses batch statistics; eval: running statistics")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--device", type=torch_device, help="default: cuda if available, else cpu")
    parser.add_argument("--backends",
                        help=f"comma list from {', '.join(BACKEND_NAMES + (COMPILE,))}; "
                             "default: every available backend and compile")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="leave out torch.compile of the reference (minutes on a CPU)")
    parser.add_argument("--channels-last", action="store_true",
                        help="inputs and gradients in channels_last, the native op's layout (default NCHW)")
    parser.add_argument("--tf32", action="store_true",
                        help="float32 products in TF32 in every backend (torch.set_float32_matmul_precision"
                             "('high'): the native op's GEMMs and the Triton kernels' dots), as PyTorch's "
                             "convolutions, the reference's, are by default (torch.backends.cudnn.allow_tf32)")
    parser.add_argument("--repeats", type=positive_int, help="default: 20 on CPU, 100 on GPU")
    parser.add_argument("--warmup", type=nonnegative_int, help="default: 3 on CPU, 10 on GPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write every raw number and the metadata here")
    parser.add_argument("--plot", type=Path, help="write a PNG bar chart here")
    args = parser.parse_args(argv)

    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device} asked for, but torch sees no CUDA GPU")
    defaults = DEFAULTS.get(args.device.type, DEFAULTS["cpu"])
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.channels is None:
        args.channels = CHANNELS_PER_SEGMENT * args.segments
    if args.channels % args.segments:
        parser.error(f"--channels ({args.channels}) must be a multiple of --segments ({args.segments})")
    args.backends = _backend_list(parser, args)
    if args.plot:
        plot_results.check_available(parser)
    return args


def _backend_list(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    if args.backends is None:
        names = gunn_ext.available_backends(args.device) + [COMPILE]
    else:
        names = [n.strip() for n in args.backends.split(",") if n.strip()]
        unknown = [n for n in names if n not in BACKEND_NAMES + (COMPILE,)]
        if unknown:
            parser.error(f"--backends: unknown {unknown}; expected names from "
                         f"{list(BACKEND_NAMES + (COMPILE,))}")
    if not args.compile:
        names = [n for n in names if n != COMPILE]
    # The reference is the baseline of every ratio: always first.
    return ["reference"] + [n for n in dict.fromkeys(names) if n != "reference"]


# --------------------------------------------------------------------------- measuring


@dataclass
class Workload:
    """The inputs every backend sees, and the float64 answer they must match."""

    inputs: list[torch.Tensor]
    grads: list[torch.Tensor]
    expected_y: torch.Tensor
    expected_dx: torch.Tensor

    @property
    def input_bytes(self) -> int:
        return self.inputs[0].numel() * self.inputs[0].element_size()


def make_layer(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    cls = GUNNLayer if args.layer == "gunn" else SUNNLayer
    layer = cls(args.channels, args.segments, expansion=args.expansion, bottlenecks=args.bottlenecks,
                shortcut=args.shortcut, backend="reference")
    return layer.train(args.mode == "train")


def make_workload(layer: torch.nn.Module, args: argparse.Namespace) -> Workload:
    generator = torch.Generator().manual_seed(args.seed + 1)
    shape = (args.batch, args.channels, args.size, args.size)
    dtype, count = DTYPES[args.dtype], ROTATING_INPUTS

    layout = torch.channels_last if args.channels_last else torch.contiguous_format

    def random() -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(args.device, dtype, memory_format=layout)

    inputs = [random().requires_grad_() for _ in range(count)]
    grads = [random() for _ in range(count)]
    oracle = copy.deepcopy(layer).to(args.device, torch.float64)
    x = inputs[0].detach().double().requires_grad_()
    y = oracle(x)
    y.backward(grads[0].double())
    return Workload(inputs, grads, y.detach(), x.grad)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.norm().clamp_min(torch.finfo(expected.dtype).tiny)
    return float((actual.double() - expected).norm() / scale)


def clear_grads(module: torch.nn.Module, x: torch.Tensor) -> None:
    module.zero_grad(set_to_none=True)
    x.grad = None


def forward(module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
    module(x)


def forward_backward(module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
    clear_grads(module, x)
    module(x).backward(dy)


def time_ms(step, module, work: Workload, warmup: int, repeats: int,
            device: torch.device) -> list[float]:
    """Wall time of ``repeats`` calls of ``step`` in milliseconds, inputs rotating."""
    def call(i: int) -> None:
        k = i % len(work.inputs)
        step(module, work.inputs[k], work.grads[k])

    for i in range(warmup):
        call(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for i, (start, end) in enumerate(events):
            start.record()
            call(i)
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    samples = []
    for i in range(repeats):
        start = time.perf_counter()
        call(i)
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def summary(samples: list[float]) -> dict:
    p20, median, p80 = np.percentile(samples, [20, 50, 80])
    return {"median_ms": float(median), "p20_ms": float(p20), "p80_ms": float(p80),
            "samples_ms": samples}


def saved_for_backward_bytes(module, layer, x: torch.Tensor) -> int:
    """Bytes of the unique storages autograd keeps for backward, layer state excluded."""
    state = {t.untyped_storage().data_ptr()
             for t in list(layer.parameters()) + list(layer.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in state:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    del y
    return sum(saved.values())


def peak_training_bytes(module, x: torch.Tensor, dy: torch.Tensor, device: torch.device) -> int:
    """Peak CUDA bytes allocated by forward+backward above the memory already in use."""
    clear_grads(module, x)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    forward_backward(module, x, dy)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - baseline


@contextlib.contextmanager
def cold_inductor_cache():
    """A fresh, temporary inductor cache, so compile time is not that of a cache hit."""
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="seq_update_inductor_") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous


@dataclass
class Result:
    backend: str
    first_call_s: dict = field(default_factory=dict)
    forward: dict | None = None
    forward_backward: dict | None = None
    memory: dict = field(default_factory=dict)
    error_y: float | None = None
    error_dx: float | None = None
    mismatch: bool = False
    error: str | None = None
    traceback: str | None = None


def benchmark_backend(name: str, layer: torch.nn.Module, work: Workload,
                      args: argparse.Namespace) -> Result:
    """Every measurement of one backend; an exception ends it and is recorded."""
    result = Result(name)
    layer = copy.deepcopy(layer)
    layer.backend = "reference" if name == COMPILE else name
    module = torch.compile(layer) if name == COMPILE else layer
    stage = "first call"
    try:
        x, dy = work.inputs[0], work.grads[0]
        clear_grads(module, x)
        start = time.perf_counter()
        y = module(x)
        _synchronize(args.device)
        middle = time.perf_counter()
        y.backward(dy)
        _synchronize(args.device)
        result.first_call_s = {"forward": middle - start, "backward": time.perf_counter() - middle}
        result.error_y = relative_error(y.detach(), work.expected_y)
        result.error_dx = relative_error(x.grad, work.expected_dx)
        del y
        for stage, step in (("forward", forward), ("forward_backward", forward_backward)):
            progress.print(f"    {stage.replace('_', '+')} ...")
            samples = time_ms(step, module, work, args.warmup, args.repeats, args.device)
            setattr(result, stage, summary(samples))
        stage = "memory"
        result.memory["saved_bytes"] = saved_for_backward_bytes(module, layer, x)
        if args.device.type == "cuda":
            # Replayed graphs keep their intermediates in private pools, which
            # max_memory_allocated does not see: measure with replay off.
            with cuda_graphs.disabled():
                result.memory["peak_bytes"] = peak_training_bytes(module, x, dy, args.device)
    except Exception as exc:  # a failing backend is reported, the others still run
        result.error = f"{stage}: {type(exc).__name__}: {exc}"
        result.traceback = traceback.format_exc()
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flag_mismatches(results: list[Result], dtype: torch.dtype) -> None:
    reference = results[0]
    for r in results:
        for error, reference_error, floor in (
                (r.error_y, reference.error_y, ERROR_FLOOR[dtype]),
                (r.error_dx, reference.error_dx, GRADIENT_ERROR_FLOOR[dtype])):
            if error is None:
                continue
            tolerance = 2 * (reference_error or 0.0) + floor
            if not np.isfinite(error) or error > tolerance:
                r.mismatch = True


# --------------------------------------------------------------------------- reporting


def memory_metric(device: torch.device) -> tuple[str, str]:
    if device.type == "cuda":
        return "peak_bytes", "peak allocated during forward+backward"
    return "saved_bytes", "saved for backward"


def machine_info(device: torch.device) -> dict:
    info = {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "gunn_ext": gunn_ext.__version__, "git_commit": _git_commit()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory,
                    compute_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(),
                    float32_precision=conventions.precision_state())
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def describe_config(args: argparse.Namespace) -> str:
    return (f"{args.layer.upper()} layer: {args.channels} channels, {args.segments} segments, "
            f"expansion {args.expansion}, bottlenecks {args.bottlenecks}, shortcut {'on' if args.shortcut else 'off'}; "
            f"input {args.batch}x{args.channels}x{args.size}x{args.size} {args.dtype}"
            f"{' channels_last' if args.channels_last else ''} on {args.device}, "
            f"{args.mode} mode; median (p20-p80) of {args.repeats} after {args.warmup} warm-up")


def describe_machine(info: dict) -> str:
    where = f"GPU {info['gpu']} (CUDA {info['cuda']})" if "gpu" in info else f"CPU {info['cpu']}"
    return f"{where}, torch {info['torch']}, {info['torch_threads']} threads, commit {info['git_commit']}"


def format_ms(stats: dict | None) -> str:
    if stats is None:
        return "-"
    return f"{stats['median_ms']:.2f} ({stats['p20_ms']:.2f}-{stats['p80_ms']:.2f})"


def format_ratio(numerator: float | None, denominator: float | None, digits: int = 2) -> str:
    if not numerator or not denominator:
        return "-"
    return f"{numerator / denominator:.{digits}f}x"


def build_table(results: list[Result], work: Workload, args: argparse.Namespace,
                info: dict) -> Table:
    key, meaning = memory_metric(args.device)
    table = Table(title=describe_config(args), title_justify="left", caption_justify="left",
                  caption=f"memory: {meaning}; ratios against the reference\n{describe_machine(info)}")
    for header in ("backend", "forward ms", "fwd+bwd ms", "speedup fwd", "speedup fwd+bwd",
                   "memory MiB (x input)", "memory ratio", "rel diff y / dx", "status"):
        table.add_column(header, overflow="fold")
    reference = results[0]

    def median(r: Result, stage: str) -> float | None:
        stats = getattr(r, stage)
        return None if stats is None else stats["median_ms"]

    for r in results:
        memory = r.memory.get(key)
        diff = "-" if r.error_y is None else f"{r.error_y:.1e} / {r.error_dx:.1e}"
        if r.error:
            status = "[bold red]FAILED[/]"
        elif r.mismatch:
            status = "[bold red]MISMATCH[/]"
        else:
            status = "[green]ok[/]"
        table.add_row(
            r.backend, format_ms(r.forward), format_ms(r.forward_backward),
            format_ratio(median(reference, "forward"), median(r, "forward")),
            format_ratio(median(reference, "forward_backward"), median(r, "forward_backward")),
            "-" if memory is None else f"{memory / MIB:.2f} ({memory / work.input_bytes:.1f}x)",
            format_ratio(memory, reference.memory.get(key), 3),
            diff, status)
    return table


def build_report(results: list[Result], work: Workload, args: argparse.Namespace,
                 info: dict) -> dict:
    arguments = report_json.options(args)
    return {
        "benchmark": "seq_update",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "args": arguments,
        "machine": info,
        "input_bytes": work.input_bytes,
        "memory_metric": memory_metric(args.device)[0],
        "compile_cache": "cold (fresh TORCHINDUCTOR_CACHE_DIR)",
        "results": [vars(r) for r in results],
    }


def warn_if_busy(info: dict) -> None:
    busy = info["load_average_1m_at_start"]
    if busy is not None and busy > 0.25 * (os.cpu_count() or 1):
        progress.print(f"[yellow]load average {busy:.2f}: other processes share the CPU; "
                       "times may be inflated[/]")


def run_backends(args: argparse.Namespace) -> tuple[list[Result], Workload]:
    """Every backend of ``args.backends`` on the layer ``args`` describes, mismatches flagged."""
    layer = make_layer(args).to(args.device, DTYPES[args.dtype])
    progress.print(f"building inputs and the float64 reference on {args.device} ...")
    work = make_workload(layer, args)
    results = []
    for i, name in enumerate(args.backends, 1):
        progress.print(f"[{i}/{len(args.backends)}] {name}"
                       + (" (compiling takes minutes)" if name == COMPILE else ""))
        context = cold_inductor_cache() if name == COMPILE else contextlib.nullcontext()
        with context:
            results.append(benchmark_backend(name, layer, work, args))
        if results[-1].error:
            progress.print(f"    [red]failed: {escape(results[-1].error.splitlines()[0])}[/]")
    flag_mismatches(results, DTYPES[args.dtype])
    return results, work


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with conventions.float32_products(True if args.tf32 else None):
        return _run(args)


def _run(args: argparse.Namespace) -> dict:
    console = Console(width=None if sys.stdout.isatty() else 160)
    info = machine_info(args.device)
    warn_if_busy(info)
    results, work = run_backends(args)

    console.print(build_table(results, work, args, info))
    for r in results:
        if r.backend == COMPILE and r.first_call_s:
            console.print(f"torch.compile time (first forward + backward): "
                          f"{sum(r.first_call_s.values()):.1f} s "
                          f"(forward {r.first_call_s['forward']:.1f} s, "
                          f"backward {r.first_call_s['backward']:.1f} s)")
    for r in results:
        if r.error:
            console.print(f"[bold red]FAILED: {r.backend} at {escape(r.error)}[/]")
        if r.mismatch:
            console.print(f"[bold red]MISMATCH: {r.backend} differs from the float64 reference by "
                          f"{_sci(r.error_y)} (y) / {_sci(r.error_dx)} (dx); the reference itself by "
                          f"{_sci(results[0].error_y)} / {_sci(results[0].error_dx)}[/]")

    report = build_report(results, work, args, info)
    save_report(report, args, plot_results.plot_results, console)
    return report


def _sci(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def save_report(report: dict, args, plot, console) -> None:
    """Writes ``report`` to ``args.json`` (``report_json``) and its chart,
    drawn by ``plot``, to ``args.plot``."""
    if args.json:
        report_json.write(args.json, report)
        console.print(f"wrote {args.json}")
    if args.plot:
        plot(report, args.plot)
        console.print(f"wrote {args.plot}")


def exit_status(report: dict) -> int:
    return int(any(r["error"] or r["mismatch"] for r in report["results"]))


if __name__ == "__main__":
    sys.exit(exit_status(main()))
