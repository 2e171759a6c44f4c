"""The LoRA layers: the :class:`LoRALayer` mixin, ``Linear``, ``MergedLinear``,
``Embedding``, ``Conv1d/2d/3d``, their merge lifecycle, tied-weight tracking and the
one-time notices where lora_layers deliberately differs from loralib.
"""
from . import base, merge_state, conv, ties, notices
from .base import *  # noqa: F401,F403  (each module's __all__)
from .merge_state import *  # noqa: F401,F403  (each module's __all__)
from .conv import *  # noqa: F401,F403  (each module's __all__)
from .ties import *  # noqa: F401,F403  (each module's __all__)
from .notices import *  # noqa: F401,F403  (each module's __all__)

__all__ = [*base.__all__, *merge_state.__all__, *conv.__all__, *ties.__all__, *notices.__all__]
