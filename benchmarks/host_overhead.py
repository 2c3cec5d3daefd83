"""Host work of a layer call outside its op: Python, autograd and the custom op's dispatch.

    OMP_NUM_THREADS=1 python benchmarks/host_overhead.py                 # 240 channels, P = 20 and 240
    python benchmarks/host_overhead.py --channels 60 --segments 6,60

On an input so small (2x240x2x2 by default) that the arithmetic is
negligible, one thread times a training forward+backward of the native
layer, and the op's forward and backward called directly with the same
arguments. Thread CPU time, best of ``--repeats`` after ``--warmup``; the
difference is what the layer adds around its op, which should not grow
with the number of segments.
"""
from __future__ import annotations

import argparse
import time

import torch

from arguments import nonnegative_int, positive_int, positive_ints
from gunn_ext import GUNNLayer, ops


def best_ms(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return min(times) * 1e3


def measure(channels: int, segments: int, args) -> dict:
    layer = GUNNLayer(channels, segments, shortcut=True, backend="native").train()
    x = torch.randn(args.batch, channels, args.size, args.size)
    with torch.no_grad():
        arguments = ops.layer_arguments(layer, x, True)
        arguments = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in arguments)
    grad = torch.ones_like(x)

    def layer_step():
        layer(x).sum().backward()

    def ops_alone():
        y, mean, var = torch.ops.gunn_ext.gradual_update(*arguments)
        torch.ops.gunn_ext.gradual_update_backward(grad, x, y, *arguments[1:4], mean, var, *arguments[6:])

    step, alone = best_ms(layer_step, args.repeats, args.warmup), best_ms(ops_alone, args.repeats, args.warmup)
    return dict(channels=channels, segments=segments, step_ms=step, ops_ms=alone, outside_ms=step - alone)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--channels", type=positive_int, default=240)
    p.add_argument("--segments", type=positive_ints, default=[20, 240], help="comma list of P (default 20,240)")
    p.add_argument("--batch", type=positive_int, default=2)
    p.add_argument("--size", type=positive_int, default=2, help="height = width")
    p.add_argument("--repeats", type=positive_int, default=50)
    p.add_argument("--warmup", type=nonnegative_int, default=5)
    args = p.parse_args(argv)
    for segments in args.segments:
        if args.channels % segments:
            p.error(f"--segments: {segments} does not divide --channels {args.channels}")
    if ops.load_error() is not None:
        p.error(ops.load_error())
    torch.set_num_threads(1)
    for segments in args.segments:
        r = measure(args.channels, segments, args)
        print(f"{args.channels} channels, P = {segments}: forward+backward {r['step_ms']:.2f} ms, "
              f"the op alone {r['ops_ms']:.2f} ms, outside the op {r['outside_ms']:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
