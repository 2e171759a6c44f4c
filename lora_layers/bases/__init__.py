"""Frozen bases other than a float weight: quantized linears (bitsandbytes 4/8-bit,
torchao NF4) seen as ``x Wᵀ``, ``g W`` and ``W``. Their packages are imported lazily.
"""
from . import quantized
from .quantized import *  # noqa: F401,F403  (each module's __all__)

__all__ = [*quantized.__all__]
