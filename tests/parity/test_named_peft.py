"""Named adapters across PEFT (issue #23 item 4): K adapters exported one folder each and run in PEFT with
``adapter_names`` give our per-row logits; PEFT's K adapters imported by name give PEFT's; a named
adapter's ``merge_and_unload`` gives PEFT's merged model."""
import copy

import pytest
import torch

import lora_layers as L
from lora_layers.checkpoint import CheckpointError

from conftest import make_tiny_phi3

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

NAMES = ("default", "b", "c", "d")
IDS = torch.randint(3, 128, (4, 10), generator=torch.Generator().manual_seed(5))
ROWS = ["default", "b", "c", None]  # one adapter per row; None: the base alone (PEFT's "__base__")


@pytest.fixture(scope="module")
def base():
    return make_tiny_phi3(gqa=True)


@pytest.fixture(scope="module")
def trained(base):
    """Three adapters of different ranks, alphas and rsLoRA settings, each trained a few steps (B != 0)."""
    model = copy.deepcopy(base)
    L.phi3.apply_lora(model, r=4, lora_alpha=8, lora_dropout=0.0, qkv=("q", "k", "v"))
    L.add_adapter(model, "b", r=2, lora_alpha=3)
    L.add_adapter(model, "c", r=6, lora_alpha=5, use_rslora=True)
    L.add_adapter(model, "d", r=4, lora_alpha=3)  # default's rank: PEFT's "linear" blend takes the pair
    opt = torch.optim.AdamW(L.lora_parameters(model), lr=2e-2)
    g = torch.Generator().manual_seed(0)
    model.train()
    for name in NAMES:
        L.set_adapter(model, name)
        for _ in range(3):
            ids = torch.randint(3, 128, (2, 8), generator=g)
            opt.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
    L.set_adapter(model, "default")
    return model.eval()


def logits(model, ids=IDS, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def per_row(model, rows=ROWS):
    """Our logits, each row run alone with its adapter active (``set_adapter``)."""
    out = []
    for i, name in enumerate(rows):
        L.set_adapter(model, name)
        out.append(logits(model, IDS[i:i + 1]))
    L.set_adapter(model, "default")
    return torch.cat(out)


def peft_rows(rows=ROWS):
    return [name or "__base__" for name in rows]


def exported(model, folder):
    for name in NAMES:
        L.export_peft(model, folder / name, adapter=name)
    return folder


def peft_with(base, folder):
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder / "default"))
    for name in NAMES[1:]:
        pm.load_adapter(str(folder / name), adapter_name=name)
    return pm.eval()


def test_k_adapters_exported_run_in_peft_with_adapter_names(base, trained, tmp_path):
    assert all(p.abs().sum() > 0 for n, p in L.named_lora_parameters(trained) if n.endswith("lora_B"))
    pm = peft_with(base, exported(trained, tmp_path))
    ours = per_row(trained)
    theirs = logits(pm, adapter_names=peft_rows())
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    for i in range(3):  # the rows differ: each adapter matters
        assert not torch.allclose(ours[i], ours[3], atol=1e-3)


def test_k_adapters_in_one_mixed_batch_equal_peft(base, trained, tmp_path):
    # Issue #23 item 4: the K adapters in one mixed batch of ours against PEFT's adapter_names.
    pm = peft_with(base, exported(trained, tmp_path))
    with L.mixed_batch(trained, ROWS):
        ours = logits(trained)
    torch.testing.assert_close(logits(pm, adapter_names=peft_rows()), ours, rtol=0, atol=1e-5)


def test_peft_adapters_imported_by_name_give_peft_logits(base, tmp_path):
    from peft import LoraConfig

    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    pm = peft.get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    pm.add_adapter("b", LoraConfig(r=2, lora_alpha=3, target_modules=targets, lora_dropout=0.1))
    pm.add_adapter("c", LoraConfig(r=6, lora_alpha=5, target_modules=targets, use_rslora=True,
                                   rank_pattern={"o_proj": 3}, alpha_pattern={"down_proj": 7}))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(str(tmp_path / "peft"))  # default in the folder, b and c in folder/b, folder/c

    model = copy.deepcopy(base)
    L.import_peft(model, tmp_path / "peft")
    for name in ("b", "c"):
        assert L.import_peft(model, tmp_path / "peft" / name, adapter=name)
    assert L.adapter_names(model) == NAMES[:3]
    layer = model.model.layers[0]
    assert layer.self_attn.o_proj.adapter("c").r == 3 and layer.mlp.down_proj.adapter("c").lora_alpha == 7
    assert layer.mlp.down_proj.adapter("b").dropout_p == 0.1
    ours = per_row(model.eval())
    theirs = logits(pm.eval(), adapter_names=peft_rows())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_named_adapter_merge_and_unload_equals_peft_merged(base, trained, tmp_path):
    pm = peft_with(base, exported(trained, tmp_path))
    for name in ("b", "c"):
        ours = L.merge_and_unload(copy.deepcopy(trained), adapter=name)
        assert not list(L.lora_modules(ours))
        theirs = copy.deepcopy(pm).merge_and_unload(adapter_names=[name])
        torch.testing.assert_close(logits(ours), logits(theirs), rtol=0, atol=1e-5)


def test_import_into_an_existing_named_adapter_and_refusals(base, trained, tmp_path):
    exported(trained, tmp_path)
    model = copy.deepcopy(trained)
    with torch.no_grad():
        for n, p in L.named_lora_parameters(model):
            if ".lora_adapters.b." in n:
                p.zero_()
    assert L.import_peft(model, tmp_path / "b", adapter="b")  # loaded in place
    mine = dict(L.named_lora_parameters(model))
    assert all(torch.equal(p, mine[n]) for n, p in L.named_lora_parameters(trained))

    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="'c'.*r=6.*r=2"):  # b's folder has other settings than c
        L.import_peft(model, tmp_path / "b", adapter="c")
    with pytest.raises(CheckpointError, match="not a LoRA layer"):  # named adapters need LoRA layers
        L.import_peft(copy.deepcopy(base), tmp_path / "b", adapter="b")
    with pytest.raises(ValueError, match="adapter must be .*identifier"):
        L.import_peft(model, tmp_path / "b", adapter="no way")
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    with pytest.raises(KeyError, match="'nope'.*default"):
        L.export_peft(model, tmp_path / "x", adapter="nope")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("combination, weights", [
    ("cat", {"default": 0.7, "b": -0.3, "c": 0.5}),
    ("linear", {"default": 0.6, "d": -0.8}),
])
def test_merge_adapters_equals_peft_add_weighted_adapter(base, trained, tmp_path, combination, weights):
    pm = peft_with(base, exported(trained, tmp_path))
    pm.add_weighted_adapter(list(weights), list(weights.values()), "blend", combination_type=combination)
    pm.set_adapter("blend")
    model = copy.deepcopy(trained)
    L.merge_adapters(model, weights, name="blend")  # "auto" picks the same combination
    blend = model.model.layers[0].self_attn.qkv_proj.adapter("blend")
    assert blend.r == (12 if combination == "cat" else 4)
    L.set_adapter(model, "blend")
    torch.testing.assert_close(logits(model), logits(pm.eval()), rtol=0, atol=1e-5)
    assert not torch.allclose(logits(model), logits(trained), atol=1e-3)  # the blend is not the default


def test_a_named_dora_adapter_round_trips_through_peft(base, tmp_path):
    model = copy.deepcopy(base)
    L.phi3.apply_lora(model, r=4, lora_alpha=8, lora_dropout=0.0, qkv=("q", "v"))
    L.add_adapter(model, "d", r=3, lora_alpha=6, use_dora=True)  # DoRA on the GQA MergedLinear too
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in L.named_lora_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    L.set_adapter(model, "d")
    model.eval()  # d merged: the export must read DoRA's norm from the unmerged weight
    assert model.model.layers[0].self_attn.qkv_proj.merged
    L.export_peft(model, tmp_path / "default")
    L.export_peft(model, tmp_path / "d", adapter="d")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "default"))
    pm.load_adapter(str(tmp_path / "d"), adapter_name="d")
    pm.set_adapter("d")
    expected = logits(model)
    torch.testing.assert_close(logits(pm.eval()), expected, rtol=0, atol=1e-5)
    back = copy.deepcopy(base)
    L.import_peft(back, tmp_path / "default")
    L.import_peft(back, tmp_path / "d", adapter="d")
    L.set_adapter(back, "d")
    torch.testing.assert_close(logits(back), expected, rtol=0, atol=1e-5)
