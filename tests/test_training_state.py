"""Training state: exact resume, and mismatches refused before anything is changed."""
import random

import pytest
import torch

import lora_layers as L
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
    save_training_state(tmp_path / "s.safetensors", model, opt, sched, step=3)

    other = make(seed=0, randomize=False, r=4)
    other_opt = torch.optim.AdamW(L.lora_parameters(other))
    before = snapshot(other)
    with pytest.raises(CheckpointError, match="r: checkpoint 2, model 4"):
        load_training_state(tmp_path / "s.safetensors", other, other_opt)
    assert_unchanged(other, before)

    model2, _, _ = _setup()
    split_opt = torch.optim.AdamW([{"params": L.lora_parameters(model2)[:2]},
                                   {"params": L.lora_parameters(model2)[2:]}])
    before = snapshot(model2)
    with pytest.raises(CheckpointError, match="optimizer parameter groups differ"):
        load_training_state(tmp_path / "s.safetensors", model2, split_opt)
    assert_unchanged(model2, before)
    with pytest.raises(CheckpointError, match="not a lora_layers training state"):
        save_lora(model, tmp_path / "plain.safetensors")
        load_training_state(tmp_path / "plain.safetensors", model, opt)
