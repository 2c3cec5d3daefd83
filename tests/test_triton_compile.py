"""Every Triton kernel variant the layer launches compiles for the GPU, here without one.

The layer's forward and backward (training and eval) run on CPU tensors with
the kernels replaced by recorders, at GUNN-15's first shape (240 channels,
20 segments), on a no-shortcut, two-unit layer and, in eval, on layers whose
bottlenecks are too wide for the fused tail. Each recorded launch is
compiled by Triton to a cubin for sm_90 (H100 / H200): the compile-time rules
(``tl.dot`` shapes, power-of-two blocks, types, shared memory) are checked by
the real compiler; only running the cubin needs the GPU. float32 with TF32
GEMMs compiles every config its autotuner would time; full-precision float32
and bfloat16 compile each variant's first config (configs differ in
scheduling, not in types). The compilations run in parallel processes.
"""
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

triton = pytest.importorskip("triton")

from conftest import make_layer  # noqa: E402
from gunn_ext import conventions  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="kernels are interpreted functions under TRITON_INTERPRET=1")

KERNELS = ("conv_kernel", "conv_bn_kernel", "input_grad_bn_relu_kernel", "input_grad_accumulate_kernel",
           "eval_bottleneck_tail_kernel", "bn_add_kernel", "bn_grad_partials_kernel", "finalize_grad_kernel",
           "finalize_stats_kernel", "weight_grad_kernel")
POINTEE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def argument_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + POINTEE[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {value!r}")


def variants(launches, every_config: bool = True) -> list[tuple]:
    """``(module, kernel, signature, constexprs, num_warps, num_stages)`` of each distinct compilation."""
    seen = {}
    for kernel, args, kwargs in launches:
        if isinstance(kernel, triton.runtime.Heuristics):  # flags of the optional inputs
            named = dict(zip(kernel.arg_names, args))
            kwargs = {**kwargs, **{flag: rule({**named, **kwargs}) for flag, rule in kernel.values.items()}}
            kernel = kernel.fn
        tuned = isinstance(kernel, triton.runtime.Autotuner)
        jit = kernel.fn if tuned else kernel
        named = dict(zip(jit.arg_names, args))
        constexprs = {p.name: kwargs[p.name] for p in jit.params if p.is_constexpr}
        constexprs.update({n: None for n, value in named.items() if value is None})  # as Triton specialises
        signature = {n: "constexpr" if n in constexprs else argument_type(named[n]) for n in jit.arg_names}
        if tuned:
            configs = kernel.early_config_prune(kernel.configs, named, **kwargs)
        else:
            configs = [triton.Config({}, num_warps=kwargs.get("num_warps", 4),
                                     num_stages=kwargs.get("num_stages", 3))]
        if not every_config:
            configs = configs[:1]
        for config in configs:
            variant = (jit.__module__, jit.__name__, signature, constexprs, config.num_warps, config.num_stages)
            seen.setdefault(repr(variant), variant)
    return list(seen.values())


def sm90_kernel(variant):
    """``(what, compiled kernel)`` of ``variant`` for sm_90; raises if it does not compile."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name, signature, constexprs, num_warps, num_stages = variant
    jit = getattr(sys.modules[module], name)
    while not isinstance(jit, triton.JITFunction):  # under autotuning and flags
        jit = jit.fn
    what = f"{name} with {constexprs}, {num_warps} warps, {num_stages} stages"
    return what, triton.compile(ASTSource(jit, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": num_warps, "num_stages": num_stages})


def compile_for_sm90(variant) -> str | None:
    """None if ``variant`` compiles to a cubin within the shared memory of an sm_90 SM, else why not."""
    try:
        what, compiled = sm90_kernel(variant)
    except Exception as exc:  # noqa: BLE001 - reported as the test's failure
        return f"{variant[1]} with {variant[3]} does not compile for sm_90: {type(exc).__name__}: {exc}"
    if not compiled.asm.get("cubin"):
        return f"{what}: no cubin"
    if compiled.metadata.shared > 227 * 1024:
        return f"{what}: {compiled.metadata.shared} bytes of shared memory, more than an SM has"
    return None


GUNN15_A = dict(channels=240, segments=20)
TWO_UNITS = dict(channels=48, segments=[12, 36], bottlenecks=2, shortcut=False)
WIDEST_TAIL = dict(channels=128, segments=1)  # 256 mid channels: the widest fused eval tail in fp32
WIDE = dict(channels=256, segments=1, expansion=1)  # 256 -> 256 channels: no fused eval tail in fp32
CASES = [  # layer, and what differs from: float32, TF32 GEMMs, every autotuning config, train and eval
    dict(layer=GUNN15_A),
    dict(layer=TWO_UNITS),
    dict(layer=TWO_UNITS, settings={"EVAL_TAIL_CHANNELS": 16}, every_config=False, modes=(False,)),
    dict(layer=WIDEST_TAIL, modes=(False,)),
    dict(layer=WIDE, modes=(False,)),
    dict(layer=WIDE, dtype=torch.bfloat16, every_config=False, modes=(False,)),
    dict(layer=GUNN15_A, precision="highest", every_config=False),
    dict(layer=GUNN15_A, dtype=torch.bfloat16, every_config=False),
]
DEFAULTS = dict(dtype=torch.float32, precision="high", every_config=True, settings={}, modes=(True, False))


def record_launches(monkeypatch, layer, dtype, precision, settings, modes, **_) -> list:
    """The kernel launches of a forward and backward, in training and / or in eval (``modes``)."""
    from gunn_ext import ops
    from gunn_ext.triton_kernels import launch, update

    launches = []
    for name in KERNELS:
        monkeypatch.setattr(launch, name, Recorder(getattr(launch, name), launches))
    for name, value in settings.items():
        monkeypatch.setattr(launch, name, value)
    monkeypatch.setattr(conventions, "matmul_tf32", lambda: precision != "highest")
    layer = make_layer(**layer, dtype=dtype)
    x = torch.randn(2, layer.channels, 16, 16, dtype=dtype)
    for training in modes:
        args = ops.layer_arguments(layer, x, training)
        y, mean, var = update.gradual_update_forward(*args)
        x_, convs, weights, biases, _, _, *config = args
        update.gradual_update_backward(torch.ones_like(y), x_, y, convs, weights, biases, mean, var, *config)
    monkeypatch.undo()
    return launches


def test_every_launched_variant_compiles_for_sm90(monkeypatch):
    cases = [{**DEFAULTS, **case} for case in CASES]
    compiled = {repr(v): v for case in cases
                for v in variants(record_launches(monkeypatch, **case), case["every_config"])}
    compiled = list(compiled.values())
    names = {v[1] for v in compiled}
    assert names == set(KERNELS), f"kernels never launched: {set(KERNELS) - names}"
    # fork: the workers find the kernels already imported (no CUDA is ever initialised here)
    with ProcessPoolExecutor(os.cpu_count() or 1, mp_context=multiprocessing.get_context("fork")) as pool:
        failures = [f for f in pool.map(compile_for_sm90, compiled) if f]
    assert not failures, "\n".join(failures)


CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def stack_frame_bytes(variant) -> tuple[str, int]:
    """The per-thread stack frame of ``variant``'s sm_90 cubin: register spills (the
    kernels keep no local arrays), as ``cuobjdump --dump-resource-usage`` reports it."""
    what, compiled = sm90_kernel(variant)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", cubin.name], capture_output=True,
                               text=True, check=True).stdout
    return what, int(re.search(r"STACK:(\d+)", usage).group(1))


@pytest.mark.skipif(not os.path.exists(CUOBJDUMP), reason="triton ships no cuobjdump here")
def test_gunn15_kernels_can_run_without_spills(monkeypatch):
    """Every kernel variant of GUNN-15's 240/20 layer (training and eval, float32
    with TF32 and with IEEE products) has an autotuning config that ptxas
    compiles for sm_90 without spilling registers, so the autotuner can pick it."""
    launched = {}
    for precision in ("high", "highest"):
        case = {**DEFAULTS, "layer": GUNN15_A, "precision": precision}
        for v in variants(record_launches(monkeypatch, **case), every_config=True):
            launched.setdefault(repr(v), v)
    with ProcessPoolExecutor(os.cpu_count() or 1, mp_context=multiprocessing.get_context("fork")) as pool:
        frames = dict(zip(launched, pool.map(stack_frame_bytes, launched.values())))
    best = {}
    for key, variant in launched.items():
        what, stack = frames[key]
        kernel = repr(variant[:4])  # the variant without its warps and stages
        best[kernel] = min(best.get(kernel, (stack, what)), (stack, what))
    spilling = [f"{what}: {stack} bytes of stack" for stack, what in best.values() if stack]
    assert len(best) > 20 and not spilling, "\n".join(spilling)
