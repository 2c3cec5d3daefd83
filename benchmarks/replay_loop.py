"""CUDA graph replay over a realistic training loop on the GUNN-15 layer stack.

    python benchmarks/replay_loop.py                       # on the GPU: every available backend
    python benchmarks/replay_loop.py --backends native --json replay.json
    python benchmarks/replay_loop.py --device cpu          # a dry run: no graphs, all eager

The stack is GUNN-15's three GUNN layers with their transitions (240/20 at
32x32, 300/25 at 16x16, 360/30 at 8x8), fed with random stem activations.
Two copies of it train on the same batches with SGD (momentum 0.9, weight
decay 1e-4, updated in place): one with graph replay, one with replay off.
An epoch is the tail of a real one: training steps of batch 64 with a last
one of 16, then evaluation batches of 64 and 40 without gradients. Per op it
prints captures, replays and eager runs of the replayed copy, in all and from
the second epoch on, and checks (exit status 1 when one fails):

- every loss and evaluation output, and at the end every parameter and
  buffer, of the replayed copy equals the eager copy's bitwise
  (deterministic algorithms on);
- from the second epoch on every call replays: no capture, no eager run.

On the CPU nothing is captured (graphs are for CUDA tensors): everything runs
eagerly, the bitwise checks still run, and the report says it was a dry run.
"""
from __future__ import annotations

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, before CUDA starts

import argparse  # noqa: E402
import copy  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from datetime import datetime, timezone  # noqa: E402

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import report_json  # noqa: E402
from arguments import positive_float, positive_int, positive_ints, torch_device  # noqa: E402
import gunn_ext  # noqa: E402
from gunn_ext import cuda_graphs  # noqa: E402
from gunn_ext.models import gunn15  # noqa: E402

GPU_DEFAULTS = dict(width=1.0, size=32, batch=64, last_batch=16, eval_batches=[64, 40],
                    steps_per_epoch=10, epochs=3)
CPU_DEFAULTS = dict(width=0.1, size=8, batch=4, last_batch=2, eval_batches=[4, 3],
                    steps_per_epoch=3, epochs=2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", help="comma list of native, triton (default: those available on the device)")
    p.add_argument("--width", type=positive_float, help="channel multiplier (GPU default 1.0 = GUNN-15's; CPU 0.1)")
    p.add_argument("--size", type=positive_int, help="input height and width, a multiple of 4 (GPU 32, CPU 8)")
    p.add_argument("--batch", type=positive_int, help="training batch (GPU 64, CPU 4)")
    p.add_argument("--last-batch", type=positive_int, help="an epoch's last training batch (GPU 16, CPU 2)")
    p.add_argument("--eval-batches", type=positive_ints,
                   help="comma list of evaluation batches per epoch (GPU 64,40, CPU 4,3)")
    p.add_argument("--steps-per-epoch", type=positive_int,
                   help="training steps per epoch, the last included (GPU 10)")
    p.add_argument("--epochs", type=positive_int, help="at least 2: the first captures (GPU 3, CPU 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the counts and checks here")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for, but torch sees no CUDA GPU")
    for name, value in (GPU_DEFAULTS if args.device.type == "cuda" else CPU_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.size % 4 or args.epochs < 2:
        p.error(f"--size must be a multiple of 4 and --epochs at least 2, got {args.size} and {args.epochs}")
    available = [b for b in gunn_ext.available_backends(args.device) if b in ("native", "triton")]
    args.backends = available if args.backends is None else args.backends.split(",")
    unknown = [b for b in args.backends if b not in available]
    if unknown:
        p.error(f"--backends {unknown} not available on {args.device.type}; available: {available}")
    return args


def layer_stack(args, backend: str) -> torch.nn.Sequential:
    """GUNN-15's GUNN layers and transitions (no stem, no head)."""
    torch.manual_seed(args.seed)
    f = gunn15(backend=backend, width=args.width).features
    return torch.nn.Sequential(f.conv2, f.trans1, f.conv3, f.trans2, f.conv4).to(args.device)


def schedule(args) -> list[tuple[int, str, int]]:
    """(epoch, "train" or "eval", batch) in order."""
    out = []
    for epoch in range(args.epochs):
        out += [(epoch, "train", args.batch)] * (args.steps_per_epoch - 1)
        out += [(epoch, "train", args.last_batch)]
        out += [(epoch, "eval", b) for b in args.eval_batches]
    return out


def batches(args, stack, plan):
    """Inputs and loss weights for every call, the same for both copies."""
    generator = torch.Generator().manual_seed(args.seed + 1)
    channels = stack[0].channels
    out = []
    for _, _, batch in plan:
        x = torch.randn(batch, channels, args.size, args.size, generator=generator)
        target = torch.randn(batch, stack[-1].channels, args.size // 4, args.size // 4, generator=generator)
        out.append((x, target))
    return out


def run_step(model, optimizer, kind: str, x, target):
    """One training step (returns the loss) or one evaluation batch (returns the output)."""
    if kind == "eval":
        model.eval()
        with torch.no_grad():
            return model(x)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = (model(x) * target).mean()
    loss.backward()
    optimizer.step()
    return loss.detach()


def subtract(a: dict, b: dict) -> dict:
    return {name: {k: a[name][k] - b.get(name, {}).get(k, 0) for k in a[name]} for name in a}


def counts() -> dict:
    return {name: {"captures": s.captures, "replays": s.replays, "eager": s.eager}
            for name, s in cuda_graphs.stats().items()}


def add(total: dict, delta: dict) -> None:
    for name, c in delta.items():
        for k, v in c.items():
            total.setdefault(name, {}).setdefault(k, 0)
            total[name][k] += v


def run_backend(args, backend: str, console: Console) -> dict:
    reference = layer_stack(args, backend)
    replayed, eager = copy.deepcopy(reference), copy.deepcopy(reference)
    del reference
    optimizers = {id(m): torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
                  for m in (replayed, eager)}
    plan = schedule(args)
    data = batches(args, replayed, plan)
    cuda_graphs.clear()
    total, steady, mismatch = {}, {}, None
    start = time.perf_counter()
    for k, ((epoch, kind, batch), (x, target)) in enumerate(zip(plan, data)):
        x, target = x.to(args.device), target.to(args.device)
        with cuda_graphs.disabled():
            expected = run_step(eager, optimizers[id(eager)], kind, x, target)
        before = counts()
        got = run_step(replayed, optimizers[id(replayed)], kind, x.clone(), target)
        delta = subtract(counts(), before)
        add(total, delta)
        if epoch >= 1:
            add(steady, delta)
        if mismatch is None and not torch.equal(got, expected):
            what = "loss" if kind == "train" else "output"
            mismatch = f"call {k} (epoch {epoch}, {kind}, batch {batch}): {what}"
        if k + 1 == len(plan) or plan[k + 1][0] != epoch:  # progress, so that a time limit shows where it went
            so_far = ", ".join(f"{name} {c.get('captures', 0)}/{c.get('replays', 0)}/{c.get('eager', 0)}"
                               for name, c in sorted(total.items()) if name.startswith(backend))
            console.print(f"  {backend}: epoch {epoch + 1} of {args.epochs} done after "
                          f"{time.perf_counter() - start:.1f} s; captures/replays/eager so far: {so_far or 'none'}")
    if args.device.type == "cuda":
        torch.cuda.synchronize(args.device)
    seconds = time.perf_counter() - start
    if mismatch is None:
        for (name, a), b in zip([*replayed.named_parameters(), *replayed.named_buffers()],
                                [*eager.parameters(), *eager.buffers()]):
            if not torch.equal(a, b):
                mismatch = f"after the last step: {name}"
                break
    ops = sorted(name for name in total if name.startswith(backend))
    steady_ok = all(steady.get(name, {}).get("captures", 0) == 0 and steady.get(name, {}).get("eager", 0) == 0
                    and steady.get(name, {}).get("replays", 0) > 0 for name in ops)
    return {"backend": backend, "calls": len(plan), "seconds": seconds,
            "ops": {name: {"all": total[name], "from_epoch_2": steady.get(name, {})} for name in ops},
            "bitwise_equal": mismatch is None, "first_mismatch": mismatch,
            "steady_state_replays": steady_ok if args.device.type == "cuda" and ops else None}


def machine(device: torch.device) -> dict:
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cpu": platform.processor() or platform.machine()}


def main(argv=None) -> int:
    args = parse_args(argv)
    console = Console(width=120)
    dry_run = args.device.type != "cuda"
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    warnings.filterwarnings("ignore", category=UserWarning)
    config = {k: v for k, v in report_json.options(args).items() if k != "json"}
    if dry_run:
        console.print("[bold]Dry run on the CPU[/]: CUDA graphs replay only CUDA tensors, so every call "
                      "runs eagerly; the bitwise checks compare two eager copies.")
    console.print(f"GUNN-15 layer stack, width {args.width}, {args.size}x{args.size}; per epoch "
                  f"{args.steps_per_epoch - 1} x batch {args.batch} + 1 x {args.last_batch} training, "
                  f"eval {args.eval_batches}; {args.epochs} epochs; backends {args.backends}")
    results = []
    for backend in args.backends:
        results.append(run_backend(args, backend, console))
        if args.json:  # after each backend, so that a time limit keeps what was done
            write_report(args, config, dry_run, results, failures=None)
    table = Table(title="CUDA graph replay per op (replayed copy)")
    for column in ("op", "captures", "replays", "eager", "captures from epoch 2", "eager from epoch 2",
                   "bitwise = eager", "steady state replays"):
        table.add_column(column, justify="left" if column == "op" else "right")
    for result in results:
        if not result["ops"]:
            table.add_row(f"{result['backend']} (no replay engine here)", *["-"] * 5,
                          "yes" if result["bitwise_equal"] else "NO", "n/a")
        for name, c in result["ops"].items():
            steady = c["from_epoch_2"]
            table.add_row(name, *(str(c["all"].get(k, 0)) for k in ("captures", "replays", "eager")),
                          str(steady.get("captures", 0)), str(steady.get("eager", 0)),
                          "yes" if result["bitwise_equal"] else "NO",
                          {True: "yes", False: "NO", None: "n/a (dry run)"}[result["steady_state_replays"]])
    console.print(table)
    failures = []
    for result in results:
        if not result["bitwise_equal"]:
            failures.append(f"{result['backend']}: replayed != eager at {result['first_mismatch']}")
        if result["steady_state_replays"] is False:
            failures.append(f"{result['backend']}: captures or eager runs after the first epoch")
        if not dry_run and not result["ops"]:
            failures.append(f"{result['backend']}: no op went through graph replay")
    for line in failures:
        console.print(f"[red]FAIL[/] {line}")
    if not failures:
        console.print("OK" + (" (dry run: nothing was captured)" if dry_run else ""))
    if args.json:
        write_report(args, config, dry_run, results, failures)
    return 1 if failures else 0


def write_report(args, config: dict, dry_run: bool, results: list, failures: list | None) -> None:
    """The JSON report; `failures` is None while backends are still to run."""
    report_json.write(args.json, {"machine": machine(args.device), "config": config, "dry_run": dry_run,
                                  "results": results, "failures": failures, "complete": failures is not None})


if __name__ == "__main__":
    sys.exit(main())
