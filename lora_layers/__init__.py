"""lora_layers: LoRA layers for PyTorch.

A drop-in replacement for Microsoft's ``loralib``::

    import lora_layers as lora

    layer = lora.Linear(in_features, out_features, r=16)
    lora.mark_only_lora_as_trainable(model)
    torch.save(lora.lora_state_dict(model), path)

with a lean autograd (no stored dropout masks), exact merging, GQA-aware
``MergedLinear``, model surgery, safetensors checkpoints and PEFT interop.
"""
import sys as _sys

from ._version import __version__
from . import core, variants, bases, layers, model, io, models, functional  # noqa: F401  (each an attribute)
from .functional import lora_linear
from .core.loss import fused_linear_cross_entropy
from .core.spec import LoRASpec
from .io.adapters import load_adapter
from .io.checkpoint import CheckpointError, LoadResult, load_lora, save_lora
from .io.hot_swap import hotswap, prepare_for_hotswap
from .io.peft_format import export_peft, import_peft
from .io.serving import ExportCheck, check_export
from .io.training_state import load_training_state, save_training_state
from .layers import Conv1d, Conv2d, Conv3d, Embedding, Linear, LoRALayer, MergedLinear
from .model.params import (
    count_lora_parameters,
    lora_modules,
    lora_parameters,
    lora_plus_param_groups,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora,
    merged_state_dict,
    named_initial_buffers,
    named_lora_parameters,
    unmerge_lora,
)
from .model.quantize import quantize_base
from .model.requantize import RequantizedLayer, RequantizeReport, requantize_report
from .model.overview import AdapterSummary, summary
from .model.blend import merge_adapters
from .model.surgery import inject_lora, merge_and_unload, unload
from .model.adapters import add_adapter, adapter_names, delete_adapter, set_adapter
from .model.mixed import MixedBatch, mixed_batch
from .models import phi3

#: The flat module paths of lora_layers before the tiers became folders (December 2026), and the
#: modules that now hold them (``lora_layers.functional`` is a module of its own: the functional
#: API gathered from core and variants). ``import lora_layers.checkpoint`` and ``lora_layers.utils.X`` keep
#: working: each old path is the new module object itself, so patching one patches the other.
_OLD_PATHS = {
    "loss": core.loss, "segments": core.segments, "recipes": core.recipes,
    "merging": core.merging, "validation": core.spec, "quantized": bases.quantized, "base": layers.base,
    "utils": model.params, "surgery": model.surgery, "qlora": model.quantize, "fileio": io.fileio,
    "checkpoint": io.checkpoint, "peft_format": io.peft_format, "training_state": io.training_state,
    "adapters": io.adapters, "phi3": models.phi3, "lean": models.phi3.lean,
}
for _name, _module in _OLD_PATHS.items():
    _sys.modules[f"{__name__}.{_name}"] = _module
    globals()[_name] = _module
del _name, _module

#: Public names an old flat module held that now live a tier above the module its path names (core
#: cannot import layers): set here on that module, and in its ``__all__`` again, so that
#: ``from lora_layers.merging import ExactMerge`` (and ``import *``) works as before.
_OLD_NAMES = {"merging": {"ExactMerge": layers.merge_state.ExactMerge}}
for _name, _names in _OLD_NAMES.items():
    for _attr, _value in _names.items():
        setattr(_OLD_PATHS[_name], _attr, _value)
        if _attr not in _OLD_PATHS[_name].__all__:
            _OLD_PATHS[_name].__all__.append(_attr)
del _name, _names, _attr, _value

__all__ = [
    "__version__",
    "LoRALayer",
    "Linear",
    "MergedLinear",
    "Embedding",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "LoRASpec",
    "lora_linear",
    "fused_linear_cross_entropy",
    "mark_only_lora_as_trainable",
    "lora_state_dict",
    "lora_modules",
    "lora_parameters",
    "named_lora_parameters",
    "named_initial_buffers",
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
    "hotswap",
    "prepare_for_hotswap",
    "summary",
    "AdapterSummary",
    "LoadResult",
    "CheckpointError",
    "quantize_base",
    "requantize_report",
    "RequantizeReport",
    "RequantizedLayer",
    "export_peft",
    "import_peft",
    "check_export",
    "ExportCheck",
    "save_training_state",
    "load_training_state",
    "add_adapter",
    "merge_adapters",
    "set_adapter",
    "delete_adapter",
    "adapter_names",
    "mixed_batch",
    "MixedBatch",
]
