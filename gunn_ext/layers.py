"""GUNN and SUNN layers.

A layer holds ``N = channels`` channels split into ``P`` segments
``c_1 .. c_P``. Each segment has an update unit ``U_i`` that reads all ``N``
channels and writes ``|c_i|`` channels.

GUNN (gradually updated) applies the units one after another, in place::

    s_0 = x
    s_i = s_{i-1} + scatter_{c_i}(U_i(s_{i-1}))      i = 1 .. P
    y   = s_P

SUNN (simultaneously updated) is the baseline with the same units, all
reading the layer input: ``y[:, c_i] = x[:, c_i] + U_i(x)``.

Update unit (``bottlenecks = M`` stacked bottlenecks, expansion ``K``, ``n = |c_i|``)::

    B_m(h) = bn3(conv1x1(relu(bn2(conv3x3(relu(bn1(conv1x1(h))))))))
             conv1: (N or n) -> K n,  conv2: K n -> K n,  conv3: K n -> n
    S(x)   = shortcut_bn(shortcut_conv(x))               N -> n (shortcut=True)
    h_1    = S(x) + B_1(x)            (without shortcut: h_1 = B_1(x))
    h_m    = h_{m-1} + B_m(h_{m-1})   m = 2 .. M
    U(x)   = h_M

The units' tensors live in a few flat tensors (:class:`UpdateUnits`), laid
out as :mod:`gunn_ext.parameter_layout` specifies.
"""
from __future__ import annotations

import contextlib
import copy
import math
import numbers
import operator
from collections.abc import Sequence

import torch
from torch import nn

from . import backends
from .parameter_layout import ParameterLayout, aligned, alignment_step, needs_alignment

__all__ = ["AlignedBatchNorm2d", "Bottleneck", "UpdateUnit", "UpdateUnits", "GUNNLayer", "SUNNLayer"]

_NORM_VECTORS = ("weight", "bias", "running_mean", "running_var")
# Set on a norm while UpdateUnits.split_views has given it aligned pieces.
_ALIGNED_VIEWS = "_aligned_views"
_NORM_TENSORS = _NORM_VECTORS + ("num_batches_tracked",)
_RUNNING = ("running_mean", "running_var")


class AlignedBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose tensors may be views into a layer's flat storage.

    On a device that :func:`~gunn_ext.parameter_layout.needs_alignment`, a
    view that is not :func:`~gunn_ext.parameter_layout.aligned` is replaced by
    an aligned copy for the call: cuDNN's channels-last kernels read these
    tensors in 16-byte vectors and fault on such a view. Gradients reach the
    view through the copy, and updated running statistics are written back to
    it. Registered parameters and buffers (a module not in a layer) are used
    as they are.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not needs_alignment(input.device) or self.__dict__.get(_ALIGNED_VIEWS):
            return super().forward(input)
        # A trace cannot read a view's offset: copy every view there.
        compiling = torch.compiler.is_compiling()
        views = {name: t for name in _NORM_VECTORS
                 if (t := self.__dict__.get(name)) is not None and (compiling or not aligned(t))}
        if not views:
            return super().forward(input)
        self.__dict__.update((name, t.clone()) for name, t in views.items())
        try:
            return super().forward(input)
        finally:
            copies = {name: self.__dict__[name] for name in views}
            self.__dict__.update(views)
            if self.training:
                with torch.no_grad():
                    for name in _RUNNING:
                        if name in views:
                            views[name].copy_(copies[name])


class Bottleneck(nn.Module):
    """conv1x1 -> BN -> ReLU -> conv3x3 -> BN -> ReLU -> conv1x1 -> BN."""

    def __init__(self, in_channels: int, out_channels: int, expansion: int):
        super().__init__()
        mid = expansion * out_channels
        self.conv1 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn1 = AlignedBatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False)
        self.bn2 = AlignedBatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_channels, 1, bias=False)
        self.bn3 = AlignedBatchNorm2d(out_channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(h)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.bn3(self.conv3(h))


class UpdateUnit(nn.Module):
    """The update ``U_i`` of one segment: ``in_channels -> out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, expansion: int,
                 bottlenecks: int, shortcut: bool):
        super().__init__()
        self.bottlenecks = nn.ModuleList(
            Bottleneck(in_channels if m == 0 else out_channels, out_channels, expansion)
            for m in range(bottlenecks))
        if shortcut:
            self.shortcut_conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
            self.shortcut_bn = AlignedBatchNorm2d(out_channels)

    @property
    def has_shortcut(self) -> bool:
        return hasattr(self, "shortcut_conv")

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        h = self.bottlenecks[0](state)
        if self.has_shortcut:
            h = h + self.shortcut_bn(self.shortcut_conv(state))
        for bottleneck in self.bottlenecks[1:]:
            h = h + bottleneck(h)
        return h

    def convs(self) -> list[nn.Conv2d]:
        """Convolutions in the order of :mod:`gunn_ext.parameter_layout`."""
        head = [self.shortcut_conv] if self.has_shortcut else []
        return head + [c for b in self.bottlenecks for c in (b.conv1, b.conv2, b.conv3)]

    def norms(self) -> list[nn.BatchNorm2d]:
        """BatchNorms in the same order as :meth:`convs`."""
        head = [self.shortcut_bn] if self.has_shortcut else []
        return head + [n for b in self.bottlenecks for n in (b.bn1, b.bn2, b.bn3)]

_FLAT_PARAMETERS = ("conv_weight", "bn_weight", "bn_bias")
_FLAT_TENSORS = _FLAT_PARAMETERS + ("running_mean", "running_var", "num_batches_tracked")
# (is a norm, attribute) -> the flat tensor holding it
_FLAT_OF = {(False, "weight"): "conv_weight", (True, "weight"): "bn_weight", (True, "bias"): "bn_bias",
            **{(True, name): name for name in _RUNNING + ("num_batches_tracked",)}}


class UpdateUnits(nn.ModuleList):
    """The ``P`` update units of a layer, with all their tensors in flat storage.

    Parameters ``conv_weight``, ``bn_weight``, ``bn_bias`` and buffers
    ``running_mean``, ``running_var``, ``num_batches_tracked`` hold every
    convolution and BatchNorm of the units in the order of ``layout`` (a
    :class:`~gunn_ext.parameter_layout.ParameterLayout`), as ``nn.LSTM``
    flattens its weights. Autograd, optimizers, DDP and the running-statistics
    update see these six tensors, whatever the number of segments.

    The units' modules stay plain ``nn.Conv2d`` and ``nn.BatchNorm2d``
    (:class:`AlignedBatchNorm2d`): their
    ``weight``, ``bias``, ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` are views into the flat tensors (plain attributes,
    not registered parameters), so a module called on its own computes with,
    updates and backpropagates into the flat storage. The views are rebound
    whenever the flat tensors are replaced (``.to()`` and other conversions,
    ``load_state_dict(assign=True)``, copies, unpickling).

    ``state_dict()`` has the per-module keys (``0.bottlenecks.0.conv1.weight``,
    ...), in module order, not the flat tensors: checkpoints are the same as
    with one parameter per module. A BatchNorm's ``num_batches_tracked`` may
    be absent where ``nn.BatchNorm2d`` allows it (a state dict without version
    metadata, or older): the count keeps its value.
    """

    def __init__(self, layout: ParameterLayout):
        super().__init__(UpdateUnit(layout.channels, n, layout.expansion, layout.bottlenecks,
                                    layout.shortcut) for n in layout.segments)
        self.layout = layout
        self.conv_weight = nn.Parameter(torch.empty(layout.conv_numel))
        self.bn_weight = nn.Parameter(torch.ones(layout.norm_channels))
        self.bn_bias = nn.Parameter(torch.zeros(layout.norm_channels))
        self.register_buffer("running_mean", torch.zeros(layout.norm_channels))
        self.register_buffer("running_var", torch.ones(layout.norm_channels))
        self.register_buffer("num_batches_tracked", torch.zeros(layout.norm_count, dtype=torch.long))
        self._rows = []  # (conv, conv slot, norm, norm slot), in layout order
        for i, conv_path, conv_slot, norm_path, norm_slot in layout.modules():
            conv, norm = self[i].get_submodule(conv_path), self[i].get_submodule(norm_path)
            del conv.weight
            for name in _NORM_TENSORS:
                delattr(norm, name)
            self._rows.append((conv, conv_slot, norm, norm_slot))
        self._norms = tuple(row[2] for row in self._rows)
        # state_dict entries (key, module, attribute, flat tensor, slot) in module registration order.
        slots = {id(m): slot for row in self._rows for m, slot in (row[:2], row[2:])}
        self._state_entries = [
            (f"{path}.{name}", module, name, _FLAT_OF[isinstance(module, nn.BatchNorm2d), name], slots[id(module)])
            for path, module in self.named_modules() if path
            for name in (("weight",) if isinstance(module, nn.Conv2d) else
                         _NORM_TENSORS if isinstance(module, nn.BatchNorm2d) else ())]
        self._loaded_keys: set[str] = set()
        self.register_load_state_dict_post_hook(_forget_loaded_keys)
        for norm in self._norms:
            norm.register_load_state_dict_pre_hook(_require_batch_count)
        self.bind_views()

    # Views ---------------------------------------------------------------
    def bind_views(self) -> None:
        """Point every module's tensors at the current flat tensors.

        A norm whose running statistics were set to None (``nn.BatchNorm2d``'s
        way to use batch statistics in eval) keeps None."""
        bound_running = self.__dict__.get("_bound_running", frozenset())
        with torch.enable_grad():  # the parameter views carry gradients to the flat ones
            for conv, conv_slot, norm, norm_slot in self._rows:
                conv.__dict__["weight"] = conv_slot.of(self.conv_weight)
                norm.__dict__["weight"] = norm_slot.of(self.bn_weight)
                norm.__dict__["bias"] = norm_slot.of(self.bn_bias)
        with torch.no_grad():
            for _, _, norm, norm_slot in self._rows:
                for name in _RUNNING:
                    flat = self._buffers[name]
                    removed = name in bound_running and norm.__dict__.get(name, flat) is None
                    norm.__dict__[name] = None if flat is None or removed else norm_slot.of(flat)
                counts = self._buffers["num_batches_tracked"]
                norm.__dict__["num_batches_tracked"] = (None if counts is None else
                                                        _slot_view(counts, "num_batches_tracked", norm_slot))
        self._bound_running = frozenset(name for name in _RUNNING if self._buffers[name] is not None)

    @contextlib.contextmanager
    def split_views(self):
        """Within the block, the modules' tensors are the outputs of one
        ``split_with_sizes`` per flat tensor: autograd then sums their
        gradients in one node instead of one full-size gradient per module.
        Where a norm's view would not be aligned, every norm gets a piece of a
        padded copy (one ``torch.cat``; running statistics written back
        after the block). Outside it they are ``narrow`` views, which stay
        valid when an optimizer updates the flat tensors in place
        (``split_with_sizes`` outputs do not). A norm whose running statistics
        were set to None keeps None."""
        rows = self._rows
        convs = self.conv_weight.split_with_sizes([r[1].numel for r in rows])
        sizes = [r[3].numel for r in rows]
        flats = {"weight": self.bn_weight, "bias": self.bn_bias,
                 "running_mean": self._buffers["running_mean"], "running_var": self._buffers["running_var"]}
        pieces = {name: _aligned_split(flat, sizes) for name, flat in flats.items() if flat is not None}
        for conv, _, norm, _ in rows:
            _check_unregistered(conv, "weight")
            for name in pieces:
                _check_unregistered(norm, name)
        saved = [(conv.__dict__["weight"], {name: norm.__dict__[name] for name in pieces})
                 for conv, _, norm, _ in rows]
        for k, (conv, conv_slot, norm, _) in enumerate(rows):
            conv.__dict__["weight"] = convs[k].view(conv_slot.shape)
            for name, (split, _) in pieces.items():
                if name not in _RUNNING or norm.__dict__[name] is not None:
                    norm.__dict__[name] = split[k]
            norm.__dict__[_ALIGNED_VIEWS] = True
        try:
            yield
        finally:
            for (conv, _, norm, _), (weight, norm_views) in zip(rows, saved):
                conv.__dict__["weight"] = weight
                norm.__dict__.update(norm_views)
                norm.__dict__.pop(_ALIGNED_VIEWS, None)
            if any(norm.training for norm in self._norms):
                with torch.no_grad():
                    for name in _RUNNING:
                        if name in pieces and pieces[name][1]:
                            flats[name].copy_(torch.cat(pieces[name][0]))

    @contextlib.contextmanager
    def _unbound(self):
        """Within the block the modules hold no views (a norm's None stays),
        and afterwards views of the flat tensors then current: ``copy.deepcopy``
        refuses views, and ``torch.utils.swap_tensors`` a tensor that views
        still reference."""
        for conv, _, norm, _ in self._rows:
            for module in (conv, norm):
                for name in _NORM_TENSORS:
                    if module.__dict__.get(name) is not None:
                        del module.__dict__[name]
        try:
            yield
        finally:
            self.bind_views()

    def _apply(self, fn, recurse=True):
        with self._unbound():
            return super()._apply(fn, recurse)

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in _FLAT_TENSORS and "_rows" in self.__dict__:  # a flat tensor replaced: rebind
            self.bind_views()

    def __getitem__(self, index):
        if isinstance(index, slice):  # a plain list of units: a slice has no flat storage
            return nn.ModuleList(list(self._modules.values())[index])
        return super().__getitem__(index)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_norms", tuple(row[2] for row in self._rows))  # a layer pickled without it
        self.bind_views()

    def __deepcopy__(self, memo):
        with self._unbound():
            other = type(self).__new__(type(self))
            memo[id(self)] = other
            other.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return other

    # BatchNorm options ---------------------------------------------------
    @property
    def norms(self) -> tuple[nn.BatchNorm2d, ...]:
        return self._norms

    @property
    def eps(self) -> float:
        """The ``eps`` of every BatchNorm (the native and triton ops take one value)."""
        values = {norm.eps for norm in self._norms}
        if len(values) != 1:
            raise ValueError(f"the BatchNorms of a layer must share one eps, got {sorted(values)}; "
                             "set it with layer.eps = value")
        return values.pop()

    @eps.setter
    def eps(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"eps must be a real number, got {value!r}")
        for row in self._rows:
            row[2].eps = float(value)

    # state_dict: per-module keys ------------------------------------------
    def _state_tensor(self, module: nn.Module, name: str, flat: str, slot) -> torch.Tensor | None:
        """A state_dict entry's tensor: its slot of the flat tensor, which the
        ops compute with (None where there is none: no flat tensor, or a norm
        whose running statistics were set to None)."""
        _check_unregistered(module, name)
        tensor = self._parameters[flat] if flat in self._parameters else self._buffers[flat]
        if tensor is None or (name in _RUNNING and module.__dict__.get(name) is None):
            return None
        return _slot_view(tensor, name, slot)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for key, *entry in self._state_entries:
            value = self._state_tensor(*entry)
            if value is not None:
                destination[prefix + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        assign = local_metadata.get("assign_to_params_buffers", False)
        loaded = []  # (state entry, its tensor now, the loaded tensor)
        for key, *entry in self._state_entries:
            current, name = self._state_tensor(*entry), entry[1]
            if current is None:
                continue
            full = prefix + key
            self._loaded_keys.add(full)
            if full not in state_dict:
                if name != "num_batches_tracked":  # the norm decides (_require_batch_count)
                    missing_keys.append(full)
                continue
            value = state_dict[full]
            if not isinstance(value, torch.Tensor):
                error_msgs.append(f'While copying the parameter named "{full}", expected torch.Tensor '
                                  f"or Tensor-like object from checkpoint but received {type(value)}")
            elif value.shape != current.shape:
                error_msgs.append(f"size mismatch for {full}: copying a param with shape {value.shape} "
                                  f"from checkpoint, the shape in current model is {current.shape}.")
            else:
                loaded.append((entry, current, value))
        if strict:
            for key in state_dict:
                if key.startswith(prefix) and key[len(prefix):].split(".", 1)[0] not in self._modules:
                    unexpected_keys.append(key)
        if assign:
            self._assign(loaded)
        else:
            with torch.no_grad():
                for _, current, value in loaded:
                    current.copy_(value)

    def _assign(self, loaded) -> None:
        """``load_state_dict(assign=True)``: new flat tensors in the loaded tensors' dtype and device."""
        by_flat = {}
        for (_, name, flat, slot), _, value in loaded:
            by_flat.setdefault(flat, []).append((name, slot, value))
        for flat_name, items in by_flat.items():
            old = getattr(self, flat_name)
            new = torch.empty(old.shape, dtype=items[0][2].dtype, device=items[0][2].device)
            if old.device.type != "meta" and new.device.type != "meta":
                new.copy_(old.detach())
            with torch.no_grad():
                for name, slot, value in items:
                    target = _slot_view(new, name, slot)
                    target.copy_(value.reshape(target.shape))
            if flat_name in _FLAT_PARAMETERS:
                setattr(self, flat_name, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                self._buffers[flat_name] = new
        self.bind_views()


def _aligned_split(flat: torch.Tensor, sizes: list[int]) -> tuple[tuple[torch.Tensor, ...], bool]:
    """``flat.split_with_sizes(sizes)`` with every piece :func:`aligned`, and
    whether that took a copy: the pieces themselves on a device that needs no
    alignment or where every size is a multiple of it (``flat``, a whole
    allocation, starts aligned), else the pieces of a copy with zero gaps
    after them."""
    step = alignment_step(flat)
    gaps = [-size % step for size in sizes]
    pieces = flat.split_with_sizes(sizes)
    if not needs_alignment(flat.device) or not any(gaps):
        return pieces, False
    zeros = flat.detach().new_zeros(step)
    padded = torch.cat([t for piece, gap in zip(pieces, gaps) for t in (piece, zeros[:gap])])
    return padded.split_with_sizes([n for size, gap in zip(sizes, gaps) for n in (size, gap)])[::2], True


def _slot_view(flat: torch.Tensor, name: str, slot) -> torch.Tensor:
    """A module tensor's view of its flat tensor: a norm's count is one element
    of ``num_batches_tracked`` (its row), every other tensor its slot."""
    return flat[slot.row] if name == "num_batches_tracked" else slot.of(flat)


def _check_unregistered(module: nn.Module, name: str) -> None:
    """A unit module's tensor is a view of the layer's flat storage; one
    registered on the module itself (``conv.weight = nn.Parameter(t)``)
    would be saved and computed with by some paths and not others."""
    if name in module._parameters or name in module._buffers:
        raise ValueError(f"a {type(module).__name__} of a gunn_ext layer was given its own {name!r}; its "
                         f"tensors are views of the layer's flat tensors (units.conv_weight, units.bn_weight, "
                         f"...): set those instead")


def _require_batch_count(norm, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                         error_msgs) -> None:
    """nn.BatchNorm2d's rule for a state dict without its ``num_batches_tracked``:
    missing if the norm was saved at version 2 or later; from an older or
    version-less state dict (made by hand) the count keeps its value."""
    key = prefix + "num_batches_tracked"
    version = local_metadata.get("version")
    if norm.num_batches_tracked is not None and key not in state_dict and version is not None and version >= 2:
        missing_keys.append(key)


def _forget_loaded_keys(units: UpdateUnits, incompatible_keys) -> None:
    """The units' modules hold no registered tensors, so they report the keys
    that :class:`UpdateUnits` loaded as unexpected: drop those."""
    loaded, units._loaded_keys = units._loaded_keys, set()
    incompatible_keys.unexpected_keys[:] = [k for k in incompatible_keys.unexpected_keys if k not in loaded]


def _partition(channels: int, segments: int | Sequence[int]) -> tuple[int, ...]:
    channels = positive_int("channels", channels)
    if isinstance(segments, bool):
        raise TypeError(f"segments must be an int or a sequence of ints, got {segments!r}")
    count = _as_int(segments)
    if count is not None:
        if count < 1 or channels % count:
            raise ValueError(
                f"segments={count} must be a positive divisor of channels={channels}; "
                "pass a sequence of segment sizes for an uneven partition")
        return (channels // count,) * count
    if not (isinstance(segments, Sequence) or getattr(segments, "ndim", None) == 1) or not len(segments):
        raise TypeError(f"segments must be an int or a non-empty sequence of ints, got {segments!r}")
    sizes = tuple(_as_int(s) for s in segments)
    if any(s is None or s < 1 for s in sizes):
        raise ValueError(f"segments must hold ints >= 1, got {list(segments)}")
    if sum(sizes) != channels:
        raise ValueError(f"segment sizes {list(sizes)} sum to {sum(sizes)}, expected channels={channels}")
    return sizes


def _as_int(value) -> int | None:
    """``value`` as a Python int where it is an integer (a NumPy one too), not a bool; else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def positive_int(name: str, value) -> int:
    """``value`` as a Python int if it is an integer >= 1 (not a bool), else a
    ValueError naming ``name``."""
    number = _as_int(value)
    if number is None or number < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return number


def init_paper(module: nn.Module) -> None:
    """He initialisation as in the paper: conv ~ N(0, sqrt(2 / (k*k*out))), BN (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


class _SegmentedLayer(nn.Module):
    sequential: bool

    def __init__(self, channels: int, segments: int | Sequence[int], expansion: int = 2,
                 bottlenecks: int = 1, shortcut: bool = False, backend: str = "auto", **removed):
        if "units" in removed:
            raise TypeError("units= is now bottlenecks= (stacked bottlenecks per update unit); "
                            "layer.units is the list of the P update units")
        if removed:
            raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument "
                            f"{next(iter(removed))!r}")
        super().__init__()
        self.segments = _partition(channels, segments)
        self.channels = sum(self.segments)
        self.expansion = positive_int("expansion", expansion)
        self.bottlenecks = positive_int("bottlenecks", bottlenecks)
        if not isinstance(shortcut, bool):
            raise TypeError(f"shortcut must be a bool, got {shortcut!r}")
        self.shortcut = shortcut
        self.backend = backends.check_name(backend)
        self.units = UpdateUnits(ParameterLayout(self.channels, self.segments, self.expansion,
                                                 self.bottlenecks, shortcut))
        init_paper(self)

    @property
    def layout(self) -> ParameterLayout:
        return self.units.layout

    # The flat tensors, held by (and shared with the layers sharing) ``units``.
    conv_weight = property(lambda self: self.units.conv_weight)
    bn_weight = property(lambda self: self.units.bn_weight)
    bn_bias = property(lambda self: self.units.bn_bias)
    running_mean = property(lambda self: self.units.running_mean)
    running_var = property(lambda self: self.units.running_var)
    num_batches_tracked = property(lambda self: self.units.num_batches_tracked)

    @property
    def eps(self) -> float:
        """The ``eps`` shared by the layer's BatchNorms; setting it sets each norm's."""
        return self.units.eps

    @eps.setter
    def eps(self, value: float) -> None:
        self.units.eps = value

    @property
    def bounds(self) -> list[tuple[int, int]]:
        """``(start, stop)`` channel range of every segment."""
        return [(start, start + n) for start, n in zip(self.layout.starts, self.segments)]

    def convs(self) -> list[nn.Conv2d]:
        return [c for u in self.units for c in u.convs()]

    def norms(self) -> list[nn.BatchNorm2d]:
        return list(self.units.norms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backends.check_input(self, x)
        return backends.get(self.backend, x.device)(self, x)

    def extra_repr(self) -> str:
        segments = len(self.segments) if len(set(self.segments)) == 1 else list(self.segments)
        return (f"channels={self.channels}, segments={segments}, expansion={self.expansion}, "
                f"bottlenecks={self.bottlenecks}, shortcut={self.shortcut}, backend={self.backend!r}")

    def _convert(self, cls: type[_SegmentedLayer]) -> _SegmentedLayer:
        other = cls.__new__(cls)
        nn.Module.__init__(other)
        for name in ("channels", "segments", "expansion", "bottlenecks", "shortcut", "backend"):
            setattr(other, name, getattr(self, name))
        other.units = self.units  # shared, not copied
        other.training = self.training  # the shared norms keep their own modes
        return other


class GUNNLayer(_SegmentedLayer):
    """Gradually updated layer: segment ``i`` is updated from the current state."""

    sequential = True

    @classmethod
    def from_sunn(cls, layer: SUNNLayer) -> GUNNLayer:
        """The GUNN layer that shares ``layer``'s units (the paper's conversion)."""
        if not isinstance(layer, SUNNLayer):
            raise TypeError(f"layer must be a SUNNLayer, got {type(layer).__name__}")
        return layer._convert(cls)


class SUNNLayer(_SegmentedLayer):
    """Simultaneously updated baseline: every unit reads the layer's input."""

    sequential = False

    @classmethod
    def from_gunn(cls, layer: GUNNLayer) -> SUNNLayer:
        """The SUNN layer that shares ``layer``'s units."""
        if not isinstance(layer, GUNNLayer):
            raise TypeError(f"layer must be a GUNNLayer, got {type(layer).__name__}")
        return layer._convert(cls)
