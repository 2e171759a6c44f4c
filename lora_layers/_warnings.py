"""The loud side of deliberate differences from loralib: warnings shown once per process."""
from __future__ import annotations

import contextlib
import threading
import warnings

__all__ = ["name_some", "quiet_state_dict", "warn_unmerged_state_dict"]

_WARNED_UNMERGED_STATE_DICT = False
_QUIET = threading.local()


def name_some(names, limit: int = 5) -> str:
    """``'a', 'b', 'c' and 4 more``: a warning names a few, so that a large model does not flood the log."""
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


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
