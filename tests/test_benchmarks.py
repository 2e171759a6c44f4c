"""Smoke tests of the benchmark scripts (tiny shapes) and the PEFT loss-parity check.

No timing is asserted. What is asserted is deterministic: saved-activation
bytes, that the compared implementations compute the same function, the first
losses, parameter counts, and the loss curves against PEFT.
"""
import json
import os
import sys

import pytest
import torch

import lora_layers as L

pytest.importorskip("peft")
pytest.importorskip("loralib")
pytest.importorskip("transformers")

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import _common  # noqa: E402
import bench_layers  # noqa: E402
import bench_merged_mark  # noqa: E402
import bench_phi3_step  # noqa: E402
import loss_parity  # noqa: E402
import plot  # noqa: E402


def test_saved_bytes_counts_each_storage_once_and_skips_excluded():
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8, requires_grad=True)
    h = torch.randn(4, 8)

    def fn():
        y = x * h  # saves h (h needs no grad, so x is not saved)
        z = (y * h[:2].repeat(2, 1)).sum()  # saves a new tensor (counted) ...
        return z + (y * h).sum() + (x[:2] * w[:2]).sum()  # ... h again (one storage); views of x, w (excluded)

    got = _common.saved_bytes(fn, exclude=[x, w])
    assert got == {"bytes": 2 * h.numel() * 4, "tensors": 2, "excluded": 2}


def test_bench_merged_mark_quick_times_both_and_restores_the_fingerprints(tmp_path, capsys):
    from lora_layers import merging

    real = merging.weight_sums
    bench_merged_mark.main(["--quick", "--threads", "1", "--out", str(tmp_path / "m.json")])
    res = json.loads((tmp_path / "m.json").read_text())
    assert sorted(res["fp32"]["median_ms"]) == ["cycle", "cycle_without", "state_dict", "state_dict_without"]
    assert merging.weight_sums is real
    with bench_merged_mark._no_sums():  # "without" is the mark alone
        sd = L.Linear(4, 4, r=2).eval().state_dict()
    assert sd._metadata[""]["lora_merged"] and "lora_merged_check" not in sd._metadata[""]


def test_interleaved_times_runs_every_callable_reps_times():
    calls = []
    times = _common.interleaved_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                      reps=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then rotated rounds
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    with pytest.raises(ValueError, match="reps"):
        _common.interleaved_times({"a": lambda: None}, reps=0)


def test_bench_layers_quick(tmp_path, capsys):
    out = tmp_path / "layers.json"
    bench_layers.main(["--quick", "--threads", "1", "--out", str(out)])
    assert "| lora_layers |" in capsys.readouterr().out
    data = json.loads(out.read_text())
    cases = data["cases"]
    assert len(cases) == 8  # fp32/bf16 x dropout 0.05/0, qkv equal and GQA splits, then DoRA, then QLoRA
    for case in cases[:6]:
        c, res = case["config"], case["results"]
        tokens, r = c["tokens"], c["r"]
        esize = 4 if c["dtype"] == "float32" else 2
        n = len(c["splits"]) if case["kind"] == "merged" else 1
        ours = res["lora_layers MergedLinear" if case["kind"] == "merged" else "lora_layers"]
        # The lean path keeps only u = drop(x) Aᵀ (T × r·n), with or without dropout.
        assert ours["saved_bytes"] == tokens * r * n * esize, (case["kind"], c)
        assert res[bench_layers.FLOOR]["saved_bytes"] == 0
        for name, f in res.items():
            assert f["train_ratio"] > 0 and f["eval_ratio"] > 0, name
            # Every implementation computing the same function agrees with lora_layers.
            if name != bench_layers.FLOOR and name != f"peft fused r={r}":
                tol = 1e-4 if c["dtype"] == "float32" else 0.1
                assert f["max_abs_diff_vs_lora_layers"] <= tol, (name, c)
        if case["kind"] == "linear" and c["dropout"] > 0:
            # loralib and PEFT keep the dropped copy of x and its mask: ≥ 1 x.
            x_bytes = tokens * c["in"] * esize
            assert res["loralib"]["saved_bytes"] >= x_bytes
            assert res["peft"]["saved_bytes"] >= x_bytes
    dora = cases[6]
    c, res = dora["config"], dora["results"]
    assert dora["kind"] == "dora" and c["dropout"] == 0.05 and c["dtype"] == "float32"
    # Lean DoRA keeps u (T × r) and the (out,) norm; PEFT keeps T × out tensors and the dropped x as well.
    assert res[bench_layers.DORA]["saved_bytes"] == (c["tokens"] * c["r"] + c["out"]) * 4
    assert res[bench_layers.PEFT_DORA]["saved_bytes"] >= (c["tokens"] * (c["in"] + c["out"])) * 4
    assert res[bench_layers.DORA]["trainable_params"] == res[bench_layers.PEFT_DORA]["trainable_params"]
    for name in (bench_layers.PEFT_DORA, "peft"):  # merged outputs: each against lora_layers' same variant
        assert res[name]["max_abs_diff_vs_lora_layers"] <= 1e-4, name
    assert {(x["name"], x["over"]) for x in dora["comparisons"]} == set(bench_layers.DORA_COMPARISONS)
    for x in dora["comparisons"]:  # the median of the per-round ratios, from the same timings
        res_a, res_b = res[x["name"]]["train_s"], res[x["over"]]["train_s"]
        assert x["round_median_ratio"] == _common.median([a / b for a, b in zip(res_a, res_b)])
    parity = dora["parity_p0"]
    assert parity["output"] <= 1e-4 * parity["output_scale"]
    assert set(parity["grads"]) == {"x", "A", "B", "m"} and max(parity["grads"].values()) <= 1e-4
    # The fast mode keeps the pre-scale product (T × out) as well, and computes the same function.
    assert res[bench_layers.DORA_FAST]["saved_bytes"] == (c["tokens"] * (c["r"] + c["out"]) + c["out"]) * 4
    assert res[bench_layers.DORA_FAST]["max_abs_diff_vs_lora_layers"] <= 1e-4
    fast = dora["parity_fast_p0"]
    assert fast["names"] == [bench_layers.DORA, bench_layers.DORA_FAST] and fast["output"] == 0.0
    assert fast["grads"]["x"] == fast["grads"]["A"] == fast["grads"]["B"] == 0.0 and fast["grads"]["m"] <= 1e-6
    qlora = cases[7]
    c, res = qlora["config"], qlora["results"]
    assert qlora["kind"] == "qlora" and c["dropout"] == 0.05 and c["dtype"] == "float32"
    # Over a packed base too, lora_layers keeps u only; PEFT keeps the dropped copy of x.
    for name in (bench_layers.QLORA, bench_layers.QLORA_TORCHAO):
        assert res[name]["saved_bytes"] == c["tokens"] * c["r"] * 4, name
        assert res[name]["weight_bytes"] < qlora["bf16_weight_bytes"], name
    assert res[bench_layers.PEFT_QLORA]["saved_bytes"] >= c["tokens"] * c["in"] * 4
    assert res[bench_layers.QLORA]["weight_bytes"] == res[bench_layers.PEFT_QLORA]["weight_bytes"]  # one layer
    assert {(x["name"], x["over"]) for x in qlora["comparisons"]} == set(bench_layers.QLORA_COMPARISONS)
    parity = qlora["parity_p0"]  # PEFT and lora_layers on the same bitsandbytes nf4 layer
    assert parity["output"] <= 1e-5 * parity["output_scale"]
    assert set(parity["grads"]) == {"x", "A", "B"} and max(parity["grads"].values()) <= 1e-5


def test_bench_phi3_step_quick(tmp_path):
    out = tmp_path / "phi3.json"
    data = bench_phi3_step.main(["--quick", "--threads", "1", "--out", str(out)])
    assert json.loads(out.read_text())["config"]["layers"] == 2
    res = data["results"]
    peft, inject = res[bench_phi3_step.PEFT], res[bench_phi3_step.INJECT]
    # Same base weights and adapter init: the same first loss and parameter count.
    assert inject["first_loss"] == pytest.approx(peft["first_loss"], abs=1e-6)
    assert inject["trainable_params"] == peft["trainable_params"]
    # No stored dropout masks or dropped copies of x.
    assert inject["saved_bytes"] < peft["saved_bytes"]
    if bench_phi3_step.PHI3 in res:
        phi3 = res[bench_phi3_step.PHI3]
        assert phi3["first_loss"] == pytest.approx(peft["first_loss"], abs=1e-6)
        assert phi3["trainable_params"] > peft["trainable_params"]  # one adapter per split


def test_bench_phi3_step_quick_over_an_nf4_base():
    pytest.importorskip("bitsandbytes")
    data = bench_phi3_step.main(["--quick", "--threads", "1", "--quantize", "nf4", "--no-phi3"])
    assert data["config"]["quantize"] == "nf4"
    res = data["results"]
    peft, inject = res[bench_phi3_step.PEFT], res[bench_phi3_step.INJECT]
    # PEFT's QLoRA and lora_layers over the same bitsandbytes base: the base model's first loss.
    assert inject["first_loss"] == peft["first_loss"] == res[bench_phi3_step.FLOOR]["first_loss"]
    assert inject["saved_bytes"] < peft["saved_bytes"]


def test_requantize_cost_quick(tmp_path):
    """benchmarks/requantize_cost.py on a run folder laid out as the example's: the exact merge keeps the trained
    function's loss, and each requantized merge's report covers every adapted layer."""
    pytest.importorskip("torchao")
    import requantize_cost

    import phi3_data  # examples/, which requantize_cost puts on the path

    texts = [m["content"] for chat in phi3_data.synthetic_reversal(40, seed=0) for m in chat]
    config = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512)
    tokenizer, model = phi3_data.build_tiny_model(texts, config, "eager", seed=0)
    model.save_pretrained(tmp_path / "base_model")
    tokenizer.save_pretrained(tmp_path / "base_model")
    L.quantize_base(model)
    L.phi3.apply_lora(model, r=4, lora_alpha=8, lora_dropout=0.0)
    with torch.no_grad():
        for p in L.lora_parameters(model):
            p.normal_(0, 0.05)
    L.save_lora(model, tmp_path / "lora_adapter.safetensors")
    rows, reports = requantize_cost.main([str(tmp_path), "--chats", "8"])
    losses = dict(rows)
    assert losses["merge_and_unload (exact, dense)"] == pytest.approx(
        losses["nf4 base + adapter, unmerged (trained)"], rel=1e-5)
    assert losses["merge_and_unload(requantize='nf4')"] != losses["merge_and_unload (exact, dense)"]
    assert all(len(report.layers) == 4 and report.max_logit_diff > 0 for report in reports.values())


@pytest.mark.parametrize("gqa", [True, False])
def test_loss_parity_with_peft(tiny_phi3_factory, gqa):
    res = loss_parity.run_parity(lambda: tiny_phi3_factory(gqa=gqa), steps=20)
    assert len(res["peft"]) == len(res["lora_layers"]) == 20
    assert res["modules"] == 8  # 2 layers x 4 projections
    assert res["trainable"]["peft"] == res["trainable"]["lora_layers"]
    assert res["adapter_max_abs"] > 0  # the adapters trained: B left zero
    assert res["lora_layers"][-1] < res["lora_layers"][0]  # and the loss fell
    for step, (a, b) in enumerate(zip(res["peft"], res["lora_layers"])):
        assert abs(a - b) <= 1e-5, f"step {step}: PEFT {a} vs lora_layers {b}"


def test_plot_quick(tmp_path):
    data = tmp_path / "sweeps.json"
    paths = plot.main(["--quick", "--threads", "1", "--outdir", str(tmp_path / "img"), "--data", str(data)])
    assert len(paths) == 3
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # Re-plotting saved data needs no benchmark run.
    again = plot.main(["--no-run", "--data", str(data), "--outdir", str(tmp_path / "img2")])
    assert [os.path.basename(p) for p in again] == [os.path.basename(p) for p in paths]


def test_bench_mixed_quick(tmp_path):
    import bench_mixed

    data = bench_mixed.main(["--quick", "--threads", "1", "--out", str(tmp_path / "mixed.json")])
    for part in data["parts"].values():
        res = part["results"]
        mixed = [bench_mixed._mixed_name(4), bench_mixed._mixed_name(4, bench_mixed.GROUPED)]
        assert set(res) == {bench_mixed.ONE, bench_mixed.FLOOR, *mixed}
        assert res[bench_mixed.FLOOR]["saved_bytes"] == 0
        c = data["config"]
        # the one adapter keeps u (T x r); the mixed batch only its T int64 indices
        assert res[bench_mixed.ONE]["saved_bytes"] == c["tokens"] * c["rank"] * 4
        assert [res[name]["saved_bytes"] for name in mixed] == [c["tokens"] * 8] * 2
        assert part["ratio_mixed_over_one"]["median"] > 0
