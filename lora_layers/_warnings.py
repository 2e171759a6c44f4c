"""The loud side of deliberate differences from loralib: warnings shown once per process."""
from __future__ import annotations

import contextlib
import threading
import warnings

__all__ = ["quiet_state_dict", "warn_unmerged_state_dict", "warn_conv_layout_switch"]

_WARNED_UNMERGED_STATE_DICT = False
_WARNED_CONV_LAYOUT = False
_QUIET = threading.local()


@contextlib.contextmanager
def quiet_state_dict():
    """Within this block, state_dict() of a merged layer does not warn (the library's own calls)."""
    before = getattr(_QUIET, "on", False)
    _QUIET.on = True
    try:
        yield
    finally:
        _QUIET.on = before


def warn_unmerged_state_dict(adapter_B) -> None:
    """state_dict() of a merged layer holds the unmerged weight, where loralib's held the merged one.

    Warned once per process, and only when it matters (``adapter_B`` non-zero).
    """
    global _WARNED_UNMERGED_STATE_DICT
    if _WARNED_UNMERGED_STATE_DICT or getattr(_QUIET, "on", False) or not adapter_B.any():
        return
    _WARNED_UNMERGED_STATE_DICT = True
    warnings.warn(
        "lora_layers: state_dict() of a merged (eval-mode) LoRA layer holds the UNMERGED base weight next to "
        "the adapter, so reloading it never counts the adapter twice. loralib wrote the merged weight here: "
        "if you meant to export merged weights, use lora_layers.merged_state_dict(model) (or "
        "merge_and_unload(model)). This warning is shown once per process.",
        UserWarning, stacklevel=5)


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
