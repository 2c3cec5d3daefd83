"""The compiled ``torch.ops.gunn_ext`` ops: loading, fake kernels, autograd.

``gradual_update`` runs the whole layer (all segments, all units) in one op
and returns ``(y, mean, var)``: the output and the per-channel statistics
every BatchNorm normalised with (batch statistics in training, the running
ones in eval). Its tensors are flat, laid out as
:mod:`gunn_ext.parameter_layout` specifies::

    gradual_update(Tensor x, Tensor conv_weight, Tensor bn_weight, Tensor bn_bias,
                   Tensor? running_mean, Tensor? running_var, int[] segments,
                   int expansion, int bottlenecks, bool shortcut, bool sequential,
                   bool training, float eps) -> (Tensor y, Tensor mean, Tensor var)

``running_mean`` and ``running_var`` are read in eval only; ``eps`` is
shared by all the layer's BatchNorms. The output's memory format and the
statistics' dtype follow :mod:`gunn_ext.conventions`.

Its backward is ``gradual_update_backward``: Algorithm 1 of the paper with
the merged residual (Eq. 6). It needs only ``x``, ``y`` and the statistics;
the state before update ``i`` is ``y`` on the segments before ``c_i`` and
``x`` from ``c_i`` on, and one gradient buffer ``g = dL/dy`` is updated in
place, segment ``P`` down to ``1``::

    g += J_{U_i}(s_{i-1})^T g[:, c_i]

It returns ``(grad_x, grad_conv_weight, grad_bn_weight, grad_bn_bias)``,
the parameter gradients flat like the parameters.
"""
from __future__ import annotations

import functools
import importlib
import warnings
from typing import Callable, NamedTuple

import torch

from . import conventions, reference
from .parameter_layout import check_input, layout_of

_NS = "gunn_ext"


@functools.cache
def load_error() -> str | None:
    """None when the compiled extension is importable and matches this torch."""
    try:
        build = importlib.import_module("gunn_ext._build_info")
    except ImportError:
        return ("the compiled extension gunn_ext._C is not built; install with "
                "`pip install .` (or `pip install --no-build-isolation .` against this torch)")
    if build.TORCH_VERSION != torch.__version__:
        return (f"gunn_ext._C was built against torch {build.TORCH_VERSION} but torch "
                f"{torch.__version__} is running; rebuild: pip install --no-build-isolation .")
    try:
        importlib.import_module("gunn_ext._C")
    except (ImportError, OSError) as exc:
        return f"gunn_ext._C failed to load ({exc}); rebuild: pip install --no-build-isolation ."
    return None


def has_cuda_kernels() -> bool:
    if load_error() is not None:
        return False
    return bool(importlib.import_module("gunn_ext._build_info").WITH_CUDA)


def register_layer_op(forward: str, backward: str, stats: Callable[[torch.dtype], torch.dtype],
                      check_input: Callable[[torch.Tensor], None] = check_input) -> None:
    """Fake kernels and autograd for an op pair with ``gradual_update``'s schema.

    ``forward`` and ``backward`` are qualified op names (``"ns::name"``), the
    backward taking ``gradual_update_backward``'s arguments; ``stats`` maps the
    input dtype to the dtype of the returned statistics, and ``check_input``
    checks ``x`` as the op does. The backward op is
    not differentiable: a double backward through it raises, instead of
    autograd's default of a warning and zero second-order terms.
    """
    namespace, backward_name = backward.split("::")
    # The fake kernels check their arguments as the ops do: a meta tensor among
    # real ones routes a call here, which must not return empty memory.
    @torch.library.register_fake(forward)
    def _(x, conv_weight, bn_weight, bn_bias, running_mean, running_var,
          segments, expansion, bottlenecks, shortcut, sequential, training, eps):
        check_input(x)
        layout_of(sum(segments), tuple(segments), expansion, bottlenecks, shortcut).check_arguments(
            x, conv_weight, bn_weight, bn_bias, running_mean, running_var, training)
        mean = x.new_empty(bn_weight.shape, dtype=stats(x.dtype))
        return conventions.output_like(x), mean, mean.clone()

    @torch.library.register_fake(backward)
    def _(grad_y, x, y, conv_weight, bn_weight, bn_bias, mean, var,
          segments, expansion, bottlenecks, shortcut, sequential, training, eps):
        check_input(x)
        layout_of(sum(segments), tuple(segments), expansion, bottlenecks, shortcut).check_backward_arguments(
            grad_y, x, y, conv_weight, bn_weight, bn_bias, mean, var)
        return (conventions.output_like(x), conv_weight.new_empty(conv_weight.shape),
                bn_weight.new_empty(bn_weight.shape), bn_bias.new_empty(bn_bias.shape))

    def setup_context(ctx, inputs, output):
        x, conv_weight, bn_weight, bn_bias, _running_mean, _running_var, *config = inputs
        y, mean, var = output
        ctx.save_for_backward(x, y, mean, var, conv_weight, bn_weight, bn_bias)
        ctx.config = config
        ctx.mark_non_differentiable(mean, var)

    def backward_formula(ctx, grad_y, _grad_mean, _grad_var):
        x, y, mean, var, conv_weight, bn_weight, bn_bias = ctx.saved_tensors
        backward_op = getattr(getattr(torch.ops, namespace), backward_name)
        grads = backward_op(grad_y, x, y, conv_weight, bn_weight, bn_bias, mean, var, *ctx.config)
        return (*grads, None, None, None, None, None, None, None, None, None)

    torch.library.register_autograd(forward, backward_formula, setup_context=setup_context)

    def no_double_backward(ctx, *grads):
        raise RuntimeError(f"{backward} is not differentiable: gunn_ext layers have no double "
                           "backward (gradients of gradients); use backend='reference' for those")

    torch.library.register_autograd(backward, no_double_backward)


_LOAD_ERROR = load_error()
if _LOAD_ERROR is None:
    register_layer_op(f"{_NS}::gradual_update", f"{_NS}::gradual_update_backward", conventions.stats_dtype)
    if has_cuda_kernels():
        from . import native_cuda  # noqa: F401  (the CUDA kernels, through graph replay)


def gradual_update(x, conv_weight, bn_weight, bn_bias, running_mean, running_var,
                   segments, expansion, bottlenecks, shortcut, sequential, training, eps):
    """``torch.ops.gunn_ext.gradual_update``, or a clear error when it is not built."""
    if _LOAD_ERROR is not None:
        raise RuntimeError(_LOAD_ERROR)
    return torch.ops.gunn_ext.gradual_update(
        x, conv_weight, bn_weight, bn_bias, running_mean, running_var,
        segments, expansion, bottlenecks, shortcut, sequential, training, eps)


def update_running_stats(units, mean: torch.Tensor, var: torch.Tensor, count: int,
                         statistics: bool = True) -> None:
    """``nn.BatchNorm2d``'s running-statistics update, for all of a layer's norms at once:
    the batch counted in ``num_batches_tracked``, then, with ``statistics``, the
    running statistics moved.

    ``running = (1 - m) running + m batch``, with the unbiased batch variance
    ``var * count / (count - 1)``; ``m = 1 / num_batches_tracked`` when the
    norm's momentum is None (cumulative average). ``units`` holds the running
    statistics in flat tensors (:class:`gunn_ext.layers.UpdateUnits`), so this
    is a few tensor operations whatever the number of norms: one ``lerp_`` per
    statistic with a scalar momentum when the norms share one, else with a
    per-channel one.
    """
    running_mean, running_var = units.running_mean, units.running_var
    counts = units.num_batches_tracked
    if counts is not None:
        with torch.no_grad():
            counts.add_(1)
    if not statistics or running_mean is None:
        return
    momenta = [norm.momentum for norm in units.norms]
    if counts is None:  # as in nn.BatchNorm2d: without counts, a cumulative average does not move
        momenta = [0.0 if m is None else m for m in momenta]
    with torch.no_grad():
        unbiased = var * (count / max(count - 1, 1))
        momentum = momenta[0]
        if momentum is None or momenta.count(momentum) != len(momenta):
            device = running_mean.device
            per_norm = torch.tensor([float("nan") if m is None else m for m in momenta],
                                    dtype=torch.float64, device=device)
            if counts is not None:
                per_norm = torch.where(per_norm.isnan(), 1.0 / counts.double(), per_norm)
            sizes = torch.tensor(units.layout.norm_sizes(), device=device)
            momentum = per_norm.repeat_interleave(sizes, output_size=running_mean.shape[0])
            momentum = momentum.to(running_mean.dtype)
        running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        running_var.lerp_(unbiased.to(running_var.dtype), momentum)


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs ``x``'s device in, or None where it is off (or
    does not exist, as on the meta device)."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def layer_arguments(layer, x: torch.Tensor, training: bool):
    """The op's arguments for ``layer`` (the conv weights in ``x``'s dtype under autocast,
    which, as for PyTorch's convolutions, leaves float64 alone)."""
    units = layer.units
    conv_weight = units.conv_weight
    dtype = autocast_dtype(x)
    if dtype is not None and x.dtype != torch.float64:
        x, conv_weight = x.to(dtype), conv_weight.to(dtype)
    running = (None, None) if training else (units.running_mean, units.running_var)
    return (x, conv_weight, units.bn_weight, units.bn_bias, *running, list(layer.segments),
            layer.expansion, layer.bottlenecks, layer.shortcut, layer.sequential, training,
            float(units.eps))


class NormModes(NamedTuple):
    """What one op call does with all of a layer's norms."""
    batch_stats: bool  # normalise with the batch's statistics (else the running ones)
    count: bool  # count the batch in num_batches_tracked
    update: bool  # move the running statistics towards the batch's


def norm_modes(units) -> NormModes | None:
    """The modes of all of a layer's norms, as ``nn.BatchNorm2d`` decides them
    per norm from its ``training``, its ``track_running_stats`` and whether it
    has running statistics (a norm whose ``running_mean`` and ``running_var``
    were set to None has none): batch statistics in training or without
    running statistics; in training, when it tracks them, the batch counted
    and the running statistics (if any) updated. None when the norms differ,
    which one op call cannot express."""
    norms = units.norms
    trainings, trackings = {n.training for n in norms}, {n.track_running_stats for n in norms}
    missing = {(n.running_mean is None, n.running_var is None) for n in norms}
    if len(trainings) != 1 or len(trackings) != 1 or len(missing) != 1:
        return None
    no_mean, no_var = missing.pop()
    if no_mean != no_var:  # nn.BatchNorm2d's own case (an error in eval)
        return None
    training, tracking, has_running = trainings.pop(), trackings.pop(), not no_mean
    count = training and tracking
    return NormModes(training or not has_running, count, count and has_running)


def check_eps(eps: float, batch_stats: bool) -> None:
    """``nn.BatchNorm2d``'s rule: positive with batch statistics, non-negative otherwise."""
    if eps <= 0 if batch_stats else eps < 0:
        rule = "positive with batch statistics" if batch_stats else "non-negative"
        raise ValueError(f"the layer's BatchNorm eps must be {rule}, got {eps}; set it with layer.eps = value")


def run_layer_op(op: Callable, layer, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` through ``op``, an op with ``gradual_update``'s schema.

    The reference runs instead where only it applies: an empty batch (what
    ``nn.BatchNorm2d`` does with one: an empty output, zero gradients, and in
    training the batch counted in ``num_batches_tracked``; the op needs rows),
    and norms that differ in their modes (:func:`norm_modes`), for example a
    layer in training with some of its BatchNorms frozen in eval."""
    modes = norm_modes(layer.units)
    if x.shape[0] == 0 or modes is None:
        if modes is None and not torch.compiler.is_compiling():
            warn_once("the BatchNorms of a gunn_ext layer differ in training, track_running_stats or "
                       "having running statistics, which one op call cannot express; such a layer runs "
                       "on the reference backend")
        return reference.gradual_update_reference(layer, x)
    arguments = layer_arguments(layer, x, modes.batch_stats)
    check_eps(arguments[-1], modes.batch_stats)
    y, mean, var = op(*arguments)
    if modes.count:
        update_running_stats(layer.units, mean, var, x.shape[0] * x.shape[2] * x.shape[3], modes.update)
    return y


_warned: set[str] = set()


def warn_once(message: str, stacklevel: int = 4) -> None:
    """A ``RuntimeWarning`` the first time ``message`` comes up in the process."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(f"gunn_ext: {message}", RuntimeWarning, stacklevel=stacklevel)


def gradual_update_native(layer, x: torch.Tensor) -> torch.Tensor:
    return run_layer_op(gradual_update, layer, x)
