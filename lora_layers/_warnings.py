"""The loud side of deliberate differences from loralib: warnings shown once per process."""
from __future__ import annotations

import warnings

__all__ = ["warn_wrapper_keys"]

_WARNED_WRAPPER_KEYS = False


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
