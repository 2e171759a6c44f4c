"""Tied weights: which LoRA layers share their base weight with another module.

Merging adds ``s·BA`` into the weight *in place*. When that Parameter is also
another module's (``lm_head.weight is embed_tokens.weight``), a merge changes
that module too: its outputs go wrong, and with two adapters on one tensor the
deltas add up. So a LoRA layer whose weight is shared never merges: ``eval()``
keeps it unmerged (its output stays exact), and an explicit merge raises.

A layer learns that its weight is shared in two ways:

* :func:`find_shared_weights` scans a model (every model-level entry point calls
  it: ``inject_lora``, ``mark_only_lora_as_trainable``, ``merge_lora``,
  ``merge_and_unload``, ...). Inside that model its answer is exact, and it
  also clears a stale mark after the weights were untied.
* A hook on parameter registration (torch's global
  ``register_module_parameter_registration_hook``) sees ties made later by
  assignment, the way weights are tied: ``head.weight = emb.weight``. When the
  Parameter assigned is a LoRA layer's weight, or is assigned *to* a built
  LoRA layer's ``weight``, that layer is marked. The second case cannot see
  where the Parameter came from, so it is conservative: a layer handed a fresh
  Parameter stays unmerged until a model-level call rescans it.
"""
from __future__ import annotations

import weakref
from typing import Dict, Optional

import torch.nn as nn
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["SHARED_ATTR", "register_weight", "find_shared_weights", "shared_weight_reason"]

#: Instance attribute of a LoRA layer: None, or a sentence saying what else holds its weight.
SHARED_ATTR = "_shared_weight"
# LoRA layers' base weights -> weakref to the layer (so a later registration elsewhere is a tie).
_OWNERS = WeakIdKeyDictionary()
# Set while a layer loads a state_dict with assign=True, whose new weight is not a tie.
LOADING_ATTR = "_lora_loading"


def register_weight(layer: nn.Module) -> None:
    """Remember ``layer.weight`` as a LoRA layer's base weight."""
    _OWNERS[layer.weight] = weakref.ref(layer)


def _is_lora(module) -> bool:
    return SHARED_ATTR in module.__dict__


def _on_parameter_registered(module: nn.Module, name: str, param) -> None:
    if param is None:
        return
    ref = _OWNERS.get(param)
    owner = ref() if ref is not None else None
    if owner is not None and owner is not module and owner._parameters.get("weight") is param:
        owner.__dict__[SHARED_ATTR] = f"its weight was also registered as {type(module).__name__}.{name}"
        if _is_lora(module) and name == "weight":
            module.__dict__[SHARED_ATTR] = f"its weight was assigned from another {type(owner).__name__}"
    elif (_is_lora(module) and name == "weight" and not module.__dict__.get(LOADING_ATTR)
          and module._parameters.get("weight") is not param):
        module.__dict__[SHARED_ATTR] = ("its weight was assigned after construction, which is how weights "
                                        "are tied (a model-level call such as mark_only_lora_as_trainable "
                                        "rescans it)")


_HOOK = nn.modules.module.register_module_parameter_registration_hook(_on_parameter_registered)


def find_shared_weights(model: nn.Module) -> Dict[str, str]:
    """Mark every LoRA layer of ``model`` whose weight another module of ``model``
    also holds, and unmark the others. Returns ``{layer name: what shares it}``."""
    # id(param) -> {(id(module), param name): a qualified name}; a module reachable
    # under two paths (an alias) holds its weight once.
    holders: Dict[int, Dict[tuple, str]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for p_name, p in module._parameters.items():
            if p is not None:
                slots = holders.setdefault(id(p), {})
                slots.setdefault((id(module), p_name), f"{mod_name}.{p_name}" if mod_name else p_name)
    shared = {}
    for mod_name, module in model.named_modules():
        if not _is_lora(module) or module._parameters.get("weight") is None:
            continue
        slots = holders.get(id(module.weight), {})
        others = sorted(name for key, name in slots.items() if key != (id(module), "weight"))
        if others:
            module.__dict__[SHARED_ATTR] = f"its weight is also {', '.join(others)} (tied weights)"
            shared[mod_name] = module.__dict__[SHARED_ATTR]
        else:
            module.__dict__[SHARED_ATTR] = None
    return shared


def shared_weight_reason(layer: nn.Module) -> Optional[str]:
    """Why ``layer`` must not merge because of a shared weight, or None if its weight is its own."""
    why = layer.__dict__.get(SHARED_ATTR)
    if why is None:
        return None
    return (f"{why}; merging would change every module that holds it. Untie it first (give the layer its "
            f"own copy, e.g. layer.weight = nn.Parameter(layer.weight.detach().clone()), and set the model's "
            f"tie_word_embeddings=False), or keep the adapter separate (unload(), save_lora, export_peft)")
