"""Autocast: the dtype a layer computes in, and the switch the autograd Functions use
(the lowest layer: imports only torch)."""
from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast_available", "no_autocast", "compute_dtype"]

# The dtypes autocast lowers; it never touches float64 (or complex, or integers).
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def autocast_available(device_type: str) -> bool:
    """Whether torch has an autocast for ``device_type`` (``meta``, for one, has none)."""
    return torch.amp.is_autocast_available(device_type)


def no_autocast(device_type: str):
    """A context with autocast off on ``device_type``: the Functions choose their dtypes up front,
    and autocast must not re-cast inside them. A no-op where the device has no autocast."""
    if autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def compute_dtype(x: torch.Tensor, weight: torch.Tensor, error: type, message: str) -> torch.dtype:
    """The dtype a projection of ``x`` by ``weight`` computes in: autocast's while autocast is on
    for ``x``'s device and ``x`` is a dtype it lowers, else ``x``'s, which must then equal the
    weight's (as ``nn.Linear`` requires).

    Raises:
        error: ``message.format(x=x.dtype, w=weight.dtype)``, when the two dtypes differ
            outside autocast.
    """
    device = x.device.type
    if x.dtype in _AUTOCAST_ELIGIBLE and autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    if x.dtype != weight.dtype:
        raise error(message.format(x=x.dtype, w=weight.dtype))
    return x.dtype
