"""Training state: exact resume, and every mismatch refused before anything is changed."""
import copy
import os
import random
import warnings

import pytest
import torch
import torch.nn as nn

import lora_layers as L
from lora_layers import training_state as ts
from lora_layers.checkpoint import CheckpointError, save_lora
from lora_layers.training_state import TRAINING_STATE_FILE, load_training_state, save_training_state

from _adapter_net import assert_unchanged, make, snapshot


def _train(model, opt, sched, steps, losses):
    x = torch.randint(0, 20, (4, 5), generator=torch.Generator().manual_seed(7))
    for _ in range(steps):
        noise = torch.randn(4, 5, 3)  # draws from the global RNG, as data shuffling would
        loss = (model(x) - noise).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())


def _setup(seed=0):
    model = make(seed=seed, randomize=False, dropout=0.2).train()
    L.mark_only_lora_as_trainable(model)
    opt = torch.optim.AdamW(L.lora_parameters(model), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    return model, opt, sched


def test_resume_is_bitwise_identical(tmp_path):
    torch.manual_seed(42)
    model, opt, sched = _setup()
    straight = []
    _train(model, opt, sched, 10, straight)
    final = {k: p.detach().clone() for k, p in L.named_lora_parameters(model)}

    torch.manual_seed(42)
    model, opt, sched = _setup()
    resumed = []
    _train(model, opt, sched, 5, resumed)
    random.seed(5)
    expected_py = random.random()
    random.seed(5)
    save_training_state(tmp_path / "run", model, opt, sched, step=5, extra={"best": 1.5, "tags": ("a", 2)})

    torch.manual_seed(999)  # scramble every RNG and build fresh objects
    random.seed(999)
    model, opt, sched = _setup(seed=0)
    state = load_training_state(tmp_path / "run", model, opt, sched)
    assert state == {"step": 5, "extra": {"best": 1.5, "tags": ("a", 2)}}
    assert random.random() == expected_py
    _train(model, opt, sched, 5, resumed)
    assert resumed == straight
    for k, p in L.named_lora_parameters(model):
        assert torch.equal(p, final[k]), k


def test_training_state_rejects_objects_and_mismatches(tmp_path):
    model, opt, sched = _setup()
    with pytest.raises(TypeError, match=r"extra\['f'\] is a builtin_function_or_method"):
        save_training_state(tmp_path / "a", model, opt, sched, extra={"f": len})
    assert not (tmp_path / "a" / TRAINING_STATE_FILE).exists()
    save_training_state(tmp_path / "s.pt", model, opt, sched, step=3)

    other = make(seed=0, randomize=False, r=4)
    other_opt = torch.optim.AdamW(L.lora_parameters(other))
    before = snapshot(other)
    with pytest.raises(CheckpointError, match="r: checkpoint 2, model 4"):
        load_training_state(tmp_path / "s.pt", other, other_opt)
    assert_unchanged(other, before)

    model2, _, _ = _setup()
    split_opt = torch.optim.AdamW([{"params": L.lora_parameters(model2)[:2]},
                                   {"params": L.lora_parameters(model2)[2:]}])
    before = snapshot(model2)
    with pytest.raises(CheckpointError, match="optimizer parameter groups differ"):
        load_training_state(tmp_path / "s.pt", model2, split_opt)
    assert_unchanged(model2, before)
    with pytest.raises(CheckpointError, match="not a lora_layers training state"):
        save_lora(model, tmp_path / "plain.safetensors")
        load_training_state(tmp_path / "plain.safetensors", model, opt)


# ----------------------------------------------------------------------------- nothing changes on a refusal

def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _everything(model, opt, sched=None):
    """All that load_training_state may change, copied."""
    return {"model": snapshot(model), "optimizer": copy.deepcopy(opt.state_dict()),
            "scheduler": copy.deepcopy(sched.state_dict()) if sched is not None else None,
            "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}


def _refused(path, model, opt, sched=None, match=None):
    """Load must raise CheckpointError (matching ``match``) and leave every object as it was."""
    before = _everything(model, opt, sched)
    with pytest.raises(CheckpointError, match=match) as info:
        load_training_state(path, model, opt, sched)
    after = _everything(model, opt, sched)
    for key in before:
        assert _same(before[key], after[key]), f"{key} changed by a refused load"
    return str(info.value)


def _trained(seed=0, steps=2, **kw):
    """_setup's objects after a few steps, so their states are non-trivial."""
    torch.manual_seed(seed)
    model, opt, sched = _setup(**kw)
    _train(model, opt, sched, steps, [])
    return model, opt, sched


# ----------------------------------------------------------------------------- file content

def test_every_header_length_loads(tmp_path):
    model, opt, sched = _trained()
    for k in range(41):  # in the safetensors format, one of these header lengths started with 0x80
        save_training_state(tmp_path / f"k{k}", model, opt, sched, step=k, extra={"n": "x" * 8 * k})
        state = load_training_state(tmp_path / f"k{k}", *_setup())
        assert state == {"step": k, "extra": {"n": "x" * 8 * k}}, k
    save_training_state(tmp_path / "flag.pt", model, opt, sched, extra=True)  # any plain value, a bool too
    assert load_training_state(tmp_path / "flag.pt", *_setup())["extra"] is True


def test_a_damaged_file_never_half_loads(tmp_path):
    model, opt, sched = _trained()
    path = tmp_path / "s.pt"
    save_training_state(path, model, opt, sched, step=7, extra={"best": 0.5, "tags": ["a", "b"]})
    data = path.read_bytes()
    model, opt, sched = _setup()
    clean = load_training_state(path, model, opt, sched)
    clean_state = _everything(model, opt, sched)
    refused = 0
    for pos in range(0, len(data), max(1, len(data) // 150)):
        path.write_bytes(data[:pos] + bytes([data[pos] ^ 0x01]) + data[pos + 1:])
        model, opt, sched = _trained(seed=1, steps=1)
        before = _everything(model, opt, sched)
        try:
            state = load_training_state(path, model, opt, sched)
        except CheckpointError:
            refused += 1
            after = _everything(model, opt, sched)
            assert all(_same(before[k], after[k]) for k in before), f"byte {pos}: changed by a refused load"
            continue
        # a byte the reader never uses (zip timestamps, padding) may change: the load is then whole
        after = _everything(model, opt, sched)
        assert state == clean and all(_same(clean_state[k], after[k]) for k in after), f"byte {pos}"
    assert refused > 0


# ----------------------------------------------------------------------------- mismatches refused up front

def test_optimizer_of_another_class_is_refused(tmp_path):
    model, opt, sched = _trained()
    save_training_state(tmp_path / "s.pt", model, opt, sched)
    model2, _, _ = _trained(seed=1)
    sgd = torch.optim.SGD(L.lora_parameters(model2), lr=0.1, momentum=0.9)
    sgd_sched = torch.optim.lr_scheduler.LambdaLR(sgd, lambda s: 1.0)
    msg = _refused(tmp_path / "s.pt", model2, sgd, sgd_sched, match="optimizer")
    assert "AdamW" in msg and "SGD" in msg
    model2(torch.zeros(1, 2, dtype=torch.long)).sum().backward()
    sgd.step()  # still usable


def test_optimizer_parameters_are_matched_by_name(tmp_path):
    def build(order):
        torch.manual_seed(0)
        model = nn.Sequential(L.Linear(4, 4, r=4, lora_alpha=4))  # square A and B: shapes cannot tell them apart
        nn.init.normal_(model[0].lora_B)
        params = [model[0].lora_A, model[0].lora_B]
        opt = torch.optim.Adam(params if order == "AB" else params[::-1], lr=0.1)
        model(torch.randn(3, 4)).pow(2).sum().backward()
        opt.step()
        return model, opt

    model, opt = build("AB")
    save_training_state(tmp_path / "s.pt", model, opt)
    model2, opt2 = build("BA")
    msg = _refused(tmp_path / "s.pt", model2, opt2, match="optimizer parameter groups differ")
    assert "['0.lora_A', '0.lora_B']" in msg and "['0.lora_B', '0.lora_A']" in msg

    model3, opt3 = build("AB")
    load_training_state(tmp_path / "s.pt", model3, opt3)
    for saved, loaded in zip(opt.state.values(), opt3.state.values()):
        assert torch.equal(saved["exp_avg"], loaded["exp_avg"])


def _sequential(opt, n):
    parts = [torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=2),
             torch.optim.lr_scheduler.StepLR(opt, step_size=2)][:n]
    return torch.optim.lr_scheduler.SequentialLR(opt, parts, milestones=[2][:n - 1])


def test_scheduler_of_another_structure_or_class_is_refused(tmp_path):
    model, opt, _ = _trained()
    save_training_state(tmp_path / "two.pt", model, opt, _sequential(opt, 2))
    save_training_state(tmp_path / "none.pt", model, opt)

    model2, opt2, sched2 = _trained(seed=1)
    _refused(tmp_path / "two.pt", model2, opt2, _sequential(opt2, 1), match="scheduler")
    msg = _refused(tmp_path / "two.pt", model2, opt2, sched2, match="scheduler")
    assert "SequentialLR" in msg and "LambdaLR" in msg
    _refused(tmp_path / "two.pt", model2, opt2, None, match="scheduler")
    _refused(tmp_path / "none.pt", model2, opt2, sched2, match="scheduler")

    sched3 = _sequential(opt2, 2)
    load_training_state(tmp_path / "two.pt", model2, opt2, sched3)


def test_adapter_mismatch_is_refused_like_load_lora(tmp_path):
    model, opt, sched = _trained()
    save_training_state(tmp_path / "s.pt", model, opt, sched)
    torch.manual_seed(0)
    other = make(seed=0, randomize=False, alpha=8, dropout=0.2)
    other_opt = torch.optim.AdamW(L.lora_parameters(other), lr=1e-2, weight_decay=0.01)
    _refused(tmp_path / "s.pt", other, other_opt, match="lora_alpha: checkpoint 4, model 8")


def _rewrite(path, edit):
    """Edit the stored payload and write it back with a correct checksum (a forged but consistent file)."""
    raw = torch.load(path, weights_only=True)
    edit(raw[ts.KEY_STATE])
    raw[ts.KEY_SHA256] = ts.payload_sha256(raw[ts.KEY_STATE])
    torch.save(raw, path)


@pytest.mark.parametrize("edit, field", [
    (lambda s: s.update(step="3"), "step"),
    (lambda s: s.pop("step"), "step"),
    (lambda s: s.update(step=True), "step"),
    (lambda s: s["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)), "rng"),
    (lambda s: s["rng"].update(python=(3, (1, 2), None)), "rng"),
    (lambda s: s["rng"].pop("python"), "rng"),
    (lambda s: s.update(optimizer=[]), "optimizer"),
    (lambda s: s["optimizer"].update(param_names="x"), "optimizer"),
    (lambda s: s["optimizer"]["state_dict"]["param_groups"][0]["params"].__setitem__(0, [0]), "optimizer"),
    (lambda s: s["scheduler"].update(state_dict=None), "scheduler"),
    (lambda s: s["adapter"]["tensors"].update({"qkv.lora_A": "x"}), "adapter"),
])
def test_forged_fields_are_refused_by_name(tmp_path, edit, field):
    model, opt, sched = _trained()
    save_training_state(tmp_path / "s.pt", model, opt, sched, step=3)
    _rewrite(tmp_path / "s.pt", edit)
    msg = _refused(tmp_path / "s.pt", *_trained(seed=1), match=field)
    assert str(tmp_path / "s.pt") in msg


_GROUP = lambda s: s["optimizer"]["state_dict"]["param_groups"][0]
_SCHED = lambda s: s["scheduler"]["state_dict"]


@pytest.mark.parametrize("edit, field", [
    (lambda s: _GROUP(s).pop("lr"), "param_groups[0]['lr'] is missing"),
    (lambda s: _GROUP(s).update(lr="0.1"), "param_groups[0]['lr'] is a str"),
    (lambda s: _GROUP(s).update(betas=(0.9, 0.99, 0.5)), "param_groups[0]['betas'] is a tuple"),
    (lambda s: _GROUP(s).update(weight_decay=[0.01]), "param_groups[0]['weight_decay'] is a list"),
    (lambda s: _SCHED(s).update(last_epoch="2"), "state_dict['last_epoch'] is a str"),
    (lambda s: _SCHED(s).update(base_lrs=[0.1, 0.1]), "state_dict['base_lrs'] is a list"),
    (lambda s: _SCHED(s).update(optimizer=3), "state_dict['optimizer'] is not part of a scheduler's state"),
    (lambda s: s["rng"].update(numpy=["MT19937", [1, 2], 0, 0, 0.0]), "rng.numpy"),
    (lambda s: _GROUP(s)["params"].__setitem__(1, _GROUP(s)["params"][0]), "param_groups' repeats parameter ids: [0, 0"),
])
def test_forged_settings_that_step_could_not_use_are_refused(tmp_path, edit, field):
    """issue #20 review: optimizer.load_state_dict takes a group's settings, and a scheduler's load its
    entries, wholesale; forged ones used to load, then fail in step() after the model was overwritten."""
    model, opt, sched = _trained()
    save_training_state(tmp_path / "s.pt", model, opt, sched, step=3)
    _rewrite(tmp_path / "s.pt", edit)
    model2, opt2, sched2 = _trained(seed=1)
    msg = _refused(tmp_path / "s.pt", model2, opt2, sched2)
    assert field in msg.replace('"', ""), msg
    _train(model2, opt2, sched2, 1, [])  # still usable


def test_settings_of_older_files_and_other_values_still_load(tmp_path):
    """Settings torch fills in for older files, a changed value of the same kind, and extra settings load."""
    model, opt, sched = _trained()
    save_training_state(tmp_path / "s.pt", model, opt, sched, step=3)
    _rewrite(tmp_path / "s.pt", lambda s: (_GROUP(s).pop("foreach"), _GROUP(s).pop("maximize"),
                                           _GROUP(s).pop("initial_lr"),
                                           _GROUP(s).update(lr=torch.tensor(0.5), weight_decay=0, extra=1)))
    model2, opt2, sched2 = _trained(seed=1)
    load_training_state(tmp_path / "s.pt", model2, opt2, sched2)
    assert opt2.param_groups[0]["foreach"] is None and opt2.param_groups[0]["maximize"] is False
    _train(model2, opt2, sched2, 1, [])


def test_a_multistep_scheduler_round_trips(tmp_path):
    """issue #20 review: MultiStepLR keeps its milestones in a collections.Counter, which torch.load
    (weights_only=True) reads; save_training_state refused it as 'not plain data'."""
    def setup():
        torch.manual_seed(0)
        model, opt, _ = _setup()
        return model, opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[1, 3, 3], gamma=0.5)

    torch.manual_seed(1)
    ref = setup()
    _train(*ref, 4, [])
    torch.manual_seed(1)
    run = setup()
    _train(*run, 2, [])
    save_training_state(tmp_path / "s.pt", *run)
    fresh = setup()
    load_training_state(tmp_path / "s.pt", *fresh)
    assert fresh[2].milestones == run[2].milestones and type(fresh[2].milestones) is type(run[2].milestones)
    _train(*fresh, 2, [])
    assert _same(snapshot(fresh[0]), snapshot(ref[0])) and fresh[2].get_last_lr() == ref[2].get_last_lr()


def test_the_checksum_covers_every_field(tmp_path):
    model, opt, sched = _trained()
    save_training_state(tmp_path / "s.pt", model, opt, sched, step=3)
    raw = torch.load(tmp_path / "s.pt", weights_only=True)
    raw[ts.KEY_STATE]["step"] = 4  # an edit without a new checksum
    torch.save(raw, tmp_path / "s.pt")
    _refused(tmp_path / "s.pt", *_trained(seed=1), match="SHA-256")


# ----------------------------------------------------------------------------- extras of every dtype

def _dtypes():
    for name in dir(torch):
        dtype = getattr(torch, name)
        if isinstance(dtype, torch.dtype):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "ComplexHalf support is experimental", quantized deprecation
                try:
                    torch.zeros(2, dtype=dtype)
                except Exception:  # quantized dtypes: no plain tensor can hold them
                    continue
            yield dtype


@pytest.mark.parametrize("dtype", sorted(set(_dtypes()), key=str), ids=str)
def test_every_dtype_in_extra_round_trips_or_is_refused_up_front(tmp_path, dtype):
    model, opt, sched = _trained()
    value = torch.arange(6, dtype=torch.uint8).view(dtype) if dtype.itemsize == 1 else torch.zeros(3, dtype=dtype)
    try:
        save_training_state(tmp_path / "run", model, opt, sched, extra={"z": value, "t": (value,)})
    except TypeError as exc:
        assert str(dtype) in str(exc) and "extra['z']" in str(exc)
        assert not (tmp_path / "run").exists()
        assert dtype not in (torch.complex64, torch.uint16, torch.float8_e4m3fn, torch.float8_e5m2)
        return
    extra = load_training_state(tmp_path / "run", *_setup())["extra"]
    back = extra["z"]
    assert back.dtype == dtype and back.shape == value.shape
    assert torch.equal(back.view(torch.uint8), value.view(torch.uint8))
    assert isinstance(extra["t"], tuple)


# ----------------------------------------------------------------------------- refused saves

@pytest.mark.parametrize("bad, exc, text", [
    ("", ValueError, "path_or_dir must be"),
    (None, TypeError, "path_or_dir must be a str or os.PathLike, got NoneType None"),
    ("s.safetensors", ValueError, "path_or_dir"),
    ("missing/run", FileNotFoundError, "does not exist"),
])
def test_bad_destinations_are_refused_before_anything_is_written(tmp_path, monkeypatch, bad, exc, text):
    monkeypatch.chdir(tmp_path)
    model, opt, sched = _trained()
    with pytest.raises(exc, match=text):
        save_training_state(bad, model, opt, sched)
    assert list(tmp_path.iterdir()) == []


def test_a_refused_save_creates_no_folder(tmp_path):
    model, opt, sched = _trained()
    with pytest.raises(TypeError, match=r"extra\['f'\] is a builtin_function_or_method"):
        save_training_state(tmp_path / "run", model, opt, sched, extra={"f": len})
    with pytest.raises(ValueError, match="has no LoRA adapters"):
        save_training_state(tmp_path / "run", L.merge_and_unload(model), opt)
    assert list(tmp_path.iterdir()) == []


def test_file_mode_follows_the_umask(tmp_path):
    model, opt, sched = _trained()
    old = os.umask(0o027)
    try:
        save_training_state(tmp_path / "run", model, opt, sched)
    finally:
        os.umask(old)
    assert (tmp_path / "run" / TRAINING_STATE_FILE).stat().st_mode & 0o777 == 0o640


# ----------------------------------------------------------------------------- every trained parameter is saved

class _Trained(nn.Module):
    """Adapters next to a LoRA layer's bias, a LayerNorm and a head whose bias has one element."""

    def __init__(self):
        super().__init__()
        self.lin = L.Linear(6, 8, r=2, lora_alpha=4, lora_dropout=0.1)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.norm(self.lin(x)))


def _trained_setup(bias, groups, norm_weight=False, optimizer=torch.optim.AdamW, **opt_kw):
    torch.manual_seed(0)
    model = _Trained().train()
    nn.init.normal_(model.lin.lora_B)
    L.mark_only_lora_as_trainable(model, bias=bias)
    model.norm.weight.requires_grad_(norm_weight)
    if groups == "lora_plus":
        params = L.lora_plus_param_groups(model, lr=1e-2)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    return model, optimizer(params, **(opt_kw or {"lr": 1e-2}))


def _steps(model, opt, n, closure=False):
    for _ in range(n):
        x, y = torch.randn(5, 6), torch.randn(5, 1)  # from the global RNG, restored by the load

        def loss():
            opt.zero_grad()
            out = (model(x) - y).pow(2).mean()
            out.backward()
            return out
        opt.step(loss) if closure else (loss(), opt.step())


def _assert_same_run(model, opt, ref_model, ref_opt):
    ref = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, ref[name]), name
    assert _same(opt.state_dict(), ref_opt.state_dict())


@pytest.mark.parametrize("bias, groups, norm_weight", [
    ("lora_only", "plain", False), ("all", "plain", False), ("lora_only", "lora_plus", False),
    ("all", "lora_plus", False), ("none", "plain", True), ("all", "lora_plus", True)])
def test_resume_restores_every_parameter_the_optimizer_updates(tmp_path, bias, groups, norm_weight):
    torch.manual_seed(1)
    ref_model, ref_opt = _trained_setup(bias, groups, norm_weight)
    _steps(ref_model, ref_opt, 6)

    torch.manual_seed(1)
    model, opt = _trained_setup(bias, groups, norm_weight)
    _steps(model, opt, 3)
    save_training_state(tmp_path / "s.pt", model, opt)  # the default bias="none"
    torch.manual_seed(999)
    model, opt = _trained_setup(bias, groups, norm_weight)
    with torch.no_grad():  # a fresh model whose trained parameters are all wrong: the load must set them
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape))
    load_training_state(tmp_path / "s.pt", model, opt)
    _steps(model, opt, 3)
    _assert_same_run(model, opt, ref_model, ref_opt)


def test_a_parameter_outside_the_model_is_refused_on_save(tmp_path):
    model, opt = _trained_setup("all", "plain")
    outside = nn.Parameter(torch.zeros(3))
    opt.add_param_group({"params": [outside]})
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\] is not a parameter of the model"):
        save_training_state(tmp_path / "run", model, opt)
    assert list(tmp_path.iterdir()) == []


def test_a_merged_trained_weight_is_saved_unmerged(tmp_path):
    model, opt = _trained_setup("all", "plain")
    model.lin.weight.requires_grad_(True)
    opt.add_param_group({"params": [model.lin.weight]})
    _steps(model, opt, 2)
    trained = model.lin.weight.detach().clone()
    model.eval()  # merges the adapter into the trained weight
    save_training_state(tmp_path / "s.pt", model, opt)
    fresh, fresh_opt = _trained_setup("all", "plain")
    fresh.lin.weight.requires_grad_(True)
    fresh_opt.add_param_group({"params": [fresh.lin.weight]})
    load_training_state(tmp_path / "s.pt", fresh.eval(), fresh_opt)  # into a merged layer
    assert torch.equal(fresh.train().lin.weight, trained)
    _assert_same_run(fresh, fresh_opt, model.train(), opt)


def test_trained_parameters_are_checked_before_anything_changes(tmp_path):
    model, opt = _trained_setup("all", "plain")
    _steps(model, opt, 2)
    save_training_state(tmp_path / "s.pt", model, opt)
    _rewrite(tmp_path / "s.pt", lambda s: s[ts.KEY_TRAINED].update({"head.bias": torch.zeros(2)}))
    fresh = _trained_setup("all", "plain")
    msg = _refused(tmp_path / "s.pt", *fresh, match=r"trained_params\['head.bias'\]")
    assert "shape (2,)" in msg and "shape (1,)" in msg
    _rewrite(tmp_path / "s.pt", lambda s: s[ts.KEY_TRAINED].pop("head.bias"))
    msg = _refused(tmp_path / "s.pt", *fresh, match="trained_params")
    assert "head.bias" in msg


def test_a_file_without_trained_parameters_warns_naming_them(tmp_path):
    model, opt = _trained_setup("all", "plain")
    _steps(model, opt, 2)
    save_training_state(tmp_path / "s.pt", model, opt, bias="lora_only")
    _rewrite(tmp_path / "s.pt", lambda s: s.pop(ts.KEY_TRAINED))  # as written before the field existed
    fresh, fresh_opt = _trained_setup("all", "plain")
    with pytest.warns(UserWarning, match=r"'head.bias', 'norm.bias' keep their current values"):
        load_training_state(tmp_path / "s.pt", fresh, fresh_opt)
    assert torch.equal(fresh.lin.bias, model.lin.bias)  # the adapter's bias (bias="lora_only") is restored


# ----------------------------------------------------------------------------- forged optimizer state

_OPTIMIZERS = {  # every torch optimizer that steps without a closure or sparse gradients
    "SGD": (torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9}),
    "Adam": (torch.optim.Adam, {"lr": 1e-2, "amsgrad": True}),
    "AdamW": (torch.optim.AdamW, {"lr": 1e-2}),
    "Adagrad": (torch.optim.Adagrad, {"lr": 1e-2}),
    "RMSprop": (torch.optim.RMSprop, {"lr": 1e-2, "momentum": 0.9, "centered": True}),
    "Adadelta": (torch.optim.Adadelta, {}),
    "Adamax": (torch.optim.Adamax, {}),
    "NAdam": (torch.optim.NAdam, {}),
    "RAdam": (torch.optim.RAdam, {}),
    "ASGD": (torch.optim.ASGD, {}),
    "Rprop": (torch.optim.Rprop, {}),
    "Adafactor": (torch.optim.Adafactor, {}),
}


def _stepped(name, steps=2):
    optimizer, kw = _OPTIMIZERS[name]
    model, opt = _trained_setup("all", "plain", optimizer=optimizer, **kw)
    _steps(model, opt, steps)
    return model, opt


@pytest.mark.parametrize("name", sorted(_OPTIMIZERS) + ["LBFGS"])
def test_every_optimizers_state_resumes_exactly(tmp_path, name):
    def setup():
        if name == "LBFGS":  # its state is flat vectors over all parameters, kept on the first one
            return _trained_setup("all", "plain", optimizer=torch.optim.LBFGS, lr=0.1, history_size=3)
        optimizer, kw = _OPTIMIZERS[name]
        return _trained_setup("all", "plain", optimizer=optimizer, **kw)

    torch.manual_seed(1)
    ref_model, ref_opt = setup()
    _steps(ref_model, ref_opt, 4, closure=name == "LBFGS")
    torch.manual_seed(1)
    model, opt = setup()
    _steps(model, opt, 2, closure=name == "LBFGS")
    save_training_state(tmp_path / "s.pt", model, opt)
    model, opt = setup()
    load_training_state(tmp_path / "s.pt", model, opt)
    _steps(model, opt, 2, closure=name == "LBFGS")
    _assert_same_run(model, opt, ref_model, ref_opt)


def _forge_state(path, param, key, value):
    """Replace ``key`` in the saved optimizer state of the parameter named ``param``."""
    def edit(state):
        names = [n for group in state["optimizer"]["param_names"] for n in group]
        state["optimizer"]["state_dict"]["state"][names.index(param)][key] = value
    _rewrite(path, edit)


A, BIAS = "lin.lora_A", "head.bias"  # shapes (2, 6) and (1,)


@pytest.mark.parametrize("name, param, key, value, expected", [
    ("AdamW", A, "exp_avg", torch.zeros(6, 2), "(2, 6)"),  # the same number of elements, transposed
    ("AdamW", A, "exp_avg_sq", torch.zeros(12), "(2, 6)"),
    ("AdamW", A, "exp_avg", torch.zeros(2, 6, dtype=torch.int64), "floating"),
    ("AdamW", BIAS, "exp_avg", torch.zeros(()), "(1,)"),  # a scalar where the (1,)-shaped bias needs a vector
    ("AdamW", BIAS, "step", torch.zeros(2), "a number"),
    ("Adam", A, "max_exp_avg_sq", torch.zeros(3, 4), "(2, 6)"),
    ("SGD", A, "momentum_buffer", torch.zeros(6, 2), "(2, 6)"),
    ("Adagrad", BIAS, "sum", torch.zeros(2), "(1,)"),
    ("RMSprop", A, "grad_avg", torch.zeros(6, 2), "(2, 6)"),
    ("RMSprop", A, "square_avg", torch.zeros(2, 6, dtype=torch.complex64), "floating"),
    ("NAdam", BIAS, "mu_product", torch.zeros(2), "a number"),
    ("Rprop", A, "step_size", torch.zeros(6, 2), "(2, 6)"),
    ("Adafactor", A, "row_var", torch.zeros(1, 6), "(2, 1)"),
    ("Adafactor", BIAS, "variance", torch.zeros(()), "(1,)"),
])
def test_wrong_shaped_optimizer_state_is_refused_before_anything_changes(tmp_path, name, param, key, value,
                                                                         expected):
    model, opt = _stepped(name)
    save_training_state(tmp_path / "s.pt", model, opt)
    _forge_state(tmp_path / "s.pt", param, key, value)
    for fresh in (_stepped(name, 0), _stepped(name, 1)):  # a fresh optimizer, and one that holds state
        msg = _refused(tmp_path / "s.pt", *fresh, match=f"'{key}'")
        assert param in msg and expected in msg and str(tuple(value.shape)) in msg and str(value.dtype) in msg
    _steps(*fresh, 1)  # still usable


class _Momentum(torch.optim.Optimizer):
    """An optimizer from outside torch.optim, whose state keys the library cannot know."""

    def __init__(self, params, lr=1e-2):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state["step"] = state.get("step", 0) + 1
                state["table"] = torch.arange(5.0)  # shaped like no parameter
                velocity = state.setdefault("velocity", torch.zeros_like(p)).mul_(0.9).add_(p.grad)
                p.sub_(group["lr"] * velocity)


def test_another_optimizers_state_is_checked_by_element_count(tmp_path):
    torch.manual_seed(1)
    ref_model, ref_opt = _trained_setup("all", "plain", optimizer=_Momentum)
    _steps(ref_model, ref_opt, 4)
    torch.manual_seed(1)
    model, opt = _trained_setup("all", "plain", optimizer=_Momentum)
    _steps(model, opt, 2)
    save_training_state(tmp_path / "s.pt", model, opt)
    fresh = _trained_setup("all", "plain", optimizer=_Momentum)
    load_training_state(tmp_path / "s.pt", *fresh)
    _steps(*fresh, 2)
    _assert_same_run(*fresh, ref_model, ref_opt)

    _forge_state(tmp_path / "s.pt", A, "velocity", torch.zeros(6, 2))
    msg = _refused(tmp_path / "s.pt", *_trained_setup("all", "plain", optimizer=_Momentum), match="'velocity'")
    assert A in msg and "the parameter's shape (2, 6)" in msg and "(6, 2)" in msg
    _forge_state(tmp_path / "s.pt", A, "step", torch.zeros(2))
    _refused(tmp_path / "s.pt", *_trained_setup("all", "plain", optimizer=_Momentum), match="'step'.*a number")


def test_sgd_state_without_momentum_buffer_loads(tmp_path):
    """torch 2.1 and earlier stored ``momentum_buffer: None`` for SGD without momentum; SGD accepts it."""
    model, opt = _stepped("SGD")
    save_training_state(tmp_path / "s.pt", model, opt)
    _forge_state(tmp_path / "s.pt", A, "momentum_buffer", None)
    fresh = _stepped("SGD", 0)
    load_training_state(tmp_path / "s.pt", *fresh)
    assert fresh[1].state[fresh[0].lin.lora_A]["momentum_buffer"] is None
    _steps(*fresh, 1)


def test_other_adapter_settings_name_the_call_that_fits_not_load_adapter(tmp_path):
    """issue #20 review: load_lora's differing-settings advice ('call lora_layers.load_adapter(model, path)')
    was given for a training state too, which load_adapter does not read; the call that builds fitting
    adapters is named, and it fits."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    L.inject_lora(net, ["0", "2"], r=3, lora_alpha=6)
    opt = torch.optim.AdamW(L.lora_parameters(net), lr=0.1)
    save_training_state(tmp_path / "s.pt", net, opt, step=1)
    other = L.unload(copy.deepcopy(net))
    L.inject_lora(other, ["0", "2"], r=2)
    with pytest.raises(CheckpointError) as info:
        load_training_state(tmp_path / "s.pt", other, torch.optim.AdamW(L.lora_parameters(other), lr=0.1))
    call = "lora_layers.inject_lora(model, ['0', '2'], r=3, lora_alpha=6)"
    assert call in str(info.value) and "load_adapter" not in str(info.value), str(info.value)
    fresh = L.unload(copy.deepcopy(other))
    eval(call, {"lora_layers": L, "model": fresh})
    load_training_state(tmp_path / "s.pt", fresh, torch.optim.AdamW(L.lora_parameters(fresh), lr=0.1))
