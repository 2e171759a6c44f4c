"""The Phi-3 preset's functions: :func:`apply_lora`, lean mode's switches, gradient checkpointing and
the qkv split sizes (what the preset does and why: :mod:`lora_layers.phi3`, this folder's docstring)."""
from __future__ import annotations

import numbers
from typing import Any, Dict, List, Optional, Sequence, Union

import torch.nn as nn

from . import lean as _lean
from ...model.unwrap import unwrap_model
from ...io.checkpoint import dropout_arg
from ...model.families import DEFAULT_TARGETS, FITTING_CALLS, UNLOAD_STEPS
from ...model.surgery import inject_lora, model_spec

__all__ = ["TARGETS", "QKV_PARTS", "qkv_split_sizes", "apply_lora", "enable_gradient_checkpointing", "enable_lean",
           "disable_lean"]

TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
QKV_PARTS = ("q", "k", "v")
_MODEL_TYPES = ("phi3",)


def _config_int(config, name: str, default=None) -> int:
    value = getattr(config, name, None)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"config.{name} must be a positive integer, got {value!r}")
    return int(value)


def qkv_split_sizes(config) -> List[int]:
    """Row sizes ``[q, k, v]`` of Phi-3's fused ``qkv_proj``: ``[H·d, KV·d, KV·d]``.

    Args:
        config: a ``Phi3Config`` (anything with ``num_attention_heads``,
            ``num_key_value_heads`` (defaults to H), and ``head_dim`` or ``hidden_size``).

    Returns:
        ``[H * d, KV * d, KV * d]`` with ``d = config.head_dim`` or ``hidden_size // H``.

    Raises:
        ValueError: a size is missing or not a positive integer, or ``hidden_size``
            is not divisible by the head count when ``head_dim`` is absent.
    """
    heads = _config_int(config, "num_attention_heads")
    kv_heads = _config_int(config, "num_key_value_heads", heads)
    if getattr(config, "head_dim", None) is None:
        hidden = _config_int(config, "hidden_size")
        if hidden % heads:
            raise ValueError(f"config.hidden_size={hidden} is not divisible by num_attention_heads={heads}")
        head_dim = hidden // heads
    else:
        head_dim = _config_int(config, "head_dim")
    return [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]


def _check_phi3(model: nn.Module) -> Dict[str, List[int]]:
    """Split sizes per fused projection, after checking ``model`` is shaped like Phi-3."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _MODEL_TYPES:
        raise ValueError(
            f"phi3.apply_lora expects a Phi-3 model (config.model_type in {_MODEL_TYPES}), got "
            f"{type(model).__name__} with model_type={model_type!r}; use lora_layers.inject_lora for other models"
        )
    qkv = qkv_split_sizes(config)
    inter = _config_int(config, "intermediate_size")
    hidden = _config_int(config, "hidden_size")
    expected = {  # suffix -> (in_features, out_features)
        "self_attn.qkv_proj": (hidden, sum(qkv)),
        "self_attn.o_proj": (qkv[0], hidden),
        "mlp.gate_up_proj": (hidden, 2 * inter),
        "mlp.down_proj": (inter, hidden),
    }
    found = {suffix: 0 for suffix in expected}
    for name, module in model.named_modules():
        for suffix, shape in expected.items():
            if name == suffix or name.endswith("." + suffix):
                found[suffix] += 1
                got = (getattr(module, "in_features", None), getattr(module, "out_features", None))
                if not isinstance(module, nn.Linear) or got != shape:
                    raise ValueError(
                        f"{name} is not Phi-3-shaped: expected a Linear {shape[0]} -> {shape[1]} from the config "
                        f"(H, KV, head_dim give qkv splits {qkv}, intermediate_size={inter}), got "
                        f"{type(module).__name__} {got[0]} -> {got[1]}"
                    )
    counts = set(found.values())
    if counts == {0} or len(counts) != 1:
        raise ValueError(f"{type(model).__name__} lacks Phi-3's decoder layout; found per projection: {found}")
    return {"qkv_proj": qkv, "gate_up_proj": [inter, inter]}


def _check_targets(targets) -> List[str]:
    if isinstance(targets, str):
        targets = (targets,)
    if not isinstance(targets, (list, tuple)) or not targets:
        raise TypeError(f"targets must be a non-empty list/tuple drawn from {TARGETS}, got {targets!r}")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or len(set(targets)) != len(targets):
        raise ValueError(f"targets must be distinct names from {TARGETS}, got {list(targets)}")
    return list(targets)


def _check_qkv(qkv) -> List[bool]:
    parts = list(qkv) if isinstance(qkv, (str, list, tuple)) else None
    if not parts or any(p not in QKV_PARTS for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(
            f"qkv must name distinct parts of qkv_proj from {QKV_PARTS} (e.g. ('q', 'v')), got {qkv!r}; "
            f"to leave qkv_proj alone, drop it from targets"
        )
    return [p in parts for p in QKV_PARTS]


def _checkpointing_kwargs(gradient_checkpointing) -> Optional[dict]:
    if gradient_checkpointing is None or gradient_checkpointing is False:
        return None
    if gradient_checkpointing is True:
        return {}
    if isinstance(gradient_checkpointing, dict) and set(gradient_checkpointing) <= {"use_reentrant"}:
        return dict(gradient_checkpointing)
    raise ValueError(
        f"gradient_checkpointing must be None, a bool or {{'use_reentrant': bool}}, got {gradient_checkpointing!r}"
    )


def apply_lora(model: nn.Module, r: int = 16, lora_alpha: float = 32, lora_dropout: float = 0.05,
               targets: Sequence[str] = TARGETS, qkv: Sequence[str] = QKV_PARTS, *, use_rslora: bool = False,
               lora_dtype=None, gradient_checkpointing: Union[None, bool, dict] = None,
               backend: str = "auto", use_dora: bool = False, init: str = "kaiming", lean: bool = False,
               dora_mode: str = "lean") -> List[str]:
    """Put LoRA adapters on a Phi-3 model's projections, in place.

    ``qkv_proj`` becomes a :class:`~lora_layers.MergedLinear` with splits
    ``[H·d, KV·d, KV·d]`` (from ``model.config``) and adapters on the parts named
    by ``qkv``; ``gate_up_proj`` a MergedLinear with splits ``[I, I]``, both
    adapted; ``o_proj`` and ``down_proj`` become :class:`~lora_layers.Linear`.
    Only the adapters stay trainable. Defaults follow the Phi-3 model card's
    fine-tuning recipe (r=16, alpha=32, dropout 0.05, all four projections).

    Args:
        model: a ``Phi3ForCausalLM`` or a bare ``Phi3Model`` (MHA or GQA).
        r, lora_alpha, lora_dropout, use_rslora, lora_dtype, backend, use_dora, init, dora_mode: as
            :func:`lora_layers.inject_lora` (``use_dora=True``: DoRA on every adapted projection;
            ``dora_mode="fast"``: its faster backward, which keeps one ``T × out`` tensor per layer).
        targets: which of ``("qkv_proj", "o_proj", "gate_up_proj", "down_proj")`` to adapt.
        qkv: which parts of ``qkv_proj`` get adapters, e.g. ``("q", "v")``.
        lean: also call :func:`enable_lean`: the adapters keep no copy of their inputs
            and, with labels, the forward computes the fused loss and returns ``logits=None``
            (``model(..., labels=y, return_logits=True)`` gives the plain loss and the logits).
        gradient_checkpointing: ``None``/``False`` leaves checkpointing as it is;
            ``True`` or ``{"use_reentrant": bool}`` calls
            :func:`enable_gradient_checkpointing` after the surgery.

    Returns:
        The qualified names of the replaced modules, in model order.

    Raises:
        ValueError: ``model`` is not Phi-3-shaped (``config.model_type`` or the
            module shapes disagree with the config), ``targets`` or ``qkv`` name
            an unknown part, or any error of :func:`~lora_layers.inject_lora`
            (e.g. the model already has adapters). The model is left unchanged.
    """
    model = unwrap_model(model, changes_parameters="phi3.apply_lora")
    targets = _check_targets(targets)
    enable_qkv = _check_qkv(qkv)
    checkpointing = _checkpointing_kwargs(gradient_checkpointing)
    splits = _check_phi3(model)
    if checkpointing is not None and not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"gradient_checkpointing: {type(model).__name__} does not support it")
    merged = {name: (splits[name], enable_qkv if name == "qkv_proj" else None) for name in splits if name in targets}
    spec = model_spec(settings=dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
                                    lora_dtype=lora_dtype, backend=backend, use_dora=use_dora, init=init,
                                    dora_mode=dora_mode),
                      caller="phi3.apply_lora")
    names = inject_lora(model, targets, spec=spec, merged_splits=merged or None)
    if lean:
        enable_lean(model, loss=_lean._is_causal_lm(model))
    if checkpointing is not None:
        enable_gradient_checkpointing(model, **checkpointing)
    return names


def enable_lean(model: nn.Module, *, loss: bool = True, adapter_inputs: bool = True) -> List[str]:
    """Lean training on a Phi-3 model: the same results with less activation memory.

    ``adapter_inputs``: every LoRA ``qkv_proj``, ``gate_up_proj`` and ``down_proj``
    rebuilds its input in backward (from the RMSNorm's input and ``rstd``, or from
    ``up`` and ``silu(gate)``, which autograd keeps anyway) instead of keeping it.
    ``loss``: with labels, ``model(...)`` computes
    :func:`~lora_layers.fused_linear_cross_entropy` on the last hidden state and returns
    ``logits=None``; ``return_logits=True`` in a call gives the plain loss and the logits.
    See :mod:`lora_layers.lean`; :func:`disable_lean`, ``merge_and_unload`` and ``unload`` undo it.

    Returns:
        The qualified names of the modules made lean (``""``: the model's forward).

    Raises:
        ValueError: the model's norms or MLPs are not transformers' Phi-3 classes, or
            ``loss=True`` on a model without an output head (a bare ``Phi3Model``).
    """
    return _lean.enable(unwrap_model(model), adapter_inputs=adapter_inputs, loss=loss)


def disable_lean(model: nn.Module) -> None:
    """Undo :func:`enable_lean`: transformers' own norm and MLP classes and forward again."""
    _lean.disable(unwrap_model(model))


def enable_gradient_checkpointing(model: nn.Module, use_reentrant: bool = False) -> None:
    """Turn on activation checkpointing so that LoRA gradients flow with a frozen base.

    With every base weight frozen, nothing entering a reentrant checkpoint needs a
    gradient, so torch's reentrant checkpoint returns outputs without a graph and
    the adapters inside silently get no gradient (transformers 4.x's default).
    This uses non-reentrant checkpointing unless asked otherwise, and in reentrant
    mode makes the input embeddings' output require grad.

    Uses ``activation_checkpointing_enable`` (transformers 5.x) or
    ``gradient_checkpointing_enable(gradient_checkpointing_kwargs=...)`` (4.x).
    Checkpointing is active in ``train()`` mode only (transformers' rule).

    Args:
        model: a transformers ``PreTrainedModel`` that supports checkpointing.
        use_reentrant: use torch's reentrant checkpoint implementation.

    Raises:
        TypeError: ``model`` has neither checkpointing method.
    """
    model = unwrap_model(model)
    kwargs = {"use_reentrant": bool(use_reentrant)}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise TypeError(
            f"enable_gradient_checkpointing expects a transformers PreTrainedModel, got {type(model).__name__}"
        )
    # transformers 5.x already hooks the embeddings; a second hook would orphan the first.
    if use_reentrant and getattr(model, "_require_grads_hook", None) is None:
        model.enable_input_require_grads()


def _fitting_call(model: nn.Module, saved_modules: Dict[str, Any], targets: List[str],
                  args: List[str]) -> Optional[str]:
    """The ``apply_lora(...)`` call that builds the adapters a checkpoint header records on a Phi-3 ``model``
    (registered in :data:`lora_layers.model.families.FITTING_CALLS`), or None: it fuses qkv_proj/gate_up_proj
    (gate and up both adapted), nothing else."""
    if getattr(getattr(model, "config", None), "model_type", None) != "phi3" or not set(targets) <= set(TARGETS):
        return None
    enables = set()
    for name, cfg in saved_modules.items():
        leaf = name.rsplit(".", 1)[-1]
        if ("split_sizes" in cfg) != (leaf in ("qkv_proj", "gate_up_proj")):
            return None
        enable = cfg.get("enable_lora")
        if "split_sizes" in cfg and not isinstance(enable, list):
            return None
        if leaf == "qkv_proj":
            enables.add(tuple(enable))
        elif leaf == "gate_up_proj" and not all(enable):
            return None
    if len(enables) > 1:
        return None
    if [t for t in TARGETS if t in targets] != list(TARGETS):
        args.append(f"targets={tuple(t for t in TARGETS if t in targets)!r}")
    if enables and not all(next(iter(enables))):
        args.append(f"qkv={tuple(p for p, on in zip(QKV_PARTS, next(iter(enables))) if on)!r}")
    args += dropout_arg(saved_modules, 0.05)  # apply_lora's default
    return f"lora_layers.phi3.apply_lora(model, {', '.join(args)})"


FITTING_CALLS.append(_fitting_call)
DEFAULT_TARGETS.update({model_type: TARGETS for model_type in _MODEL_TYPES})
UNLOAD_STEPS.append(_lean.disable)
