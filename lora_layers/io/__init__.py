"""Files: atomic writes and folders, native safetensors checkpoints, the PEFT adapter
format, exact training states, and self-describing adapter loading.
"""
from . import fileio, checkpoint, peft_format, training_state, adapters
from .fileio import *  # noqa: F401,F403  (each module's __all__)
from .checkpoint import *  # noqa: F401,F403  (each module's __all__)
from .peft_format import *  # noqa: F401,F403  (each module's __all__)
from .training_state import *  # noqa: F401,F403  (each module's __all__)
from .adapters import *  # noqa: F401,F403  (each module's __all__)

# (once each: CheckpointError is in fileio's and checkpoint's, as it was at their old paths)
__all__ = list(dict.fromkeys([*fileio.__all__, *checkpoint.__all__, *peft_format.__all__, *training_state.__all__,
                              *adapters.__all__]))
