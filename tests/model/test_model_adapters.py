"""Named adapters over a model (issue #23): add/set/delete/adapter_names all or nothing, the adapter a
forward uses, per-adapter state dicts, merge_and_unload(adapter=), and what the parameter helpers see.

The reference for adapter "b" is a fresh model with the same base whose only adapter is b, loaded from
``lora_state_dict(model, adapter="b")`` with torch's own ``load_state_dict``."""
import copy

import pytest
import torch

import lora_layers as L
from _adapter_net import IDS, Net, make, randomize_adapters
from _naive_lora import bit_equal

B_SETTINGS = dict(r=3, lora_alpha=5.0)


def _with_b(seed=0):
    """A Net (default adapters r=2, random) with adapter "b" (r=3, alpha=5, random) on every layer."""
    net = make(seed=seed)
    L.add_adapter(net, "b", **B_SETTINGS)
    randomize_adapters(net, seed + 7, contains=".lora_adapters.b.")
    return net


def _single(net, adapter="b"):
    """A fresh Net with ``net``'s base whose only adapters (r=3, alpha=5) hold ``net``'s adapter ``adapter``,
    from ``lora_state_dict(net, adapter=adapter)``."""
    ref = Net(r=B_SETTINGS["r"], alpha=B_SETTINGS["lora_alpha"])
    sd = L.lora_state_dict(net, adapter=adapter)
    assert sorted(sd) == sorted(k for k in ref.state_dict() if "lora_" in k)  # keyed as a default adapter
    base = {k: v for k, v in net.state_dict().items() if "lora_" not in k}
    ref.load_state_dict({**base, **sd})
    return ref


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, \
        [(n, m.active_adapter, m.adapter_names) for n, m in L.lora_modules(model)]


def _same_state(model, before):
    sd, layers = _state(model)
    return list(sd) == list(before[0]) and all(bit_equal(sd[k], before[0][k]) for k in sd) and layers == before[1]


def test_the_active_adapter_of_a_model_gives_the_model_holding_it_alone():
    net = _with_b()
    y_default = net(IDS)
    L.set_adapter(net, "b")
    ref = _single(net)
    assert bit_equal(net(IDS), ref(IDS))
    net.eval()
    ref.eval()
    assert all(m.merged for _, m in L.lora_modules(net))
    assert torch.allclose(net(IDS), ref(IDS), atol=1e-6)
    L.set_adapter(net, "default")  # re-merges the default adapters
    assert torch.allclose(net(IDS), y_default, atol=1e-5)
    assert L.adapter_names(net) == ("default", "b")


def test_merge_and_unload_merges_the_named_adapter():
    net = _with_b()
    ref = _single(net)
    y_ref = ref(IDS)
    plain = L.merge_and_unload(net, adapter="b")
    assert not list(L.lora_modules(plain)) and not any("lora_" in k for k in plain.state_dict())
    assert torch.allclose(plain(IDS), y_ref, atol=1e-5)
    assert bit_equal(plain.out.weight, L.merge_and_unload(ref).out.weight)


def test_merge_and_unload_refuses_an_unknown_adapter_and_changes_nothing():
    net = _with_b()
    before = _state(net)
    with pytest.raises(KeyError, match=r"no adapter 'zz'.*\('default', 'b'\)"):
        L.merge_and_unload(net, adapter="zz")
    assert _same_state(net, before)


def test_targets_select_layers_and_the_others_run_their_base():
    net = make()
    L.add_adapter(net, "q", r=2, lora_alpha=3, targets=["qkv"])
    with torch.no_grad():
        net.qkv.lora_adapters.q.lora_B.normal_()
    assert [n for n, m in L.lora_modules(net) if "q" in m.adapter_names] == ["qkv"]
    assert L.adapter_names(net) == ("default", "q")
    L.set_adapter(net, "q")
    assert {n: m.active_adapter for n, m in L.lora_modules(net)} == {"emb": None, "qkv": "q", "out": None,
                                                                   "conv": None}
    assert sorted(L.lora_state_dict(net, adapter="q")) == ["qkv.lora_A", "qkv.lora_B"]
    # The base alone on the other layers: the default adapters with B zeroed give the same outputs.
    ref = copy.deepcopy(net)
    L.set_adapter(ref, "default")
    with torch.no_grad():
        for n, m in L.lora_modules(ref):
            m.lora_B.zero_()
        with_q = ref.qkv
        with_q.lora_A.copy_(with_q.lora_adapters.q.lora_A)
        with_q.lora_B.copy_(with_q.lora_adapters.q.lora_B)
        with_q.lora_alpha, with_q.scaling = 3, 1.5
    assert torch.allclose(net(IDS), ref(IDS), atol=1e-6)
    L.add_adapter(net, "lin", r=2, lora_alpha=2, targets="all-linear")
    assert [n for n, m in L.lora_modules(net) if "lin" in m.adapter_names] == ["qkv", "out"]


@pytest.mark.parametrize("call,exc,text", [
    (lambda net: L.add_adapter(net, "b", r=2), ValueError, "already has an adapter 'b'"),
    (lambda net: L.add_adapter(net, "c", r=2, use_dora=True), TypeError, "emb: "),
    (lambda net: L.add_adapter(net, "c", r=0), ValueError, "r must be a positive integer"),
    (lambda net: L.add_adapter(net, "c.d", r=2), ValueError, "valid Python identifier"),
    (lambda net: L.add_adapter(net, "c", r=2, targets=["nothing"]), ValueError, "match no LoRA layer"),
    (lambda net: L.set_adapter(net, "zz"), KeyError, "no adapter 'zz'"),
    (lambda net: L.delete_adapter(net, "zz"), KeyError, "no adapter 'zz'"),
    (lambda net: L.delete_adapter(net, "default"), ValueError, "cannot be deleted"),
    (lambda net: L.delete_adapter(net, "b"), ValueError, "is the active adapter of ['qkv']"),
    (lambda net: L.lora_state_dict(net, adapter="zz"), KeyError, "('default', 'b')"),
])
def test_bad_model_calls_name_the_problem_and_change_no_layer(call, exc, text):
    net = _with_b()
    L.delete_adapter(net, "b")
    L.add_adapter(net, "b", r=2, lora_alpha=2, targets=["qkv"])  # on one layer only: a partial clash
    L.set_adapter(net, "b")
    before = _state(net)
    with pytest.raises(exc) as info:
        call(net)
    assert text in str(info.value)
    assert _same_state(net, before)


def test_a_failing_add_takes_back_the_layers_it_changed(monkeypatch):
    net = _with_b()
    before = _state(net)
    real = L.Conv2d.add_adapter

    def fail(self, *args, **kwargs):
        raise RuntimeError("out of memory")  # after the checks: the earlier layers already have it

    monkeypatch.setattr(L.Conv2d, "add_adapter", fail)
    with pytest.raises(RuntimeError):
        L.add_adapter(net, "c", r=2)
    monkeypatch.setattr(L.Conv2d, "add_adapter", real)
    assert _same_state(net, before) and L.adapter_names(net) == ("default", "b")


def test_a_model_without_named_adapters_keeps_todays_keys_and_files(tmp_path):
    net = make()
    keys = list(net.state_dict())
    sd = L.lora_state_dict(net)
    L.save_lora(net, tmp_path / "before.safetensors")
    L.add_adapter(net, "b", r=3)
    L.set_adapter(net, "b")
    L.set_adapter(net, "default")
    L.delete_adapter(net, "b")
    assert list(net.state_dict()) == keys and list(L.lora_state_dict(net)) == list(sd)
    L.save_lora(net, tmp_path / "after.safetensors")
    assert (tmp_path / "before.safetensors").read_bytes() == (tmp_path / "after.safetensors").read_bytes()
    assert L.lora_state_dict(net, adapter="default").keys() == sd.keys()


def test_every_helper_sees_every_adapter_and_inactive_ones_get_no_gradient():
    net = _with_b()
    for p in net.parameters():
        p.requires_grad_(False)
    L.mark_only_lora_as_trainable(net)
    lora_keys = [k for k in net.state_dict() if "lora_" in k]
    assert sorted(L.lora_state_dict(net)) == sorted(lora_keys)  # nothing lost
    named = [k for k in lora_keys if ".lora_adapters.b." in k]
    assert len(named) == 8  # A and B of four layers
    params = dict(net.named_parameters())
    assert all(params[k].requires_grad for k in lora_keys)
    assert not any(p.requires_grad for k, p in params.items() if "lora_" not in k)
    total = sum(net.state_dict()[k].numel() for k in lora_keys)
    assert L.count_lora_parameters(net) == total == L.summary(net).adapter_params
    assert "adapters ['default', 'b'], active 'default'" in str(L.summary(net))
    fast = {id(p) for p in L.lora_plus_param_groups(net, lr=1e-3)[1]["params"]}
    assert {id(params[k]) for k in named if k.endswith("lora_B") and not k.startswith("emb.")} <= fast
    L.set_adapter(net, "b")
    net(IDS).pow(2).sum().backward()
    for k in lora_keys:
        assert (params[k].grad is not None) == (k in named), k


def test_merged_state_dict_has_no_named_adapter_keys():
    net = _with_b()
    L.set_adapter(net, "b")
    merged = L.merged_state_dict(net)
    assert not any("lora_" in k for k in merged)
    ref = _single(net)
    assert bit_equal(merged["out.weight"], L.merged_state_dict(ref)["out.weight"])


def test_adding_a_named_adapter_to_a_sharded_model_is_refused_and_changes_nothing(process_group):
    """Found in review: add_adapter after fully_shard added plain (unsharded) Parameters whose gradients FSDP2
    never reduces, so each rank would train its own copy; merge_adapters added one layer's adapter, then
    failed in a DTensor copy with the model changed."""
    from torch.distributed.fsdp import fully_shard

    model = torch.nn.Sequential(L.Linear(16, 16, r=2), L.Linear(16, 16, r=2))
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    before = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"0: add_adapter: .* is sharded by fully_shard.*'b'.*before fully_shard"):
        L.add_adapter(model, "b", r=2, lora_alpha=4)
    with pytest.raises(ValueError, match=r"merge_adapters: 0: add_adapter: .* is sharded by fully_shard"):
        L.merge_adapters(model, {"default": 0.5}, "c")
    assert L.adapter_names(model) == ("default",)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n].full_tensor(), t) for n, t in before.items())


@pytest.mark.parametrize("name", ["training", "keys", "update", "forward"])
def test_a_name_torch_s_module_dict_cannot_hold_is_refused_and_changes_nothing(name):
    """Found in review: add_adapter(model, "keys") passed every check, then torch's ModuleDict raised a bare
    KeyError("attribute 'keys' already exists"), leaving an empty lora_adapters submodule on the first layer."""
    model = torch.nn.Sequential(L.Linear(6, 6, r=2), L.Linear(6, 6, r=2))
    modules = [n for n, _ in model.named_modules()]
    with pytest.raises(ValueError, match=rf"adapter name must not be an attribute of torch's nn.ModuleDict.*'{name}'"):
        L.add_adapter(model, name, r=2, lora_alpha=4)
    with pytest.raises(ValueError, match="must not be an attribute"):
        model[0].add_adapter(name, 2, 4)
    with pytest.raises(ValueError, match="merge_adapters: name must not be an attribute"):
        L.merge_adapters(model, {"default": 1.0}, name)
    assert [n for n, _ in model.named_modules()] == modules and L.adapter_names(model) == ("default",)


def test_a_copy_of_the_model_made_inside_a_mixed_batch_is_not_in_it():
    """Found in review: copy.deepcopy(model) inside ``with mixed_batch(...)`` copied the live batch too, which
    nothing ever closed: the copy refused every other batch size and never merged in eval()."""
    import pickle

    model = torch.nn.Sequential(L.Linear(8, 6, r=2, lora_alpha=4))
    L.add_adapter(model, "a", r=2, lora_alpha=4)
    with torch.no_grad():
        model[0].lora_B.normal_()
    x = torch.randn(3, 8)
    with L.mixed_batch(model, ["a", None]):
        copies = [copy.deepcopy(model), pickle.loads(pickle.dumps(model))]
    for c in copies:
        torch.testing.assert_close(c(x), model(x), rtol=0, atol=0)  # the plain forward, rows of any number
        c.eval()
        assert c[0].merged
        torch.testing.assert_close(c(x), model(x), rtol=1e-6, atol=1e-6)
