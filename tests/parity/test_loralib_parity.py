"""Parity with loralib 0.1.2: same init for the same seed, same state_dict keys
(strict load), same outputs and gradients in train and eval mode."""
import pytest
import torch

import lora_layers as L

loralib = pytest.importorskip("loralib")

LINEAR_CASES = {
    "linear": (lambda m: m.Linear(10, 7, r=4, lora_alpha=8), 10),
    "linear_fifo": (lambda m: m.Linear(10, 7, r=3, lora_alpha=5, fan_in_fan_out=True), 10),
    "linear_nobias": (lambda m: m.Linear(6, 9, r=2, lora_alpha=2, bias=False), 6),
    "merged_TFT": (lambda m: m.MergedLinear(8, 12, r=2, lora_alpha=4, enable_lora=[True, False, True]), 8),
    "merged_FTF": (lambda m: m.MergedLinear(8, 12, r=3, lora_alpha=4, enable_lora=[False, True, False]), 8),
    "merged_TTT": (lambda m: m.MergedLinear(8, 12, r=2, lora_alpha=1, enable_lora=[True, True, True]), 8),
    "merged_TT_fifo": (lambda m: m.MergedLinear(8, 12, r=2, lora_alpha=4, enable_lora=[True, True],
                                                fan_in_fan_out=True), 8),
    "merged_single": (lambda m: m.MergedLinear(8, 4, r=2, lora_alpha=4, enable_lora=[True]), 8),
}


def _pair(make, seed=0):
    torch.manual_seed(seed)
    ref = make(loralib)
    torch.manual_seed(seed)
    ours = make(L)
    return ref, ours


def _params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("case", list(LINEAR_CASES) + ["embedding", "embedding_pad"])
def test_same_seed_same_init(case):
    if case.startswith("embedding"):
        pad = 2 if case == "embedding_pad" else None

        def make(m):
            return m.Embedding(11, 5, r=3, lora_alpha=2, padding_idx=pad)
    else:
        make = LINEAR_CASES[case][0]
    ref, ours = _pair(make)
    pr, po = _params(ref), _params(ours)
    assert list(pr) == list(po)
    for name in pr:
        assert torch.equal(pr[name], po[name]), f"{case}: {name} differs for the same seed"
    assert {n for n, p in ref.named_parameters() if p.requires_grad} == \
        {n for n, p in ours.named_parameters() if p.requires_grad}
    # Both continue from the same RNG state.
    torch.manual_seed(5)
    make(loralib)
    a = torch.rand(3)
    torch.manual_seed(5)
    make(L)
    assert torch.equal(a, torch.rand(3))


def _randomise_ref(ref):
    with torch.no_grad():
        ref.lora_B.normal_()
        ref.lora_A.normal_()


def _run(module, x, params):
    y = module(x)
    g = torch.linspace(-1, 1, y.numel()).view_as(y)
    want = [x] + [p for p in params if p.requires_grad]
    grads = torch.autograd.grad(y, want, g, allow_unused=True)
    return y.detach(), grads


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_parity(case, mode):
    make, in_f = LINEAR_CASES[case]
    ref, ours = _pair(make, seed=1)
    _randomise_ref(ref)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.train(mode == "train")
    ours.train(mode == "train")
    assert ours.merged == ref.merged == (mode == "eval")
    x = torch.randn(2, 3, in_f, requires_grad=True)
    yr, gr = _run(ref, x, [ref.lora_A, ref.lora_B, ref.bias] if ref.bias is not None else [ref.lora_A, ref.lora_B])
    yo, go = _run(ours, x, [ours.lora_A, ours.lora_B, ours.bias] if ours.bias is not None else [ours.lora_A, ours.lora_B])
    torch.testing.assert_close(yo, yr, rtol=1e-5, atol=1e-5)
    assert len(gr) == len(go)
    for a, b in zip(go, gr):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if mode == "eval":  # both merged the same delta into the weight
        torch.testing.assert_close(ours.weight, ref.weight, rtol=1e-6, atol=1e-6)


def test_linear_dropout_eval_parity():
    """With dropout > 0 only eval is comparable (the RNG streams differ); keys always are."""
    ref, ours = _pair(lambda m: m.Linear(12, 6, r=4, lora_alpha=8, lora_dropout=0.2), seed=3)
    _randomise_ref(ref)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert ours.lora_dropout.p == 0.2
    ref.eval()
    ours.eval()
    x = torch.randn(5, 12)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("pad", [None, 3])
def test_embedding_parity(mode, pad):
    ref, ours = _pair(lambda m: m.Embedding(13, 6, r=4, lora_alpha=8, padding_idx=pad), seed=2)
    _randomise_ref(ref)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.train(mode == "train")
    ours.train(mode == "train")
    idx = torch.tensor([[0, 3, 12, 5], [3, 3, 1, 7]])
    yr, yo = ref(idx), ours(idx)
    torch.testing.assert_close(yo, yr, rtol=1e-5, atol=1e-5)
    if mode == "train":
        g = torch.randn_like(yr)
        gr = torch.autograd.grad(yr, [ref.lora_A, ref.lora_B], g)
        go = torch.autograd.grad(yo, [ours.lora_A, ours.lora_B], g)
        for a, b in zip(go, gr):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_loralib_checkpoint_saved_in_train_mode_loads_strict():
    """A whole loralib model's checkpoint (incl. non-LoRA modules) loads strictly."""
    def build(m):
        return torch.nn.Sequential(m.Embedding(10, 8, r=2), m.Linear(8, 8, r=2),
                                   m.MergedLinear(8, 12, r=2, enable_lora=[True, False, True]), torch.nn.Linear(12, 3))

    torch.manual_seed(0)
    ref = build(loralib)
    for mod in ref[:3]:
        _randomise_ref(mod)
    ours = build(L)
    ours.load_state_dict(ref.state_dict(), strict=True)
    idx = torch.randint(0, 10, (2, 4))
    for mode in (True, False):
        ref.train(mode)
        ours.train(mode)
        torch.testing.assert_close(ours(idx), ref(idx), rtol=1e-5, atol=1e-5)
