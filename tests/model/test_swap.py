"""One module swap (issue #21): a module held by two parents becomes one new module that both see,
whichever entry point swaps it (inject_lora, unload, import_peft, load_adapter)."""
import copy

import pytest
import torch
import torch.nn as nn

import lora_layers as L


class _Shared(nn.Module):
    """One ``nn.Linear`` held by two parents (``a.0`` and ``b.0``), plus one of its own (``c``)."""

    def __init__(self):
        super().__init__()
        shared = nn.Linear(8, 8)
        self.a, self.b, self.c = nn.Sequential(shared), nn.Sequential(shared), nn.Linear(8, 8)

    def forward(self, x):
        return self.c(self.a(x) + 2 * self.b(x))


def _reference_output(plain: nn.Module, x, delta_w: torch.Tensor):
    """``plain``'s output with ``delta_w`` added to the shared weight, in float64, built by hand."""
    ref = copy.deepcopy(plain).double()
    with torch.no_grad():
        ref.a[0].weight += delta_w.double()  # one Parameter: b.0 sees it too
    return ref(x.double())


def _trained_source(seed=0):
    torch.manual_seed(seed)
    model = _Shared()
    plain = copy.deepcopy(model)
    assert L.inject_lora(model, ["0"], r=2, lora_alpha=4) == ["a.0"]  # named once: a module is wrapped once
    layer = model.a[0]
    with torch.no_grad():
        layer.lora_B.normal_()
    return plain, model, layer


def test_swap_modules_replaces_every_slot_and_the_root():
    from lora_layers.model.swap import swap_modules

    model = _Shared()
    shared, new = model.a[0], nn.Identity()
    assert swap_modules(model, {id(shared): new}) is model
    assert model.a[0] is new and model.b[0] is new and isinstance(model.c, nn.Linear)
    assert not any(m is shared for m in model.modules())
    root = nn.Linear(2, 2)
    assert swap_modules(root, {id(root): new}) is new  # the root is given back, not set anywhere
    assert swap_modules(model, {}) is model


def test_inject_lora_and_unload_keep_one_module_under_both_parents():
    plain, model, layer = _trained_source()
    assert model.b[0] is layer
    x = torch.randn(3, 8)
    delta = layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()
    torch.testing.assert_close(model(x).double(), _reference_output(plain, x, delta), rtol=1e-5, atol=1e-5)
    L.unload(model)
    assert type(model.a[0]) is nn.Linear and model.a[0] is model.b[0]


def test_import_peft_into_a_module_held_by_two_parents(tmp_path):
    plain, source, layer = _trained_source()
    L.export_peft(source, tmp_path / "adapter")
    target = copy.deepcopy(plain)

    assert L.import_peft(target, tmp_path / "adapter") == ["a.0"]

    assert isinstance(target.a[0], L.Linear), type(target.a[0])
    assert target.b[0] is target.a[0]  # one LoRA layer, seen by both parents
    assert not any(type(m) is nn.Linear and m.weight is target.a[0].weight for m in target.modules())
    x = torch.randn(3, 8)
    delta = layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()
    torch.testing.assert_close(target(x).double(), _reference_output(plain, x, delta), rtol=1e-5, atol=1e-5)


def test_import_peft_naming_one_shared_module_twice_keeps_each_adapter(tmp_path):
    """A hand-made adapter that names both paths of one shared module: each path keeps the adapter
    loaded under its name (two layers on one weight, as before the swap was shared)."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    tensors = {f"base_model.model.{p}.0.lora_{ab}.weight": torch.randn(shape)
               for p in ("a", "b") for ab, shape in (("A", (2, 8)), ("B", (8, 2)))}
    folder = tmp_path / "twice"
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 2}')
    model = _Shared()

    assert L.import_peft(model, folder) == ["a.0", "b.0"]

    for p in ("a", "b"):
        layer = getattr(model, p)[0]
        assert isinstance(layer, L.Linear)
        assert torch.equal(layer.lora_A, tensors[f"base_model.model.{p}.0.lora_A.weight"])
    assert model.a[0] is not model.b[0] and model.a[0].weight is model.b[0].weight


@pytest.mark.parametrize("fmt", ["native", "peft"])
def test_load_adapter_into_a_module_held_by_two_parents(tmp_path, fmt):
    plain, source, layer = _trained_source()
    if fmt == "native":
        path = tmp_path / "a.safetensors"
        L.save_lora(source, path)
    else:
        path = tmp_path / "adapter"
        L.export_peft(source, path)
    target = copy.deepcopy(plain)

    assert L.load_adapter(target, path) == ["a.0"]

    assert isinstance(target.a[0], L.Linear) and target.b[0] is target.a[0]
    x = torch.randn(3, 8)
    delta = layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()
    torch.testing.assert_close(target(x).double(), _reference_output(plain, x, delta), rtol=1e-5, atol=1e-5)
