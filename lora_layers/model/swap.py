"""Putting one module in another's place everywhere a model holds it: the one swap that
``inject_lora``, ``merge_and_unload``, ``unload``, ``import_peft`` and ``load_adapter`` use."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch.nn as nn

__all__ = ["swap_modules"]


def _parent_slots(model: nn.Module, wanted: set) -> Dict[int, List[Tuple[nn.Module, str]]]:
    """Every (parent, child_name) through which each wanted module is reachable
    (a module shared by two parents is replaced in both)."""
    slots: Dict[int, List[Tuple[nn.Module, str]]] = {i: [] for i in wanted}
    seen = set()
    for _, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in parent._modules.items():
            if child is not None and id(child) in wanted and (id(parent), child_name) not in seen:
                seen.add((id(parent), child_name))
                slots[id(child)].append((parent, child_name))
    return slots


def swap_modules(model: nn.Module, replacements: Dict[int, nn.Module]) -> nn.Module:
    """Put ``replacements[id(old)]`` wherever ``model`` holds ``old``: under every parent and name,
    so a module shared by two parents becomes one new module that both see.

    Returns the root, which is the replacement itself when ``model`` is one of the replaced modules.
    """
    for old_id, slots in _parent_slots(model, set(replacements)).items():
        for parent, child_name in slots:
            setattr(parent, child_name, replacements[old_id])
    return replacements.get(id(model), model)
