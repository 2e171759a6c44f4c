"""lora_layers: LoRA layers for PyTorch.

A drop-in replacement for Microsoft's ``loralib``::

    import lora_layers as lora

    layer = lora.Linear(in_features, out_features, r=16)
    lora.mark_only_lora_as_trainable(model)
    torch.save(lora.lora_state_dict(model), path)

with a lean autograd (no stored dropout masks), exact merging, GQA-aware
``MergedLinear``, model surgery, safetensors checkpoints and PEFT interop.
"""
from ._version import __version__
from .adapters import AdapterSummary, load_adapter, summary
from .checkpoint import CheckpointError, LoadResult, load_lora, save_lora
from .functional import lora_linear
from .layers import Conv1d, Conv2d, Conv3d, Embedding, Linear, LoRALayer, MergedLinear
from .loss import fused_linear_cross_entropy
from .peft_format import export_peft, import_peft
from .qlora import quantize_base
from .surgery import inject_lora, merge_and_unload, unload
from .training_state import load_training_state, save_training_state
from . import phi3  # noqa: E402  (the Phi-3 preset: lora_layers.phi3.apply_lora)
from .utils import (
    count_lora_parameters,
    lora_modules,
    lora_parameters,
    lora_plus_param_groups,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora,
    merged_state_dict,
    named_lora_parameters,
    unmerge_lora,
)

__all__ = [
    "__version__",
    "LoRALayer",
    "Linear",
    "MergedLinear",
    "Embedding",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "lora_linear",
    "fused_linear_cross_entropy",
    "mark_only_lora_as_trainable",
    "lora_state_dict",
    "lora_modules",
    "lora_parameters",
    "named_lora_parameters",
    "merge_lora",
    "unmerge_lora",
    "merged_state_dict",
    "lora_plus_param_groups",
    "count_lora_parameters",
    "inject_lora",
    "merge_and_unload",
    "unload",
    "phi3",
    "save_lora",
    "load_lora",
    "load_adapter",
    "summary",
    "AdapterSummary",
    "LoadResult",
    "CheckpointError",
    "quantize_base",
    "export_peft",
    "import_peft",
    "save_training_state",
    "load_training_state",
]
