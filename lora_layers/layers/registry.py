"""Which LoRA class wraps which torch module: the one table that surgery, the PEFT importer and
``load_adapter`` read."""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

from ..bases.quantized import is_quantized_linear
from .conv import Conv1d, Conv2d, Conv3d
from .embedding import Embedding
from .linear import Linear, is_hf_conv1d

__all__ = ["LORA_CLASSES", "lora_class_for"]

#: Exact torch type -> LoRA class. Exact, not isinstance: a subclass may override forward
#: (MultiheadAttention's out_proj, which attention reads through ``.weight`` directly), and a
#: LoRA wrapper would silently drop that behaviour.
LORA_CLASSES = {nn.Linear: Linear, nn.Embedding: Embedding, nn.Conv1d: Conv1d, nn.Conv2d: Conv2d,
                nn.Conv3d: Conv3d}


def lora_class_for(module: nn.Module, *, hf_conv1d: bool = True, subclasses: bool = False) -> Optional[type]:
    """The LoRA class whose ``from_module`` wraps ``module``, or None.

    * ``nn.Linear``, ``nn.Embedding``, ``nn.Conv1d/2d/3d`` (exact types): their LoRA classes.
    * A quantized linear (bitsandbytes ``Linear4bit``/``Linear8bitLt``, an ``nn.Linear`` holding a
      torchao NF4 weight): :class:`Linear`, which runs their kernels itself.
    * transformers' ``Conv1D`` (GPT-2): :class:`Linear` with ``fan_in_fan_out``; None with
      ``hf_conv1d=False`` (``inject_lora`` takes torch layers only).
    * With ``subclasses=True`` (PEFT's reading, which ``import_peft`` follows), any subclass of
      ``nn.Linear`` or ``nn.Embedding`` too; conv subclasses never.

    The answer is about the module's kind only: a LoRA layer is not excluded here.
    """
    if is_quantized_linear(module):
        return Linear
    exact = LORA_CLASSES.get(type(module))
    if exact is not None:
        return exact
    if subclasses and isinstance(module, (nn.Linear, nn.Embedding)):
        return Linear if isinstance(module, nn.Linear) else Embedding
    return Linear if hf_conv1d and is_hf_conv1d(module) else None
