"""Compile-time choices of the kernels: flags for optional arguments, and autotuning.

An optional input of a kernel is ``None`` when absent; a named constexpr flag
says whether it was given (:func:`optional_flags`), so a variant reads as what
it computes and its autotuning is keyed by it.

Warps and pipeline stages are autotuned, pruned per launch.

Block sizes are fixed by the problem (channel blocks are the padded channel
counts, row tiles are ``BLOCK_M`` so statistics workspaces are sized before a
launch), which leaves a small space: four configs, pruned to those that can
differ. Eight warps only pay on tiles of 64x64 and more, or with dots on
the CUDA cores (``"ieee"``, which hold operand slices per thread): there
four warps can run out of registers and spill. A third pipeline stage only
pays on loops of three or more steps; under the interpreter there is
nothing to tune. Each kernel variant is tuned once per key (its sizes, the
number of rows included), at its first call, which runs eagerly, before any
CUDA graph capture.
"""
from __future__ import annotations

import inspect
import os
from typing import Callable

import triton

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

CONFIGS = [triton.Config({}, num_warps=4, num_stages=2),
           triton.Config({}, num_warps=4, num_stages=3),
           triton.Config({}, num_warps=8, num_stages=2),
           triton.Config({}, num_warps=8, num_stages=3)]


def useful_configs(tile_elements: int, loop_steps: int, cuda_cores: bool = False) -> list[triton.Config]:
    """The configs worth timing for an output tile of ``tile_elements``, a
    main loop of ``loop_steps`` steps and dots on the CUDA cores or not
    (never empty: the first is always kept)."""
    if INTERPRETED:
        return CONFIGS[:1]
    many_warps = cuda_cores or tile_elements >= 64 * 64
    return [c for c in CONFIGS
            if (c.num_warps == 4 or many_warps) and (c.num_stages == 2 or loop_steps >= 3)]


class OptionalFlags(triton.runtime.Heuristics):
    """``triton.heuristics`` setting each constexpr flag to whether the argument it
    names was given (not ``None``), read by position: no per-launch dict of all
    arguments, as the generic heuristics build once per flag."""

    def __init__(self, fn, flags: dict[str, str]):
        super().__init__(fn, fn.arg_names, {flag: _is_given(name) for flag, name in flags.items()})
        self.positions = {flag: (fn.arg_names.index(name), name) for flag, name in flags.items()}

    def run(self, *args, **kwargs):
        for flag, (index, name) in self.positions.items():
            kwargs[flag] = (args[index] if index < len(args) else kwargs[name]) is not None
        return self.fn.run(*args, **kwargs)


def optional_flags(**flags: str):
    """Decorator: ``optional_flags(STATS="sum_ptr")`` sets the constexpr ``STATS``
    to ``sum_ptr is not None`` at each launch. Outermost, so autotuning sees the flags."""
    return lambda fn: OptionalFlags(fn, flags)


def _is_given(name: str) -> Callable[[dict], bool]:
    return lambda args: args[name] is not None


def _quick_bench(kernel_call, quantiles):
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def autotune(tile: tuple[str, str], loop_steps: Callable[[dict], int], key: list[str],
             accumulates_into: str | None = None):
    """``triton.autotune`` over :func:`useful_configs` for a kernel whose output
    tile is ``tile`` (two block-size names) and whose main loop runs
    ``loop_steps(args)`` times.

    ``accumulates_into``: the output argument the kernel adds into (when its
    ``ACCUMULATE`` flag is set, or always for a kernel without that flag); it is
    restored after each timed run of such a launch (only then: a copy of a large
    output per run would both cost memory and swamp the timings).
    """
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        return useful_configs(args[tile[0]] * args[tile[1]], loop_steps(args),
                              args.get("DOT_PRECISION") == "ieee")

    saved = []

    def pre_hook(args, reset_only=False):
        if not reset_only and accumulates_into and args.get("ACCUMULATE", True):
            saved.append(args[accumulates_into].clone())

    def post_hook(args, exception=None):
        if saved:
            args[accumulates_into].copy_(saved.pop())

    options = dict(configs=CONFIGS, key=key, prune_configs_by={"early_config_prune": prune},
                   pre_hook=pre_hook, post_hook=post_hook)
    if "do_bench" in inspect.signature(triton.autotune).parameters:
        options["do_bench"] = _quick_bench
    return triton.autotune(**options)
