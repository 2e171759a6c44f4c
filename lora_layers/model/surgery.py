"""Model surgery: put LoRA layers into an existing model, and take them out again.

:func:`inject_lora` swaps matching ``nn.Linear`` / ``nn.Embedding`` /
``nn.Conv1d/2d/3d`` modules for their LoRA counterparts *in place*, through
``<LoRA class>.from_module``: the new modules share the original Parameter
objects, so nothing is copied or re-initialised and device and dtype are kept.
:func:`merge_and_unload` and :func:`unload` turn every LoRA layer back into the
plain torch layer, with or without the adapter folded into the weight.

Every entry point validates its whole plan before it changes anything: a bad
argument raises and leaves the model exactly as it was.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..layers.base import LoRALayer
from ..core.spec import NOT_GIVEN, SPEC_FIELDS, LoRASpec, check_alpha, check_rank, given_settings, resolve_spec
from ..layers.linear import Linear
from ..layers.merged import MergedLinear
from ..layers.registry import LORA_CLASSES, lora_class_for
from .families import undo_family_changes
from ..layers.ties import find_shared_weights
from .swap import swap_modules
from .unwrap import unwrap_model
from ..bases.quantized import is_quantized_linear, record_compute_dtype
from ..core.sharded import any_fsdp_managed
from .params import check_adapter, lora_modules, mark_only_lora_as_trainable, merge_layers

__all__ = ["ALL_LINEAR", "inject_lora", "model_spec", "merge_and_unload", "unload", "select_modules"]

ALL_LINEAR = "all-linear"


def _lora_class(module: nn.Module):
    """The LoRA class ``inject_lora`` puts on ``module``, or None: exact torch types and quantized
    linears (:func:`~lora_layers.layers.registry.lora_class_for`), not transformers' ``Conv1D``."""
    return lora_class_for(module, hf_conv1d=False)


Targets = Union[str, Sequence[str]]
_Matcher = Callable[[str], bool]


# ----------------------------------------------------------------------------- patterns

def _suffix_matches(name: str, suffix: str) -> bool:
    """``suffix`` equals ``name`` or its tail after a dot (``"qkv_proj"`` matches ``a.b.qkv_proj``)."""
    return name == suffix or name.endswith("." + suffix)


def _compile(pattern: str, arg: str, template: str = "{}") -> "re.Pattern":
    try:
        return re.compile(template.format(pattern))
    except re.error as exc:
        raise ValueError(f"{arg}: {pattern!r} is not a valid regular expression ({exc})") from None


def _parse_targets(spec, arg: str) -> List[Tuple[str, _Matcher]]:
    """``(label, matcher)`` per entry of a targets/exclude spec; ``ALL_LINEAR`` gets no matcher here."""
    if isinstance(spec, str):
        if spec == ALL_LINEAR:
            return [(spec, None)]
        rx = _compile(spec, arg)
        return [(spec, lambda name: rx.fullmatch(name) is not None)]
    if isinstance(spec, (list, tuple)) and spec:
        for s in spec:
            if not isinstance(s, str) or not s:
                raise TypeError(f"{arg} entries must be non-empty strings (module name suffixes), got {s!r}")
        return [(s, lambda name, s=s: _suffix_matches(name, s)) for s in spec]
    raise TypeError(
        f"{arg} must be a non-empty list/tuple of name suffixes, a regex string or {ALL_LINEAR!r}, got {spec!r}"
    )


def _pattern_lookup(patterns, arg: str) -> List[Tuple[str, _Matcher, object]]:
    """Keys of rank_pattern/alpha_pattern/merged_splits: a dotted suffix, or a regex
    matching the whole name or a suffix of it after a dot (PEFT's convention)."""
    if patterns is None:
        return []
    if not isinstance(patterns, Mapping):
        raise TypeError(f"{arg} must be a dict {{pattern: value}} or None, got {type(patterns).__name__}")
    out = []
    for key, value in patterns.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"{arg} keys must be non-empty strings, got {key!r}")
        rx = _compile(key, arg, r"(?:.*\.)?(?:{})")
        out.append((key, lambda name, k=key, rx=rx: _suffix_matches(name, k) or rx.fullmatch(name) is not None,
                    value))
    return out


def _first_match(entries, name: str):
    # Several keys may match one module: the first in the dict's order wins.
    for key, match, value in entries:
        if match(name):
            return key, value
    return None, None


def _output_heads(model: nn.Module) -> set:
    """ids of the output head(s): every ``get_output_embeddings()`` and any module named ``lm_head``."""
    heads = set()
    for name, module in model.named_modules():
        getter = getattr(module, "get_output_embeddings", None)
        if callable(getter):
            try:
                head = getter()
            except (NotImplementedError, AttributeError):
                head = None
            if isinstance(head, nn.Module):
                heads.add(id(head))
        if name.rsplit(".", 1)[-1] == "lm_head":
            heads.add(id(module))
    return heads


def _candidates(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Named submodules in model order, without the root and without the insides of
    LoRA layers (their ``lora_dropout`` is not a target)."""
    out, inside = [], None
    for name, module in model.named_modules():
        if not name or (inside is not None and name.startswith(inside)):
            continue
        inside = name + "." if isinstance(module, LoRALayer) else inside
        out.append((name, module))
    return out


def _example_names(candidates) -> str:
    names = [n for n, m in candidates if _lora_class(m) is not None][:4]
    return f" (adaptable modules are named like {names})" if names else " (the model has no adaptable layer)"


# ----------------------------------------------------------------------------- planning

def _select(model, candidates, targets, exclude) -> List[Tuple[str, nn.Module]]:
    """The (name, module) pairs to replace. Raises if a target or exclude entry matches
    nothing, if nothing is left, or if a selected module cannot or must not be wrapped."""
    target_entries = _parse_targets(targets, "targets")
    exclude_entries = _parse_targets(exclude, "exclude") if exclude is not None else []
    if any(m is None for _, m in exclude_entries):
        raise ValueError(f"exclude cannot be {ALL_LINEAR!r}")
    heads = _output_heads(model) if targets == ALL_LINEAR else set()

    def targeted(name, module):
        if targets == ALL_LINEAR:
            # LoRA Linear layers count too, so that re-injection is reported, not skipped.
            plain = type(module) is nn.Linear or is_quantized_linear(module) or isinstance(module, Linear)
            return plain and id(module) not in heads
        return any(match(name) for _, match in target_entries)

    missing = [label for label, match in target_entries
               if not any((match(n) if match else targeted(n, m)) for n, m in candidates)]
    if missing:
        raise ValueError(f"targets {missing} match no module of {type(model).__name__}{_example_names(candidates)}")
    unused = [label for label, match in exclude_entries if not any(match(n) for n, _ in candidates)]
    if unused:
        raise ValueError(f"exclude {unused} match no module of {type(model).__name__}")

    plan = [(n, m) for n, m in candidates
            if targeted(n, m) and not any(match(n) for _, match in exclude_entries)]
    if not plan:
        raise ValueError(f"targets={targets!r} with exclude={exclude!r} leaves no module to replace")
    wrapped = [n for n, m in plan if isinstance(m, LoRALayer)]
    if wrapped:
        raise ValueError(
            f"modules {wrapped} already carry LoRA adapters; exclude them, or call unload() or "
            f"merge_and_unload() first (a layer is never wrapped twice)"
        )
    unsupported = [f"{n} ({type(m).__name__})" for n, m in plan if _lora_class(m) is None]
    if unsupported:
        raise TypeError(
            f"targets={targets!r} selects modules that cannot take a LoRA adapter: {unsupported}; "
            f"supported types are exactly {[t.__name__ for t in LORA_CLASSES]} and the quantized linears of "
            f"bitsandbytes (Linear4bit, Linear8bitLt) and torchao (an NF4 weight)"
        )
    return plan


def select_modules(model: nn.Module, targets, exclude=None) -> List[Tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs ``targets``/``exclude`` select, as :func:`inject_lora` reads them
    (its errors too). Nothing is changed."""
    model = unwrap_model(model)
    return _select(model, _candidates(model), targets, exclude)


def _check_patterns(plan, ranks, alphas, splits) -> None:
    """Raise if a rank_pattern/alpha_pattern/merged_splits value is invalid, or a key matches no replaced module."""
    for key, _, value in ranks:
        check_rank(value, f"rank_pattern[{key!r}]", positive=True)
    for key, _, value in alphas:
        try:
            check_alpha(value)
        except ValueError:
            raise ValueError(f"alpha_pattern[{key!r}] must be a finite number, got {value!r}") from None
    for key, _, value in splits:
        if not (isinstance(value, (tuple, list)) and len(value) == 2):
            raise TypeError(f"merged_splits[{key!r}] must be a pair (split_sizes, enable_lora), got {value!r}")
    for arg, entries in (("rank_pattern", ranks), ("alpha_pattern", alphas), ("merged_splits", splits)):
        unused = [key for key, match, _ in entries if not any(match(n) for n, _ in plan)]
        if unused:
            raise ValueError(f"{arg} keys {unused} match none of the replaced modules {[n for n, _ in plan]}")


def _layer_kwargs(plan, spec: LoRASpec, rank_pattern, alpha_pattern, merged_splits):
    """Per-module ``(class, from_module kwargs)``: ``spec`` with the module's rank and alpha from the
    patterns, and a MergedLinear's splits. Raises if a pattern is invalid or matches no replaced module."""
    ranks = _pattern_lookup(rank_pattern, "rank_pattern")
    alphas = _pattern_lookup(alpha_pattern, "alpha_pattern")
    splits = _pattern_lookup(merged_splits, "merged_splits")
    _check_patterns(plan, ranks, alphas, splits)
    out = []
    for name, module in plan:
        cls, kwargs = _lora_class(module), {}
        (rank_key, rank), (alpha_key, alpha) = _first_match(ranks, name), _first_match(alphas, name)
        if rank_key is not None or alpha_key is not None:
            kwargs["spec"] = dataclasses.replace(spec, r=spec.r if rank_key is None else rank,
                                                 lora_alpha=spec.lora_alpha if alpha_key is None else alpha)
        key, split = _first_match(splits, name)
        if key is not None:
            if cls is not Linear:
                raise TypeError(f"merged_splits[{key!r}] matches {name} ({type(module).__name__}); "
                                f"only nn.Linear modules can become MergedLinear")
            cls, (sizes, enable) = MergedLinear, split
            kwargs.update(split_sizes=sizes, enable_lora=[True] * len(sizes) if enable is None else enable)
        out.append((cls, {"spec": spec, **kwargs}))
    return out


# ----------------------------------------------------------------------------- public API

def inject_lora(model: nn.Module, targets: Targets, r: int = NOT_GIVEN, lora_alpha: float = NOT_GIVEN,
                lora_dropout: float = NOT_GIVEN, *, spec: Optional[LoRASpec] = None,
                exclude: Optional[Targets] = None, rank_pattern: Optional[Mapping[str, int]] = None,
                alpha_pattern: Optional[Mapping[str, float]] = None,
                merged_splits: Optional[Mapping[str, Tuple[Sequence[int], Optional[Sequence[bool]]]]] = None,
                **settings) -> List[str]:
    """Replace matching layers of ``model`` in place with LoRA layers.

    Each selected ``nn.Linear``, ``nn.Embedding`` or ``nn.Conv1d/2d/3d`` (exact
    types) becomes its LoRA class via ``from_module``: the Parameters are shared,
    not copied, and the adapters start at zero effect (B = 0, or A = 0 for
    embeddings). Afterwards only adapter parameters are trainable
    (:func:`~lora_layers.mark_only_lora_as_trainable`).

    Args:
        model: any ``nn.Module``; the root itself is never replaced.
        targets: which modules to replace, by qualified name (as in ``named_modules()``):
            a list/tuple of suffixes matched at a dot boundary (``"qkv_proj"``
            matches ``model.layers.3.self_attn.qkv_proj``; a full name matches only
            that module); a ``str`` regex that must fullmatch the name; or
            ``"all-linear"``: every exact ``nn.Linear`` but the output head
            (``get_output_embeddings()`` and modules named ``lm_head``).
        r, lora_alpha, lora_dropout: the first settings, by position or keyword as before
            :class:`~lora_layers.LoRASpec` existed (described below).
        spec: the LoRA settings as a :class:`~lora_layers.LoRASpec` (its ``r`` positive), or None
            to take them from the arguments. Not both.
        exclude: modules to leave out, in the same forms as ``targets`` (not "all-linear").
        rank_pattern: ``{pattern: r}`` per-module ranks; a pattern is a dotted
            suffix or a regex matching the name or a suffix of it after a dot.
        alpha_pattern: ``{pattern: lora_alpha}``, likewise.
        merged_splits: ``{pattern: (split_sizes, enable_lora)}``: matching
            ``nn.Linear`` modules become :class:`~lora_layers.MergedLinear` with
            those output splits (``enable_lora=None`` enables every split).
            For several matching pattern keys, the first in dict order wins.
        **settings: the other LoRA settings as keyword arguments, when ``spec`` is None
            (``r``, ``lora_alpha`` and ``lora_dropout`` may be given here too):
            ``r``, the adapter rank, a positive integer (default 8);
            ``lora_alpha``, the scaling numerator (``scaling = lora_alpha / r``; default 16);
            ``lora_dropout``, dropout on the adapter input (not used by embeddings; default 0.0);
            ``merge_weights``, passed to the layers (``eval()`` merges, ``train()`` unmerges; default True);
            ``use_rslora``, ``scaling = lora_alpha / sqrt(r)`` (default False);
            ``lora_dtype``, the dtype of the adapter parameters (default None: each weight's);
            ``backend``, ``"auto"`` (the default), ``"torch"`` or ``"triton"``;
            ``use_dora``, DoRA adapters (``Linear`` and ``MergedLinear`` only; another
            selected type raises ``TypeError``; see :class:`~lora_layers.Linear`; default False);
            ``init``, ``"kaiming"`` (loralib's, the default) or ``"gaussian"`` (PEFT's) adapter init, or
            ``"pissa"``, ``"pissa_niter_<N>"``, ``"olora"`` (Linear/MergedLinear only, per split): A and B
            from each weight, which becomes the residual ``W − s·B A`` in place (docs/pissa.md);
            ``dora_mode``, DoRA's backward, ``"lean"`` (the default) or ``"fast"`` (with ``use_dora=True``;
            see :class:`~lora_layers.Linear`).

    Returns:
        The qualified names of the replaced modules, in model order.

    Raises:
        ValueError: a target or exclude entry matches no module; nothing is left
            to replace; a selected module is already a LoRA layer (never wrapped
            twice: exclude it or unload first); a rank/alpha/split is invalid; a
            ``rank_pattern``/``alpha_pattern``/``merged_splits`` key matches no
            replaced module.
        TypeError: an argument has the wrong type or is unknown, ``spec`` comes with a setting
            as keyword argument, or ``targets`` selects a module that is not one of the
            supported layer types.

    On any error the model is left unchanged.
    """
    model = unwrap_model(model, changes_parameters="inject_lora")
    given_settings(settings, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout)
    spec = model_spec(spec, settings, "inject_lora")
    plan = select_modules(model, targets, exclude)
    layer_kwargs = _layer_kwargs(plan, spec, rank_pattern, alpha_pattern, merged_splits)
    swap_modules(model, build_layers(model, plan, layer_kwargs))
    mark_only_lora_as_trainable(model)
    return [name for name, _ in plan]


def model_spec(spec: Optional[LoRASpec] = None, settings: Optional[dict] = None,
               caller: str = "inject_lora") -> LoRASpec:
    """The :class:`LoRASpec` of a model-level call (:func:`inject_lora`'s defaults: ``r=8``,
    ``lora_alpha=16``): ``spec``, or one made of ``settings`` (a dict of keyword arguments, emptied).

    Raises:
        ValueError: ``r`` is not a positive integer (a model-level call puts an adapter on every
            module it selects), or another setting is invalid.
        TypeError: a setting has the wrong type, is unknown, or is given together with ``spec``.
    """
    settings = {} if settings is None else settings
    unknown = [name for name in settings if name not in SPEC_FIELDS]
    if unknown:  # first, as Python refused a misspelt keyword before any value was checked
        raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}")
    # Checked before LoRASpec's own rank check, whose message allows r=0.
    check_rank(spec.r if isinstance(spec, LoRASpec) else settings.get("r", 8), "r", positive=True)
    return resolve_spec(spec, settings, caller, r=8, lora_alpha=16)


def build_layers(model: nn.Module, plan, specs) -> Dict[int, nn.Module]:
    """``{id(module): LoRA layer}``: ``cls.from_module(module, **kwargs)`` for each ``(name, module)`` of
    ``plan`` and ``(cls, kwargs)`` of ``specs``, nothing swapped in yet. A failure raises naming the module,
    with every weight's ``requires_grad`` restored."""
    # Every new layer is built before any is swapped in. from_module's only side effect
    # on the original is freezing its weight; undo that if a later build fails.
    frozen = [(p, p.requires_grad) for _, m in plan for p in m.parameters(recurse=False)]
    record_compute_dtype(model, [m for _, m in plan])  # LLM.int8 layers take the model's dtype
    built = {}
    try:
        for (name, module), (cls, kwargs) in zip(plan, specs):
            try:
                built[id(module)] = cls.from_module(module, **kwargs)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"cannot put a LoRA adapter on {name}: {exc}") from exc
    except BaseException:
        for param, flag in frozen:
            param.requires_grad_(flag)
        raise
    return built


def _check_plain_kind(fn: str, layers) -> None:
    """Refuse, before anything changes, a LoRA layer with no torch layer to become: a ``LoRALayer``
    subclass of the user's own (loralib style) that wraps a bare ``nn.Module``."""
    for name, layer in layers:
        if "_wrapped_class" not in layer.__dict__ and layer._base_type is nn.Module:
            raise TypeError(f"{fn}: {name or 'the model'} is a {type(layer).__name__}, a LoRALayer subclass "
                            f"that wraps no torch layer (its _base_type is nn.Module), so there is no plain "
                            f"layer to put in its place; remove its adapter with its own code, or set "
                            f"_base_type to the torch layer class it extends (the model was left unchanged)")


def _plain_layer(layer: LoRALayer) -> nn.Module:
    """The torch layer ``layer`` wraps, sharing its Parameters, without any LoRA state."""
    plain = layer.wrapped_module()
    if getattr(layer, "fan_in_fan_out", False) and "_wrapped_class" not in layer.__dict__:
        # A hand-built fan_in_fan_out Linear stores (in, out); a plain nn.Linear
        # stores (out, in): the only case that needs a new tensor.
        weight = layer.weight
        plain._parameters["weight"] = nn.Parameter(weight.detach().t().contiguous(),
                                                   requires_grad=weight.requires_grad)
    return plain


def _refuse_sharded(model: nn.Module) -> None:
    """merge_and_unload on a ``fully_shard`` model: refused on every rank alike (no collective), saying
    what gives the merged model instead."""
    if any_fsdp_managed(model):
        raise ValueError(f"merge_and_unload: {type(model).__name__} is sharded by fully_shard (its weights are "
                         f"DTensor shards), and merging would replace them by whole plain weights on every rank. "
                         f"Call lora_layers.merged_state_dict(model) on every rank instead: rank 0 gets the merged "
                         f"full state dict, as one process's merged_state_dict(model); load it with strict=True "
                         f"into the model built without LoRA, or save it (docs/distributed.md)")


def merge_and_unload(model: nn.Module, safe_merge: bool = False, adapter: Optional[str] = None,
                     requantize: Optional[str] = None, probe=None) -> nn.Module:
    """Fold every adapter into its weight and replace each LoRA layer by the plain torch layer.

    The result holds ``nn.Linear`` / ``nn.Embedding`` / ``nn.ConvNd`` modules whose
    weight is the merged one (the same storage: merging is in place, no copy),
    so its ``state_dict()`` keys equal the original model's and e.g.
    ``save_pretrained`` writes a plain checkpoint. ``requires_grad`` flags are
    left as they are (base weights stay frozen). Lean mode
    (:func:`lora_layers.phi3.enable_lean`) is undone: norms, MLPs and forward are the plain ones again.

    Args:
        model: a model with LoRA layers (a model without any is returned as is).
        safe_merge: check each merged weight is finite (see :meth:`LoRALayer.merge`).
        adapter: the adapter to fold in (:func:`lora_layers.add_adapter`): None, each layer's active
            one; a name, that adapter on the layers that have it (the others keep their base weight).
        requantize: None, ``"nf4"`` or ``"bnb-nf4"``: every ``Linear`` LoRA layer (over a quantized or a
            dense base) becomes a plain layer holding the weight it would hold without ``requantize``,
            packed again in 4 bits: an ``nn.Linear`` with a torchao NF4 weight (``"nf4"``, what
            :func:`~lora_layers.quantize_base` makes, with the base's block sizes) or a bitsandbytes
            ``Linear4bit`` (``"bnb-nf4"``). The returned model carries the cost as
            ``model.requantize_report`` (a :class:`~lora_layers.RequantizeReport`; without changing the
            model, :func:`~lora_layers.requantize_report` gives the same). Embeddings and convolutions
            merge as usual.
        probe: with ``requantize``, inputs to run the model on (``model(probe)``, or ``model(**probe)``
            for a mapping), e.g. ``input_ids``: the report then gives the largest logit difference between
            the exact merge and the requantized model (run in inference mode before and after).

    Returns:
        ``model``, changed in place; the plain layer if ``model`` itself is a LoRA layer.
        For a ``torch.compile``/DDP-wrapped model, the bare model inside: the
        wrapper's compiled graphs and DDP's gradient buckets were built for the
        LoRA layers, so wrap the result again if you need a wrapper. A transformers
        model loaded with a ``BitsAndBytesConfig`` whose quantized layers all had
        adapters holds none afterwards: its record of the quantization is removed too
        (``hf_quantizer.remove_quantization_config``), so ``save_pretrained`` writes a
        plain model (with quantized layers left, the record stays: ``model.dequantize()``).
        With ``requantize="nf4"`` the record goes once no bitsandbytes layer is left; with
        ``"bnb-nf4"`` it stays, and ``save_pretrained`` writes a 4-bit checkpoint.

    Raises:
        TypeError, ValueError: a weight cannot be merged (non-float dtype, or
            non-finite with ``safe_merge``); every layer merged so far is
            unmerged again, so the model is left unchanged.
        KeyError: no layer has an adapter ``adapter`` (the model is left unchanged).
        ValueError: the model is sharded by ``fully_shard`` (its weights are shards, and plain layers
            holding whole merged weights would undo the sharding on every rank): use
            :func:`lora_layers.merged_state_dict` on every rank instead (docs/distributed.md).
        ValueError: ``requantize`` is not None, ``"nf4"`` or ``"bnb-nf4"``; a ``probe`` without
            ``requantize``; a ``Linear`` layer it cannot pack (for ``"nf4"`` a number of weights that is not
            a multiple of its block size; a weight stored ``(in, out)``; for ``"bnb-nf4"`` on CPU, rows that
            are not whole blocks, which bitsandbytes' CPU kernels misread); ``"bnb-nf4"`` on a model that
            transformers recorded with another quantization: raised before anything changes.
        ImportError: the library ``requantize`` needs (torchao, bitsandbytes) is not installed.
        TypeError: ``probe`` is neither a tensor nor a mapping, or the model's output on it has no logits.
    """
    model = unwrap_model(model)
    _refuse_sharded(model)
    find_shared_weights(model)  # a tied weight is refused by name
    layers = [(name, layer) for name, layer in lora_modules(model)]
    _check_plain_kind("merge_and_unload", layers)
    if adapter is not None:
        check_adapter(model, adapter, "merge_and_unload")
    before = [(layer, layer.active_adapter) for _, layer in layers]
    try:
        for _, layer in layers:
            if adapter is not None and layer.r > 0:
                layer.set_adapter(adapter if adapter in layer.adapter_names else None)
        requant = None
        if requantize is not None or probe is not None:  # checked, and the probe's exact logits taken, first
            requant = _requantizer(model, layers, requantize, probe)
        # A quantized base cannot take the adapter in place: it becomes a plain Linear
        # holding the dequantized weight plus the adapter (built before anything changes).
        replaced = {id(layer): _dequantized_plain(name, layer, safe_merge) for name, layer in layers
                    if getattr(layer, "quantized", None) is not None} if requant is None else requant.layers(safe_merge)
        merge_layers([(n, m) for n, m in layers if id(m) not in replaced], safe_merge)  # all or nothing
    except BaseException:
        for layer, active in before:
            if layer.r > 0:
                layer.set_adapter(active)
        raise
    undo_family_changes(model)
    dequantized = bool(replaced)
    replaced.update({id(layer): _plain_layer(layer) for _, layer in layers if id(layer) not in replaced})
    model = swap_modules(model, replaced)
    quantizer = getattr(model, "hf_quantizer", None)
    left = is_quantized_linear if requant is None else requant.needs_quantizer
    if dequantized and quantizer is not None and not any(left(m) for m in model.modules()):
        # No quantized layer is left: transformers' record of the quantization (config.quantization_config)
        # would make save_pretrained write a checkpoint that from_pretrained reloads as a quantized one.
        quantizer.remove_quantization_config(model)
    return model if requant is None else requant.attach(model)


def _requantizer(model, layers, requantize, probe):
    # Imported here: requantize uses quantize's NF4 packer, and quantize imports this module.
    from .requantize import Requantizer

    return Requantizer("merge_and_unload", model, layers, requantize, probe)


def _dequantized_plain(name: str, layer: Linear, safe_merge: bool) -> nn.Linear:
    """A plain ``nn.Linear`` in the base's compute dtype: the dequantized weight with the adapter folded in."""
    weight = layer.merged_weight()
    if safe_merge and not torch.isfinite(weight).all():
        raise ValueError(f"safe_merge: merging the adapter into {name or 'the layer'} gives non-finite values; "
                         f"the model was left unchanged")
    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    plain.weight = nn.Parameter(weight, requires_grad=False)
    if layer.bias is not None:
        plain.bias = nn.Parameter(layer.bias.detach().to(weight.dtype), requires_grad=layer.bias.requires_grad)
    return plain


def unload(model: nn.Module) -> nn.Module:
    """Drop every adapter without merging: each LoRA layer becomes its plain torch layer
    with the original weight, restored bit for bit if it was merged. Lean mode is undone too.
    A PiSSA/OLoRA layer's base (the residual ``W − s·B₀A₀``) gets ``s·B₀A₀`` added back: the
    weight before ``init="pissa"``/``"olora"``, to one rounding (PEFT's ``unload`` leaves the residual).

    Args:
        model: a model with LoRA layers (a model without any is returned as is).

    Returns:
        ``model``, changed in place; the plain layer if ``model`` itself is a LoRA layer;
        for a wrapped model, the bare model inside (as :func:`merge_and_unload`).
    """
    model = unwrap_model(model)
    named = list(lora_modules(model))
    _check_plain_kind("unload", named)
    layers = [layer for _, layer in named]
    for layer in layers:
        layer.unmerge()
        layer._undo_residual()  # PiSSA/OLoRA: the base is W - s·B₀A₀; give W back (to one rounding)
    undo_family_changes(model)
    return swap_modules(model, {id(layer): _plain_layer(layer) for layer in layers})
