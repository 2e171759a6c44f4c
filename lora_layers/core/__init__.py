"""Pure tensor code: the LoRA forward and backward (:mod:`.functional` routes a call,
:mod:`.autograd` holds the lean Function, :mod:`.dropout` the seeded mask,
:mod:`.row_scale` the hook variants such as DoRA plug into), the fused loss,
fused-layer segments, exact merging as pure functions, FSDP2-sharded parameters
(:mod:`.sharded`), mixed-adapter batches (:mod:`.mixed`), argument checks, and the module-adoption
helpers that wrapping uses. Nothing here knows a LoRA layer class.
"""
from . import amp, segments, dropout, row_scale, autograd, recipes, functional, loss, merging, spec, wrap, sharded
from . import mixed
from .amp import *  # noqa: F401,F403  (each module's __all__)
from .segments import *  # noqa: F401,F403  (each module's __all__)
from .dropout import *  # noqa: F401,F403  (each module's __all__)
from .row_scale import *  # noqa: F401,F403  (each module's __all__)
from .autograd import *  # noqa: F401,F403  (each module's __all__)
from .recipes import *  # noqa: F401,F403  (each module's __all__)
from .functional import *  # noqa: F401,F403  (each module's __all__)
from .loss import *  # noqa: F401,F403  (each module's __all__)
from .merging import *  # noqa: F401,F403  (each module's __all__)
from .spec import *  # noqa: F401,F403  (each module's __all__)
from .wrap import *  # noqa: F401,F403  (each module's __all__)
from .sharded import *  # noqa: F401,F403  (each module's __all__)
from .mixed import *  # noqa: F401,F403  (each module's __all__)

__all__ = [*amp.__all__, *segments.__all__, *dropout.__all__, *row_scale.__all__, *autograd.__all__,
           *recipes.__all__, *functional.__all__, *loss.__all__, *merging.__all__, *spec.__all__, *wrap.__all__,
           *sharded.__all__, *mixed.__all__]
