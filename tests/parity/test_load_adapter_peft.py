"""load_adapter on folders that PEFT itself writes: a Phi-3 with rsLoRA and a rank pattern, and GPT-2's
Conv1D layers, whose adapters must also save and load again. The other load_adapter tests are in
tests/io/test_load_adapter.py."""
import pytest
import torch
from conftest import make_tiny_phi3
from _model_checks import logits

import lora_layers as L

peft = pytest.importorskip("peft")


def test_peft_folder_written_by_peft(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["qkv_proj", "down_proj"],
                             rank_pattern={"model.layers.1.mlp.down_proj": 2}, init_lora_weights=False)
    peft_model = peft.get_peft_model(make_tiny_phi3(), config).eval()
    peft_model.save_pretrained(str(tmp_path / "peft"))
    fresh = make_tiny_phi3()

    L.load_adapter(fresh, tmp_path / "peft")

    assert fresh.model.layers[1].mlp.down_proj.r == 2 and fresh.model.layers[0].mlp.down_proj.use_rslora
    with torch.no_grad():
        expected = peft_model(input_ids=torch.tensor([[1, 5, 9, 17, 33]])).logits
    torch.testing.assert_close(logits(fresh, torch.tensor([[1, 5, 9, 17, 33]])), expected, rtol=0, atol=1e-6)


def test_gpt2_conv1d_adapters_from_a_peft_folder_save_and_load_again(tmp_path):
    # issue #20 review: import_peft puts fan_in_fan_out Linear adapters on GPT-2's Conv1D; the file
    # save_lora writes from that model was refused by load_adapter ("class Linear, which cannot go on
    # a Conv1D").
    transformers = pytest.importorskip("transformers")

    def gpt2():
        torch.manual_seed(0)
        config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return transformers.GPT2LMHeadModel(config).eval()

    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc", "wte"], fan_in_fan_out=True,
                             init_lora_weights=False)
    peft.get_peft_model(gpt2(), config).save_pretrained(str(tmp_path / "peft"))
    saved = gpt2()
    L.load_adapter(saved, tmp_path / "peft")
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    for mode in ("train", "eval"):  # eval: the file holds the same adapters, the weights merged
        getattr(saved, mode)()
        L.save_lora(saved, tmp_path / f"{mode}.safetensors")
        fresh = gpt2()

        L.load_adapter(fresh, tmp_path / f"{mode}.safetensors")

        attn = fresh.transformer.h[0].attn.c_attn
        assert type(attn) is L.Linear and attn.fan_in_fan_out and attn.r == 2
        with torch.no_grad():
            assert torch.equal(fresh.eval()(ids).logits, saved.eval()(ids).logits)
