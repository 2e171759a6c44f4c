"""End-to-end tests of examples/phi3_finetune.py, run in subprocesses on the tiny offline model.

One short training run (module fixture) serves the artifact, learning and resume
tests; the DDP and bad-data tests make their own runs. Sizes are cut down with
flags so the whole file stays well under two minutes on 2 cores.
"""
import json
import math
import os
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
STEPS, SAVE_AT = 24, 12
# Small data and eval sets; dropout on, so the resume test also covers the RNG state.
SMALL = ["--synthetic-examples", "300", "--exact-match-prompts", "8", "--batch-size", "16",
         "--lora-dropout", "0.1", "--max-steps", str(STEPS), "--eval-steps", str(SAVE_AT),
         "--save-steps", str(SAVE_AT), "--logging-steps", "4"]


def run_script(*args, launcher=(), timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               # this checkout's lora_layers, not whichever one is installed (a git worktree's tests ran main's)
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.run([sys.executable, *launcher, str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)
    return proc


def check_ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    proc = run_script("--output-dir", out, "--merge", *SMALL)
    check_ok(proc)
    return out, proc


def train_losses(out):
    return {h["step"]: h["loss"] for h in json.loads((out / "train_log.json").read_text())["train"]}


def test_end_to_end_writes_checkpoints_exports_and_plot(first_run):
    out, proc = first_run
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == [f"step-{SAVE_AT:06d}", f"step-{STEPS:06d}"]
    for ckpt in ckpts:
        assert (out / "checkpoints" / ckpt / "adapter.safetensors").stat().st_size > 0
    assert (out / "lora_adapter.safetensors").is_file()
    config = json.loads((out / "peft_adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert set(config["target_modules"]) >= {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert (out / "peft_adapter" / "adapter_model.safetensors").is_file()
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS and 0 < summary["trainable_params"] < summary["total_params"]
    assert "==== summary ====" in proc.stdout and "exact match" in proc.stdout
    assert list(out.rglob(".*.tmp")) == []  # each folder was built aside and swapped in, leaving nothing


def test_final_artifacts_agree(first_run):
    """base + the native adapter (lora_layers) gives the logits of the saved merged model."""
    from transformers import AutoModelForCausalLM

    import lora_layers as lora

    out, _ = first_run
    base = AutoModelForCausalLM.from_pretrained(out / "base_model")
    lora.phi3.apply_lora(base, r=32, lora_alpha=32, use_rslora=True, lora_dtype=torch.float32)
    lora.load_lora(base, out / "lora_adapter.safetensors")
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    ids = torch.randint(0, base.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted, reference = base.train(False)(ids).logits, merged.eval()(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(out / "base_model").eval()(ids).logits
    assert torch.allclose(adapted, reference, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(plain, reference, atol=1e-3)  # training changed something


def test_loss_decreases_on_synthetic_task(first_run):
    out, _ = first_run
    losses = train_losses(out)
    first = sum(losses[s] for s in range(1, 5)) / 4
    last = sum(losses[s] for s in range(STEPS - 3, STEPS + 1)) / 4
    assert last < 0.95 * first, (first, last)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_loss_after"]["all"] < summary["eval_loss_before"]["all"]


def test_resume_continues_exactly(first_run, tmp_path):
    out, _ = first_run
    resumed = tmp_path / "resumed"
    proc = run_script("--output-dir", resumed, "--resume", out / "checkpoints" / f"step-{SAVE_AT:06d}", *SMALL)
    check_ok(proc)
    assert "resumed from" in proc.stdout
    full, again = train_losses(out), train_losses(resumed)
    assert sorted(again) == list(range(1, STEPS + 1))  # history up to the checkpoint comes along
    for step in range(SAVE_AT + 1, STEPS + 1):
        assert again[step] == full[step], (step, again[step], full[step])
    a = json.loads((out / "summary.json").read_text())
    b = json.loads((resumed / "summary.json").read_text())
    assert b["eval_loss_before"] == a["eval_loss_before"]
    assert b["eval_loss_after"] == a["eval_loss_after"]


# Runs the script in a torchrun process, then saves that rank's adapter next to the script's
# outputs: the script saves rank 0's only, and the test compares every rank's.
SAVE_EVERY_RANK = """
import runpy, sys
import lora_layers as lora
sys.argv = sys.argv[1:]
run = runpy.run_path(sys.argv[0], run_name="__main__")
lora.save_lora(run["raw_model"], run["out_dir"] / f"adapter.rank{run['rank']}.safetensors")
"""


def test_ddp_two_gloo_processes_keep_identical_adapters(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "ddp"
    wrapper = tmp_path / "save_every_rank.py"
    wrapper.write_text(SAVE_EVERY_RANK)
    proc = run_script("--output-dir", out, "--synthetic-examples", "200",
                      "--exact-match-prompts", "4", "--batch-size", "8", "--max-steps", "4", "--eval-steps", "4",
                      "--save-steps", "4", launcher=("-m", "torch.distributed.run", "--standalone",
                                                     "--nproc_per_node", "2", wrapper))
    check_ok(proc)
    saved = load_file(out / "lora_adapter.safetensors")  # the script's own output (rank 0)
    ranks = [load_file(out / f"adapter.rank{r}.safetensors") for r in (0, 1)]
    assert saved and sorted(ranks[0]) == sorted(ranks[1]) == sorted(saved)
    for name, tensor in saved.items():
        assert torch.equal(ranks[0][name], tensor) and torch.equal(ranks[1][name], tensor), name
    assert any(t.abs().sum() > 0 for name, t in saved.items() if name.endswith("lora_B"))  # training moved B
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2


def test_dora_with_lora_plus_saves_magnitudes(tmp_path):
    from safetensors import safe_open

    out = tmp_path / "dora"
    proc = run_script("--output-dir", out, "--use-dora", "--lora-plus-ratio", "4", "--max-steps", "2",
                      "--synthetic-examples", "100", "--exact-match-prompts", "4", "--batch-size", "8")
    check_ok(proc)
    assert "DoRA=True, LoRA+ ratio 4" in proc.stdout
    with safe_open(out / "lora_adapter.safetensors", "pt") as f:
        magnitudes = [k for k in f.keys() if k.endswith(".lora_magnitude")]
    assert len(magnitudes) == 4 * 4  # 4 layers x qkv_proj, o_proj, gate_up_proj, down_proj
    assert json.loads((out / "peft_adapter" / "adapter_config.json").read_text())["use_dora"] is True


BAD_DATA = {
    "missing": (None, "file not found"),
    "malformed": ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                  '{"messages": [{"role": "user", "content": "oops"\n', "line 2: malformed JSON"),
    "schema": ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n\n'
               '{"conversation": ["hi"]}\n', "line 3: wrong schema"),
    "role": ('{"messages": [{"role": "human", "content": "hi"}]}\n', "line 1: wrong schema in messages[0]"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_names_file_and_line(case, tmp_path):
    text, expected = BAD_DATA[case]
    path = tmp_path / "chats.jsonl"
    if text is not None:
        path.write_text(text)
    proc = run_script("--data", path, "--output-dir", tmp_path / "out", timeout=60)
    assert proc.returncode == 2
    assert str(path) in proc.stderr and expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_quantized_nf4_base_trains_and_reports_its_bytes(tmp_path):
    pytest.importorskip("torchao")
    out = tmp_path / "qlora"
    proc = run_script("--output-dir", out, "--quantize", "nf4", "--max-steps", "2", "--synthetic-examples", "100",
                      "--exact-match-prompts", "4", "--batch-size", "8")
    check_ok(proc)
    summary = json.loads((out / "summary.json").read_text())
    weights = summary["base_weights"]
    # The tiny model's adapted projections: 4 layers x (qkv 128->256, o 128->128, gate_up 128->512, down 256->128).
    assert weights["quantize"] == "nf4" and weights["bf16_bytes"] == 2 * 4 * 128 * (256 + 128 + 512 + 256)
    assert 0.25 * weights["bf16_bytes"] < weights["bytes"] < 0.3 * weights["bf16_bytes"]  # 4 bits + a scale per 64
    assert "base weights of the adapted projections" in proc.stdout and "(nf4)" in proc.stdout
    losses = train_losses(out)
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())
    assert math.isfinite(summary["eval_loss_after"]["all"])


# ----------------------------------------------------------------------------- folders written whole (issue #20 item 3)

# Runs the script with one function made to SIGKILL the process on its n-th call: a save cut short.
KILL_AT = """
import os, runpy, signal, sys
import lora_layers, transformers
owner, attr = {"save_training_state": (lora_layers, "save_training_state"),
               "tokenizer.save_pretrained": (transformers.PreTrainedTokenizerFast, "save_pretrained")}[sys.argv[1]]
nth, real, calls = int(sys.argv[2]), getattr(owner, sys.argv[1].rsplit(".", 1)[-1]), []
def killing(*args, **kwargs):
    calls.append(1)
    if len(calls) == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
setattr(owner, attr, killing)
sys.argv = sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
TWO_STEPS = ["--synthetic-examples", "40", "--exact-match-prompts", "2", "--batch-size", "4", "--max-steps", "2",
             "--eval-steps", "2", "--save-steps", "2", "--logging-steps", "1", "--merge"]


@pytest.mark.parametrize("folder, kill, nth", [
    ("checkpoints/step-000002", "save_training_state", 1),  # after the adapter, before the training state
    ("peft_adapter", "tokenizer.save_pretrained", 2),        # after the PEFT files, before the tokenizer
    ("merged", "tokenizer.save_pretrained", 3),              # after the merged weights, before the tokenizer
])
def test_a_run_killed_while_saving_a_folder_leaves_the_previous_folder(tmp_path, folder, kill, nth):
    import signal

    out = tmp_path / "out"
    old = out / folder
    old.mkdir(parents=True)
    for name in ("adapter.safetensors", "training_state.pt", "adapter_config.json", "adapter_model.safetensors",
                 "model.safetensors", "config.json", "tokenizer.json", "README.md"):
        (old / name).write_bytes(f"previous run's {name}".encode())
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    wrapper = tmp_path / "kill_at.py"
    wrapper.write_text(KILL_AT)
    proc = run_script("--output-dir", out, *TWO_STEPS, launcher=(str(wrapper), kill, str(nth)))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
