"""Files: atomic writes and folders, native safetensors checkpoints, the PEFT adapter
format, exact training states, self-describing adapter loading, and hot swap.
"""
from . import fileio, checkpoint, peft_format, serving, training_state, adapters, hot_swap
from .fileio import *  # noqa: F401,F403  (each module's __all__)
from .checkpoint import *  # noqa: F401,F403  (each module's __all__)
from .peft_format import *  # noqa: F401,F403  (each module's __all__)
from .serving import *  # noqa: F401,F403  (each module's __all__)
from .training_state import *  # noqa: F401,F403  (each module's __all__)
from .adapters import *  # noqa: F401,F403  (each module's __all__)
from .hot_swap import *  # noqa: F401,F403  (each module's __all__)

# checkpoint's __all__ repeats fileio's CheckpointError, and adapters' lists model.overview's summary and
# AdapterSummary, for the star imports of their old paths (lora_layers.checkpoint, lora_layers.adapters).
_ELSEWHERE = ("summary", "AdapterSummary")
__all__ = list(dict.fromkeys(name for name in [*fileio.__all__, *checkpoint.__all__, *peft_format.__all__,
                                               *serving.__all__, *training_state.__all__, *adapters.__all__,
                                               *hot_swap.__all__] if name not in _ELSEWHERE))
