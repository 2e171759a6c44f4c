"""Exports of examples/phi3_finetune.py: the tiny base model, the final adapter (native and PEFT), the merged model.

Kept out of the main script so that it reads top to bottom. Each folder is written whole (see
``SAVED_FILES`` in phi3_checkpoints.py): a run killed while saving leaves the previous folder or the new one.
"""
from __future__ import annotations

from phi3_checkpoints import SAVED_FILES

import lora_layers as lora
from lora_layers.fileio import atomic_folder


def save_base_model(model, tokenizer, folder):
    """The random tiny base with its tokenizer, so that the PEFT export has a base to load on."""
    with atomic_folder(folder, "the base model", owned=SAVED_FILES) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def save_adapters(model, tokenizer, out_dir, step, base_model_path):
    """lora_adapter.safetensors (lora_layers' format) and peft_adapter/ (PEFT's, with the tokenizer)."""
    lora.save_lora(model, out_dir / "lora_adapter.safetensors", metadata={"step": str(step)})
    with atomic_folder(out_dir / "peft_adapter", "the PEFT adapter", owned=SAVED_FILES) as tmp:
        lora.export_peft(model, tmp, base_model_name_or_path=str(base_model_path))
        tokenizer.save_pretrained(tmp)


def save_merged(model, tokenizer, out_dir, dtype):
    """merged/: the base with the adapters folded in (merge_and_unload), a plain model in ``dtype``.

    Call it last: it turns the LoRA layers of ``model`` back into plain ``nn.Linear``.
    """
    bnb_loaded = getattr(model, "hf_quantizer", None) is not None  # loaded with a BitsAndBytesConfig
    merged = lora.merge_and_unload(model)  # over a quantized base: the dequantized weight plus s·BA
    if bnb_loaded:
        # Save a plain model in the run's dtype (LLM.int8 dequantizes to fp16): dequantize the layers that took no
        # adapter (with none left, merge_and_unload has dropped transformers' record of the quantization).
        if getattr(merged, "hf_quantizer", None) is not None:
            merged = merged.dequantize(dtype=dtype)
        merged.to(dtype)
    merged.config.use_cache = True
    with atomic_folder(out_dir / "merged", "the merged model", owned=SAVED_FILES) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"merged model saved to {out_dir / 'merged'}")
