"""LoRA variants, one file each: a different delta, init or row scale over the same core.

A variant that rescales the adapted output rows implements the core's row-scale hook
(:class:`lora_layers.core.row_scale.RowScale`) and passes it to
:func:`lora_layers.core.functional.lora_linear` as ``row_scale=``; DoRA (:mod:`.dora`) is one.
A new initialisation is a pure function of the weight: PiSSA and OLoRA (:mod:`.pissa`).
"""
from . import dora, pissa
from .dora import *  # noqa: F401,F403  (each module's __all__)
from .pissa import *  # noqa: F401,F403

__all__ = [*dora.__all__, *pissa.__all__]
