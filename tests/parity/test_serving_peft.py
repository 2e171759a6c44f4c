"""export_peft(server=) exports loaded by PEFT itself on a tiny Phi-3 (issue #25 item 3): folding rsLoRA for
vLLM keeps PEFT's outputs, and the DoRA export vLLM refuses is the one PEFT loads."""
import copy
import json

import pytest
import torch

import lora_layers as L
from lora_layers.peft_format import PEFT_CONFIG_NAME

from conftest import make_tiny_phi3

IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(3))


def adapted(seed=0, **kwargs):
    model = make_tiny_phi3()
    base = copy.deepcopy(model)
    L.phi3.apply_lora(model, lora_dropout=0.0, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in L.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1 if p.dim() == 1 else 0))  # DoRA's m near 1
    return base, model.eval()


def peft_logits(base, folder):
    peft = pytest.importorskip("peft")
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_rslora_folded_for_vllm_gives_peft_the_same_logits(tmp_path):
    pytest.importorskip("peft")
    base, model = adapted(r=8, lora_alpha=16, use_rslora=True)  # √8 is irrational: the fold is not exact in binary
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    L.export_peft(model, tmp_path / "rslora")
    check = L.export_peft(model, tmp_path / "vllm", server="vllm")
    config = json.loads((tmp_path / "vllm" / PEFT_CONFIG_NAME).read_text())
    assert config["use_rslora"] is False and check.changes[0].startswith("use_rslora folded into lora_alpha")
    assert config["lora_alpha"] == pytest.approx(16 * 8 ** 0.5, rel=1e-15)
    assert (check.max_rank, check.min_max_lora_rank) == (24, 32)  # q, k, v at r=8 on the fused qkv_proj
    folded, plain = peft_logits(base, tmp_path / "vllm"), peft_logits(base, tmp_path / "rslora")
    torch.testing.assert_close(folded, plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(folded, expected, rtol=0, atol=1e-5)  # our forward, as the unfolded export's test
    with torch.no_grad():
        assert not torch.allclose(folded, base(input_ids=IDS).logits, atol=1e-3)  # the adapter matters


def test_the_dora_export_vllm_refuses_is_the_one_peft_loads(tmp_path):
    pytest.importorskip("peft")
    base, model = adapted(r=4, lora_alpha=8, use_dora=True)
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    with pytest.raises(ValueError, match="use_dora=true: vLLM does not serve DoRA"):
        L.export_peft(model, tmp_path / "vllm", server="vllm")
    check = L.export_peft(model, tmp_path / "peft", server="peft")
    assert check.ok and not L.check_export(tmp_path / "peft").ok
    torch.testing.assert_close(peft_logits(base, tmp_path / "peft"), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("rank, ok", [(8, True), (4, False)])
def test_the_peft_rank_rule_is_what_peft_itself_does(tmp_path, rank, ok):
    """A module whose tensors are not of the rank r/rank_pattern give it: check_export(server="peft")
    reports it, and PEFT's own load fails on it; the matching folder passes both."""
    peft = pytest.importorskip("peft")
    from _adapter_folder import write_adapter

    folder = write_adapter(tmp_path / "a", {"r": 8, "target_modules": ["q"], "rank_pattern": {}},
                           ranks={"q": rank})
    check = L.check_export(folder, server="peft")
    base = torch.nn.Sequential()
    base.add_module("q", torch.nn.Linear(4, 6))
    if ok:
        assert check.ok
        peft.PeftModel.from_pretrained(base, str(folder))
    else:
        assert check.problems == ("q: its tensors have rank 4 but r/rank_pattern give it r=8; PEFT builds lora_A "
                                  "with that many rows and fails to load these",)
        with pytest.raises(RuntimeError, match="size mismatch"):
            peft.PeftModel.from_pretrained(base, str(folder))
