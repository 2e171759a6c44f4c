"""``Conv1d``/``Conv2d``/``Conv3d``: torch convolutions with a rank-``r`` LoRA adapter, loralib's
rank-``r·k`` layout (``layout="loralib"``) and loralib's ``.conv`` (a view of the layer itself)."""
from __future__ import annotations

import math
import warnings
from collections.abc import MutableMapping
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..core.functional import lora_conv
from ..core.merging import accumulation_dtype
from ..core.mixed import MixedAdapter, lora_conv_mixed
from ..core.spec import LoRASpec, check_dora_support
from ..core.wrap import _base_attribute_names
from .adapters import ADAPTERS_ATTR
from .base import ADAPTER_NAMES, LoRALayer
from .notices import warn_conv_layout_switch

__all__ = ["Conv1d", "Conv2d", "Conv3d"]


_CONV_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONV_PARAMS = ("weight", "bias")
# A plain conv's own attributes (in_channels, kernel_size, stride, padding, ...), not nn.Module's.
_CONV_ATTRS = _base_attribute_names(nn.Conv2d) - frozenset(nn.Module().__dict__)


class _ConvParameters(MutableMapping):
    """The ``weight`` and ``bias`` entries of a layer's ``_parameters``, as a ``_parameters`` of
    their own: a view's reads, registrations and deletions act on the layer's dict."""

    def __init__(self, params: dict):
        self.params = params

    def _check(self, name):
        if name not in _CONV_PARAMS:
            raise KeyError(f"{name!r}: loralib's .conv holds only {_CONV_PARAMS}")

    def __getitem__(self, name):
        self._check(name)
        return self.params[name]

    def __setitem__(self, name, value):
        self._check(name)
        self.params[name] = value

    def __delitem__(self, name):
        self._check(name)
        del self.params[name]

    def __iter__(self):
        return (name for name in _CONV_PARAMS if name in self.params)

    def __len__(self):
        return sum(name in self.params for name in _CONV_PARAMS)


class _ConvView:
    """What ``layer.conv`` returns: the layer seen as the plain torch conv loralib wraps.

    Its ``weight``, ``bias`` and geometry (``kernel_size``, ``stride``, ``padding``, ...)
    are the layer's, for reading and writing; calling it runs the base conv alone.
    It is built on each access and never registered, so the layer's ``state_dict``
    keys and ``named_modules()`` stay those of a plain conv with an adapter.
    """

    @classmethod
    def of(cls, layer: nn.Module) -> nn.Module:
        view = cls.__new__(cls)
        nn.Module.__init__(view)
        view.__dict__.update(_parameters=_ConvParameters(layer._parameters), _layer=layer, training=layer.training)
        return view

    def __getattr__(self, name):
        if name in _CONV_ATTRS:
            return getattr(self.__dict__["_layer"], name)
        return super().__getattr__(name)

    def __setattr__(self, name, value):
        if name in _CONV_ATTRS or name in _CONV_PARAMS:
            setattr(self.__dict__["_layer"], name, value)
        else:
            super().__setattr__(name, value)

    def extra_repr(self) -> str:
        return nn.modules.conv._ConvNd.extra_repr(self.__dict__["_layer"])  # it formats from __dict__


class _Conv1dView(_ConvView, nn.Conv1d):
    pass


class _Conv2dView(_ConvView, nn.Conv2d):
    pass


class _Conv3dView(_ConvView, nn.Conv3d):
    pass


_CONV_VIEWS = {nn.Conv1d: _Conv1dView, nn.Conv2d: _Conv2dView, nn.Conv3d: _Conv3dView}

#: Conv adapter layouts, both ``ΔW = scaling · (B A).view(weight.shape)``: lora_layers' rank ``r``
#: (A ``(r, in/groups·∏k)``, B ``(out, r)``) and loralib 0.1.2's rank ``r·k``
#: (A ``(r·k, in·k)``, B ``(out/groups·k, r·k)``, no dropout).
CONV_LAYOUTS = ("lora_layers", "loralib")


def _check_layout(layout) -> str:
    if not isinstance(layout, str) or layout not in CONV_LAYOUTS:
        raise ValueError(f"layout must be one of {CONV_LAYOUTS}, got {layout!r}")
    return layout


class _ConvNd(LoRALayer):
    """Shared LoRA logic for :class:`Conv1d`, :class:`Conv2d` and :class:`Conv3d`.

    ``ΔW = B A`` reshaped to the weight's shape ``(out, in/groups, *kernel)``,
    with ``A (r, in/groups · ∏kernel)`` and ``B (out, r)``: rank ``r``
    whatever the kernel (loralib uses ``r · k`` and only square 2-D kernels).
    The signature is loralib's: ``(in_channels, out_channels, kernel_size,
    r=0, lora_alpha=1, lora_dropout=0., merge_weights=True, **kwargs)``; the
    kwargs (stride, padding, dilation, groups, bias, padding_mode, device,
    dtype) go to the torch convolution.

    ``layout="loralib"`` gives loralib 0.1.2's adapter instead: ``A (r·k, in·k)``,
    ``B (out/groups·k, r·k)``, the same ``(B A).view(weight.shape)``, and no
    dropout, so loralib's checkpoints load and give loralib's outputs. It needs
    a square kernel, and kernel 1 for Conv1d/Conv3d (where loralib's own layer
    fails). A fresh layer (``lora_B`` still zero) that loads a loralib-shaped
    adapter switches to this layout by itself, with a one-time warning.
    """

    layout = "lora_layers"  # also the value for layers pickled before layouts existed

    def __init__(self, in_channels: int, out_channels: int, kernel_size, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, merge_weights: bool = True, *, use_rslora: bool = False,
                 lora_dtype=None, backend: str = "auto", init: str = "kaiming", use_dora: bool = False,
                 layout: str = "lora_layers", **kwargs):
        spec = LoRASpec(r, lora_alpha, lora_dropout, merge_weights, use_rslora, lora_dtype, backend, use_dora, init)
        check_dora_support(self, spec.use_dora, spec.r > 0)  # a clear TypeError: DoRA is Linear's
        _check_layout(layout)
        dims = _CONV_DIMS[self._base_type]
        if isinstance(kernel_size, Sequence) and len(kernel_size) != dims:
            raise ValueError(f"kernel_size must be an int or {dims} ints for {self._base_type.__name__}, "
                             f"got {kernel_size!r}")
        self._base_type.__init__(self, in_channels, out_channels, kernel_size, **kwargs)
        self._validate_wrapped(layout)
        self._init_lora(spec)
        self.reset_parameters()

    def _validate_wrapped(self, layout: str = "lora_layers") -> None:
        k = tuple(self.kernel_size)
        if tuple(self.weight.shape[2:]) != k:
            raise ValueError(
                f"kernel_size={k} does not match the weight's spatial shape {tuple(self.weight.shape[2:])}"
            )
        if getattr(self, "transposed", False):
            raise TypeError("transposed convolutions are not supported")
        if _check_layout(layout) == "loralib" and (problem := self._loralib_layout_problem()):
            raise ValueError(f"layout='loralib' {problem}")
        self.layout = layout

    def _init_lora(self, *args, **kwargs) -> None:
        super()._init_lora(*args, **kwargs)
        if self.layout == "loralib" and self.lora_dropout.p > 0:
            warnings.warn(f"{type(self).__name__}(layout='loralib'): lora_dropout={self.lora_dropout.p} is not "
                          f"applied, as in loralib 0.1.2, whose conv layers never apply it (the default "
                          f"layout='lora_layers' does)", UserWarning, stacklevel=3)

    def _loralib_layout_problem(self) -> Optional[str]:
        """Why loralib's ``(r·k, in·k)``/``(out/groups·k, r·k)`` adapter cannot be this layer's, or None."""
        k, name = tuple(self.kernel_size), type(self).__name__
        if len(set(k)) != 1:
            return f"needs a square kernel (loralib takes an int kernel_size), got kernel_size={k}"
        if k[0] != 1 and len(k) != 2:
            return (f"fits {name} only with kernel_size 1, got kernel_size={k}: loralib's B A has "
                    f"in·out·k²/groups elements, the weight in·out·k^{len(k)}/groups (loralib's own {name} "
                    f"fails in forward)")
        return None

    def _adapter_shapes(self, layout: Optional[str] = None, r: Optional[int] = None):
        r = self.r if r is None else r
        if (layout or self.layout) == "loralib":
            k = self.kernel_size[0]
            return (r * k, self.in_channels * k), (self.out_channels // self.groups * k, r * k)
        fan_in = self.weight.shape[1] * math.prod(self.kernel_size)
        return (r, fan_in), (self.out_channels, r)

    def _switches_layout_for(self, shapes) -> bool:
        """True when loading an adapter of ``shapes`` (lora_A's, lora_B's) switches this layer to
        loralib's layout: they are loralib's shapes, and this layer's adapter is fresh (``lora_B``
        zero, so nothing trained is thrown away)."""
        B = getattr(self, "lora_B", None)
        # Named adapters have this layout's shapes: a switch would leave them behind.
        return (self.layout == "lora_layers" and self.has_adapter and isinstance(B, nn.Parameter)
                and ADAPTERS_ATTR not in self._modules
                and self._loralib_layout_problem() is None and shapes == self._adapter_shapes("loralib")
                and shapes != self._adapter_shapes() and (B.is_meta or not B.detach().any()))

    @torch.no_grad()
    def _use_loralib_layout(self) -> None:
        """Switch to loralib's layout. The adapter Parameters stay the same objects (an optimizer
        built before still holds them), zero until the loaded values are copied in."""
        shapes = self._adapter_shapes("loralib")
        for name, shape in zip(ADAPTER_NAMES, shapes):
            param = getattr(self, name)
            param.data, param.grad = param.new_zeros(shape), None
        self.layout = "loralib"
        warn_conv_layout_switch(type(self).__name__, shapes, self.lora_dropout.p)

    def _layout_hint(self, shapes) -> Optional[str]:
        """For a shape error: how a layout explains adapter ``shapes`` that do not fit, or None."""
        name, current = type(self).__name__, self._adapter_shapes()
        got = f"lora_A {shapes[0]} and lora_B {shapes[1]}"
        if self.layout == "lora_layers" and shapes == self._adapter_shapes("loralib") != current:
            problem = self._loralib_layout_problem()
            if problem:
                return (f"{got} are loralib's conv adapter shapes, which do not fit this {name}: loralib's "
                        f"layout {problem}; only the base weights of that checkpoint can be loaded")
            return (f"{got} are loralib's conv layout (rank r·k); this {name} has lora_A {current[0]} and "
                    f"lora_B {current[1]} and was not switched to it because its adapter is trained "
                    f"(lora_B is non-zero): build it with {name}(..., layout='loralib')")
        if self.layout == "loralib" and shapes == self._adapter_shapes("lora_layers") != current:
            return (f"{got} are lora_layers' conv layout (rank r); this {name} has layout='loralib': build it "
                    f"with layout='lora_layers' (the default)")
        return None

    def _delta_blocks(self, A, B, *, scaling=None):
        acc = accumulation_dtype(self.weight.dtype)
        scaling = self.scaling if scaling is None else scaling
        yield (slice(None),), (B.to(acc) @ A.to(acc)).mul_(scaling).view(self.weight.shape)

    def _base_forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight, self.bias)

    def _mixed_problem(self):
        if self.layout == "loralib":
            return ("it has layout='loralib' (rank r·k factors that are no (r, C_in·∏kernel) pair); mixed batches "
                    "need the default layout='lora_layers'")
        return super()._mixed_problem()

    def _mixed_index(self, x: Tensor, rows: Tensor) -> Tensor:
        dims = len(self.kernel_size) + 2
        if x.dim() != dims or x.shape[0] != rows.shape[0]:
            raise ValueError(f"a batched input (N, C, *spatial) with N = {rows.shape[0]} rows was expected, got "
                             f"shape {tuple(x.shape)}")
        return rows

    def _mixed_call(self, x: Tensor, views, index: Tensor) -> Tensor:
        adapters = [MixedAdapter(v.lora_A, v.lora_B, v.scaling, v.dropout_p) for v in views]
        return lora_conv_mixed(x, self.weight, self.bias, adapters, index, self._conv_forward,
                               training=self.training)

    def forward(self, x: Tensor) -> Tensor:
        if self._mixed_rows is not None:
            return self._mixed_forward(x)
        if not self._uses_adapter() or self.merged:
            return self._base_forward(x)
        v = self._forward_view()
        # loralib's conv never applies its dropout: its layout does the same, to give its outputs.
        p = 0.0 if self.layout == "loralib" else v.dropout_p
        return lora_conv(x, self.weight, self.bias, v.lora_A, v.lora_B, v.scaling, self._conv_forward,
                         p, self.training)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", layout='loralib'" if self.layout == "loralib" else "")

    @property
    def conv(self) -> nn.Module:
        """loralib's ``.conv``: this layer as a plain ``nn.Conv{1,2,3}d`` without the adapter.

        ``layer.conv.weight`` *is* ``layer.weight`` (so ``layer.conv.weight.data.copy_(w)``
        and ``layer.conv.weight = nn.Parameter(w)`` change the layer), likewise ``bias``,
        ``kernel_size``, ``stride``, ``padding`` and the other conv attributes;
        ``layer.conv(x)`` is the base convolution alone (with the merged weight while merged,
        as loralib's). It is not a submodule: the state_dict keys stay ``weight``/``bias``.
        """
        return _CONV_VIEWS[self._base_type].of(self)

    def __setattr__(self, name, value):
        if name == "conv":
            raise TypeError(
                f"{type(self).__name__}.conv cannot be replaced: this layer is its own conv (loralib wraps one). "
                f"Copy the tensors instead (layer.conv.load_state_dict(conv.state_dict())), or wrap the conv "
                f"itself with {type(self).__name__}.from_module(conv, r=...)")
        super().__setattr__(name, value)

    @staticmethod
    def _rename_loralib_keys(state_dict, prefix: str) -> None:
        """loralib 0.1.2 stores the wrapped conv under ``conv.``: rename its base keys
        (``<prefix>conv.weight``, ``<prefix>conv.bias``) to this layer's, in place."""
        for name in ("weight", "bias"):
            old = prefix + "conv." + name
            if old in state_dict and prefix + name not in state_dict:
                state_dict[prefix + name] = state_dict.pop(old)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self._rename_loralib_keys(state_dict, prefix)
        shapes = tuple(tuple(state_dict[prefix + n].shape) if isinstance(state_dict.get(prefix + n), Tensor)
                       else None for n in ADAPTER_NAMES)
        if self._switches_layout_for(shapes):
            self._use_loralib_layout()
        errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        hint = self._layout_hint(shapes) if len(error_msgs) > errors and None not in shapes else None
        if hint:
            error_msgs.append(f"{prefix.rstrip('.') or type(self).__name__}: {hint}")


class Conv1d(_ConvNd, nn.Conv1d):
    """``nn.Conv1d`` with a rank-``r`` LoRA adapter (loralib's ``Conv1d`` crashes for kernel > 1).

    Attributes:
        lora_A: ``(r, in_channels/groups · kernel_size)``, kaiming-uniform init.
        lora_B: ``(out_channels, r)``, zero init.
            (``layout="loralib"``, kernel 1 only: ``(r, in_channels)`` and ``(out_channels/groups, r)``.)
        conv, layout: as :class:`Conv2d`.
    """

    _base_type = nn.Conv1d


class Conv2d(_ConvNd, nn.Conv2d):
    """``nn.Conv2d`` with a rank-``r`` LoRA adapter; tuple kernels and groups supported.

    Attributes:
        lora_A: ``(r, in_channels/groups · kh · kw)``, kaiming-uniform init.
        lora_B: ``(out_channels, r)``, zero init.
            (``layout="loralib"``, square kernel ``k``: ``(r·k, in_channels·k)`` and
            ``(out_channels/groups·k, r·k)``, as loralib.)
        conv: loralib's wrapped conv, a view of this layer (same ``weight``/``bias``, base conv only).

    Args:
        layout: ``"lora_layers"`` (the default, rank ``r``) or ``"loralib"``: loralib 0.1.2's
            rank-``r·k`` adapter and forward (no dropout), so its checkpoints load and give its
            outputs. A fresh layer (``lora_B`` zero) that loads a loralib-shaped adapter switches
            to ``"loralib"`` by itself and warns once per process.
    """

    _base_type = nn.Conv2d


class Conv3d(_ConvNd, nn.Conv3d):
    """``nn.Conv3d`` with a rank-``r`` LoRA adapter (loralib's ``Conv3d`` crashes for kernel > 1).

    Attributes:
        lora_A: ``(r, in_channels/groups · kd · kh · kw)``, kaiming-uniform init.
        lora_B: ``(out_channels, r)``, zero init.
            (``layout="loralib"``, kernel 1 only: ``(r, in_channels)`` and ``(out_channels/groups, r)``.)
        conv, layout: as :class:`Conv2d`.
    """

    _base_type = nn.Conv3d
