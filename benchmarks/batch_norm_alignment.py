"""PyTorch's batch norm with its parameters at offsets into flat tensors.

    python benchmarks/batch_norm_alignment.py --json alignment.json
    python benchmarks/batch_norm_alignment.py --device cpu       # a dry run

A GUNN layer keeps every BatchNorm's weight, bias and running statistics as
views into flat tensors, so a norm's tensors can start 4, 8 or 12 bytes past a
16-byte boundary, where separately allocated parameters never do. Every
reference (pure PyTorch) call computes with those views. This runs
``F.batch_norm`` in training (forward, backward, running statistics) and in
eval on ``[batch, C, H, W]`` inputs, channels_last and NCHW, with all four
tensors at an offset of 0 to 3 elements into flat float32 tensors, and
compares each with the same call on freshly allocated copies (offset 0).

A case that loses the CUDA context (a device-side fault is sticky) kills only
its worker process: the worker is restarted at the next case, and the report
keeps the fault's message. Per case it prints ``ok`` (equal to the aligned
call within 1e-5), ``MISMATCH`` or the fault, and the kernels that ran
(``torch.profiler``). The exit status is 1 when any case failed.
"""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys

import torch
import torch.nn.functional as F

import report_json
from arguments import torch_device

GPU_CASES = dict(batches=(256, 64), channels=(12,), size=32, offsets=(0, 1, 2, 3))
CPU_CASES = dict(batches=(2,), channels=(6,), size=4, offsets=(0, 2))
LAYOUTS = ("channels_last", "nchw")
WORKER_TIMEOUT_S = 20


def cases(args) -> list[dict]:
    return [dict(batch=b, channels=c, size=args.size, layout=layout, offset=offset)
            for b, c, layout, offset in itertools.product(args.batches, args.channels, LAYOUTS, args.offsets)]


def views_at(offset: int, values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor copied into a flat tensor of its own, starting ``offset`` elements in."""
    views = []
    for v in values:
        flat = torch.zeros(offset + v.numel() + 4, device=v.device, dtype=v.dtype)
        view = flat[offset:offset + v.numel()]
        view.copy_(v)
        views.append(view)
    return views


def batch_norm_run(x, weight, bias, mean, var, grad) -> list[torch.Tensor]:
    """Training forward and backward (the running statistics updated in place), then eval."""
    weight, bias = weight.detach().requires_grad_(), bias.detach().requires_grad_()
    x = x.detach().requires_grad_()
    y = F.batch_norm(x, mean, var, weight, bias, training=True, momentum=0.1, eps=1e-5)
    dx, dw, db = torch.autograd.grad(y, (x, weight, bias), grad)
    y_eval = F.batch_norm(x.detach(), mean, var, weight.detach(), bias.detach(), training=False, eps=1e-5)
    return [y.detach(), dx, dw, db, mean.clone(), var.clone(), y_eval]


def run_case(case: dict, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(0)
    c, shape = case["channels"], (case["batch"], case["channels"], case["size"], case["size"])
    x, grad = (torch.randn(shape, generator=gen).to(device) for _ in range(2))
    if case["layout"] == "channels_last":
        x, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad))
    values = [torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen),
              torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5]
    values = [v.to(device) for v in values]
    aligned = batch_norm_run(x, *[v.clone() for v in values], grad)
    views = views_at(case["offset"], values)
    kernels = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            ours = batch_norm_run(x, *views, grad)
            torch.cuda.synchronize()
        kernels = sorted({e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})
    else:
        ours = batch_norm_run(x, *views, grad)
    # torch's max keeps a NaN (Python's max drops one that is not first)
    worst = torch.stack([(a - b).abs().max() / b.abs().max().clamp_min(1e-30)
                         for a, b in zip(ours, aligned)]).max().item()
    return dict(case, status="ok" if worst <= 1e-5 else "MISMATCH", max_relative_difference=worst,
                bytes_past_16=[v.data_ptr() % 16 for v in views], kernels=kernels)


def worker(args) -> None:
    """Runs the cases from ``--first`` on, one JSON line each, until one kills it."""
    device = torch.device(args.device)
    for index, case in enumerate(cases(args)):
        if index >= args.first:
            print(json.dumps(dict(run_case(case, device), index=index)), flush=True)


def worker_command(args) -> list[str]:
    """This script as a worker for ``args``' cases; ``--first K`` is appended per start."""
    return [sys.executable, __file__, "--worker", "--device", args.device, "--size", str(args.size),
            "--batches", ",".join(map(str, args.batches)), "--channels", ",".join(map(str, args.channels)),
            "--offsets", ",".join(map(str, args.offsets))]


def run_all(args, command: list[str] | None = None, on_results=None) -> list[dict]:
    """Every case, in workers restarted after each fault; prints each row as it comes
    and hands the results so far to ``on_results`` after every worker."""
    todo, results, first = cases(args), [], 0
    command = command or worker_command(args)
    print(f"{'batch':>5} {'C':>3} {'layout':<13} {'offset':>6} {'bytes past 16':<14} status", flush=True)
    while first < len(todo):
        try:
            done = subprocess.run(command + ["--first", str(first)], capture_output=True, text=True,
                                  timeout=WORKER_TIMEOUT_S)
            stdout, stderr, code = done.stdout, done.stderr, done.returncode
        except subprocess.TimeoutExpired as timeout:
            stdout = timeout.stdout.decode() if isinstance(timeout.stdout, bytes) else (timeout.stdout or "")
            stderr, code = f"timed out after {WORKER_TIMEOUT_S} s", -1
        new = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        if code != 0 and len(results) + len(new) < len(todo):
            lines = [line for line in stderr.splitlines() if line.strip()]
            error = next((line for line in reversed(lines) if "rror" in line), lines[-1] if lines else "")
            index = len(results) + len(new)
            new.append(dict(todo[index], index=index, status="FAULT",
                            error=f"worker exit status {code}: {error.strip()[:400]}"))
        elif code != 0:
            print(f"the worker exited with status {code} after its last case: {stderr.strip()[-400:]}")
        for r in new:
            print_row(r)
        results += new
        first = len(results)
        if on_results is not None:
            on_results(results)
    return results


def print_row(r: dict) -> None:
    past = ",".join(map(str, r.get("bytes_past_16", []))) or "-"
    detail = r.get("error") or f"max rel diff {r['max_relative_difference']:.1e}"
    print(f"{r['batch']:>5} {r['channels']:>3} {r['layout']:<13} {r['offset']:>6} {past:<14} "
          f"{r['status']}  {detail}", flush=True)


def print_kernels(results: list[dict]) -> None:
    kernels = sorted({k for r in results for k in r.get("kernels", [])})
    print(f"kernels seen ({len(kernels)}):")
    for k in kernels:
        print(f"  {k[:160]}")


def integers(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", type=lambda text: str(torch_device(text)),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", type=integers, help="comma list (GPU 256,64; CPU 2)")
    p.add_argument("--channels", type=integers, help="comma list (GPU 12; CPU 6)")
    p.add_argument("--size", type=int, help="height and width (GPU 32, CPU 4)")
    p.add_argument("--offsets", type=integers, help="comma list of element offsets (GPU 0,1,2,3; CPU 0,2)")
    p.add_argument("--json", help="write every case's result here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda asked for, but torch sees no CUDA GPU")
    defaults = GPU_CASES if args.device.startswith("cuda") else CPU_CASES
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    def save(results: list[dict]) -> None:  # after every worker: a step cut short keeps its rows
        if args.json:
            report_json.write(args.json, dict(device=args.device, torch=torch.__version__, results=results))

    results = run_all(args, on_results=save)
    print_kernels(results)
    return int(any(r["status"] != "ok" for r in results) or len(results) < len(cases(args)))


if __name__ == "__main__":
    sys.exit(main())
