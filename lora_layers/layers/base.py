"""The LoRALayer mixin: the LoRA state every layer type shares.

Concrete layers (:mod:`lora_layers.layers`) say which adapter shapes they
have, how to initialise them, what their ``ΔW`` blocks are and how their
forward calls the functional core. This mixin holds the configuration,
construction, ``from_module`` (state adopted through :mod:`lora_layers.core.wrap`)
and which parameters are the adapter. ``train``/``eval``, ``merge``/``unmerge``
and the state_dict hooks come from :class:`~lora_layers.layers.merge_state.ExactMerge`.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .ties import SHARED_ATTR, check_adopted, register_weight
from ..core.wrap import adopt, plain_module, refuse_unwrappable
from .merge_state import ExactMerge
from . import adapters as _adapters
from . import mixed as _mixed
from ..core.spec import NOT_GIVEN, LoRASpec, check_dora_support, given_settings, lora_scaling, resolve_spec
from ..variants.pissa import INITIAL_NAMES, is_residual_init

__all__ = ["LoRALayer", "ADAPTER_NAMES", "ADAPTER_PREFIX", "MAGNITUDE_NAME", "HOTSWAP_SCALE"]

ADAPTER_NAMES = ("lora_A", "lora_B")
# The settings beyond loralib's four (r, lora_alpha, lora_dropout, merge_weights).
_EXTRAS = ("use_rslora", "lora_dtype", "backend", "use_dora", "init", "dora_mode")
MAGNITUDE_NAME = "lora_magnitude"  # DoRA's per-row magnitude (named lora_* so it is an adapter parameter)
ADAPTER_PREFIX = "lora_"  # a layer's own Parameters with this prefix are its adapter
# A non-persistent buffer that lora_layers.prepare_for_hotswap adds: the float64 bits of ``scaling`` as a
# 0-d int64 tensor. Compiled code reads the scale from it as data (dynamo guards a float attribute as a
# constant, so a new ``scaling`` would recompile); an integer buffer is moved by ``.to(device)`` but never
# rounded by ``.half()``/``.to(torch.bfloat16)``, which cast floating buffers.
HOTSWAP_SCALE = "hotswap_scaling"


class LoRALayer(ExactMerge):
    """Mixin with the LoRA state shared by every layer type (merging: :class:`~lora_layers.layers.merge_state.ExactMerge`).

    Attributes (loralib names): ``r``, ``lora_alpha``, ``scaling``,
    ``lora_dropout`` (an ``nn.Dropout``), ``merged``, ``merge_weights``.
    Extra: ``use_rslora``, ``lora_dtype``, ``backend``, ``use_dora``, ``init``, ``dora_mode``; all ten as one
    :class:`~lora_layers.LoRASpec`: ``spec``.

    Named adapters (:meth:`add_adapter`, :meth:`set_adapter`; :mod:`lora_layers.layers.adapters`) sit
    next to this default adapter; forward and merging use the active one, read through :meth:`adapter`.

    Subclasses implement ``_adapter_shapes``, ``_delta_blocks`` and ``forward``
    (and ``reset_lora_parameters`` when the default init does not fit).

    As in loralib, a class of your own may subclass it next to a torch layer and
    call ``LoRALayer.__init__(self, r=..., lora_alpha=..., lora_dropout=...,
    merge_weights=...)`` after the torch layer's ``__init__``, then define its own
    adapters, ``forward``, ``train`` and merging.
    """

    _base_type: type = nn.Module  # the torch layer this class wraps
    _supports_dora = False
    _adapter_dropout = True  # False: the class has no adapter dropout (from_module takes no lora_dropout)

    # -- construction --------------------------------------------------------
    def __init__(self, r: int, lora_alpha: float, lora_dropout: float, merge_weights: bool):
        """loralib's ``LoRALayer.__init__``: set the configuration attributes, nothing else."""
        self._set_config(LoRASpec(r, lora_alpha, lora_dropout, merge_weights))

    def _set_config(self, spec: LoRASpec) -> None:
        self.r, self.lora_alpha = spec.r, spec.lora_alpha
        dropout = nn.Dropout(p=spec.lora_dropout)
        if "_modules" in self.__dict__:
            self.lora_dropout = dropout
        elif dropout.p == 0.0:
            # Called before nn.Module.__init__ (loralib tolerates this at p=0):
            # a plain attribute, which Module.__init__ leaves alone.
            object.__setattr__(self, "lora_dropout", dropout)
        else:
            raise TypeError(f"{type(self).__name__}: call the torch layer's __init__ (e.g. nn.Linear.__init__) "
                            f"before LoRALayer.__init__ when lora_dropout={spec.lora_dropout!r} > 0")
        self.merged, self.merge_weights = False, spec.merge_weights
        self.use_rslora, self.lora_dtype, self.backend = spec.use_rslora, spec.lora_dtype, spec.backend
        # use_dora (and its dora_mode) once the layer is known to support it
        self.use_dora, self.dora_mode, self.init = False, "lean", spec.init
        self._merge_state = None
        self.scaling = self._compute_scaling()
        self.__dict__[SHARED_ATTR] = None

    def _init_lora(self, *args, **kwargs) -> None:
        """Configure the layer and create its adapters (not initialised: ``reset_lora_parameters``).

        Takes a :class:`LoRASpec`, or its fields as arguments (``r, lora_alpha, lora_dropout,
        merge_weights, use_rslora=False, lora_dtype=None, backend="auto", use_dora=False,
        init="kaiming", dora_mode="lean"``), from which it builds one.
        """
        given = len(args) == 1 and not kwargs and isinstance(args[0], LoRASpec)
        spec = args[0] if given else LoRASpec(*args, **kwargs)
        self._set_config(spec)
        register_weight(self)
        shapes = self._adapter_shapes() if self.r > 0 else None
        check_dora_support(self, spec.use_dora, shapes is not None)
        self.use_dora, self.dora_mode = spec.use_dora, spec.dora_mode
        if shapes is not None and is_residual_init(spec.init):
            self._check_residual_init()  # before the weight is frozen: a refused layer changes nothing
        if shapes is not None:
            w = self.weight
            if self.use_dora:  # one magnitude per adapted output row
                shapes = shapes + ((shapes[1][0],),)
            for name, shape in zip(ADAPTER_NAMES + (MAGNITUDE_NAME,), shapes):
                self.register_parameter(name, nn.Parameter(
                    torch.empty(shape, device=w.device, dtype=self.lora_dtype or self._base_dtype())))
            w.requires_grad_(False)  # loralib freezes the pretrained weight as soon as adapters exist

    @property
    def spec(self) -> LoRASpec:
        """This layer's settings as a :class:`LoRASpec` (read from its attributes now), e.g. to
        build a layer like it: ``Linear.from_module(module, spec=layer.spec)``."""
        # A loralib-style subclass may hold any callable as lora_dropout, and lack the extras.
        return LoRASpec(self.r, self.lora_alpha, getattr(self.lora_dropout, "p", 0.0), self.merge_weights,
                        **{name: getattr(self, name) for name in _EXTRAS if hasattr(self, name)})

    def _base_dtype(self) -> torch.dtype:
        """The dtype the base computes in (a quantized base's is not its storage dtype)."""
        return self.weight.dtype

    def _compute_scaling(self) -> float:
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)

    def _live_scaling(self, holder: Optional[nn.Module] = None):
        """The scale the forward uses: ``scaling``, or, under ``torch.compile`` on a layer that
        :func:`lora_layers.prepare_for_hotswap` prepared, a 0-d tensor holding the same value, which a
        hot swap rewrites in place without a recompile. Eager code always reads ``scaling``.
        ``holder``: a named adapter (an :class:`~lora_layers.layers.adapters.Adapter`), which holds its own."""
        holder = self if holder is None else holder
        bits = holder._buffers.get(HOTSWAP_SCALE) if torch.compiler.is_compiling() else None
        return holder.scaling if bits is None else bits.view(torch.float64)

    @classmethod
    def from_module(cls, module: nn.Module, r: int = NOT_GIVEN, lora_alpha: float = NOT_GIVEN,
                    lora_dropout: float = NOT_GIVEN, merge_weights: bool = NOT_GIVEN, *,
                    spec: Optional[LoRASpec] = None, **kwargs):
        """Wrap an existing torch layer without copying it: the new layer shares ``module``'s
        Parameters (nothing re-initialised) and adds fresh adapters. ``unload`` and
        ``merge_and_unload`` give back exactly the wrapped kind of module.

        Args:
            module: the torch layer to wrap (``cls._base_type``).
            r, lora_alpha, lora_dropout, merge_weights: the first settings, by position or
                keyword (not given: the defaults ``8``, ``1``, ``0.0`` and ``True``).
            spec: the LoRA settings as a :class:`LoRASpec`, or None to take them from the arguments.
            **kwargs: the other settings, as keyword arguments (without ``spec``): ``use_rslora=False``,
                ``lora_dtype=None``, ``backend="auto"``, ``use_dora=False``, ``init="kaiming"``,
                ``dora_mode="lean"``; and the
                class-specific ones (``fan_in_fan_out`` for :class:`Linear`,
                ``enable_lora``/``split_sizes`` for :class:`MergedLinear`, ``layout`` for convs).

        Raises:
            TypeError: ``module`` is not a ``cls._base_type`` (or is already a LoRA layer), its
                weight is computed on the fly (weight_norm, parametrizations), or it has an
                instance-level ``forward`` (accelerate hooks) that the wrapper would bypass;
                ``spec`` is given with a setting as keyword argument.
            ValueError: a LoRA hyper-parameter is out of range.
        """
        refuse_unwrappable(cls, module, isinstance(module, LoRALayer) or not cls._can_wrap(module))
        given_settings(kwargs, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, merge_weights=merge_weights)
        if not cls._adapter_dropout and lora_dropout is not NOT_GIVEN:
            raise TypeError(f"{cls.__name__}.from_module got an unexpected keyword argument 'lora_dropout' "
                            f"({cls.__name__} layers have no adapter dropout)")
        spec = resolve_spec(spec, kwargs, f"{cls.__name__}.from_module", r=8, lora_alpha=1)  # before any change
        if not cls._adapter_dropout:
            spec = dataclasses.replace(spec, lora_dropout=0.0)  # inject_lora's spec, say, holds one for the Linears
        obj = adopt(cls, module)
        obj._validate_wrapped(**kwargs)
        weight = module._parameters.get("weight")
        trainable = weight is not None and weight.requires_grad
        obj._init_lora(spec)
        check_adopted(obj, module)  # a weight tied before wrapping, or a module wrapped twice, never merges
        try:
            obj.reset_lora_parameters()
        except BaseException:  # a refused init (PiSSA on a tied weight) leaves the module as it was
            if weight is not None:
                weight.requires_grad_(trainable)
            raise
        return obj

    def __setstate__(self, state):
        # copy.deepcopy, pickle and torch.load restore without registering Parameters:
        # record the weight again so a tie made to the copy later is seen.
        super().__setstate__(state)
        if SHARED_ATTR in self.__dict__:
            register_weight(self)

    @classmethod
    def _can_wrap(cls, module: nn.Module) -> bool:
        return isinstance(module, cls._base_type)

    def _validate_wrapped(self, **layer_kwargs) -> None:
        if layer_kwargs:
            raise TypeError(f"{type(self).__name__}.from_module got unexpected arguments {sorted(layer_kwargs)}")

    def wrapped_module(self) -> nn.Module:
        """A plain module of the wrapped kind sharing this layer's Parameters, without LoRA state.

        For a layer made by :meth:`from_module`, the original class with its own
        attributes; for one built directly, ``_base_type``. Merging is the
        caller's business: the weight is taken as it is now.
        """
        plain = plain_module(self, [*self.adapter_parameters(), *INITIAL_NAMES, HOTSWAP_SCALE])
        plain._modules.pop(_adapters.ADAPTERS_ATTR, None)  # the named adapters, PiSSA's A₀, B₀ and the
        return plain  # hot-swap scale are the layer's, not the wrapped module's

    # -- what subclasses provide ---------------------------------------------
    def _adapter_shapes(self) -> Optional[Tuple[Tuple[int, ...], Tuple[int, ...]]]:
        raise NotImplementedError

    def reset_lora_parameters(self) -> None:
        """Default init (loralib's for Linear/Conv): A kaiming-uniform(a=√5), or N(0, 1/r²) with
        ``init="gaussian"`` (PEFT's); B zero. DoRA's magnitude starts at ``‖W‖`` per row.
        PiSSA/OLoRA (``Linear`` only) take A and B from the weight as it is now, which becomes the residual."""
        if self.has_adapter and is_residual_init(self.init):
            self._reset_residual()
        elif self.has_adapter:
            self._init_factors(self.lora_A, self.lora_B, self.r, self.init)
            self._reset_magnitude()

    def _init_factors(self, A: Tensor, B: Tensor, r: int, init: str) -> None:
        """Initialise one adapter's factors in place (the default adapter's and each named one's)."""
        _adapters.init_factors(A, B, r, init)

    def _reset_magnitude(self) -> None:
        pass

    def _check_residual_init(self) -> None:
        raise TypeError(f"init={self.init!r} is not supported by {type(self).__name__} (PiSSA and OLoRA are "
                        f"implemented for Linear and MergedLinear)")

    def _reset_residual(self) -> None:
        self._check_residual_init()

    def _undo_residual(self) -> None:
        """Give the base weight its pre-PiSSA/OLoRA value back (``unload``); nothing for other inits."""

    def _delta_blocks(self, A: Tensor, B: Tensor) -> Iterator[Tuple[tuple, Tensor]]:
        """Yield ``(index, ΔW_block)`` with ``weight[index] += ΔW_block`` (accumulation dtype, scaled)."""
        raise NotImplementedError(f"{type(self).__name__} defines no _delta_blocks: lora_layers cannot merge it")

    def _knows_its_delta(self) -> bool:
        return type(self)._delta_blocks is not LoRALayer._delta_blocks

    def _merge_blocker(self) -> Optional[str]:
        # A class of the user's own (loralib style) defines no _delta_blocks: as with loralib's
        # LoRALayer, eval() and train() (reached through super().train) leave its weight alone,
        # and an explicit merge says why it cannot.
        if not self.merged and not self._knows_its_delta():
            return ("its class subclasses LoRALayer without defining _delta_blocks, so lora_layers does not "
                    "know its delta (merge it with the class's own code)")
        if self._mixed_rows is not None and self._mixed_rows.batch.live:
            return "a mixed-adapter batch is set (its rows use different adapters, so no one adapter can be merged)"
        return super()._merge_blocker()

    # -- common API ----------------------------------------------------------
    @property
    def has_adapter(self) -> bool:
        """True when this layer has an adapter now: ``r > 0`` and ``lora_A`` holds a tensor.

        Read at call time, as loralib does, so adapters replaced by plain
        tensors (``torch.func.functional_call``, subspace training) are used.
        """
        return self.r > 0 and isinstance(getattr(self, "lora_A", None), Tensor)

    # -- named adapters (lora_layers.layers.adapters) --------------------------
    _active_adapter: Optional[str] = _adapters.DEFAULT_ADAPTER  # an instance value only once set_adapter changes it
    _mixed_rows = None  # a mixed batch's MixedRows record (lora_layers.layers.mixed), or None; forward checks it first

    @property
    def adapter_names(self) -> Tuple[str, ...]:
        """The names of this layer's adapters: ``"default"`` first, then the named ones in the order
        they were added; ``()`` for a layer with ``r == 0``."""
        return _adapters.adapter_names(self)

    @property
    def active_adapter(self) -> Optional[str]:
        """The adapter forward uses and ``eval()`` merges (``"default"`` unless :meth:`set_adapter`
        chose another); None: the base alone (a model-level ``set_adapter`` to an adapter this
        layer lacks)."""
        return self._active_adapter

    def adapter(self, name: str) -> "_adapters.AdapterView":
        """Adapter ``name`` (``"default"`` included) as an :class:`~lora_layers.layers.adapters.AdapterView`:
        its tensors (the Parameters themselves) and settings.

        Raises:
            KeyError: no adapter of that name (the message lists :attr:`adapter_names`).
        """
        return _adapters.view(self, name)

    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0, *,
                    use_rslora: bool = False, use_dora: bool = False, init: str = "kaiming") -> None:
        """Add a named adapter next to the default one, initialised as a default adapter with these
        settings would be (shapes per the layer's kind, rank ``r``; dtype ``lora_dtype`` or the
        weight's; A random, B zero, so it changes no output; DoRA's magnitude from the base weight).
        It is not made active: :meth:`set_adapter`.

        Raises:
            ValueError: ``name`` is not an identifier or exists already, a setting is out of range,
                or the layer has ``r == 0`` (no adapter dimension to add to); nothing changes.
            TypeError: ``use_dora=True`` on a layer kind without DoRA (Embedding, conv).
        """
        _adapters.add(self, name, r, lora_alpha, lora_dropout, use_rslora=use_rslora, use_dora=use_dora,
                      init=init)

    def _check_new_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0, *,
                           use_rslora: bool = False, use_dora: bool = False, init: str = "kaiming") -> None:
        """The checks of :meth:`add_adapter`, changing nothing (a model-level call checks every layer first)."""
        _adapters.new_adapter_spec(self, name, r, lora_alpha, lora_dropout, use_rslora, use_dora, init)

    def delete_adapter(self, name: str) -> None:
        """Delete a named adapter. Raises ValueError for ``"default"`` (the layer's own) and for the
        active adapter, KeyError for an unknown name; nothing changes then."""
        _adapters.delete(self, name)

    def set_adapter(self, name: Optional[str]) -> None:
        """Make ``name`` the active adapter (None: the base alone). A merged layer is unmerged first
        and merged again with the new adapter; in eval mode (with ``merge_weights``) the new adapter is
        merged as ``eval()`` merges it, also after None. Raises KeyError for an unknown name (nothing changes)."""
        _adapters.set_active(self, name)

    def _active_view(self) -> "_adapters.AdapterView":
        return _adapters.view(self, self._active_adapter)

    def _forward_view(self) -> "_adapters.AdapterView":
        """The active adapter's view as forward reads it: the default adapter's scale is
        :meth:`_live_scaling` (a hot-swappable tensor under ``torch.compile``)."""
        view = self._active_view()
        named = view.name != _adapters.DEFAULT_ADAPTER
        return view._replace(scaling=self._live_scaling(_adapters.named_adapters(self)[view.name] if named else None))

    def _merge_scaling(self) -> Optional[float]:
        name = self._active_adapter
        return None if name == _adapters.DEFAULT_ADAPTER else _adapters.view(self, name).scaling

    def _uses_adapter(self) -> bool:
        """True when forward adds an adapter: the layer has one and one is active."""
        return self.has_adapter and self._active_adapter is not None

    def _mixed_forward(self, x: Tensor) -> Tensor:
        """Forward under a mixed batch (:mod:`lora_layers.layers.mixed`)."""
        return _mixed.mixed_forward(self, x)

    def _mixed_problem(self) -> Optional[str]:
        """Why this layer cannot run a mixed batch, or None (``mixed_batch`` asks before it changes anything)."""
        if type(self)._mixed_call is LoRALayer._mixed_call or not type(self).forward.__module__.startswith(
                "lora_layers.layers."):
            return (f"its class {type(self).__name__} has a forward of its own, which would not see the batch's "
                    f"rows (mixed batches run through lora_layers' Linear, MergedLinear, Embedding and conv layers)")
        return None

    def _base_forward(self, x: Tensor) -> Tensor:
        """The frozen base alone (the rows of a mixed batch without an adapter here)."""
        raise NotImplementedError

    def _mixed_index(self, x: Tensor, rows: Tensor) -> Tensor:
        """The per-token (per-sample for a conv) adapter indices of input ``x`` for the per-row ``rows``;
        ValueError when they do not fit."""
        raise NotImplementedError

    def _mixed_call(self, x: Tensor, views, index: Tensor) -> Tensor:
        """The mixed forward with the adapters ``views`` (AdapterViews) and ``_mixed_index``'s ``index``."""
        raise NotImplementedError

    def all_adapter_parameters(self) -> Dict[str, nn.Parameter]:
        """:meth:`adapter_parameters` and every named adapter's, keyed by their names in this layer's
        ``state_dict`` (``lora_A``, ``lora_adapters.b.lora_A``, ...)."""
        out = self.adapter_parameters()
        for name in _adapters.named_adapters(self):
            out.update({f"{_adapters.ADAPTERS_ATTR}.{name}.{local}": p
                        for local, p in self.adapter_parameters(name).items()})
        return out

    def adapter_parameters(self, adapter: Optional[str] = None) -> Dict[str, nn.Parameter]:
        """This layer's own parameters whose names start with ``lora_`` (``lora_A``, ``lora_B``): the
        default adapter's; empty without adapters. With ``adapter`` a named adapter's, by the same
        local names (KeyError for a name the layer lacks)."""
        if adapter is not None and adapter != _adapters.DEFAULT_ADAPTER:
            self.adapter(adapter)  # the KeyError listing the names
            params = _adapters.named_adapters(self)[adapter]._parameters
        else:
            params = self._parameters
        return {n: p for n, p in params.items() if n.startswith(ADAPTER_PREFIX) and p is not None}

    def reset_parameters(self) -> None:
        # Same call order as loralib, so a given seed gives the same numbers.
        if self.__dict__.get("merged"):
            # Fresh weights carry no merged delta: a later unmerge() must not subtract the old one.
            self.merged, self._merge_state = False, None
            self._record_merged_with(None)
        super().reset_parameters()
        if "lora_A" in self.__dict__.get("_parameters", {}):
            self.reset_lora_parameters()

    def extra_repr(self) -> str:
        # A loralib-style subclass may hold any callable as lora_dropout, and lack the extras.
        extra = f"r={self.r}, lora_alpha={self.lora_alpha}, lora_dropout={getattr(self.lora_dropout, 'p', 0.0)}"
        if getattr(self, "use_rslora", False):
            extra += ", use_rslora=True"
        if is_residual_init(getattr(self, "init", None)):
            extra += f", init={self.init!r}"  # the weight is the residual W - s·B₀A₀
        if getattr(self, "merged", False):
            extra += ", merged=True"
        if self.__dict__.get("_active_adapter", _adapters.DEFAULT_ADAPTER) != _adapters.DEFAULT_ADAPTER:
            extra += f", active_adapter={self._active_adapter!r}"
        return f"{super().extra_repr()}, {extra}"
