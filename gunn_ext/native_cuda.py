"""The native op's CUDA kernels: CUDA graph replay around the eager CUDA ops.

``csrc/cuda/gradual_update_cuda.cpp`` registers the orchestration with the
CUDA fused kernels as ``_gradual_update_cuda`` and
``_gradual_update_backward_cuda``; their schemas are defined here from the
public ops' ones, so the two never drift apart. The CUDA kernels of
``gradual_update`` and ``gradual_update_backward`` are Python kernels that call
those eager ops through :class:`gunn_ext.graph_replay.GraphReplay`, with the
argument roles of ``graph_replay.FORWARD_ROLES`` and ``BACKWARD_ROLES``.
Imported by :mod:`gunn_ext.ops` when the extension has its CUDA kernels.
"""
from __future__ import annotations

import torch

from . import graph_replay

_NS = "gunn_ext"
_LIB = torch.library.Library(_NS, "FRAGMENT")


def _replayed(public: str, eager: str, name: str, roles: dict) -> graph_replay.GraphReplay:
    schema = getattr(torch.ops.gunn_ext, public).default._schema
    _LIB.define(eager + str(schema)[len(schema.name):])
    engine = graph_replay.register(graph_replay.GraphReplay(
        name, getattr(torch.ops.gunn_ext, eager).default, [a.name for a in schema.arguments],
        **roles))

    def kernel(*args):
        return engine(*args)

    torch.library.register_kernel(f"{_NS}::{public}", "cuda", kernel, lib=_LIB)
    return engine


FORWARD = _replayed("gradual_update", "_gradual_update_cuda", "native_forward",
                    graph_replay.FORWARD_ROLES)
BACKWARD = _replayed("gradual_update_backward", "_gradual_update_backward_cuda", "native_backward",
                     graph_replay.BACKWARD_ROLES)
