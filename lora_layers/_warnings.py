"""The loud side of deliberate differences from loralib: warnings shown once per process."""
from __future__ import annotations

import contextlib
import threading
import warnings

__all__ = ["quiet_state_dict", "warn_unmerged_state_dict", "warn_wrapper_keys"]

_WARNED_UNMERGED_STATE_DICT = False
_WARNED_WRAPPER_KEYS = False
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
