"""The ``triton`` backend: the gradual update as two first-class ops.

``torch.ops.gunn_ext.triton_gradual_update`` takes the arguments of the native
``gradual_update`` (see :func:`gunn_ext.ops.layer_arguments`) and returns
``(y, mean, var)``: the output and every BatchNorm's statistics packed in the
order of ``layer.norms()`` (batch statistics in training, running ones in
eval). Its backward is ``torch.ops.gunn_ext.triton_gradual_update_backward``
(Algorithm 1, Eq. 6). Both are opaque custom ops with fake kernels, so
``torch.compile(fullgraph=True)`` traces a layer as two nodes.

The kernels live in :mod:`gunn_ext.triton_kernels`; ``triton`` is imported
only when an op runs.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import ops

_NS = "gunn_ext"


@torch.library.custom_op(f"{_NS}::triton_gradual_update", mutates_args=())
def triton_gradual_update(
        x: Tensor, conv_weights: list[Tensor], bn_weights: list[Tensor], bn_biases: list[Tensor],
        running_means: list[Tensor], running_vars: list[Tensor], segments: list[int], units: int,
        shortcut: bool, sequential: bool, training: bool, eps: list[float],
) -> tuple[Tensor, Tensor, Tensor]:
    from .triton_kernels.update import gradual_update_forward
    return gradual_update_forward(x, conv_weights, bn_weights, bn_biases, running_means,
                                  running_vars, segments, units, shortcut, sequential, training, eps)


@torch.library.custom_op(f"{_NS}::triton_gradual_update_backward", mutates_args=())
def triton_gradual_update_backward(
        grad_y: Tensor, x: Tensor, y: Tensor, conv_weights: list[Tensor], bn_weights: list[Tensor],
        bn_biases: list[Tensor], mean: Tensor, var: Tensor, segments: list[int], units: int,
        shortcut: bool, sequential: bool, training: bool, eps: list[float],
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    from .triton_kernels.update import gradual_update_backward
    return gradual_update_backward(grad_y, x, y, conv_weights, bn_weights, bn_biases, mean, var,
                                   segments, units, shortcut, sequential, training, eps)


def _output_like(x: Tensor) -> Tensor:
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)


@triton_gradual_update.register_fake
def _(x, conv_weights, bn_weights, bn_biases, running_means, running_vars,
      segments, units, shortcut, sequential, training, eps):
    total = sum(w.shape[0] for w in bn_weights)
    stats = x.new_empty((total,), dtype=torch.float32)
    return _output_like(x), stats, stats.clone()


@triton_gradual_update_backward.register_fake
def _(grad_y, x, y, conv_weights, bn_weights, bn_biases, mean, var,
      segments, units, shortcut, sequential, training, eps):
    return (_output_like(x), [torch.empty_like(w) for w in conv_weights],
            [torch.empty_like(w) for w in bn_weights], [torch.empty_like(b) for b in bn_biases])


def _setup_context(ctx, inputs, output):
    (x, conv_weights, bn_weights, bn_biases, running_means, running_vars,
     segments, units, shortcut, sequential, training, eps) = inputs
    y, mean, var = output
    ctx.save_for_backward(x, y, mean, var, *conv_weights, *bn_weights, *bn_biases)
    ctx.counts = (len(conv_weights), len(bn_weights), len(running_means))
    ctx.config = (segments, units, shortcut, sequential, training, eps)
    ctx.mark_non_differentiable(mean, var)


def _backward(ctx, grad_y, _grad_mean, _grad_var):
    x, y, mean, var, *params = ctx.saved_tensors
    n_conv, n_bn, n_running = ctx.counts
    conv_weights = params[:n_conv]
    bn_weights = params[n_conv:n_conv + n_bn]
    bn_biases = params[n_conv + n_bn:]
    grad_x, grad_w, grad_g, grad_b = triton_gradual_update_backward(
        grad_y, x, y, conv_weights, bn_weights, bn_biases, mean, var, *ctx.config)
    no_grad = [None] * n_running
    return (grad_x, grad_w, grad_g, grad_b, no_grad, no_grad,
            None, None, None, None, None, None)


triton_gradual_update.register_autograd(_backward, setup_context=_setup_context)


def gradual_update_triton(layer, x: Tensor) -> Tensor:
    """The layer's forward with the Triton kernels (running statistics updated in training)."""
    training = ops.uses_batch_stats(layer)
    y, mean, var = triton_gradual_update(*ops.layer_arguments(layer, x, training))
    if layer.training:
        ops.update_running_stats(layer.norms(), mean, var, x.shape[0] * x.shape[2] * x.shape[3])
    return y
