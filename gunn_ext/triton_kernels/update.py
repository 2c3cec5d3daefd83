"""The gradual update of a whole layer with the Triton kernels, forward and backward.

The state is a ``[rows, N]`` row-major matrix (rows = B*H*W, channels_last);
segment ``c_i`` is a column block updated in place. Per bottleneck, training::

    pre1 = state @ [Ws; W1]^T               (+ BN statistics in the epilogue)
    pre2 = conv3x3(relu(bn1(pre1)))          (BN + ReLU in the prologue, statistics)
    pre3 = relu(bn2(pre2)) @ W3^T            (same)
    state[:, c_i] += bn3(pre3) + bn_s(pre1_s)

Eval applies every BN (running statistics) as ``x * scale + shift`` in the
epilogue of the convolution before it and runs a bottleneck as two kernels:
the merged 1x1 GEMM (+ BN, ReLU), then the 3x3 conv, its BN and ReLU, the
last 1x1 GEMM, its BN and the residual, fused (bottlenecks too wide for one
tile, :func:`launch.fits_eval_tail`, run the last two as separate GEMMs). ``[Ws; W1]`` is never
concatenated: the GEMMs read both weights in place.

Backward is Algorithm 1 with the merged residual (Eq. 6): walking segments
``P .. 1``, the state before update ``i`` is ``y`` with ``c_i..c_P`` restored
from ``x``; the unit's activations are recomputed from it and the saved
statistics, and ``dL/dstate`` is accumulated into one buffer ``g``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import launch
from .launch import BNBackward, BNRelu, Image, NormVectors, Weights

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Layout:
    """The layer's structure, decoded from the op's arguments."""
    segments: tuple[int, ...]
    units: int
    shortcut: bool
    sequential: bool
    training: bool

    @property
    def starts(self) -> list[int]:
        out, start = [], 0
        for n in self.segments:
            out.append(start)
            start += n
        return out

    @property
    def per_unit(self) -> int:
        return int(self.shortcut) + 3 * self.units

    def first(self, i: int, m: int) -> int:
        """Index of bottleneck ``m``'s conv1 / bn1 in the flat lists of unit ``i``."""
        return i * self.per_unit + int(self.shortcut) + 3 * m

    def first_gemm(self, i: int, m: int) -> int:
        """Index of the first conv / norm of the merged first GEMM (the shortcut's, if any)."""
        return i * self.per_unit if self.has_shortcut(m) else self.first(i, m)

    def has_shortcut(self, m: int) -> bool:
        return m == 0 and self.shortcut


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B*H*W, C]`` row-major (a view for channels_last)."""
    return t.permute(0, 2, 3, 1).contiguous().view(-1, t.shape[1])


def as_output(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[rows, C]`` back to the image layout of ``like`` (channels_last stays a view)."""
    b, c, h, w = like.shape
    image = rows.view(b, h, w, c).permute(0, 3, 1, 2)
    channels_last = like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()
    return image if channels_last else image.contiguous()


class Norms:
    """All BN parameters packed into fp32 vectors in the order of ``layer.norms()``."""

    def __init__(self, bn_weights, bn_biases, eps, mean=None, var=None):
        self.offsets = [0]
        for w in bn_weights:
            self.offsets.append(self.offsets[-1] + w.shape[0])
        device = bn_weights[0].device
        f32 = dict(dtype=torch.float32, device=device)
        total = self.offsets[-1]
        weight = torch.cat([w.detach().float() for w in bn_weights])
        bias = torch.cat([b.detach().float() for b in bn_biases])
        if len(set(eps)) == 1:  # the usual case: one fill, not one per norm
            eps_vec = torch.full((total,), eps[0], **f32)
        else:
            eps_vec = torch.cat([torch.full((w.shape[0],), e, **f32) for w, e in zip(bn_weights, eps)])
        if mean is None:
            empty = torch.empty((5, total), **f32)
            self.all = NormVectors(weight, bias, eps_vec, *empty)
        else:
            mean, var = mean.float(), var.float()
            invstd = torch.rsqrt(var + eps_vec)
            scale = weight * invstd
            self.all = NormVectors(weight, bias, eps_vec, mean, var, invstd, scale, bias - mean * scale)

    def at(self, k: int, count: int = 1) -> NormVectors:
        start = self.offsets[k]
        return self.all.slice(start, self.offsets[k + count] - start)


def _check(x, conv_weights, layout: Layout) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the triton backend supports float32, float16 and bfloat16 inputs, got "
                        f"{x.dtype}; use backend='native' or 'reference'")
    expected = len(layout.segments) * layout.per_unit
    if len(conv_weights) != expected:
        raise ValueError(f"conv_weights must hold {expected} tensors, got {len(conv_weights)}")
    if layout.training and x.shape[0] * x.shape[2] * x.shape[3] < 2:
        raise ValueError(f"expected more than 1 value per channel when training, got input of shape "
                         f"{tuple(x.shape)}")


class Unit:
    """One update unit ``U_i``: its weights and its kernels."""

    def __init__(self, layout: Layout, convs, norms: Norms, image: Image, i: int):
        self.layout, self.convs, self.norms, self.image, self.i = layout, convs, norms, image, i
        self.n = layout.segments[i]

    def skip(self, m: int) -> int:
        return self.n if self.layout.has_shortcut(m) else 0

    def first_weights(self, m: int) -> tuple[torch.Tensor, ...]:
        """The merged first GEMM's weights ``(Ws, W1)`` of bottleneck ``m`` (``(W1,)`` without shortcut)."""
        w1 = self.convs[self.layout.first(self.i, m)]
        if self.layout.has_shortcut(m):
            return self.convs[self.layout.first_gemm(self.i, m)], w1
        return (w1,)

    def first_norm(self, m: int) -> NormVectors:
        return self.norms.at(self.layout.first_gemm(self.i, m), 2 if self.layout.has_shortcut(m) else 1)

    def norm(self, m: int, j: int) -> NormVectors:
        """bn1 / bn2 / bn3 (j = 0, 1, 2) of bottleneck m."""
        return self.norms.at(self.layout.first(self.i, m) + j)

    def shortcut_norm(self) -> NormVectors:
        return self.norms.at(self.layout.first_gemm(self.i, 0))

    def bottleneck(self, m: int, source: torch.Tensor, stats: bool) -> dict:
        """pre1, pre2, pre3 of bottleneck ``m`` on ``source`` (statistics computed if ``stats``)."""
        image, rows = self.image, self.image.rows
        k = self.layout.first(self.i, m)
        skip, mid = self.skip(m), self.convs[k].shape[0]
        pre1 = source.new_empty((rows, skip + mid))
        pre2 = source.new_empty((rows, mid))
        pre3 = source.new_empty((rows, self.n))
        steps = ((source, Weights.linear(*self.first_weights(m)), pre1, None, self.first_norm(m)),
                 (pre1[:, skip:], Weights.conv3x3(self.convs[k + 1]), pre2, BNRelu(self.norm(m, 0)),
                  self.norm(m, 1)),
                 (pre2, Weights.linear(self.convs[k + 2]), pre3, BNRelu(self.norm(m, 1)),
                  self.norm(m, 2)))
        for a, b, out, prologue, out_norm in steps:
            ws = launch.stats_workspace(rows, out.shape[1], out.device) if stats else None
            launch.conv(a, b, out, image, prologue=prologue, stats=ws)
            if stats:
                launch.finalize_stats(ws, rows, out_norm)
        return dict(input=source, pre1=pre1, pre2=pre2, pre3=pre3)

    def combine(self, m: int, tape: dict, out: torch.Tensor, accumulate: bool,
                h: torch.Tensor | None) -> None:
        """``out (+)= bn3(pre3) + (bn_s(pre1_s) | h)``."""
        if self.layout.has_shortcut(m):
            launch.bn_add(out, tape["pre3"], self.norm(m, 2), accumulate=accumulate,
                          x2=tape["pre1"][:, :self.n], norm2=self.shortcut_norm())
        else:
            launch.bn_add(out, tape["pre3"], self.norm(m, 2), accumulate=accumulate, x2=h)

    def forward(self, source: torch.Tensor, target: torch.Tensor | None, stats: bool) -> list[dict]:
        """``target += U(source)``; returns the activations of every bottleneck.

        Without ``target`` (recomputation for backward) the last sum is skipped.
        """
        tapes, h = [], None
        for m in range(self.layout.units):
            tape = self.bottleneck(m, source if m == 0 else h, stats)
            tapes.append(tape)
            last = m + 1 == self.layout.units
            if last and target is None:
                break
            out = target if last else source.new_empty((self.image.rows, self.n))
            self.combine(m, tape, out, accumulate=last, h=h)
            h = out
        return tapes

    def forward_eval(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """Eval: ``target += U(source)``, every BN applied with its running statistics."""
        image, h = self.image, None
        for m in range(self.layout.units):
            k = self.layout.first(self.i, m)
            skip, mid = self.skip(m), self.convs[k].shape[0]
            pre1 = source.new_empty((image.rows, skip + mid))
            launch.conv_bn(source if m == 0 else h, Weights.linear(*self.first_weights(m)), pre1, image,
                           bn=self.first_norm(m), relu_from=skip)
            last = m + 1 == self.layout.units
            out = target if last else source.new_empty((image.rows, self.n))
            residual = pre1[:, :skip] if skip else h
            if launch.fits_eval_tail(mid, self.n, source.dtype):
                launch.eval_bottleneck_tail(pre1[:, skip:], self.convs[k + 1], self.norm(m, 1),
                                            self.convs[k + 2], self.norm(m, 2), out, image,
                                            residual=residual, accumulate=last)
            else:  # too wide for one tile: the 3x3 and the last 1x1 as GEMMs, BN in their epilogues
                act2 = source.new_empty((image.rows, mid))
                launch.conv_bn(pre1[:, skip:], Weights.conv3x3(self.convs[k + 1]), act2, image,
                               bn=self.norm(m, 1), relu_from=0)
                launch.conv_bn(act2, Weights.linear(self.convs[k + 2]), out, image, bn=self.norm(m, 2),
                               accumulate=last)
                if residual is not None:
                    out += residual
            h = out

    def backward(self, tapes: list[dict], grad_unit: torch.Tensor, grad_state: torch.Tensor,
                 grad_convs: list) -> None:
        """Backpropagate ``grad_unit = dL/dU`` through the unit; add ``dL/dsource`` into ``grad_state``."""
        image, rows, training = self.image, self.image.rows, self.layout.training
        for m in reversed(range(self.layout.units)):
            t = tapes[m]
            k = self.layout.first(self.i, m)
            skip, mid = self.skip(m), self.convs[k].shape[0]
            bn1, bn2, bn3 = self.norm(m, 0), self.norm(m, 1), self.norm(m, 2)
            launch.finalize_grad(launch.bn_grad_partials(grad_unit, t["pre3"], bn3), rows, bn3, training)
            if skip:
                sc = self.shortcut_norm()
                launch.finalize_grad(launch.bn_grad_partials(grad_unit, t["pre1"][:, :skip], sc),
                                     rows, sc, training)
            d3 = BNBackward(t["pre3"], bn3)
            w3 = self.convs[k + 2]
            grad2 = t["pre2"].new_empty((rows, mid))
            ws = launch.stats_workspace(rows, mid, grad2.device)
            launch.input_grad_bn_relu(grad_unit, Weights.linear_transposed(w3), grad2, image, prologue=d3,
                                      x=t["pre2"], x_bn=bn2, sums=ws)
            launch.finalize_grad(ws, rows, bn2, training)
            grad_convs[k + 2] = launch.weight_grad(d3, grad_unit, t["pre2"], BNRelu(bn2), image, 1)

            d2 = BNBackward(t["pre2"], bn2)
            w2 = self.convs[k + 1]
            grad1 = t["pre1"].new_empty((rows, skip + mid))
            ws = launch.stats_workspace(rows, mid, grad1.device)
            launch.input_grad_bn_relu(grad2, Weights.conv3x3_transposed(w2), grad1[:, skip:], image,
                                      prologue=d2, x=t["pre1"][:, skip:], x_bn=bn1, sums=ws)
            launch.finalize_grad(ws, rows, bn1, training)
            grad_convs[k + 1] = launch.weight_grad(d2, grad2, t["pre1"][:, skip:], BNRelu(bn1), image, 9)

            if skip:
                grad1[:, :skip].copy_(grad_unit)
            d1 = BNBackward(t["pre1"], self.first_norm(m))
            w1 = self.first_weights(m)
            dw1 = launch.weight_grad(d1, grad1, t["input"], None, image, 1)
            grad_convs[k] = dw1[skip:]
            if skip:
                grad_convs[self.layout.first_gemm(self.i, m)] = dw1[:skip]
            if m == 0:
                launch.input_grad_accumulate(grad1, Weights.linear_transposed(*w1), grad_state, image,
                                             prologue=d1)
            else:  # h_m = h_{m-1} + B_m(h_{m-1})
                grad_prev = grad_unit.clone()
                launch.input_grad_accumulate(grad1, Weights.linear_transposed(*w1), grad_prev, image,
                                             prologue=d1)
                grad_unit = grad_prev


def _image(x: torch.Tensor) -> Image:
    return Image(x.shape[0] * x.shape[2] * x.shape[3], x.shape[2], x.shape[3])


def _contiguous(tensors) -> list[torch.Tensor]:
    return [t.detach().contiguous() for t in tensors]


def gradual_update_forward(x, conv_weights, bn_weights, bn_biases, running_means, running_vars,
                           segments, units, shortcut, sequential, training, eps):
    """``(y, mean, var)`` as ``torch.ops.gunn_ext.gradual_update``."""
    layout = Layout(tuple(segments), units, shortcut, sequential, training)
    _check(x, conv_weights, layout)
    image = _image(x)
    convs = _contiguous(conv_weights)
    if training:
        norms = Norms(bn_weights, bn_biases, eps)
    else:
        norms = Norms(bn_weights, bn_biases, eps, torch.cat(list(running_means)),
                      torch.cat(list(running_vars)))
    source = as_rows(x.detach())
    state = source.clone()
    for i, (start, n) in enumerate(zip(layout.starts, layout.segments)):
        unit = Unit(layout, convs, norms, image, i)
        read = state if sequential else source
        target = state[:, start:start + n]
        if training:
            unit.forward(read, target, stats=True)
        else:
            unit.forward_eval(read, target)
    return as_output(state, x), norms.all.mean.clone(), norms.all.var.clone()


def gradual_update_backward(grad_y, x, y, conv_weights, bn_weights, bn_biases, mean, var,
                            segments, units, shortcut, sequential, training, eps):
    """``(dx, d conv_weights, d bn_weights, d bn_biases)`` by Algorithm 1."""
    layout = Layout(tuple(segments), units, shortcut, sequential, training)
    _check(x, conv_weights, layout)
    image = _image(x)
    convs = _contiguous(conv_weights)
    norms = Norms(bn_weights, bn_biases, eps, mean, var)
    norms.all = norms.all.with_gradients()
    original = as_rows(x.detach())
    incoming = as_rows(grad_y.to(x.dtype))
    grad = incoming.clone()
    read_from = grad if sequential else incoming
    state = as_rows(y.detach()).clone() if sequential else original
    grad_convs: list = [None] * len(convs)
    for i in reversed(range(len(layout.segments))):
        start, n = layout.starts[i], layout.segments[i]
        if sequential:
            state[:, start:start + n] = original[:, start:start + n]
        unit = Unit(layout, convs, norms, image, i)
        tapes = unit.forward(state, None, stats=False)
        unit.backward(tapes, read_from[:, start:start + n], grad, grad_convs)
    sizes = [w.shape[0] for w in bn_weights]
    grad_w = norms.all.grad_weight.split_with_sizes(sizes)
    grad_b = norms.all.grad_bias.split_with_sizes(sizes)
    return (as_output(grad, x), _copies(grad_convs, conv_weights), _copies(grad_w, bn_weights),
            _copies(grad_b, bn_biases))


def _copies(sources, like) -> list[torch.Tensor]:
    """Fresh tensors laid out as ``like`` holding ``sources`` (a few foreach launches)."""
    out = [torch.empty_like(t) for t in like]
    torch._foreach_copy_(out, [s.view(t.shape) for s, t in zip(sources, out)])
    return out
