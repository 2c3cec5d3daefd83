"""The ``triton`` backend: the gradual update as two first-class ops.

``torch.ops.gunn_ext.triton_gradual_update`` takes the arguments of the native
``gradual_update`` (see :func:`gunn_ext.ops.layer_arguments`) and returns
``(y, mean, var)``: the output and every BatchNorm's statistics, flat in the
order of :mod:`gunn_ext.parameter_layout` (batch statistics in training,
running ones in eval). Its backward is ``torch.ops.gunn_ext.triton_gradual_update_backward``
(Algorithm 1, Eq. 6). Both are opaque custom ops with fake kernels, so
``torch.compile(fullgraph=True)`` traces a layer as two nodes. On the GPU
each runs through the CUDA graph replay engine of the native op
(:mod:`gunn_ext.graph_replay`).

The kernels live in :mod:`gunn_ext.triton_kernels`; ``triton`` is imported
only when an op runs.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import graph_replay, ops, parameter_layout

_NS = "gunn_ext"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_input(x: Tensor) -> None:
    """The op's ``x``: the native op's rule, in a dtype the kernels support."""
    parameter_layout.check_input(x)
    if x.dtype not in DTYPES:
        raise TypeError(f"the triton backend supports float32, float16 and bfloat16 inputs, got "
                        f"{x.dtype}; use backend='native' or 'reference'")


def _forward(*args):
    from .triton_kernels.update import gradual_update_forward
    return gradual_update_forward(*args)


def _backward(*args):
    from .triton_kernels.update import gradual_update_backward
    return gradual_update_backward(*args)


@torch.library.custom_op(f"{_NS}::triton_gradual_update", mutates_args=())
def triton_gradual_update(
        x: Tensor, conv_weight: Tensor, bn_weight: Tensor, bn_bias: Tensor,
        running_mean: Optional[Tensor], running_var: Optional[Tensor], segments: list[int], expansion: int,
        bottlenecks: int, shortcut: bool, sequential: bool, training: bool, eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    return FORWARD(x, conv_weight, bn_weight, bn_bias, running_mean, running_var, segments,
                   expansion, bottlenecks, shortcut, sequential, training, eps)


@torch.library.custom_op(f"{_NS}::triton_gradual_update_backward", mutates_args=())
def triton_gradual_update_backward(
        grad_y: Tensor, x: Tensor, y: Tensor, conv_weight: Tensor, bn_weight: Tensor,
        bn_bias: Tensor, mean: Tensor, var: Tensor, segments: list[int], expansion: int,
        bottlenecks: int, shortcut: bool, sequential: bool, training: bool, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return BACKWARD(grad_y, x, y, conv_weight, bn_weight, bn_bias, mean, var, segments, expansion,
                    bottlenecks, shortcut, sequential, training, eps)


def _replayed(op: str, fn, name: str, roles: dict) -> graph_replay.GraphReplay:
    arguments = [a.name for a in getattr(torch.ops.gunn_ext, op).default._schema.arguments]
    return graph_replay.register(graph_replay.GraphReplay(name, fn, arguments, **roles))


FORWARD = _replayed("triton_gradual_update", _forward, "triton_forward", graph_replay.FORWARD_ROLES)
BACKWARD = _replayed("triton_gradual_update_backward", _backward, "triton_backward",
                     graph_replay.BACKWARD_ROLES)

ops.register_layer_op(f"{_NS}::triton_gradual_update", f"{_NS}::triton_gradual_update_backward",
                      lambda dtype: torch.float32, check_input)


def gradual_update_triton(layer, x: Tensor) -> Tensor:
    """The layer's forward with the Triton kernels (running statistics updated in training)."""
    return ops.run_layer_op(triton_gradual_update, layer, x)
