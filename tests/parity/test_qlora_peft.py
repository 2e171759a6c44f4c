"""QLoRA against PEFT on the same bitsandbytes-quantized Phi-3: the same logits and loss, and adapter
files that each loads from the other. The tests of the quantized bases that need no PEFT are in
tests/bases/test_qlora.py."""
import pytest
import torch
from conftest import load_quantized_phi3

import lora_layers as L
from lora_layers.quantized import quantized_base

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_peft_and_lora_layers_agree_on_a_bitsandbytes_phi3(saved_phi3, tmp_path, kind):
    ids = torch.randint(0, 128, (2, 10))
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    theirs = peft.get_peft_model(load_quantized_phi3(saved_phi3, kind), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets)).train()
    # PEFT in training mode (dropout 0), ours in eval: the function PEFT trains is the one ours evaluates.
    # (PEFT's eval runs bitsandbytes' CPU eval path, another function: LLM.int8 quantizes x there.)
    ours = load_quantized_phi3(saved_phi3, kind)
    L.inject_lora(ours, targets, r=4, lora_alpha=8, lora_dropout=0.0)  # one adapter per module, as PEFT
    assert isinstance(ours.model.layers[0].mlp.down_proj, L.Linear)
    assert quantized_base(ours.model.layers[0].mlp.down_proj).kind.startswith("bnb")
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)  # at init
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    theirs.save_pretrained(tmp_path / "peft")
    L.import_peft(ours, tmp_path / "peft")
    torch.testing.assert_close(ours(ids, labels=ids).loss, theirs(ids, labels=ids).loss, rtol=1e-5, atol=1e-5)
    logits_tol = 1e-4  # (a wrong adapter is off by ~1e-1 here)
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=logits_tol, atol=logits_tol)
    # and back: our export loads into PEFT on a fresh quantized base, and into a float model alike
    L.export_peft(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(load_quantized_phi3(saved_phi3, kind), tmp_path / "ours").train()
    torch.testing.assert_close(again(ids).logits, ours(ids).logits, rtol=logits_tol, atol=logits_tol)
    L.save_lora(ours, tmp_path / "a.safetensors")
    plain = transformers.Phi3ForCausalLM.from_pretrained(saved_phi3)
    L.inject_lora(plain, targets, r=4, lora_alpha=8, lora_dropout=0.0)
    L.load_lora(plain, tmp_path / "a.safetensors")  # the adapter file does not depend on the quantization
    for (name, p), (_, q) in zip(L.named_lora_parameters(plain), L.named_lora_parameters(ours)):
        assert torch.equal(p, q), name


def test_phi3_apply_lora_on_a_4bit_base_exports_to_peft(saved_phi3, tmp_path):
    ids = torch.randint(0, 128, (2, 10))
    ours = load_quantized_phi3(saved_phi3, "nf4")
    L.phi3.apply_lora(ours, r=4, lora_alpha=8, lora_dropout=0.0, qkv=("q", "v"), gradient_checkpointing=True)
    qkv = ours.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, L.MergedLinear) and qkv.quantized.kind == "bnb-4bit"
    with torch.no_grad():
        for p in L.lora_parameters(ours):
            p.normal_(0, 0.1)
    ours.train()
    loss = ours(ids, labels=ids).loss
    loss.backward()  # through checkpointing, over the packed weights
    assert all(p.grad is not None for p in L.lora_parameters(ours))
    ours.eval()
    L.export_peft(ours, tmp_path / "a")
    fresh = load_quantized_phi3(saved_phi3, "nf4")
    theirs = peft.PeftModel.from_pretrained(fresh, tmp_path / "a").train()  # not repacked
    torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)
