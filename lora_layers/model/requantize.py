"""Merging adapters and packing the merged weights in 4 bits again: ``merge_and_unload(model, requantize=...)``.

Over a quantized base, ``merge_and_unload`` folds the adapter into the dequantized weight exactly
(``W_m = deq(W) + ΔW``), in the compute dtype, at full size. With ``requantize="nf4"`` each merged
``Linear`` weight is then packed again with torchao's NF4 (:func:`~lora_layers.quantize_base`'s
format): ``to_nf4(W_m)`` with the base's block sizes; with ``"bnb-nf4"``, by bitsandbytes into a
``Linear4bit``. That rounding is not exact, so the cost is measured and reported
(:class:`RequantizeReport`): per layer, the relative Frobenius error of the requantized weight
against ``W_m``, next to what the same rounding costs the base weight alone and the size of the
adapter's change; on a probe batch, the largest logit difference between the exact merged model and
the requantized one. :func:`requantize_report` measures it without changing the model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..bases.quantized import check_bnb_4bit_rows, torchao_nf4
from ..core.sharded import fsdp_managed, shard_group
from ..layers.linear import Linear
from ..variants.pissa import INITIAL_NAMES
from .params import lora_modules
from .quantize import _NF4_BLOCK, nf4_tensor
from .unwrap import unwrap_model

__all__ = ["REQUANTIZE_SCHEMES", "RequantizedLayer", "RequantizeReport", "requantize_report"]

#: What ``merge_and_unload(requantize=...)`` and :func:`requantize_report` can requantize to.
REQUANTIZE_SCHEMES = ("nf4", "bnb-nf4")


@dataclasses.dataclass(frozen=True)
class RequantizedLayer:
    """The cost of requantizing one merged ``Linear`` weight (relative Frobenius norms, computed in float64).

    Attributes:
        name: the module's qualified name.
        shape: ``(out_features, in_features)``.
        base: the base it was merged into: ``"dense"`` or the quantized kind (``"torchao-nf4"``, ``"bnb-4bit"``, ...).
        error: ``‖Q(W_m) − W_m‖ / ‖W_m‖``, ``W_m`` the exact merged weight (what ``merge_and_unload``
            gives without ``requantize``) and ``Q`` the requantization.
        base_error: ``‖Q(W) − W‖ / ‖W‖`` for the base weight ``W`` alone, with the same ``Q``. Over a dense
            base, the cost of quantizing the base itself. Over a quantized base, ``W`` is the dequantized
            weight (the float weight it was made from is gone): that weight already lies on an NF4 grid,
            so this is only what a round trip costs, and ``error`` above it is the adapter's doing. Over
            PiSSA/OLoRA's residual base, ``W`` is the original weight ``W_res + s·B₀A₀``.
        delta: ``‖W_m − W‖ / ‖W_m‖``, the adapter's change. ``error`` close to it or above means the
            rounding is as large as what the adapter changed.
    """

    name: str
    shape: Tuple[int, int]
    base: str
    error: float
    base_error: float
    delta: float


@dataclasses.dataclass(frozen=True)
class RequantizeReport:
    """What requantizing a merged model cost. ``str(report)`` is a table, one row per layer.

    Attributes:
        scheme: the requantization (``"nf4"``).
        layers: one :class:`RequantizedLayer` per requantized layer, in model order.
        max_logit_diff: ``max |logits(requantized) − logits(exact merge)|`` over the probe batch
            (both models in inference mode, without gradients; where the probe has an ``attention_mask``,
            over the positions it keeps), or None without a probe.
        max_logit: ``max |logits(exact merge)|`` over the probe batch, the scale of the difference.
    """

    scheme: str
    layers: Tuple[RequantizedLayer, ...]
    max_logit_diff: Optional[float] = None
    max_logit: Optional[float] = None

    @property
    def max_error(self) -> float:
        """The largest per-layer ``error`` (0.0 without layers)."""
        return max((row.error for row in self.layers), default=0.0)

    def __str__(self) -> str:
        width = max([len("layer")] + [len(row.name) for row in self.layers])
        lines = [f"requantized to {self.scheme}: {len(self.layers)} layers; relative Frobenius errors "
                 f"(error: the merged weight; base_error: the base weight alone; delta: the adapter's change)",
                 f"{'layer':<{width}}  {'shape':>12}  {'base':<12} {'error':>9} {'base_error':>10} {'delta':>9}"]
        for row in self.layers:
            shape = "x".join(map(str, row.shape))
            lines.append(f"{row.name:<{width}}  {shape:>12}  {row.base:<12} {row.error:9.3e} {row.base_error:10.3e} "
                         f"{row.delta:9.3e}")
        if self.max_logit_diff is not None:
            lines.append(f"probe batch: max |logit difference| {self.max_logit_diff:.4g} against the exact merge "
                         f"(max |logit| {self.max_logit:.4g})")
        return "\n".join(lines)


@dataclasses.dataclass
class _Target:
    name: str
    layer: Linear
    block: int
    scaler_block: Optional[int]  # None: the largest power of two up to 256 that divides the number of blocks
    double_quant: bool = True  # bitsandbytes: block scales quantized too (compress_statistics)


def _check_probe(fn: str, probe) -> None:
    if probe is not None and not isinstance(probe, (Tensor, Mapping)):
        raise TypeError(f"{fn}: probe must be a tensor of model inputs (e.g. input_ids) or a mapping of keyword "
                        f"inputs, got {type(probe).__name__}")


def _target(fn: str, scheme: str, name: str, layer: Linear) -> _Target:
    """The block sizes for ``layer``: the base's own where it has them; refused where NF4 cannot pack it."""
    base, shape = layer.quantized, (layer.out_features, layer.in_features)
    if layer.fan_in_fan_out:
        raise ValueError(f"{fn}: {name or 'the layer'} stores its weight (in, out) (fan_in_fan_out=True), and "
                         f"an NF4 weight is an nn.Linear's (out, in); merge it without requantize")
    block, scaler_block, double_quant = base.nf4_blocks() if base is not None else (_NF4_BLOCK, None, True)
    if scheme == "nf4" and (shape[0] * shape[1]) % block:  # bitsandbytes pads the last block, torchao cannot
        raise ValueError(f"{fn}: {name or 'the layer'} has a weight of shape {shape}: NF4 packs blocks of {block} "
                         f"weights and needs a multiple of {block} elements, got {shape[0] * shape[1]}; merge "
                         f"without requantize, then quantize the layers that pack with quantize_base(model, targets=...)")
    device = layer.quantized.device if base is not None else layer.weight.device
    if scheme == "bnb-nf4":
        check_bnb_4bit_rows(f"{fn}: {name or 'the layer'}", layer.in_features, block, device,
                            "Use requantize='nf4' (torchao), or requantize on a GPU")
    return _Target(name, layer, block, scaler_block, double_quant)


def _check_library(fn: str, scheme: str, model: nn.Module) -> None:
    if scheme == "nf4":
        try:
            torchao_nf4()
        except ImportError as exc:
            raise ImportError(f"{fn}: requantize='nf4' needs torchao, from the qlora extra: in a checkout of "
                              f"lora_layers, pip install -e \".[qlora]\"") from exc
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"{fn}: requantize='bnb-nf4' needs bitsandbytes, from the qlora extra: in a checkout of "
                          f"lora_layers, pip install -e \".[qlora]\"; requantize='nf4' needs only torchao") from exc
    config = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
    if config is not None and not (getattr(config, "load_in_4bit", False)
                                   and getattr(config, "bnb_4bit_quant_type", None) == "nf4"):
        raise ValueError(f"{fn}: requantize='bnb-nf4' on a model transformers loaded with another quantization "
                         f"({type(config).__name__}, not 4-bit nf4): its record (config.quantization_config) would "
                         f"describe layers it no longer has; use requantize='nf4' (torchao), whose merge drops the "
                         f"bitsandbytes record")


def plan_requantize(fn: str, scheme, model: nn.Module, layers, probe) -> List[_Target]:
    """The ``Linear`` LoRA layers of ``layers`` (``(name, layer)``) to requantize with ``scheme``: everything
    is checked here, before anything is computed or changed."""
    if scheme not in REQUANTIZE_SCHEMES:
        raise ValueError(f"{fn}: requantize must be None or one of {REQUANTIZE_SCHEMES}, got {scheme!r}")
    _check_probe(fn, probe)
    # Embeddings and convolutions merge as usual and stay dense.
    targets = [_target(fn, scheme, name, layer) for name, layer in layers if isinstance(layer, Linear)]
    _check_library(fn, scheme, model)
    return targets


def _base_weight(layer: Linear) -> Tensor:
    """The base weight without the adapter, dense, ``(out, in)``: for PiSSA/OLoRA the original weight
    ``W − s·B₀A₀ + s·B₀A₀`` (rounded once), not the residual, which holds the adapter's initial part."""
    if layer.quantized is not None:
        return layer.quantized.dequantize()
    weight, initial = layer.unmerged_weight(), getattr(layer, INITIAL_NAMES[0], None)
    if initial is None:
        return weight
    original = weight.to(torch.float64, copy=True)  # never the layer's own float64 weight
    for index, delta in layer._delta_blocks(initial.to(torch.float64), layer.lora_init_B.to(torch.float64)):
        original[index] += delta.to(torch.float64)
    return original.to(weight.dtype)


def exact_weight(layer: Linear) -> Tensor:
    """What ``merge_and_unload`` without ``requantize`` puts in the plain layer: ``W + ΔW``, dense."""
    if layer.quantized is not None and not layer.has_adapter:
        return layer.quantized.dequantize()
    return layer.merged_weight()


def _rel(approx: Tensor, exact: Tensor) -> float:
    """``‖approx − exact‖_F / ‖exact‖_F`` in float64 (0 when both are 0)."""
    exact64 = exact.detach().double()
    diff = torch.linalg.vector_norm(approx.detach().double() - exact64).item()
    norm = torch.linalg.vector_norm(exact64).item()
    return diff / norm if norm else (0.0 if diff == 0 else math.inf)


def _pack(scheme: str, weight: Tensor, target: _Target) -> Tensor:
    """``weight`` packed as ``scheme`` says: a torchao NF4 tensor, or a bitsandbytes ``Params4bit``."""
    if scheme == "nf4":
        return nf4_tensor(weight, target.name, target.block, target.scaler_block)
    import bitsandbytes as bnb

    try:  # bitsandbytes quantizes when the parameter moves to its device
        return bnb.nn.Params4bit(weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                 blocksize=target.block, compress_statistics=target.double_quant).to(weight.device)
    except (RuntimeError, NotImplementedError, ValueError, AssertionError) as exc:
        raise RuntimeError(f"requantize='bnb-nf4': bitsandbytes {bnb.__version__} could not quantize "
                           f"{target.name or 'the layer'} ({tuple(weight.shape)}, {weight.dtype}, on {weight.device}): "
                           f"{exc}; requantize='nf4' (torchao, pure PyTorch) runs on any device; the model was left "
                           f"unchanged") from exc


def _unpack(packed: Tensor) -> Tensor:
    """The dense weight a packed one stands for."""
    if hasattr(packed, "get_original_weight"):
        return packed.get_original_weight()
    import bitsandbytes.functional as bf

    return bf.dequantize_4bit(packed.data, packed.quant_state).to(packed.quant_state.dtype)


def _requantize(scheme: str, target: _Target, safe_merge: bool) -> Tuple[Tensor, RequantizedLayer]:
    """``(packed weight, its row of the report)`` for one layer; one exact merged weight alive at a time."""
    layer, name = target.layer, target.name
    with torch.no_grad():
        exact = exact_weight(layer)
        if safe_merge and not torch.isfinite(exact).all():
            raise ValueError(f"safe_merge: merging the adapter into {name or 'the layer'} gives non-finite values; "
                             f"the model was left unchanged")
        kind = getattr(layer.quantized, "kind", "dense")
        if scheme == "nf4" and kind == "torchao-nf4" and not layer._uses_adapter():
            packed = layer.weight.detach()  # nothing was added (r=0, or merge_and_unload(adapter=) of an adapter
            # this layer lacks): the base's own NF4 weight is the best one
        else:
            packed = _pack(scheme, exact, target)
        base = _base_weight(layer)
        row = RequantizedLayer(name, (layer.out_features, layer.in_features), kind, _rel(_unpack(packed), exact),
                               _rel(_unpack(_pack(scheme, base, target)), base), _rel(base, exact))
    return packed, row


def requantized_layers(scheme: str, targets: List[_Target], safe_merge: bool = False):
    """``({id(layer): plain layer holding the packed weight}, report rows)``; the model is not changed."""
    replaced, rows = {}, []
    for target in targets:
        packed, row = _requantize(scheme, target, safe_merge)
        replaced[id(target.layer)] = _packed_linear(target.layer, packed, target)
        rows.append(row)
    return replaced, rows


def _packed_linear(layer: Linear, packed: Tensor, target: _Target) -> nn.Module:
    """A plain ``nn.Linear`` (torchao NF4) or ``bitsandbytes.nn.Linear4bit`` holding ``packed``, frozen, and the
    layer's bias (in the weight's dtype)."""
    if isinstance(packed, nn.Parameter):  # bitsandbytes' Params4bit
        import bitsandbytes as bnb

        dtype = packed.quant_state.dtype
        plain = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                  compute_dtype=dtype, compress_statistics=target.double_quant, quant_type="nf4",
                                  device="meta")
        packed.module = plain
        plain.weight = packed
    else:
        dtype = packed.dtype
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight = nn.Parameter(packed, requires_grad=False)
    bias = layer.bias
    if bias is not None:
        plain.bias = bias if bias.dtype == dtype else nn.Parameter(bias.detach().to(dtype),
                                                                   requires_grad=bias.requires_grad)
    return plain


# ----------------------------------------------------------------------------- the probe batch

@contextlib.contextmanager
def _inference_flags(model: nn.Module):
    """Every module's ``training`` flag off, then back as it was. Set directly, not by ``eval()``: a LoRA
    layer's ``eval()`` would merge its adapter into a dense weight. bitsandbytes layers stay in training
    mode: on a CPU with AVX512-BF16, an eval-mode forward of ``Linear4bit`` repacks its weight in place for
    good, rounding its block scales to bf16 (docs/phi3.md), which the probe must not do."""
    flags = [(m, m.training) for m in model.modules()]
    for module, _ in flags:
        module.training = type(module).__module__.split(".")[0] == "bitsandbytes"
    try:
        with torch.no_grad():
            yield
    finally:
        for module, flag in flags:
            module.training = flag


def run_probe(fn: str, model: nn.Module, probe) -> Tensor:
    """The model's logits on ``probe`` (``model(probe)``, or ``model(**probe)`` for a mapping), in inference mode."""
    with _inference_flags(model):
        out = model(**probe) if isinstance(probe, Mapping) else model(probe)
    logits = out if isinstance(out, Tensor) else getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        logits = out[0]
    if not isinstance(logits, Tensor):
        raise TypeError(f"{fn}: the model's output on the probe has no logits (a tensor, a tuple starting with one, "
                        f"or an output with .logits), got {type(out).__name__}")
    return logits.detach()


def _exact_forward(layer: nn.Module, args, kwargs):
    """The layer's output as the plain layer of ``merge_and_unload`` (no requantize) computes it."""
    if isinstance(layer, Linear):
        weight, bias = exact_weight(layer), layer.bias  # (out, in): requantize refuses fan_in_fan_out
        return F.linear(args[0], weight, None if bias is None else bias.to(weight.dtype))
    plain = layer.wrapped_module()
    # Its own forward, called directly: the plain module shares the layer's hooks, this one among them.
    plain.__dict__["_parameters"] = {**plain._parameters, "weight": layer.merged_weight()}
    return plain.forward(*args, **kwargs)


def exact_logits(fn: str, model: nn.Module, layers, probe) -> Tensor:
    """The exact merged model's logits on ``probe``, without changing the model: each LoRA layer's output is
    computed from its merged weight, made in its forward and dropped after it (one at a time)."""
    return _hooked_logits(fn, model, layers, probe, lambda module, args, kwargs: _exact_forward(module, args, kwargs))


def _hooked_logits(fn, model, layers, probe, forward) -> Tensor:
    hooks = [layer.register_forward_hook(lambda m, a, k, out: forward(m, a, k), with_kwargs=True)
             for _, layer in layers]
    try:
        return run_probe(fn, model, probe)
    finally:
        for hook in hooks:
            hook.remove()


def _largest(values: Tensor, mask: Optional[Tensor]) -> float:
    """``max |values|`` over the positions ``mask`` keeps (all without one), 0.0 over none."""
    values = values.double().abs()
    if mask is not None and tuple(mask.shape) == tuple(values.shape[:-1]):
        values = values[mask.to(device=values.device, dtype=torch.bool)]
    return values.max().item() if values.numel() else 0.0


def make_report(scheme: str, rows, reference: Optional[Tensor], logits: Optional[Tensor],
                probe=None) -> RequantizeReport:
    """The report; logits are compared where the probe's ``attention_mask`` (if any) keeps a token, as padded
    positions carry no prediction."""
    if reference is None:
        return RequantizeReport(scheme, tuple(rows))
    mask = probe.get("attention_mask") if isinstance(probe, Mapping) else None
    return RequantizeReport(scheme, tuple(rows), _largest(logits.double() - reference.double(), mask),
                            _largest(reference, mask))


class Requantizer:
    """``merge_and_unload(requantize=...)``'s steps, in its order: built, it checks everything and takes the
    probe's exact logits (nothing changed yet); :meth:`layers` makes the 4-bit layers, one exact merged weight
    at a time; :meth:`attach` runs the probe on the merged model and attaches the report."""

    def __init__(self, fn: str, model: nn.Module, layers, scheme, probe):
        if scheme is None:
            raise ValueError(f"{fn}: probe= measures what requantize costs; pass requantize='nf4' with it "
                             f"(got requantize=None and a {type(probe).__name__} probe)")
        self.fn, self.scheme, self.probe, self.rows = fn, scheme, probe, []
        self.targets = plan_requantize(fn, scheme, model, layers, probe)
        self.reference = None if probe is None else exact_logits(fn, model, layers, probe)

    def layers(self, safe_merge: bool) -> Dict[int, nn.Module]:
        """``{id(LoRA layer): its 4-bit plain layer}``; the model is not changed."""
        replaced, self.rows = requantized_layers(self.scheme, self.targets, safe_merge)
        return replaced

    @staticmethod
    def needs_quantizer(module: nn.Module) -> bool:
        """Whether ``module`` needs transformers' record of a bitsandbytes quantization: only bitsandbytes
        layers do (torchao's NF4 ones are not in it)."""
        return type(module).__module__.split(".")[0] == "bitsandbytes"

    def attach(self, model: nn.Module) -> nn.Module:
        """``model`` (merged), carrying its :class:`RequantizeReport` as ``model.requantize_report``."""
        logits = None if self.probe is None else run_probe(self.fn, model, self.probe)
        model.requantize_report = make_report(self.scheme, self.rows, self.reference, logits, self.probe)
        return model


def requantize_report(model: nn.Module, scheme: str = "nf4", probe=None) -> RequantizeReport:
    """What ``merge_and_unload(model, requantize=scheme, probe=probe)`` would cost, measured without changing
    ``model``: the same :class:`RequantizeReport` that call attaches to the merged model.

    Args:
        model: a model with LoRA layers (over quantized or dense bases).
        scheme: ``"nf4"`` (torchao NF4, :func:`~lora_layers.quantize_base`'s format) or ``"bnb-nf4"``
            (bitsandbytes' nf4).
        probe: None, or inputs to run the model on (``model(probe)``, or ``model(**probe)`` for a mapping),
            e.g. a batch of ``input_ids``: the report then gives the largest logit difference.

    Raises:
        ValueError: an unknown ``scheme``; a ``Linear`` LoRA layer it cannot pack (as
            :func:`~lora_layers.merge_and_unload` with ``requantize``); a model sharded by ``fully_shard``.
        TypeError: ``probe`` is neither a tensor nor a mapping, or the model's output has no logits.
    """
    model = unwrap_model(model)
    if shard_group(model) is not None or any(fsdp_managed(m) for m in model.modules()):
        raise ValueError(f"requantize_report: {type(model).__name__} is sharded by fully_shard; measure the model "
                         f"before sharding it, or one process's copy of it")
    layers = list(lora_modules(model))
    targets = plan_requantize("requantize_report", scheme, model, layers, probe)
    packed: Dict[int, Tensor] = {}
    rows = []
    for target in targets:
        packed[id(target.layer)], row = _requantize(scheme, target, False)
        rows.append(row)
    if probe is None:
        return make_report(scheme, rows, None, None)
    reference = exact_logits("requantize_report", model, layers, probe)

    def requantized_forward(module, args, kwargs):
        if id(module) not in packed:  # not requantized (an embedding, a convolution): merged, as merge_and_unload
            return _exact_forward(module, args, kwargs)
        target = next(t for t in targets if t.layer is module)
        return _packed_linear(module, packed[id(module)], target)(*args, **kwargs)

    logits = _hooked_logits("requantize_report", model, layers, probe, requantized_forward)
    return make_report(scheme, rows, reference, logits, probe)
