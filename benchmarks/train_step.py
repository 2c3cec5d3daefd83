"""Training throughput of a whole network: images/s and peak memory per backend.

    python benchmarks/train_step.py                          # GUNN-15, batch 64 on a GPU
    python benchmarks/train_step.py --model sunn15 --backends reference,native --json out.json

Each step is one SGD update (momentum 0.9, weight decay 1e-4, as in the paper)
on synthetic CIFAR-shaped data (3x32x32, random labels): forward, cross
entropy, backward, step. Every backend trains a copy of the same initial
network. Warm-up runs until CUDA graph capture has settled. Peak memory is
``torch.cuda.max_memory_allocated`` over one more step with graph replay off,
so that every intermediate is counted (GPU only; the paper reports 2.485 GB
for GUNN-15 at batch 64). As in the training CLI, every float32 product on
the GPU runs in TF32 (``--no-tf32``: all in IEEE float32).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from datetime import datetime, timezone

import torch
from rich.console import Console
from rich.table import Table

import report_json
import seq_update
from arguments import nonnegative_int, positive_float, positive_int, torch_device
import gunn_ext
from gunn_ext import conventions, cuda_graphs
from gunn_ext.models import MODELS, build_model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gunn15", choices=sorted(MODELS))
    p.add_argument("--num-classes", type=positive_int, default=10)
    p.add_argument("--width", type=positive_float, default=1.0, help="channel multiplier (1.0 = the paper's)")
    p.add_argument("--segment-channels", type=positive_int,
                   help="channels per segment in every GUNN/SUNN layer (default: the paper's; 1 = P = N)")
    p.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=positive_int, help="default 64 on a GPU, 8 on the CPU")
    p.add_argument("--backends", help="comma list (default: every available backend)")
    p.add_argument("--amp", choices=["bf16", "fp16"], help="autocast dtype")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="every float32 product in TF32 on the GPU, as the training CLI's --tf32 "
                        "(default; --no-tf32: IEEE float32 everywhere)")
    p.add_argument("--steps", type=positive_int, default=10, help="timed steps")
    p.add_argument("--warmup", type=nonnegative_int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write every measurement here")
    args = p.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for, but torch sees no CUDA GPU")
    if args.backends is not None:
        args.backends = args.backends.split(",")
        unknown = [name for name in args.backends if name not in gunn_ext.backends.NAMES]
        if unknown:
            p.error(f"--backends: unknown {', '.join(map(repr, unknown))}; "
                    f"choose from {', '.join(gunn_ext.backends.NAMES)}")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model, args, device) -> dict:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    generator = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.batch, 3, 32, 32, generator=generator).to(device, memory_format=fmt)
    labels = torch.randint(0, args.num_classes, (args.batch,), generator=generator).to(device)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)

    def step():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    def captures() -> int:
        return sum(s.captures for s in cuda_graphs.stats().values())

    model.train()
    # Each layer captures its graphs in the first steps: warm up until no step captures.
    steady, warmup = 0, 0
    while warmup < args.warmup or (steady < 2 and warmup < args.warmup + 20):
        before = captures()
        step()
        warmup += 1
        steady = steady + 1 if captures() == before else 0
    sync(device)
    before = captures()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()
        sync(device)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    out = {"step_ms": median * 1e3, "images_per_s": args.batch / median,
           "samples_ms": [t * 1e3 for t in times], "final_loss": float(loss.detach()),
           "warmup_steps": warmup, "captures_while_timed": captures() - before}
    if device.type == "cuda":
        # Replayed graphs keep intermediates in private pools that
        # max_memory_allocated does not see: one more step with replay off.
        with cuda_graphs.disabled():
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            step()
            sync(device)
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        out["peak_above_start_bytes"] = out["peak_allocated_bytes"] - base
    return out


def run_backend(name, template, args, device, rows) -> bool:
    """Measures ``name`` on a copy of ``template`` into ``rows``; True if it failed."""
    model = copy.deepcopy(template)
    for layer in model.modules():
        if isinstance(layer, (gunn_ext.GUNNLayer, gunn_ext.SUNNLayer)):
            layer.backend = name
    model = model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    failed = False
    try:
        rows.append({"backend": name, **measure(model, args, device)})
    except Exception as exc:  # report and go on with the other backends
        failed = True
        rows.append({"backend": name, "error": f"{type(exc).__name__}: {exc}"})
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return failed


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.batch is None:
        args.batch = 64 if device.type == "cuda" else 8
    names = args.backends or gunn_ext.available_backends(device)
    torch.manual_seed(args.seed)
    template = build_model(args.model, num_classes=args.num_classes, width=args.width,
                           segment_channels=args.segment_channels)
    params = sum(p.numel() for p in template.parameters())
    machine = seq_update.machine_info(device)  # the load average before the run
    rows, failed = [], False
    with conventions.float32_products(args.tf32):
        for name in names:
            failed |= run_backend(name, template, args, device, rows)

    segments = "" if args.segment_channels is None else f", {args.segment_channels}-channel segments"
    table = Table(title=f"{args.model} ({params:,} parameters{segments}), batch {args.batch}, {device.type}"
                        f"{', ' + args.amp if args.amp else ''}{', channels_last' if args.channels_last else ''}"
                        f"{', TF32' if args.tf32 and device.type == 'cuda' else ''}")
    for column in ("backend", "step ms", "images/s", "speedup", "peak memory GB"):
        table.add_column(column, justify="left" if column == "backend" else "right")
    reference = next((r["step_ms"] for r in rows if r["backend"] == "reference" and "step_ms" in r), None)
    for r in rows:
        if "error" in r:
            table.add_row(r["backend"], "FAILED", r["error"][:60], "", "")
            continue
        peak = f"{r['peak_allocated_bytes'] / 1e9:.3f}" if "peak_allocated_bytes" in r else "n/a"
        speedup = f"{reference / r['step_ms']:.2f}x" if reference else ""
        table.add_row(r["backend"], f"{r['step_ms']:.1f}", f"{r['images_per_s']:.0f}", speedup, peak)
    console = Console(width=120)
    console.print(table)
    console.print(seq_update.describe_machine(machine))
    if args.json:
        report_json.write(args.json, {
            "benchmark": "train_step", "date": datetime.now(timezone.utc).isoformat(),
            "args": report_json.options(args),
            "parameters": params, "machine": machine, "torch": torch.__version__, "results": rows})
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
