"""Autocast switches shared by the autograd Functions (the lowest layer: imports only torch)."""
from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast_available", "no_autocast"]


def autocast_available(device_type: str) -> bool:
    """Whether torch has an autocast for ``device_type`` (``meta``, for one, has none)."""
    return torch.amp.is_autocast_available(device_type)


def no_autocast(device_type: str):
    """A context with autocast off on ``device_type``: the Functions choose their dtypes up front,
    and autocast must not re-cast inside them. A no-op where the device has no autocast."""
    if autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
