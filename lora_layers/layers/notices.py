"""The loud side of deliberate differences from loralib: warnings shown once per process."""
from __future__ import annotations

import warnings

__all__ = ["name_some", "warn_conv_layout_switch", "warn_conv_lora_only_biases", "warn_lora_named_parameters",
           "warn_merged_export_as_base", "warn_wrapper_keys"]

_WARNED_WRAPPER_KEYS = False
_WARNED_CONV_LAYOUT = False
_WARNED_CONV_LORA_ONLY = False
_WARNED_MERGED_EXPORT = False
_WARNED_LORA_NAMED = set()  # the functions that warned about 'lora_'-named non-adapter parameters


def name_some(names, limit: int = 5) -> str:
    """``'a', 'b', 'c' and 4 more``: a warning names a few, so that a large model does not flood the log."""
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def warn_wrapper_keys(wrapper) -> None:
    """lora_state_dict of a compiled or DDP model is keyed by the bare model's names, where loralib kept
    the wrapper's prefix. Warned once per process."""
    global _WARNED_WRAPPER_KEYS
    if _WARNED_WRAPPER_KEYS:
        return
    _WARNED_WRAPPER_KEYS = True
    warnings.warn(
        f"lora_layers: lora_state_dict of a wrapped model ({type(wrapper).__name__}) is keyed by the bare "
        f"model's names (no '_orig_mod.' or 'module.' prefix), where loralib kept the wrapper's prefix. The "
        f"wrapper's own load_state_dict(sd, strict=False) would silently load none of these keys: load them "
        f"with lora_layers.load_lora, or into the bare model (compiled._orig_mod, ddp.module). This warning "
        f"is shown once per process.",
        UserWarning, stacklevel=3)


def warn_conv_layout_switch(layer_class: str, shapes, dropout: float) -> None:
    """A loralib-shaped adapter loaded into a fresh conv layer switched it to loralib's layout.

    Warned once per process: a model's conv layers switch together on one load.
    """
    global _WARNED_CONV_LAYOUT
    if _WARNED_CONV_LAYOUT:
        return
    _WARNED_CONV_LAYOUT = True
    warnings.warn(
        f"lora_layers: a loralib conv adapter (lora_A {shapes[0]}, lora_B {shapes[1]}: rank r·k) was loaded into "
        f"a fresh {layer_class} built with the default layout='lora_layers' (rank r), so that layer switched to "
        f"layout='loralib' and now gives loralib's outputs: ΔW = (B A).view(weight.shape), and lora_dropout "
        f"is not applied{f' (this layer has lora_dropout={dropout})' if dropout else ''}, as in loralib. "
        f"Other conv layers loading such adapters switch too; build them with layout='loralib' to say so in "
        f"the code. This warning is shown once per process.",
        UserWarning, stacklevel=4)


def warn_conv_lora_only_biases(names) -> None:
    """mark_only_lora_as_trainable(bias="lora_only") trains conv LoRA layers' biases, which loralib's
    conv layers (the bias is their wrapped ``conv.bias``) leave frozen. Warned once per process."""
    global _WARNED_CONV_LORA_ONLY
    if _WARNED_CONV_LORA_ONLY:
        return
    _WARNED_CONV_LORA_ONLY = True
    warnings.warn(
        f"lora_layers: mark_only_lora_as_trainable(bias='lora_only') trains the biases of the LoRA conv layers "
        f"({name_some(names)}), as of every LoRA layer. loralib leaves them frozen (its conv layers keep the "
        f"bias in their wrapped conv, which its 'lora_only' does not look at), so training differs from "
        f"loralib's: to train as loralib did, set requires_grad_(False) on these biases after the call. This "
        f"warning is shown once per process.",
        UserWarning, stacklevel=3)


def warn_merged_export_as_base(weight_key: str) -> None:
    """A weight saved merged (eval mode) whose adapter keys were all removed from the state dict loaded as
    a base weight. Warned once per process: a model's layers load together."""
    global _WARNED_MERGED_EXPORT
    if _WARNED_MERGED_EXPORT:
        return
    _WARNED_MERGED_EXPORT = True
    warnings.warn(
        f"lora_layers: {weight_key} was saved merged (eval mode) and the state dict holds none of its layer's "
        f"adapter keys, so it is loaded as a base weight (a merged export, as with loralib), with the adapter "
        f"merged into it. Loading that same adapter afterwards would count it twice. This warning is shown "
        f"once per process.",
        UserWarning, stacklevel=6)


def warn_lora_named_parameters(function: str, names) -> None:
    """Parameters whose names contain ``lora_`` but that are no LoRA layer's adapter: loralib's name test
    would have trained (``mark_only_lora_as_trainable``) or saved (``lora_state_dict``) them. Warned once
    per process and function."""
    if function in _WARNED_LORA_NAMED:
        return
    _WARNED_LORA_NAMED.add(function)
    done = {"mark_only_lora_as_trainable": "froze", "lora_state_dict": "left out the trainable parameters"}[function]
    warnings.warn(
        f"lora_layers: {function} {done} {name_some(names)}: their names contain 'lora_', so loralib's "
        f"{function} would have {'trained' if function.startswith('mark') else 'saved'} them, but they are no "
        f"LoRA layer's adapter (lora_layers finds adapters by identity: the lora_* Parameters of its LoRA "
        f"layers and of LoRALayer subclasses). If they are adapters of your own, make them subclass "
        f"lora_layers.LoRALayer, or set requires_grad and save them yourself. This warning is shown once per "
        f"process.",
        UserWarning, stacklevel=3)
