"""The Phi-3 preset (:mod:`.preset`: ``apply_lora`` and friends), lean mode (:mod:`.lean`) and FSDP2
sharding per decoder layer (:mod:`.sharding`: ``fully_shard``)."""
from . import lean, preset, sharding  # noqa: F401  (lora_layers.phi3.lean, the old lora_layers.lean)
from .preset import *  # noqa: F401,F403  (its __all__)
from .sharding import fully_shard  # noqa: F401

__all__ = [*preset.__all__, "fully_shard"]
