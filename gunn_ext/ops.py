"""The compiled ``torch.ops.gunn_ext`` ops: loading, fake kernels, autograd.

``gradual_update`` runs the whole layer (all segments, all units) in one op
and returns ``(y, mean, var)``: the output and the per-channel statistics
every BatchNorm normalised with (batch statistics in training, the running
ones in eval), packed in the order of :meth:`layer.norms`.

Its backward is ``gradual_update_backward``: Algorithm 1 of the paper with
the merged residual (Eq. 6). It needs only ``x``, ``y`` and the statistics;
the state before update ``i`` is ``y`` on the segments before ``c_i`` and
``x`` from ``c_i`` on, and one gradient buffer ``g = dL/dy`` is updated in
place, segment ``P`` down to ``1``::

    g += J_{U_i}(s_{i-1})^T g[:, c_i]
"""
from __future__ import annotations

import functools
import importlib
from typing import Callable

import torch

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


def output_like(x: torch.Tensor) -> torch.Tensor:
    """An empty tensor shaped like ``x`` in the layout the kernels return."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def register_layer_op(forward: str, backward: str, stats: Callable[[torch.dtype], torch.dtype]) -> None:
    """Fake kernels and autograd for an op pair with ``gradual_update``'s schema.

    ``forward`` and ``backward`` are qualified op names (``"ns::name"``), the
    backward taking ``gradual_update_backward``'s arguments; ``stats`` maps the
    input dtype to the dtype of the returned statistics.
    """
    namespace, backward_name = backward.split("::")
    @torch.library.register_fake(forward)
    def _(x, conv_weights, bn_weights, bn_biases, running_means, running_vars,
          segments, units, shortcut, sequential, training, eps):
        total = sum(w.shape[0] for w in bn_weights)
        mean = x.new_empty((total,), dtype=stats(x.dtype))
        return output_like(x), mean, mean.clone()

    @torch.library.register_fake(backward)
    def _(grad_y, x, y, conv_weights, bn_weights, bn_biases, mean, var,
          segments, units, shortcut, sequential, training, eps):
        return (output_like(x), [torch.empty_like(w) for w in conv_weights],
                [torch.empty_like(w) for w in bn_weights], [torch.empty_like(b) for b in bn_biases])

    def setup_context(ctx, inputs, output):
        (x, conv_weights, bn_weights, bn_biases, running_means, running_vars,
         segments, units, shortcut, sequential, training, eps) = inputs
        y, mean, var = output
        ctx.save_for_backward(x, y, mean, var, *conv_weights, *bn_weights, *bn_biases)
        ctx.counts = (len(conv_weights), len(bn_weights), len(running_means))
        ctx.config = (segments, units, shortcut, sequential, training, eps)
        ctx.mark_non_differentiable(mean, var)

    def backward_formula(ctx, grad_y, _grad_mean, _grad_var):
        x, y, mean, var, *params = ctx.saved_tensors
        n_conv, n_bn, n_running = ctx.counts
        conv_weights = params[:n_conv]
        bn_weights = params[n_conv:n_conv + n_bn]
        bn_biases = params[n_conv + n_bn:]
        backward_op = getattr(getattr(torch.ops, namespace), backward_name)
        grad_x, grad_w, grad_g, grad_b = backward_op(
            grad_y, x, y, conv_weights, bn_weights, bn_biases, mean, var, *ctx.config)
        no_grad = [None] * n_running
        return (grad_x, grad_w, grad_g, grad_b, no_grad, no_grad,
                None, None, None, None, None, None)

    torch.library.register_autograd(forward, backward_formula, setup_context=setup_context)


_LOAD_ERROR = load_error()
if _LOAD_ERROR is None:
    register_layer_op(f"{_NS}::gradual_update", f"{_NS}::gradual_update_backward", stats_dtype)
    if has_cuda_kernels():
        from . import native_cuda  # noqa: F401  (the CUDA kernels, through graph replay)


def gradual_update(x, conv_weights, bn_weights, bn_biases, running_means, running_vars,
                   segments, units, shortcut, sequential, training, eps):
    """``torch.ops.gunn_ext.gradual_update``, or a clear error when it is not built."""
    if _LOAD_ERROR is not None:
        raise RuntimeError(_LOAD_ERROR)
    return torch.ops.gunn_ext.gradual_update(
        x, conv_weights, bn_weights, bn_biases, running_means, running_vars,
        segments, units, shortcut, sequential, training, eps)


def update_running_stats(norms, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """``nn.BatchNorm2d``'s running-statistics update, for all norms at once.

    ``running = (1 - m) running + m batch``, with the unbiased batch variance
    ``var * count / (count - 1)``; ``m = 1 / num_batches_tracked`` when the
    norm's momentum is None (cumulative average). A layer with P = N segments
    has thousands of norms, so this is a handful of foreach ops.
    """
    # Buffers through the _buffers dicts: Module.__getattr__ costs ~0.5 us a call.
    buffers = [bn._buffers for bn in norms]
    tracked = [k for k, (bn, b) in enumerate(zip(norms, buffers))
               if bn.track_running_stats and b.get("running_mean") is not None]
    if not tracked:
        return
    sizes = [bn.num_features for bn in norms]
    dtypes = {buffers[k]["running_mean"].dtype for k in tracked}
    with torch.no_grad():
        unbiased = var * (count / max(count - 1, 1))
        if len(dtypes) == 1:
            mean, unbiased = mean.to(*dtypes), unbiased.to(*dtypes)
        # Tensor.split_with_sizes: torch.split's Python wrapper costs ~15x more.
        means, variances = mean.split_with_sizes(sizes), unbiased.split_with_sizes(sizes)
        torch._foreach_add_([buffers[k]["num_batches_tracked"] for k in tracked], 1)
        groups: dict[float, list[int]] = {}
        for k in tracked:
            momentum = norms[k].momentum
            if momentum is None:
                momentum = 1.0 / float(buffers[k]["num_batches_tracked"])
            groups.setdefault(momentum, []).append(k)
        for momentum, ks in groups.items():
            for batch, name in ((means, "running_mean"), (variances, "running_var")):
                running = [buffers[k][name] for k in ks]
                torch._foreach_lerp_(running, [batch[k] if batch[k].dtype == r.dtype else batch[k].to(r.dtype)
                                               for k, r in zip(ks, running)], momentum)


def layer_arguments(layer, x: torch.Tensor, training: bool, norms=None):
    """The op's arguments for ``layer`` (conv weights in ``x``'s dtype under autocast)."""
    norms = layer.norms() if norms is None else norms
    weights = [c.weight for c in layer.convs()]
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x = x.to(dtype)
        weights = [w.to(dtype) for w in weights]
    if training:
        running_means = running_vars = []
    else:
        running_means = [n.running_mean for n in norms]
        running_vars = [n.running_var for n in norms]
    return (x, weights, [n.weight for n in norms], [n.bias for n in norms],
            running_means, running_vars, list(layer.segments), layer.num_units,
            layer.shortcut, layer.sequential, training, [float(n.eps) for n in norms])


def uses_batch_stats(layer, norms=None) -> bool:
    """As ``nn.BatchNorm2d``: batch statistics in training or without running stats."""
    if layer.training:
        return True
    return any(n.running_mean is None for n in (layer.norms() if norms is None else norms))


def run_layer_op(op: Callable, layer, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` through ``op``, an op with ``gradual_update``'s schema."""
    norms = layer.norms()
    training = uses_batch_stats(layer, norms)
    y, mean, var = op(*layer_arguments(layer, x, training, norms))
    if layer.training:
        update_running_stats(norms, mean, var, x.shape[0] * x.shape[2] * x.shape[3])
    return y


def gradual_update_native(layer, x: torch.Tensor) -> torch.Tensor:
    return run_layer_op(gradual_update, layer, x)
