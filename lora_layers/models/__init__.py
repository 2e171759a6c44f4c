"""Everything that names a model family. Each family registers what the generic tiers need
(:mod:`lora_layers.model.families`) when it is imported."""
from . import phi3

__all__ = ["phi3"]
