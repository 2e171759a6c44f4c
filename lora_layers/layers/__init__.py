"""The LoRA layers, drop-in compatible with Microsoft's ``loralib``: the :class:`LoRALayer` mixin
(``base``), ``Linear`` (``linear``), ``MergedLinear`` (``merged``), ``Embedding`` (``embedding``),
``Conv1d/2d/3d`` (``conv``), the torch-type -> LoRA-class table (``registry``), their merge lifecycle
(``merge_state``), tied-weight tracking (``ties``), named adapters next to a layer's own
(``adapters``) and the one-time notices where lora_layers deliberately differs from loralib (``notices``).

Each layer subclasses its torch counterpart (``isinstance(m, nn.Linear)`` holds,
``weight``/``bias`` keep their state_dict keys) and the :class:`LoRALayer`
mixin (:mod:`lora_layers.layers.base`), which holds the configuration and *all*
merge logic once for every layer type. A layer only says which adapter
shapes it has, how to initialise them, what its ``ΔW`` blocks are, and how
its forward runs.

Differences from loralib 0.1.2 (all bug fixes; see docs/migrating-from-loralib.md):

* ``train()`` returns ``self``; modules pickle and deepcopy (no lambdas).
* Merging is exact: after any number of ``eval()``/``train()`` cycles the base
  weight is bit-identical to the original, in every dtype.
* ``state_dict()`` of a merged layer holds the merged weight, as loralib's,
  marked in its metadata, so reloading a checkpoint saved in eval mode never
  double-counts the adapter.
* Conv layers have rank ``r`` (loralib uses ``r·k``), support tuple kernels,
  groups, Conv1d/Conv3d, and apply dropout. ``layout="loralib"`` gives loralib's
  conv adapter instead, and a fresh conv layer loading a loralib conv adapter
  switches to it (with a one-time warning). ``.conv`` is loralib's wrapped conv.
* ``MergedLinear`` accepts unequal ``split_sizes`` (GQA qkv, ``[gate | up]``)
  and never builds the full ``ΔW`` or a zero-padded output in forward.
"""
from . import base, merge_state, linear, merged, embedding, conv, registry, ties, notices  # noqa: F401
from .base import *  # noqa: F401,F403  (each module's __all__)
from .merge_state import *  # noqa: F401,F403  (each module's __all__)
from .linear import *  # noqa: F401,F403  (each module's __all__)
from .merged import *  # noqa: F401,F403  (each module's __all__)
from .embedding import *  # noqa: F401,F403  (each module's __all__)
from .conv import *  # noqa: F401,F403  (each module's __all__)
from .conv import CONV_LAYOUTS  # noqa: F401  (lora_layers.layers.CONV_LAYOUTS, as before the folders)
from .registry import *  # noqa: F401,F403  (each module's __all__)
from .ties import *  # noqa: F401,F403  (each module's __all__)
from .notices import *  # noqa: F401,F403  (each module's __all__)

from .base import LoRALayer
from .conv import Conv1d, Conv2d, Conv3d
from .embedding import Embedding
from .linear import Linear
from .merged import MergedLinear

# The folder's contract: the layers (what ``from lora_layers.layers import *`` gave before the folders)
# and the type -> class table. The other names above stay importable by name for the tiers above.
__all__ = ["LoRALayer", "Linear", "MergedLinear", "Embedding", "Conv1d", "Conv2d", "Conv3d", *registry.__all__]
