"""Checkpoints of named adapters (issue #23): save_lora/load_lora with and without ``adapter=``, the
header's named-adapter settings checked at load, and a training state covering every adapter."""
import pytest
import torch

import lora_layers as L
from lora_layers.checkpoint import CheckpointError
from lora_layers.training_state import load_training_state, save_training_state
from _adapter_net import IDS, Net, assert_unchanged, make, randomize_adapters, snapshot
from _naive_lora import bit_equal


def _with(names=("b",), seed=0, alpha=5.0):
    """The same base whatever ``seed``, which draws the adapters."""
    net = make(seed=0)
    for name in names:
        L.add_adapter(net, name, r=3, lora_alpha=alpha)
    randomize_adapters(net, seed + 7)
    return net


def test_a_file_of_every_adapter_restores_every_adapter(tmp_path):
    net = _with(("b", "c"))
    L.save_lora(net, tmp_path / "all.safetensors")
    other = _with(("b", "c"), seed=1)  # another draw of every adapter
    L.load_lora(other, tmp_path / "all.safetensors")
    mine, theirs = dict(L.named_lora_parameters(net)), dict(L.named_lora_parameters(other))
    assert mine.keys() == theirs.keys() and len(mine) == 4 * 2 * 3  # 4 layers x (A, B) x 3 adapters
    assert all(bit_equal(mine[k], theirs[k]) for k in mine)


def test_an_adapter_file_is_a_single_adapter_checkpoint(tmp_path):
    net = _with(("b", "c"))
    L.save_lora(net, tmp_path / "c.safetensors", adapter="c")
    plain = Net(r=3, alpha=5.0)  # a single-adapter model with c's settings, and net's base
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if "lora_" not in k}, strict=False)
    L.load_lora(plain, tmp_path / "c.safetensors")
    L.set_adapter(net, "c")
    assert bit_equal(plain(IDS), net(IDS))
    # ... and it loads into adapter c of another multi-adapter model, and nowhere else.
    other = _with(("b", "c"), seed=3)
    before = {k: p.detach().clone() for k, p in L.named_lora_parameters(other)}
    L.load_lora(other, tmp_path / "c.safetensors", adapter="c")
    for k, p in L.named_lora_parameters(other):
        expected = dict(L.named_lora_parameters(net))[k] if ".lora_adapters.c." in k else before[k]
        assert bit_equal(p, expected), k


def test_loading_an_adapter_file_into_a_merged_layer_remerges_it(tmp_path):
    net = _with(("b",))
    L.save_lora(net, tmp_path / "b.safetensors", adapter="b")
    other = _with(("b",), seed=3)
    L.set_adapter(other, "b")
    other.eval()
    L.load_lora(other, tmp_path / "b.safetensors", adapter="b")
    L.set_adapter(net, "b")
    assert all(m.merged for _, m in L.lora_modules(other))
    assert torch.allclose(other(IDS), net.eval()(IDS), atol=1e-6)


def test_named_settings_are_checked_and_a_mismatch_loads_nothing(tmp_path):
    net = _with(("b",))
    L.save_lora(net, tmp_path / "all.safetensors")
    L.save_lora(net, tmp_path / "b.safetensors", adapter="b")
    other = _with(("b",), seed=2, alpha=7.0)  # the same shapes, another alpha: silently wrong if loaded
    before = snapshot(other)
    with pytest.raises(CheckpointError, match=r"qkv.lora_adapters.b.*lora_alpha: checkpoint 5.0, model 7.0"):
        L.load_lora(other, tmp_path / "all.safetensors")
    with pytest.raises(CheckpointError, match=r"lora_alpha: checkpoint 5.0, model 7.0"):
        L.load_lora(other, tmp_path / "b.safetensors", adapter="b")
    with pytest.raises(CheckpointError, match=r"missing keys.*lora_adapters.b.lora_A.*adapter=name"):
        L.load_lora(other, tmp_path / "b.safetensors")  # one adapter's file, without adapter=
    with pytest.raises(KeyError, match="no adapter 'zz'"):
        L.load_lora(other, tmp_path / "b.safetensors", adapter="zz")
    assert_unchanged(other, before)


def test_save_lora_refuses_an_unknown_adapter_and_writes_nothing(tmp_path):
    net = _with(("b",))
    with pytest.raises(KeyError, match=r"no adapter 'zz'.*\('default', 'b'\)"):
        L.save_lora(net, tmp_path / "x.safetensors", adapter="zz")
    assert not (tmp_path / "x.safetensors").exists()


def _train(model, opt, steps, losses):
    x = torch.randint(0, 20, (4, 5), generator=torch.Generator().manual_seed(7))
    for step in range(steps):
        L.set_adapter(model, "b" if step % 2 else "default")  # both adapters train, in turns
        loss = (model(x) - torch.randn(4, 5, 3)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())


def _setup():
    model = _with(("b",))
    L.mark_only_lora_as_trainable(model)
    return model, torch.optim.AdamW(L.lora_parameters(model), lr=1e-2, weight_decay=0.01)


def test_the_training_state_covers_every_adapter_the_optimizer_updates(tmp_path):
    torch.manual_seed(42)
    model, opt = _setup()
    straight = []
    _train(model, opt, 8, straight)
    final = {k: p.detach().clone() for k, p in L.named_lora_parameters(model)}
    torch.manual_seed(42)
    model, opt = _setup()
    resumed = []
    _train(model, opt, 4, resumed)
    save_training_state(tmp_path / "run", model, opt, step=4)
    torch.manual_seed(999)
    model, opt = _setup()  # fresh adapters and optimizer: everything comes from the file
    load_training_state(tmp_path / "run", model, opt)
    _train(model, opt, 4, resumed)
    assert resumed == straight
    assert all(torch.equal(p, final[k]) for k, p in L.named_lora_parameters(model))
    assert any(".lora_adapters.b." in k for k in final)
