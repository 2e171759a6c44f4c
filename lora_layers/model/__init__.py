"""Model-level operations: surgery (inject, merge_and_unload, unload) and the one module swap
(:mod:`.swap`), trainable parameters and state dicts, quantizing a model's base, seeing through
wrappers, what adapters a model carries (``summary``), named adapters (:mod:`.adapters`: add, set,
delete, list; :mod:`.mixed`: mixed-adapter batches), and the registries a model family fills (:mod:`.families`).
"""
from . import families, unwrap, params, swap, surgery, quantize, overview, adapters, mixed
from .families import *  # noqa: F401,F403  (each module's __all__)
from .unwrap import *  # noqa: F401,F403  (each module's __all__)
from .params import *  # noqa: F401,F403  (each module's __all__)
from .swap import *  # noqa: F401,F403  (each module's __all__)
from .surgery import *  # noqa: F401,F403  (each module's __all__)
from .quantize import *  # noqa: F401,F403  (each module's __all__)
from .overview import *  # noqa: F401,F403  (each module's __all__)
from .adapters import *  # noqa: F401,F403  (each module's __all__)
from .mixed import *  # noqa: F401,F403  (each module's __all__)

__all__ = [*families.__all__, *unwrap.__all__, *params.__all__, *swap.__all__, *surgery.__all__, *quantize.__all__,
           *overview.__all__, *adapters.__all__, *mixed.__all__]
