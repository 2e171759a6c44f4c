"""What generic model-level code needs from a model family, registered by :mod:`lora_layers.models`.

Only ``lora_layers.models`` names a model family. The generic tiers (surgery,
:func:`~lora_layers.quantize_base`, :func:`~lora_layers.load_lora`'s hints) consult
these registries and never import a family's module; a family module fills them
when it is imported (``import lora_layers`` imports every family).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch.nn as nn

__all__ = ["DEFAULT_TARGETS", "FITTING_CALLS", "UNLOAD_STEPS", "default_targets", "undo_family_changes"]

#: ``config.model_type`` -> the projections a family's preset adapts (and ``quantize_base`` quantizes).
DEFAULT_TARGETS: Dict[str, Tuple[str, ...]] = {}

#: Functions ``(model, saved_modules, targets, args) -> str or None``: a family's own call that builds
#: the adapters a checkpoint header records (``lora_layers.phi3.apply_lora(model, r=32)``), or None.
FITTING_CALLS: List[Callable[..., Optional[str]]] = []

#: Functions ``(model) -> None`` that take a family's module swaps out again (Phi-3's lean norms,
#: MLPs and forward); ``merge_and_unload`` and ``unload`` run each, so their result is plain torch.
UNLOAD_STEPS: List[Callable[[nn.Module], None]] = []


def default_targets(model: nn.Module) -> Optional[List[str]]:
    """The registered targets of ``model``'s family (by ``model.config.model_type``), or None."""
    model_type: Any = getattr(getattr(model, "config", None), "model_type", None)
    targets = DEFAULT_TARGETS.get(model_type) if isinstance(model_type, str) else None
    return None if targets is None else list(targets)


def undo_family_changes(model: nn.Module) -> None:
    """Run every registered unload step on ``model``."""
    for step in UNLOAD_STEPS:
        step(model)
