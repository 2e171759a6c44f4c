"""Exports of examples/phi3_finetune.py: the tiny base model, the final adapter (native and PEFT), the merged model.

Kept out of the main script so that it reads top to bottom. Each folder is written whole (see
``SAVED_FILES`` in phi3_checkpoints.py): a run killed while saving leaves the previous folder or the new one.
"""
from __future__ import annotations

import copy

import torch
from phi3_checkpoints import SAVED_FILES, Folders

import lora_layers as lora
from lora_layers.fileio import atomic_folder


def save_base_model(model, tokenizer, folder):
    """The random tiny base with its tokenizer, so that the PEFT export has a base to load on."""
    with atomic_folder(folder, "the base model", owned=SAVED_FILES) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def save_adapters(model, tokenizer, out_dir, step, base_model_path, folders=Folders()):
    """lora_adapter.safetensors (lora_layers' format) and peft_adapter/ (PEFT's, with the tokenizer).

    Under --fsdp every rank calls it (``folders``: phi3_fsdp.RankZeroFolders): save_lora and export_peft gather the
    sharded adapters, and rank 0 writes the files one process would write.
    """
    lora.save_lora(model, out_dir / "lora_adapter.safetensors", metadata={"step": str(step)})
    with folders.open(out_dir / "peft_adapter", "the PEFT adapter") as tmp:
        lora.export_peft(model, tmp, base_model_name_or_path=str(base_model_path))
        if folders.writer:
            tokenizer.save_pretrained(tmp)


def save_merged(model, tokenizer, out_dir, dtype, folders=Folders()):
    """merged/: the base with the adapters folded in (merge_and_unload), a plain model in ``dtype``.

    Call it last: it turns the LoRA layers of ``model`` back into plain ``nn.Linear``. A model sharded by
    --fsdp (every rank calls it) is left as it is: rank 0 saves its ``merged_state_dict`` instead.
    """
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        return save_merged_state(model, tokenizer, out_dir, folders)
    if any(getattr(m, "quantized", None) is not None for m in model.modules()):  # --quantize
        print_requantize_report(model, tokenizer)
    bnb_loaded = getattr(model, "hf_quantizer", None) is not None  # loaded with a BitsAndBytesConfig
    merged = lora.merge_and_unload(model)  # over a quantized base: the dequantized weight plus s·BA
    if bnb_loaded:
        # Save a plain model in the run's dtype (LLM.int8 dequantizes to fp16): dequantize the layers that took no
        # adapter (with none left, merge_and_unload has dropped transformers' record of the quantization).
        if getattr(merged, "hf_quantizer", None) is not None:
            merged = merged.dequantize(dtype=dtype)
        merged.to(dtype)
    merged.config.use_cache = True
    with folders.open(out_dir / "merged", "the merged model") as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"merged model saved to {out_dir / 'merged'}")


PROBE_PROMPTS = ("Reverse the string: merged adapters", "What does a 4-bit base cost?")


def print_requantize_report(model, tokenizer):
    """What serving the merged model in 4 bits would cost, printed: each merged weight packed as torchao NF4
    (lora.requantize_report, the model unchanged), its error per layer and the logits' on two prompts. merged/
    holds the exact merge; lora.merge_and_unload(model, requantize="nf4") gives the 4-bit one."""
    device = next(p.device for p in model.parameters())
    probe = tokenizer(list(PROBE_PROMPTS), return_tensors="pt", padding=True).to(device)
    print(lora.requantize_report(model, "nf4", probe=dict(probe)))


def save_merged_state(model, tokenizer, out_dir, folders):
    """merged/ of a model sharded by fully_shard, called on every rank: ``lora.merged_state_dict`` gathers one
    layer at a time and gives rank 0 the whole merged state dict on the CPU (the other ranks an empty one), which rank 0
    saves with the model's own class, built without LoRA on the meta device (no second copy of the weights)."""
    state = lora.merged_state_dict(model)  # a collective; one process's merge_and_unload(model).state_dict()
    with folders.open(out_dir / "merged", "the merged model") as tmp:
        if folders.writer:
            from torch.distributed.fsdp import FSDPModule

            cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))  # FSDPPhi3... -> Phi3...
            config = copy.deepcopy(model.config)
            config.use_cache = True
            with torch.device("meta"):
                plain = cls(config)
            plain.load_state_dict(state, strict=True, assign=True)  # the merged tensors themselves
            plain.save_pretrained(tmp, state_dict=state)
            tokenizer.save_pretrained(tmp)
    if folders.writer:
        print(f"merged model saved to {out_dir / 'merged'}")
