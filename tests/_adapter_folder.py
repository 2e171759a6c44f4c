"""A PEFT adapter folder written by hand, for the checks of tests/io/test_serving.py and
tests/parity/test_serving_peft.py."""
import json
import os

import torch

from lora_layers.fileio import safetensors_bytes
from lora_layers.peft_format import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME

PREFIX = "base_model.model."
BASE_CONFIG = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q", "v"], "bias": "none",
               "use_rslora": False, "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
               "rank_pattern": {}, "alpha_pattern": {}}


def write_adapter(folder, config=None, ranks=None, extra=None):
    """An adapter folder: BASE_CONFIG updated by ``config``, and for each module of ``ranks`` (default
    layers.0.q and layers.0.v at r=8) a lora_A (r, 4) and lora_B (6, r); ``extra``: more tensors by key."""
    os.makedirs(folder, exist_ok=True)
    tensors = {}
    for name, r in (ranks or {"layers.0.q": 8, "layers.0.v": 8}).items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = torch.zeros(r, 4)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = torch.zeros(6, r)
    tensors.update(extra or {})
    with open(os.path.join(folder, PEFT_WEIGHTS_NAME), "wb") as f:
        f.write(safetensors_bytes(tensors, {"format": "pt"}))
    with open(os.path.join(folder, PEFT_CONFIG_NAME), "w") as f:
        json.dump({**BASE_CONFIG, **(config or {})}, f)
    return folder
