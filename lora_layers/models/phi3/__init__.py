"""The Phi-3 preset (:mod:`.preset`: ``apply_lora`` and friends) and lean mode (:mod:`.lean`)."""
from . import lean, preset  # noqa: F401  (lora_layers.phi3.lean, the old lora_layers.lean)
from .preset import *  # noqa: F401,F403  (its __all__)

__all__ = [*preset.__all__]
