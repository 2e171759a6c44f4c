"""QLoRA preparation: quantize the frozen base that LoRA will adapt.

:func:`quantize_base` turns the frozen ``nn.Linear`` weights a later
``apply_lora`` / ``inject_lora`` would adapt into torchao NF4 tensors, in
place; the LoRA layers then run over them (:mod:`lora_layers.quantized`).
Models loaded with a bitsandbytes ``BitsAndBytesConfig`` need nothing here.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import torch.nn as nn
from torch import Tensor

from ..core.sharded import is_sharded
from ..layers.ties import parameter_holders
from .unwrap import unwrap_model
from ..bases.quantized import is_quantized_linear, torchao_nf4
from .families import default_targets
from .surgery import ALL_LINEAR, select_modules

__all__ = ["SCHEMES", "quantize_base"]

#: What :func:`quantize_base` can do.
SCHEMES = ("nf4",)
_NF4_BLOCK = 64          # torchao's NF4 block: 64 weights share one scale
_NF4_SCALER_BLOCK = 256  # and 256 scales share one fp32 factor (smaller when the shape needs it)


def nf4_tensor(weight: Tensor, name: str, block: int = _NF4_BLOCK, scaler_block: Optional[int] = None) -> Tensor:
    """torchao's NF4 of ``weight``: blocks of ``block`` weights, and ``scaler_block`` scales sharing one factor
    (None: the largest power of two up to 256 that divides the number of blocks)."""
    numel = weight.numel()
    if numel % block:
        raise ValueError(f"quantize_base: {name}.weight has shape {tuple(weight.shape)}: NF4 needs a multiple of "
                         f"{block} elements, got {numel}")
    if scaler_block is None:
        scaler_block = math.gcd(numel // block, _NF4_SCALER_BLOCK)
    return torchao_nf4().to_nf4(weight.detach().contiguous(), block, scaler_block)


def quantize_base(model: nn.Module, scheme: str = "nf4",
                  targets: Union[None, str, Sequence[str]] = None) -> List[str]:
    """Quantize, in place, the frozen ``nn.Linear`` weights that LoRA will adapt (QLoRA with torchao).

    Each selected ``nn.Linear`` keeps its class and its bias; its ``weight``
    becomes a frozen torchao NF4 tensor (blocks of 64 weights, about 0.26× the
    bf16 bytes). Call it before :func:`~lora_layers.phi3.apply_lora` or
    :func:`~lora_layers.inject_lora`, which then wrap the quantized layers.

    Args:
        model: the model.
        scheme: ``"nf4"`` (torchao's NF4, the QLoRA data type).
        targets: as :func:`~lora_layers.inject_lora`'s ``targets``. None: what a
            following ``apply_lora`` would take (Phi-3's four projections for a
            Phi-3 model, else ``"all-linear"``, which leaves out the output head).

    Returns:
        The qualified names of the quantized modules, in model order.

    Raises:
        ValueError: an unknown ``scheme``, a target that matches nothing or a
            module that is not a plain ``nn.Linear`` (already quantized, or a LoRA
            layer), a weight sharded by ``fully_shard`` (quantize before sharding), a
            weight another module also holds (tied), or a weight whose size NF4
            cannot pack. The model is unchanged.
        ImportError: torchao is not installed (in a checkout: ``pip install -e ".[qlora]"``).
    """
    model = unwrap_model(model, changes_parameters="quantize_base")
    if scheme not in SCHEMES:
        raise ValueError(f"quantize_base: scheme must be one of {SCHEMES}, got {scheme!r}")
    if targets is None:
        targets = default_targets(model) or ALL_LINEAR
    plan = select_modules(model, targets)
    wrong = [f"{n} ({'already quantized' if is_quantized_linear(m) else type(m).__name__})" for n, m in plan
             if type(m) is not nn.Linear or is_quantized_linear(m)]
    if wrong:
        raise ValueError(f"quantize_base: only plain nn.Linear layers with a float weight can be quantized, got "
                         f"{wrong}")
    sharded = [n for n, m in plan if is_sharded(m.weight)]
    if sharded:
        raise ValueError(f"quantize_base: {sharded} are sharded by fully_shard (their weights are DTensors); "
                         f"quantize the float model first, then apply_lora, then fully_shard (an NF4 weight "
                         f"shards as NF4: docs/distributed.md)")
    # A weight held by another module too (tied embeddings, a shared layer) would be quantized into
    # separate copies: the tie would be silently broken and the memory doubled.
    holders = parameter_holders(model)
    tied = [f"{n}.weight (also {sorted(set(holders[id(m.weight)].values()) - {n + '.weight'})})" for n, m in plan
            if len(holders[id(m.weight)]) > 1]
    if tied:
        raise ValueError(f"quantize_base: these weights are shared with other modules, and quantizing them "
                         f"would untie them: {tied}; leave them out of targets")
    try:
        torchao_nf4()
    except ImportError as exc:
        raise ImportError("quantize_base needs torchao, from the qlora extra: in a checkout of lora_layers, "
                          "pip install -e \".[qlora]\" (lora_layers is not on the package index)") from exc
    packed = [(m, nf4_tensor(m.weight, n)) for n, m in plan]  # everything packs before anything changes
    for module, weight in packed:
        module.weight = nn.Parameter(weight, requires_grad=False)
    return [n for n, _ in plan]
