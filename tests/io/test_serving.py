"""check_export and export_peft(server=) on hand-written adapter folders and small torch models (issue #25 item 3).
Each rule of vLLM's loader has a test; PEFT loading the folded exports is in tests/parity/test_serving_peft.py."""
import json
import os

import pytest
import torch
import torch.nn as nn

import lora_layers as L
from lora_layers.fileio import CheckpointError
from lora_layers.peft_format import PEFT_BIN_NAME, PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME
from _adapter_folder import BASE_CONFIG, PREFIX, write_adapter


def problems(folder, server="vllm"):
    return L.check_export(folder, server=server).problems


def folder_bytes(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def two_layer_net(**kwargs):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    net[0] = L.Linear.from_module(net[0], r=kwargs.pop("r", 4), lora_alpha=8, **kwargs)
    with torch.no_grad():
        net[0].lora_B.normal_()
    return net


def test_a_plain_adapter_passes_both_and_prints_its_flag(tmp_path):
    check = L.check_export(write_adapter(tmp_path / "a"))
    assert check.ok and check.problems == () and check.server == "vllm" and check.changes == ()
    assert (check.max_rank, check.min_max_lora_rank) == (8, 8)
    assert str(check) == f"vllm: {tmp_path / 'a'}: servable, largest rank 8: --max-lora-rank 8 or more"
    peft = L.check_export(tmp_path / "a", server="peft")
    assert peft.ok and peft.min_max_lora_rank is None and str(peft).endswith("loads, largest rank 8")
    with pytest.raises(AttributeError):
        check.problems = ("x",)  # frozen


# ----------------------------------------------------------------------------- one test per vLLM rule

def test_a_dora_export_is_refused_for_vllm_and_accepted_for_peft(tmp_path):
    net = two_layer_net(use_dora=True)
    with pytest.raises(ValueError, match=r"vllm would not load this export.*\n  - use_dora=true: vLLM does not "
                                         r"serve DoRA") as info:
        L.export_peft(net, tmp_path / "vllm", server="vllm")
    assert "nothing was written" in str(info.value)
    assert not (tmp_path / "vllm").exists()
    check = L.export_peft(net, tmp_path / "peft", server="peft")
    assert check.ok and check.server == "peft" and check.changes == ()
    assert L.check_export(tmp_path / "peft", server="peft").ok
    assert [p for p in problems(tmp_path / "peft") if p.startswith("use_dora=true")]


def test_a_refused_export_leaves_the_previous_one(tmp_path):
    L.export_peft(two_layer_net(), tmp_path / "a")
    before = folder_bytes(tmp_path / "a")
    with pytest.raises(ValueError, match="use_dora"):
        L.export_peft(two_layer_net(use_dora=True), tmp_path / "a", server="vllm")
    assert folder_bytes(tmp_path / "a") == before


@pytest.mark.parametrize("config, field", [({"bias": "all"}, "bias='all'"), ({"bias": "lora_only"}, "bias='lora_only'"),
                                           ({"lora_bias": True}, "lora_bias=True")])
def test_trained_biases_are_refused_by_vllm_only(tmp_path, config, field):
    folder = write_adapter(tmp_path / "a", config)
    found = problems(folder)
    assert len(found) == 1 and found[0].startswith(field) and "vLLM serves no" in found[0]
    assert problems(folder, "peft") == ()


@pytest.mark.parametrize("saved, refused", [(["score"], None), (["classifier"], None), (["lm_head"], ["lm_head"]),
                                            (["score", "embed_tokens"], ["embed_tokens"])])
def test_modules_to_save_only_a_classification_head(tmp_path, saved, refused):
    extra = {f"{PREFIX}{m}.weight": torch.zeros(3, 6) for m in saved}
    folder = write_adapter(tmp_path / "a", {"modules_to_save": saved}, extra=extra)
    found = problems(folder)
    if refused is None:
        assert found == ()
    else:  # the saved weights of a module vLLM refuses are named too
        assert found[0] == (f"modules_to_save={saved!r}: vLLM accepts only a classification head "
                            f"(classifier / score), not {refused}")
        assert any(f"{PREFIX}{refused[0]}.weight" in p for p in found[1:])
    assert problems(folder, "peft") == ()


@pytest.mark.parametrize("init, ok", [(True, True), (False, True), ("gaussian", True), ("orthogonal", True),
                                      ("pissa", False), ("pissa_niter_4", False), ("PiSSA", False),
                                      ("olora", False), ("corda", False), ("loftq", False)])
def test_inits_that_rewrite_the_base_are_refused(tmp_path, init, ok):
    found = problems(write_adapter(tmp_path / "a", {"init_lora_weights": init}))
    assert found == () if ok else (len(found) == 1 and found[0].startswith(f"init_lora_weights={init!r}: vLLM refuses"))
    assert problems(tmp_path / "a", "peft") == ()


@pytest.mark.parametrize("key, value", [("alora_invocation_tokens", [5, 6]), ("layer_replication", [[0, 2]]),
                                        ("use_bdlora", {"x": 1}), ("use_qalora", True)])
def test_other_features_vllm_does_not_serve(tmp_path, key, value):
    found = problems(write_adapter(tmp_path / "a", {key: value}))
    assert len(found) == 1 and found[0].startswith(f"{key}={value!r}: vLLM does not serve")


def test_tensors_vllm_does_not_load_and_fields_it_requires(tmp_path):
    folder = write_adapter(tmp_path / "a", extra={f"{PREFIX}layers.0.q.lora_B.bias": torch.zeros(6)})
    assert problems(folder) == (f"tensors vLLM does not load (only lora_A/lora_B and lora_embedding_A/B): "
                                f"['{PREFIX}layers.0.q.lora_B.bias']",)
    config = dict(BASE_CONFIG)
    del config["target_modules"]
    write_adapter(tmp_path / "b")
    (tmp_path / "b" / PEFT_CONFIG_NAME).write_text(json.dumps(config))
    assert problems(tmp_path / "b") == (f"{PEFT_CONFIG_NAME} has no ['target_modules']: vLLM requires them",)
    assert problems(tmp_path / "b", "peft") == ()


@pytest.mark.parametrize("rank, flag", [(1, 1), (2, 8), (8, 8), (9, 16), (17, 32), (48, 64), (300, 320),
                                        (320, 320), (321, 512), (512, 512), (513, None)])
def test_rank_limits_give_the_smallest_max_lora_rank(tmp_path, rank, flag):
    folder = write_adapter(tmp_path / "a", {"r": 1, "rank_pattern": {"^layers\\.0\\.v": rank}},
                           ranks={"layers.0.q": 1, "layers.0.v": rank})
    check = L.check_export(folder)
    assert (check.max_rank, check.min_max_lora_rank) == (rank, flag)
    if flag is None:
        assert check.problems == ("rank 513: above vLLM's largest --max-lora-rank, 512",)
    else:
        assert check.ok
    assert L.check_export(folder, "peft").ok  # PEFT has no such limit


def test_the_rank_vllm_checks_includes_the_config(tmp_path):
    # validate_legal compares max(r, *rank_pattern.values()) too: a pattern that matches nothing still counts.
    folder = write_adapter(tmp_path / "a", {"rank_pattern": {"^nothing$": 40}})
    assert (L.check_export(folder).max_rank, L.check_export(folder).min_max_lora_rank) == (40, 64)


def test_a_fused_qkv_export_of_rank_48_needs_max_lora_rank_64(tmp_path):
    from conftest import make_tiny_phi3

    model = make_tiny_phi3()
    L.phi3.apply_lora(model, r=16, lora_alpha=32)  # q, k, v: one rank-48 block-diagonal adapter on qkv_proj
    check = L.export_peft(model, tmp_path / "a", server="vllm")
    assert check.ok and check.changes == () and (check.max_rank, check.min_max_lora_rank) == (48, 64)
    config = json.loads((tmp_path / "a" / PEFT_CONFIG_NAME).read_text())
    assert config["r"] == 16 and config["rank_pattern"]["model.layers.0.self_attn.qkv_proj"] == 48
    assert L.check_export(tmp_path / "a") == check
    assert "--max-lora-rank 64 or more" in str(check)


# ----------------------------------------------------------------------------- patterns, ranks, folding

def test_rank_pattern_is_read_as_vllm_reads_it(tmp_path):
    # The first key that matches a dot-separated suffix wins: layers.0.v is rank 4, and its tensors say 8.
    config = {"rank_pattern": {"layers\\.0\\..*": 4, "v": 8}}
    found = problems(write_adapter(tmp_path / "a", config, ranks={"layers.0.q": 4, "layers.0.v": 8}))
    assert found == ("layers.0.v: its tensors have rank 8 but r/rank_pattern give it r=4; vLLM computes its "
                     "scale lora_alpha/r with that r",)
    peft = problems(tmp_path / "a", "peft")
    assert len(peft) == 1 and "PEFT builds lora_A with that many rows" in peft[0]
    # "v" is no suffix of "layers.0.kv" at a dot: the top-level r (8) applies there.
    assert problems(write_adapter(tmp_path / "b", {"rank_pattern": {"v": 4}},
                                  ranks={"layers.0.kv": 8, "layers.0.v": 4})) == ()


def test_rslora_is_folded_into_alpha_and_equal_patterns_disappear(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    net[0] = L.Linear.from_module(net[0], r=16, lora_alpha=16, use_rslora=True)  # scale 4
    net[2] = L.Linear.from_module(net[2], r=64, lora_alpha=8, use_rslora=True)  # scale 1
    for p in L.lora_parameters(net):
        torch.nn.init.normal_(p, std=0.2)
    L.export_peft(net, tmp_path / "plain")
    plain = json.loads((tmp_path / "plain" / PEFT_CONFIG_NAME).read_text())
    assert (plain["use_rslora"], plain["lora_alpha"], plain["alpha_pattern"]) == (True, 16, {"2": 8})

    check = L.export_peft(net, tmp_path / "vllm", server="vllm")
    config = json.loads((tmp_path / "vllm" / PEFT_CONFIG_NAME).read_text())
    # alpha' = scale·r: 4·16 = 1·64 = 64, so one lora_alpha covers both and alpha_pattern is empty.
    assert (config["use_rslora"], config["lora_alpha"], config["alpha_pattern"]) == (False, 64, {})
    assert config["rank_pattern"] == {"2": 64}
    assert check.changes == ("use_rslora folded into lora_alpha (alpha·√r, which vLLM divides by r: the same "
                             "scale): alpha_pattern {'2': 8} -> {}; lora_alpha 16 -> 64; use_rslora True -> False",)
    assert L.check_export(tmp_path / "vllm").ok
    for name, layer in (("0", net[0]), ("2", net[2])):  # vLLM's scale for each module is the layer's own
        rank = config["rank_pattern"].get(name, config["r"])
        assert config["alpha_pattern"].get(name, config["lora_alpha"]) / rank == layer.scaling
    x = torch.randn(5, 8)
    for folder in ("plain", "vllm"):  # the folded export loads back to the same function
        torch.manual_seed(0)
        fresh = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
        fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in net.state_dict().items()
                               if "lora" not in k}, strict=False)
        L.import_peft(fresh, tmp_path / folder)
        torch.testing.assert_close(fresh(x), net(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("server", ["vllm", "peft"])
def test_without_anything_to_fold_the_files_are_those_of_a_plain_export(tmp_path, server):
    net = two_layer_net()
    assert L.export_peft(net, tmp_path / "plain") is None  # unchanged behaviour without server
    check = L.export_peft(net, tmp_path / "checked", server=server)
    assert check.ok and check.changes == ()
    assert folder_bytes(tmp_path / "checked") == folder_bytes(tmp_path / "plain")


def test_peft_rules_on_keys_and_dora_tensors(tmp_path):
    folder = write_adapter(tmp_path / "a", extra={"layers.0.q.lora_A.weight": torch.zeros(8, 4),
                                                  f"{PREFIX}layers.0.v.lora_magnitude_vector": torch.zeros(6)})
    assert problems(folder, "peft") == (
        "tensors without the 'base_model.model.' prefix, which PEFT ignores without a word: "
        "['layers.0.q.lora_A.weight']",
        "layers.0.v: a lora_magnitude_vector (DoRA) but use_dora=False; PEFT ignores it")
    write_adapter(tmp_path / "b", {"use_dora": True})
    assert problems(tmp_path / "b", "peft")[0].startswith("layers.0.q: use_dora=true but no lora_magnitude_vector")


def test_config_values_and_pairs_every_loader_needs(tmp_path):
    folder = write_adapter(tmp_path / "a", {"r": 0, "lora_alpha": "16", "peft_type": "IA3",
                                            "alpha_pattern": {"(": 2}})
    found = problems(folder, "peft")
    assert found[:2] == ("r=0: expected a positive integer", "lora_alpha='16': expected a finite number")
    assert "alpha_pattern key '(' is not a valid regular expression" in found[2]
    assert found[3:] == ("peft_type='IA3': expected 'LORA'",)
    assert "peft_type='IA3': expected 'LORA'" not in problems(folder)  # vLLM never reads it
    found = problems(write_adapter(tmp_path / "c", {"rank_pattern": [4], "modules_to_save": "lm_head"}))
    assert found[0] == "rank_pattern=[4] is invalid: expected an object mapping module-name patterns to values"
    assert found[1].startswith("modules_to_save='lm_head': vLLM accepts only a classification head")
    extra = {f"{PREFIX}layers.1.q.lora_A.weight": torch.zeros(8, 4),
             f"{PREFIX}layers.1.v.lora_A.weight": torch.zeros(8, 4),
             f"{PREFIX}layers.1.v.lora_B.weight": torch.zeros(6, 4)}
    found = problems(write_adapter(tmp_path / "b", extra=extra), "peft")
    assert found == ("layers.1.q: has ['A'] but needs both lora_A and lora_B",
                     "layers.1.v: lora_A (8, 4) and lora_B (6, 4) are not one adapter (expected A (r, in, ...) "
                     "and B (out, r, ...) with one r)")


# ----------------------------------------------------------------------------- bad input

def test_bad_folders_are_refused_by_name(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist or is not a folder"):
        L.check_export(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"{PEFT_CONFIG_NAME} is missing"):
        L.check_export(tmp_path / "empty")
    folder = write_adapter(tmp_path / "bin")
    os.rename(folder / PEFT_WEIGHTS_NAME, folder / PEFT_BIN_NAME)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("check_export unpickled a file"))
    with pytest.raises(CheckpointError, match=f"holds {PEFT_BIN_NAME}, a pickle, which check_export never opens"):
        L.check_export(folder)
    os.remove(folder / PEFT_BIN_NAME)
    with pytest.raises(FileNotFoundError, match=f"has no {PEFT_WEIGHTS_NAME}"):
        L.check_export(folder)
    (folder / PEFT_WEIGHTS_NAME).write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(CheckpointError, match="is not a safetensors file: header size"):
        L.check_export(folder)
    (folder / PEFT_CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="must hold a JSON object, got list"):
        L.check_export(folder)


@pytest.mark.parametrize("server", ["tgi", "VLLM", None, 3])
def test_an_unknown_server_is_refused_before_anything(tmp_path, server):
    folder = write_adapter(tmp_path / "a")
    expected = f"server must be one of 'vllm', 'peft' .*got {server!r}"
    with pytest.raises(ValueError, match=expected):
        L.check_export(folder, server=server)
    if server is not None:  # None is export_peft's default: no check
        with pytest.raises(ValueError, match=f"server must be one of 'vllm', 'peft' or None .*got {server!r}"):
            L.export_peft(two_layer_net(), tmp_path / "b", server=server)
        assert not (tmp_path / "b").exists()
