"""examples/phi3_finetune.py --adapters N (examples/phi3_sweep.py, issue #23 item 6): N adapters trained in one run,
each micro-batch a mixed batch, against N separate single-adapter training loops on the same rows."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "phi3_finetune.py"
sys.path.insert(0, str(ROOT / "tests"))
from test_example import check_ok, run_script, script_env  # noqa: E402

# Runs the example, recording what the reference needs: every micro-batch it trained on and each adapter's
# initial weights (right after phi3_sweep.add), keyed as a single-adapter model's.
RECORD = """
import runpy, sys
from pathlib import Path
import torch
sys.argv = sys.argv[2:]
sys.path.insert(0, str(Path(sys.argv[0]).parent))
import phi3_data, phi3_sweep
import lora_layers as lora
record = {"batches": [], "initial": {}}
real_batches, real_add = phi3_data.micro_batches, phi3_sweep.add
def micro_batches(*args, **kwargs):
    for batch, chats in real_batches(*args, **kwargs):
        record["batches"].append({k: v.clone() for k, v in batch.items()})
        yield batch, chats
def add(run, model):
    real_add(run, model)
    for name in run.sweep.names:
        record["initial"][name] = {k: v.detach().clone() for k, v in lora.lora_state_dict(model, adapter=name).items()}
phi3_data.micro_batches, phi3_sweep.add = micro_batches, add
runpy.run_path(sys.argv[0], run_name="__main__")
torch.save(record, RECORD_PATH)
"""
N, STEPS, ACCUM, BATCH, RANKS = 3, 4, 2, 8, (4, 8, 4)
FLAGS = ["--adapters", str(N), "--adapter-ranks", ",".join(map(str, RANKS)), "--synthetic-examples", "120",
         "--exact-match-prompts", "4", "--batch-size", str(BATCH), "--gradient-accumulation-steps", str(ACCUM),
         "--max-steps", str(STEPS), "--eval-steps", str(STEPS), "--save-steps", str(STEPS), "--weight-decay", "0.01",
         "--max-grad-norm", "0.5"]


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "out"
    wrapper = out.parent / "record.py"
    wrapper.write_text(f"RECORD_PATH = {str(out.parent / 'record.pt')!r}\n" + RECORD)
    proc = subprocess.run([sys.executable, str(wrapper), "-", str(SCRIPT), "--output-dir", str(out), *FLAGS],
                          capture_output=True, text=True, timeout=180, env=script_env(), cwd=ROOT)
    check_ok(proc)
    return out, proc, torch.load(out.parent / "record.pt")


def reference_run(out, record, k, lr, dtype=torch.float32):
    """Adapter k trained alone, as the default single-adapter example trains: its own model (transformers' loss
    on the full logits, no mixed batch, no named adapters, no fused loss), on rows k, k + N, ... of each batch;
    base and adapter in ``dtype``."""
    from transformers import AutoModelForCausalLM

    import lora_layers as lora
    import phi3_finetune

    model = AutoModelForCausalLM.from_pretrained(out / "base_model").to(dtype)
    lora.phi3.apply_lora(model, r=RANKS[k], lora_alpha=32, lora_dropout=0.0, use_rslora=True, lean=False,
                         gradient_checkpointing=False, lora_dtype=dtype)
    name = ("default", "sweep1", "sweep2")[k]
    initial = {key: v.to(dtype) for key, v in record["initial"][name].items()}
    missing, unexpected = model.load_state_dict(initial, strict=False)
    assert unexpected == [] and not [m for m in missing if "lora_" in m]
    config = json.loads((out / "summary.json").read_text())["config"]["training"]
    tc = {**config, "learning_rate": lr, "lora_plus_ratio": 0.0}
    optimizer, scheduler = phi3_finetune.optimizer_and_schedule(model, tc, STEPS)
    params, losses, batches = lora.lora_parameters(model), [], iter(record["batches"])
    model.train()
    for _ in range(STEPS):
        step_loss = 0.0
        for _ in range(ACCUM):
            batch = {key: v[k::N] for key, v in next(batches).items()}
            loss = model(**batch).loss / ACCUM
            loss.backward()
            step_loss += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, tc["max_grad_norm"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
    return {key: v.detach() for key, v in lora.lora_state_dict(model).items()}, losses


def _max_diff(a, b):
    return max(float((a[key].double() - b[key].double()).abs().max()) for key in b)


def test_each_adapter_trains_exactly_as_a_run_of_its_own_on_its_rows(sweep_run, monkeypatch):
    """Each adapter's weights after the sweep against its own run in float64 (the exact result), next to its own
    run in float32: the sweep is as close to the exact result as a separate fp32 run is. (1e-6 against the fp32
    run itself is below fp32's reach here: AdamW's m/sqrt(v) turns rounding in lora_A's tiny early gradients, B
    starting at 0, into weight differences of up to 2e-6 between two fp32 runs that differ only in summation order.)"""
    from safetensors.torch import load_file

    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    out, proc, record = sweep_run
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["names"] == ["default", "sweep1", "sweep2"] and sweep["ranks"] == list(RANKS)
    lr = json.loads((out / "summary.json").read_text())["config"]["training"]["learning_rate"]
    assert sweep["learning_rates"] == [lr / 2, lr, 2 * lr]  # the default spread
    assert len(record["batches"]) == STEPS * ACCUM
    for k, name in enumerate(sweep["names"]):
        exact, exact_losses = reference_run(out, record, k, sweep["learning_rates"][k], torch.float64)
        alone, _ = reference_run(out, record, k, sweep["learning_rates"][k])
        trained = load_file(out / "adapters" / f"{name}.safetensors")  # save_lora(adapter=name)
        assert sorted(trained) == sorted(exact) and all(trained[key].shape == exact[key].shape for key in exact)
        moved = _max_diff(exact, record["initial"][name])  # about lr per step: what a bug would be measured against
        swept, fp32 = _max_diff(trained, exact), _max_diff(alone, exact)
        print(f"{name}: weights moved {moved:.1e}; max |w - exact|: sweep {swept:.2e}, separate fp32 run {fp32:.2e}, "
              f"sweep vs that run {_max_diff(trained, alone):.2e}")
        assert swept <= 2 * fp32 + 1e-7 and swept <= 1e-5 < moved / 100, (name, swept, fp32, moved)
        assert [h[name] for h in sweep["train"]] == pytest.approx(exact_losses, abs=1e-6), name


def test_the_sweep_prints_a_table_and_exports_every_adapter(sweep_run):
    out, proc, _ = sweep_run
    assert "==== sweep: one line per adapter" in proc.stdout
    table = proc.stdout.split("==== sweep: one line per adapter", 1)[1].splitlines()[2:2 + N]
    assert [line.split()[0] for line in table] == ["default", "sweep1", "sweep2"]
    sweep = json.loads((out / "sweep.json").read_text())
    for row, line in zip(sweep["eval"], table):
        assert f"{row['eval_loss']['all']:.4f}" in line and math.isfinite(row["eval_loss"]["all"])
        assert row["exact_match"] is not None
    for name, r in zip(sweep["names"], RANKS):
        config = json.loads((out / f"peft_adapter_{name}" / "adapter_config.json").read_text())
        assert config["r"] == r and (out / f"peft_adapter_{name}" / "adapter_model.safetensors").is_file()
    # The losses differ by adapter, so the table compares different models (not one model three times).
    assert len({round(row["eval_loss"]["all"], 6) for row in sweep["eval"]}) == N


def test_each_exported_adapter_loads_into_a_single_adapter_model_with_the_sweeps_eval_loss(sweep_run):
    """peft_adapter_<name>/ imported into a fresh model (lora.import_peft) gives the eval loss of the table."""
    from transformers import AutoModelForCausalLM

    import lora_layers as lora

    out, _, record = sweep_run
    sweep = json.loads((out / "sweep.json").read_text())
    batch = {key: v[:4] for key, v in record["batches"][0].items()}
    losses = []
    for name in sweep["names"]:
        model = AutoModelForCausalLM.from_pretrained(out / "base_model")
        lora.import_peft(model, out / f"peft_adapter_{name}")
        native = AutoModelForCausalLM.from_pretrained(out / "base_model")
        lora.phi3.apply_lora(native, r=sweep["ranks"][sweep["names"].index(name)], lora_alpha=32, use_rslora=True,
                             lora_dropout=0.0, lean=False, lora_dtype=torch.float32)
        lora.load_lora(native, out / "adapters" / f"{name}.safetensors")
        with torch.no_grad():
            a, b = model.eval()(**batch).loss, native.eval()(**batch).loss
        assert torch.allclose(a, b, atol=1e-5), name
        losses.append(float(a))
    assert len(set(losses)) == N


def _parse(monkeypatch, tmp_path, *flags):
    """phi3_cli.parse on ``flags``: the settings, or the usage error's message (exit code 2)."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import phi3_cli
    import phi3_finetune

    monkeypatch.setattr(sys, "argv", ["phi3_finetune.py", "--output-dir", str(tmp_path / "out"), *flags])
    try:
        return phi3_cli.parse(phi3_finetune.__doc__, phi3_finetune.training_config, phi3_finetune.lora_config)
    except SystemExit as exc:
        assert exc.code == 2
        return None


@pytest.mark.parametrize("flags, expected", [
    (["--adapters", "1"], "--adapters: expected an integer >= 2"),
    (["--adapter-ranks", "4,8"], "--adapter-ranks sets one value per adapter of --adapters N; give --adapters N"),
    (["--adapters", "3", "--adapter-ranks", "4,8"], "--adapter-ranks: expected 3 positive integers"),
    (["--adapters", "2", "--adapter-lrs", "1e-3,-1"], "--adapter-lrs: expected 2 positive numbers"),
    (["--adapters", "2", "--adapter-lrs", "1e-3,nan"], "--adapter-lrs: expected 2 positive numbers"),
    (["--adapters", "3", "--batch-size", "2"], "--adapters 3 with --batch-size 2: every adapter needs a row"),
    (["--adapters", "2", "--merge"], "--adapters 2 with --merge: a merged model holds one adapter"),
    (["--adapters", "2", "--lora-plus-ratio", "16"], "--adapters 2 with --lora-plus-ratio"),
])
def test_refused_combinations_name_the_flag_before_anything_runs(flags, expected, monkeypatch, tmp_path, capsys):
    assert _parse(monkeypatch, tmp_path, *flags) is None
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_resume_and_processes_are_refused_with_the_reason(monkeypatch, tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "training_state.pt").write_bytes(b"")
    assert _parse(monkeypatch, tmp_path, "--adapters", "2", "--resume", str(tmp_path / "ckpt")) is None
    assert "--adapters 2 with --resume: the checkpoints hold every adapter" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _parse(monkeypatch, tmp_path, "--adapters", "2") is None
    assert "--adapters 2 with --fsdp or torchrun's processes (DDP)" in capsys.readouterr().err


def test_without_adapters_the_settings_are_todays(monkeypatch, tmp_path):
    cli = _parse(monkeypatch, tmp_path)
    assert cli.sweep is None and cli.lc["r"] == 32  # the tiny preset's rank, untouched
    cli = _parse(monkeypatch, tmp_path, "--adapters", "2", "--adapter-ranks", "8,16")
    assert cli.lc["r"] == 8 and cli.sweep.names == ("default", "sweep1") and cli.sweep.ranks == (8, 16)


def test_overwrite_deletes_the_sweeps_outputs_and_nothing_else(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import phi3_checkpoints

    for path in ("adapters/default.safetensors", "peft_adapter_sweep1/adapter_config.json", "sweep.json",
                 "peft_adapter_sweep1/README.md", "notes.txt", "peft_adapters_mine/x.json"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x")
    phi3_checkpoints.clear_outputs(tmp_path)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["notes.txt", "peft_adapter_sweep1/README.md", "peft_adapters_mine/x.json"]


def test_help_describes_the_sweep_flags():
    proc = run_script("--help", timeout=60)
    check_ok(proc)
    text = " ".join(proc.stdout.split())
    assert "--adapters N train N >= 2 adapters in one run over one frozen base" in text
    assert "--adapter-lrs LR1,LR2,... each adapter's peak learning rate" in text
    assert "--adapter-ranks R1,R2,... each adapter's rank" in text
