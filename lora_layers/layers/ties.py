"""Tied weights: which LoRA layers share their base weight with another module.

Merging adds ``s·BA`` into the weight *in place*. When that Parameter is also
another module's (``lm_head.weight is embed_tokens.weight``), a merge changes
that module too: its outputs go wrong, and with two adapters on one tensor the
deltas add up. So a LoRA layer whose weight is shared never merges: ``eval()``
keeps it unmerged (its output stays exact), and an explicit merge raises.

A layer learns that its weight is shared in three ways:

* :func:`find_shared_weights` scans a model (every model-level entry point calls
  it: ``inject_lora``, ``mark_only_lora_as_trainable``, ``merge_lora``,
  ``merge_and_unload``, ...). Inside that model its answer is exact, and it
  also clears a stale mark after the weights were untied, unless another live
  LoRA layer *outside* the model still holds the same Parameter (one base
  module wrapped by two models' adapters): that mark stays.
* A hook on parameter registration (torch's global
  ``register_module_parameter_registration_hook``) sees ties made later by
  assignment, the way weights are tied: ``head.weight = emb.weight``. When the
  Parameter assigned is a LoRA layer's weight, or is assigned *to* a built
  LoRA layer's ``weight``, that layer is marked. The second case cannot see
  where the Parameter came from, so it is conservative: a layer handed a fresh
  Parameter stays unmerged until a model-level call rescans it.
* ``from_module`` (:func:`check_adopted`) looks at who else holds the
  Parameter it adopts, so a tie made *before* wrapping (a loaded, tied model
  whose ``lm_head`` is then wrapped by hand) and one base module wrapped twice
  are seen without a model-level call. The same hook keeps a weak record of
  every ``(module, name)`` that registered each Parameter; a recorded module
  that still holds it, other than the module being wrapped, is a tie (another
  LoRA layer holding it is marked too).

LoRA layers are recorded at construction, at ``from_module``, when a state_dict
gives them a new weight and when they are restored by ``copy.deepcopy``,
``pickle`` or ``torch.load`` (``LoRALayer.__setstate__``), so a tie made after
a copy is seen.

Limits: the record only knows registrations made after ``lora_layers`` was
imported. Plain modules restored by ``deepcopy``/``pickle``/``torch.load`` do
not re-register their Parameters, so a tie *between plain modules* of a copied
or unpickled model is not seen by ``from_module`` alone; the model-level scan
(``inject_lora`` or any model-level call) still finds it. The module being
wrapped is never counted, even if the caller keeps using it next to the LoRA
layer.
"""
from __future__ import annotations

import weakref
from typing import Dict, List, Optional, Tuple

import torch.nn as nn

__all__ = ["SHARED_ATTR", "register_weight", "check_adopted", "parameter_holders", "find_shared_weights",
           "shared_weight_reason"]

#: Instance attribute of a LoRA layer: None, or a sentence saying what else holds its weight.
SHARED_ATTR = "_shared_weight"
# id(Parameter) -> [(weakref to a module, name)] that registered it (LoRA layers' weights
# included). Keyed by id, not by a weak reference to the Parameter: torch refuses to swap a
# tensor that has a weak reference (Module.to/.float/.cuda of a tensor-subclass Parameter such
# as torchao's NF4 or a DTensor). A holder counts only while it still holds a Parameter of that
# id (which keeps it alive, so the id is not reused); entries that no longer do are pruned as the
# record grows.
_HOLDERS: Dict[int, List[Tuple[weakref.ref, str]]] = {}
_PRUNE_AT = [1024]
# Set while a layer loads a state_dict with assign=True, whose new weight is not a tie.
LOADING_ATTR = "_lora_loading"


def _live_holders(param) -> List[Tuple[nn.Module, str]]:
    """The recorded modules that hold ``param`` now, with the name they hold it under."""
    live = ((ref(), name) for ref, name in _HOLDERS.get(id(param), ()))
    return [(m, name) for m, name in live if m is not None and m._parameters.get(name) is param]


def _prune() -> None:
    """Drop the holders that are dead or hold another Parameter now, and the ids left with none."""
    for key, holders in list(_HOLDERS.items()):
        live = [(ref, name) for ref, name in holders
                if ref() is not None and id(ref()._parameters.get(name)) == key]
        if live:
            _HOLDERS[key] = live
        else:
            del _HOLDERS[key]
    _PRUNE_AT[0] = max(1024, 2 * len(_HOLDERS))


def _record(module: nn.Module, name: str, param) -> None:
    """Add ``(module, name)`` to ``param``'s holders, dropping the dead or replaced entries."""
    kept = [(m, n) for m, n in _live_holders(param) if not (m is module and n == name)]
    _HOLDERS[id(param)] = [(weakref.ref(m), n) for m, n in kept] + [(weakref.ref(module), name)]
    if len(_HOLDERS) > _PRUNE_AT[0]:
        _prune()


def _lora_holders(param, exclude: nn.Module) -> List[nn.Module]:
    """Live LoRA layers other than ``exclude`` whose base weight is ``param``."""
    return [m for m, name in _live_holders(param) if m is not exclude and name == "weight" and _is_lora(m)]


def register_weight(layer: nn.Module) -> None:
    """Remember ``layer.weight`` as a LoRA layer's base weight."""
    weight = layer._parameters.get("weight")
    if weight is not None:
        _record(layer, "weight", weight)


def check_adopted(layer: nn.Module, wrapped: nn.Module) -> None:
    """After ``from_module``: mark ``layer`` if a module other than ``wrapped`` already holds its
    weight, and mark every other LoRA layer that holds it."""
    weight = layer._parameters.get("weight")
    if weight is None:
        return
    others = [(m, n) for m, n in _live_holders(weight) if m is not layer and m is not wrapped]
    if others:
        names = sorted({f"{type(m).__name__}.{n}" for m, n in others})
        layer.__dict__[SHARED_ATTR] = f"its weight is also held by {', '.join(names)} (tied before wrapping)"
        for m in _lora_holders(weight, exclude=layer):
            m.__dict__[SHARED_ATTR] = f"its weight was also wrapped by another {type(layer).__name__}"


def _is_lora(module) -> bool:
    return SHARED_ATTR in module.__dict__


def _on_parameter_registered(module: nn.Module, name: str, param) -> None:
    if param is None:
        return
    owners = _lora_holders(param, exclude=module)
    for owner in owners:
        owner.__dict__[SHARED_ATTR] = f"its weight was also registered as {type(module).__name__}.{name}"
    if owners:
        if _is_lora(module) and name == "weight":
            module.__dict__[SHARED_ATTR] = f"its weight was assigned from another {type(owners[0]).__name__}"
    elif (_is_lora(module) and name == "weight" and not module.__dict__.get(LOADING_ATTR)
          and module._parameters.get("weight") is not param):
        module.__dict__[SHARED_ATTR] = ("its weight was assigned after construction, which is how weights "
                                        "are tied (a model-level call such as mark_only_lora_as_trainable "
                                        "rescans it)")
    _record(module, name, param)


_HOOK = nn.modules.module.register_module_parameter_registration_hook(_on_parameter_registered)


def parameter_holders(model: nn.Module) -> Dict[int, Dict[tuple, str]]:
    """``id(param) -> {(id(module), param name): a qualified name}`` over ``model``. A module
    reachable under two paths (an alias) holds its parameters once, so more than one entry
    means the parameter is shared by distinct modules or names."""
    holders: Dict[int, Dict[tuple, str]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for p_name, p in module._parameters.items():
            if p is not None:
                slots = holders.setdefault(id(p), {})
                slots.setdefault((id(module), p_name), f"{mod_name}.{p_name}" if mod_name else p_name)
    return holders


def find_shared_weights(model: nn.Module) -> Dict[str, str]:
    """Mark every LoRA layer of ``model`` whose weight another module of ``model``
    (or another live LoRA layer outside it) also holds, and unmark the others.
    Returns ``{layer name: what shares it}``."""
    holders = parameter_holders(model)
    inside = {id(module) for module in model.modules()}
    shared = {}
    for mod_name, module in model.named_modules():
        if not _is_lora(module) or module._parameters.get("weight") is None:
            continue
        slots = holders.get(id(module.weight), {})
        others = sorted(name for key, name in slots.items() if key != (id(module), "weight"))
        outside = [m for m in _lora_holders(module.weight, exclude=module) if id(m) not in inside]
        if others:
            module.__dict__[SHARED_ATTR] = f"its weight is also {', '.join(others)} (tied weights)"
        elif outside:
            module.__dict__[SHARED_ATTR] = (f"its weight is also the weight of a {type(outside[0]).__name__} "
                                            f"outside this model (one base module wrapped twice)")
        else:
            module.__dict__[SHARED_ATTR] = None
        if module.__dict__[SHARED_ATTR] is not None:
            shared[mod_name] = module.__dict__[SHARED_ATTR]
    return shared


def shared_weight_reason(layer: nn.Module) -> Optional[str]:
    """Why ``layer`` must not merge because of a shared weight, or None if its weight is its own."""
    why = layer.__dict__.get(SHARED_ATTR)
    if why is None:
        return None
    return (f"{why}; merging would change every module that holds it. Untie it first (give the layer its "
            f"own copy, e.g. layer.weight = nn.Parameter(layer.weight.detach().clone()), and set the model's "
            f"tie_word_embeddings=False), or keep the adapter separate (unload(), save_lora, export_peft)")
