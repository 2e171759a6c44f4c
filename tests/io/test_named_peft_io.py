"""export_peft/import_peft of a named adapter (issue #23): the folder of adapter ``b`` is byte for byte
the folder of a model holding ``b`` as its only adapter, and it imports back into a named adapter."""
import pytest
import torch

import lora_layers as L
from lora_layers.checkpoint import CheckpointError
from _adapter_net import IDS, Net, assert_unchanged, make, snapshot
from _naive_lora import bit_equal


def _with_b(seed=0):
    net = make(seed=0)
    L.add_adapter(net, "b", r=3, lora_alpha=5.0)
    g = torch.Generator().manual_seed(seed + 11)
    with torch.no_grad():
        for p in L.lora_parameters(net):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net


def _alone(net, name):
    """A single-adapter Net with ``net``'s base and adapter ``name``'s tensors as its default adapter."""
    plain = Net(r=3, alpha=5.0)
    state = {k: v for k, v in net.state_dict().items() if "lora_" not in k}
    for key, p in L.named_lora_parameters(net):
        if f".lora_adapters.{name}." in key:
            state[key.replace(f".lora_adapters.{name}.", ".")] = p.detach()
    plain.load_state_dict(state)
    return plain


def _bytes(folder):
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def test_a_named_adapter_exports_as_the_only_adapter_of_a_model(tmp_path):
    net = _with_b()
    L.export_peft(net, tmp_path / "b", adapter="b")
    L.export_peft(_alone(net, "b"), tmp_path / "alone")
    assert _bytes(tmp_path / "b") == _bytes(tmp_path / "alone")
    L.export_peft(net, tmp_path / "default")  # the default adapter: as before named adapters existed
    single = make(seed=0)
    single.load_state_dict({k: v for k, v in net.state_dict().items() if ".lora_adapters." not in k})
    L.export_peft(single, tmp_path / "single")
    assert _bytes(tmp_path / "default") == _bytes(tmp_path / "single")


def test_a_named_export_imports_into_a_new_named_adapter(tmp_path):
    net = _with_b()
    L.export_peft(net, tmp_path / "b", adapter="b")
    other = make(seed=0)
    rng = torch.get_rng_state()
    names = L.import_peft(other, tmp_path / "b", adapter="z")
    assert torch.equal(torch.get_rng_state(), rng)  # the discarded random init drew from a forked stream
    assert names == sorted(n for n, m in L.lora_modules(net) if m.has_adapter)
    for n, m in L.lora_modules(other):
        z, b = m.adapter("z"), dict(L.lora_modules(net))[n].adapter("b")
        assert (z.r, z.lora_alpha, z.scaling, z.dropout_p) == (b.r, b.lora_alpha, b.scaling, b.dropout_p), n
        assert bit_equal(z.lora_A, b.lora_A) and bit_equal(z.lora_B, b.lora_B), n
    assert other.qkv.active_adapter == "default"  # added, not made active
    L.set_adapter(other, "z")
    L.set_adapter(net, "b")
    assert bit_equal(other(IDS), net(IDS))


def test_a_refused_named_import_changes_nothing(tmp_path):
    net = _with_b()
    L.export_peft(net, tmp_path / "b", adapter="b")
    L.export_peft(net, tmp_path / "default")
    other = _with_b(seed=1)
    other.eval()  # merged: a refusal must not unmerge or remerge anything
    before = snapshot(other)
    with pytest.raises(CheckpointError, match="'b'.*r=3.*r=2"):  # default's r=2 folder into b (r=3)
        L.import_peft(other, tmp_path / "default", adapter="b")
    out = other.out
    del other.out  # a module the folder names is gone: every other module is left alone too
    with pytest.raises(CheckpointError, match="'out': no such module"):
        L.import_peft(other, tmp_path / "b", adapter="new")
    assert "new" not in L.adapter_names(other)
    other.out = out
    assert_unchanged(other, before)


def test_importing_into_the_active_merged_adapter_remerges_it(tmp_path):
    net = _with_b()
    L.export_peft(net, tmp_path / "b", adapter="b")
    other = _with_b(seed=1)
    for model in (net, other):
        L.set_adapter(model, "b")
        model.eval()
    assert all(m.merged for _, m in L.lora_modules(other))
    L.import_peft(other, tmp_path / "b", adapter="b")
    assert all(m.merged for _, m in L.lora_modules(other))
    torch.testing.assert_close(other(IDS), net(IDS), rtol=1e-6, atol=1e-6)
    other.train(), net.train()  # unmerged: the base weights are back, exactly
    assert all(bit_equal(other.state_dict()[k], v) for k, v in net.state_dict().items() if "lora_" not in k)


def test_an_adapter_on_some_layers_exports_and_imports_those_only(tmp_path):
    import json

    net = _with_b()
    L.add_adapter(net, "t", r=2, lora_alpha=2.0, targets=["out", "conv"])
    L.export_peft(net, tmp_path / "t", adapter="t")
    config = json.loads((tmp_path / "t" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["conv", "out"] and config["r"] == 2
    other = make(seed=0)
    assert L.import_peft(other, tmp_path / "t", adapter="t") == ["conv", "out"]
    assert [n for n, m in L.lora_modules(other) if "t" in m.adapter_names] == ["out", "conv"]
    L.set_adapter(other, "t")  # the layers without t run their base alone, as in net
    L.set_adapter(net, "t")
    assert bit_equal(other(IDS), net(IDS))
