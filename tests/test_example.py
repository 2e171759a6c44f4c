"""End-to-end tests of examples/phi3_finetune.py, run in subprocesses on the tiny offline model.

One short training run (module fixture) serves the artifact, learning and resume
tests; the DDP and bad-data tests make their own runs. Sizes are cut down with
flags so the whole file stays well under two minutes on 2 cores.
"""
import ast
import json
import math
import os
import re
import shlex
import shutil
import signal
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


def script_env():
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                # this checkout's lora_layers, not whichever one is installed (a git worktree's tests ran main's)
                PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))


def run_script(*args, launcher=(), timeout=120):
    proc = subprocess.run([sys.executable, *launcher, str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=script_env(), cwd=ROOT)
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
run = runpy.run_path(sys.argv[0], run_name="__main__")["run"]  # what main() returned
lora.save_lora(run.raw_model, run.out_dir / f"adapter.rank{run.rank}.safetensors")
"""


TORCHRUN_2 = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
# The short 2-process run of the DDP test and of the --fsdp one (dropout 0, the tiny preset's: DDP seeds
# every rank alike, --fsdp each rank with seed + rank, so only masks-free runs compare step for step).
TWO_RANKS = ["--synthetic-examples", "200", "--exact-match-prompts", "4", "--batch-size", "8", "--max-steps", "4",
             "--eval-steps", "4"]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ddp")
    out = tmp_path / "ddp"
    wrapper = tmp_path / "save_every_rank.py"
    wrapper.write_text(SAVE_EVERY_RANK)
    proc = run_script("--output-dir", out, *TWO_RANKS, "--save-steps", "4", launcher=(*TORCHRUN_2, wrapper))
    check_ok(proc)
    return out


def test_ddp_two_gloo_processes_keep_identical_adapters(ddp_run):
    from safetensors.torch import load_file

    out = ddp_run
    saved = load_file(out / "lora_adapter.safetensors")  # the script's own output (rank 0)
    ranks = [load_file(out / f"adapter.rank{r}.safetensors") for r in (0, 1)]
    assert saved and sorted(ranks[0]) == sorted(ranks[1]) == sorted(saved)
    for name, tensor in saved.items():
        assert torch.equal(ranks[0][name], tensor) and torch.equal(ranks[1][name], tensor), name
    assert any(t.abs().sum() > 0 for name, t in saved.items() if name.endswith("lora_B"))  # training moved B
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2


# ----------------------------------------------------------------------------- FSDP2 (issue #22 item 8)

FSDP_FLAGS = [*TWO_RANKS, "--save-steps", "2", "--fsdp", "--merge"]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "fsdp"
    check_ok(run_script("--output-dir", out, *FSDP_FLAGS, launcher=TORCHRUN_2))
    return out


def test_fsdp_two_gloo_processes_train_as_ddp_and_export_from_rank_0(ddp_run, fsdp_run):
    """--fsdp (each decoder layer sharded, then the root) against the DDP run of the same flags: the same
    losses and adapters within fp32 rounding; rank 0's adapter, PEFT and merged exports agree with each other."""
    from safetensors.torch import load_file

    out = fsdp_run
    fsdp, ddp = load_file(out / "lora_adapter.safetensors"), load_file(ddp_run / "lora_adapter.safetensors")
    assert fsdp.keys() == ddp.keys() and len(fsdp) == 4 * 4 * 2  # 4 layers x 4 projections x (lora_A, lora_B)
    diff = max(float((fsdp[k] - ddp[k]).abs().max()) for k in fsdp)
    print(f"--fsdp vs DDP: adapters max |diff| {diff:.2e}")
    assert diff <= 1e-5 and any(t.abs().sum() > 0 for k, t in fsdp.items() if k.endswith("lora_B"))
    losses, ddp_losses = train_losses(out), train_losses(ddp_run)
    assert sorted(losses) == [1, 2, 3, 4] and all(abs(losses[s] - ddp_losses[s]) <= 1e-5 for s in losses)
    summary, ddp_summary = (json.loads((o / "summary.json").read_text()) for o in (out, ddp_run))
    assert summary["world_size"] == 2 and summary["config"]["fsdp"] is True
    assert abs(summary["eval_loss_after"]["all"] - ddp_summary["eval_loss_after"]["all"]) <= 1e-5
    assert summary["exact_match_after"] == ddp_summary["exact_match_after"]
    # checkpoints: the adapter and the training state (the sharded optimizer's, gathered), rank 0's files
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    last = out / "checkpoints" / "step-000004"
    assert sorted(p.name for p in last.iterdir()) == ["adapter.safetensors", "training_state.pt"]
    assert (last / "adapter.safetensors").read_bytes() == (out / "lora_adapter.safetensors").read_bytes()
    check_exports_agree(out)


def test_fsdp_resume_continues_the_two_process_run_exactly(fsdp_run, tmp_path):
    """--fsdp --resume from step 2 of 4 (each rank loads its slice of the adapter and of AdamW's state, and its
    own RNG state): steps 3 and 4, the evaluation and every written adapter equal the uninterrupted run's."""
    resumed = tmp_path / "resumed"
    proc = run_script("--output-dir", resumed, *FSDP_FLAGS, "--resume", fsdp_run / "checkpoints" / "step-000002",
                      launcher=TORCHRUN_2)
    check_ok(proc)
    assert "resumed from" in proc.stdout
    full, again = train_losses(fsdp_run), train_losses(resumed)
    assert sorted(again) == [1, 2, 3, 4] and all(again[s] == full[s] for s in (3, 4)), (again, full)
    a, b = (json.loads((o / "summary.json").read_text()) for o in (fsdp_run, resumed))
    assert b["eval_loss_after"] == a["eval_loss_after"] and b["exact_match_after"] == a["exact_match_after"]
    for name in ("lora_adapter.safetensors", "checkpoints/step-000004/adapter.safetensors",
                 "peft_adapter/adapter_model.safetensors", "merged/model.safetensors"):
        assert (resumed / name).read_bytes() == (fsdp_run / name).read_bytes(), name


def check_exports_agree(out):
    """PEFT loads peft_adapter/ on base_model/, and gives the merged model's logits."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(out / "base_model")
    ids = torch.randint(0, base.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    adapted = peft.PeftModel.from_pretrained(base, out / "peft_adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    plain = AutoModelForCausalLM.from_pretrained(out / "base_model").eval()
    with torch.no_grad():
        got, expected, untrained = adapted(ids).logits, merged(ids).logits, plain(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(untrained, expected, atol=1e-3)


@pytest.mark.parametrize("flags, expected", [
    ([], "--fsdp: shards the model over torchrun's processes, and this is one process"),
    (["--quantize", "nf4"], "--quantize nf4 with --fsdp: this example quantizes a real model with bitsandbytes"),
])
def test_fsdp_refuses_one_process_and_the_flags_it_does_not_take_yet(flags, expected, tmp_path):
    env = {"WORLD_SIZE": "2"} if flags else {}  # as under torchrun: refused while parsing, before any process group
    proc = subprocess.run([sys.executable, str(SCRIPT), "--fsdp", "--output-dir", str(tmp_path / "out"), *flags],
                          capture_output=True, text=True, timeout=60, env=dict(script_env(), **env), cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert expected in proc.stderr, proc.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


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
                      "--exact-match-prompts", "4", "--batch-size", "8", "--merge")
    check_ok(proc)
    # --merge over a quantized base prints what requantizing the merge would cost (lora.requantize_report).
    table = proc.stdout[proc.stdout.index("requantized to nf4: 16 layers"):]
    assert "model.layers.3.mlp.down_proj" in table and "probe batch: max |logit difference|" in table
    assert (out / "merged" / "config.json").exists()
    summary = json.loads((out / "summary.json").read_text())
    weights = summary["base_weights"]
    # The tiny model's adapted projections: 4 layers x (qkv 128->256, o 128->128, gate_up 128->512, down 256->128).
    assert weights["quantize"] == "nf4" and weights["bf16_bytes"] == 2 * 4 * 128 * (256 + 128 + 512 + 256)
    assert 0.25 * weights["bf16_bytes"] < weights["bytes"] < 0.3 * weights["bf16_bytes"]  # 4 bits + a scale per 64
    assert "base weights of the adapted projections" in proc.stdout and "(nf4)" in proc.stdout
    losses = train_losses(out)
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())
    assert math.isfinite(summary["eval_loss_after"]["all"])


def test_fsdp_memory_table_is_the_docs_and_counts_what_transformers_builds(monkeypatch):
    """docs/distributed.md shows examples/fsdp_memory.py's output; its parameter counts are those of transformers'
    Phi3ForCausalLM (built on the meta device) with phi3.apply_lora(r=16) on it."""
    from transformers import Phi3Config, Phi3ForCausalLM

    import lora_layers as lora

    proc = subprocess.run([sys.executable, str(SCRIPT.parent / "fsdp_memory.py")], capture_output=True, text=True,
                          timeout=60, env=script_env(), cwd=ROOT)
    check_ok(proc)
    doc = (ROOT / "docs" / "distributed.md").read_text()
    table = proc.stdout.split("\n\n")[0].strip()
    assert table.count("\n") == 13 and "```text\n" + proc.stdout.strip() + "\n```" in doc
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import fsdp_memory

    for name, m in fsdp_memory.MODELS.items():
        config = Phi3Config(hidden_size=m["hidden"], num_hidden_layers=m["layers"], num_attention_heads=m["heads"],
                            num_key_value_heads=m["kv_heads"], intermediate_size=m["intermediate"],
                            vocab_size=m["vocab"], tie_word_embeddings=False)
        assert config.hidden_size // config.num_attention_heads == m["head_dim"]
        with torch.device("meta"):
            model = Phi3ForCausalLM(config)
            lora.phi3.apply_lora(model, r=fsdp_memory.RANK)
        n_lora = lora.count_lora_parameters(model)
        assert fsdp_memory.totals()[name] == (model.num_parameters() - n_lora, n_lora), name
    mini = fsdp_memory.per_gpu(fsdp_memory.MODELS["Phi-3-mini (3.8B)"], "bf16", 2)
    assert abs(mini["base"] * 2 - 2 * 3_821_079_552) < 1 and mini["adapters"] * 2 == 16 * 29_884_416


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
    out = tmp_path / "out"
    old = out / folder
    resume = []
    if folder.startswith("checkpoints"):  # only a run resumed from an earlier step saves over a checkpoint
        check_ok(run_script("--output-dir", out, *TWO_STEPS, "--save-steps", "1"))
        remove_tree(old)
        resume = ["--resume", out / "checkpoints" / "step-000001"]
    old.mkdir(parents=True)
    for name in ("adapter.safetensors", "training_state.pt", "adapter_config.json", "adapter_model.safetensors",
                 "model.safetensors", "config.json", "tokenizer.json", "README.md"):
        (old / name).write_bytes(f"previous run's {name}".encode())
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    wrapper = tmp_path / "kill_at.py"
    wrapper.write_text(KILL_AT)
    proc = run_script("--output-dir", out, *TWO_STEPS, *resume, launcher=(str(wrapper), kill, str(nth)))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before


def remove_tree(path):
    import shutil

    shutil.rmtree(path)


# ----------------------------------------------------------------------------- a newcomer's path (issue #24 item 3)

def files_under(folder):
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_help_gives_every_flag_a_line_with_its_default():
    proc = run_script("--help", timeout=60)
    check_ok(proc)
    entries = [" ".join(e.split()) for e in re.split(r"\n  (?=-)", proc.stdout.split("\noptions:", 1)[1])]
    flags = [e for e in entries if e.startswith("--")]
    assert len(flags) > 40 and [e for e in flags if "(default: " not in e] == []
    assert "--learning-rate LEARNING_RATE peak learning rate (default: 0.0002; tiny preset: 0.001)" in flags


def test_output_explains_itself_and_logs_plain_lines(first_run):
    out, proc = first_run
    assert proc.stdout.count("base weights of the adapted projections") == 1
    assert "configuration (preset tiny; flags given: --batch-size" in proc.stdout
    assert "that is not divergence" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["lora"]["r"] == 32 and summary["config"]["training"]["max_steps"] == STEPS
    assert ("a reply '' means" in proc.stdout) == any(s["reply"] == "" for s in summary["samples"])
    # Not a terminal: a plain line every logging step, and no progress bar redrawn with \r.
    assert re.findall(r"^step (\d+)/24: loss", proc.stdout, re.M) == [str(s) for s in range(4, STEPS + 1, 4)]
    assert "\r" not in proc.stdout + proc.stderr
    # The loss curve's per-source points: chat batches are the high ones.
    train = json.loads((out / "train_log.json").read_text())["train"]
    chat = [h["loss"] for h in train[STEPS // 2:] if h["chat_share"] >= 0.5]
    synthetic = [h["loss"] for h in train[STEPS // 2:] if h["chat_share"] < 0.5]
    assert chat and synthetic and min(chat) > max(synthetic)
    config = json.loads((out / "peft_adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((out / "base_model").resolve())


def test_refuses_an_output_dir_holding_another_runs_checkpoints(first_run):
    out, _ = first_run
    before = files_under(out)
    proc = run_script("--output-dir", out, "--max-steps", "2", timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"holds another run's checkpoints (step-{SAVE_AT:06d}, step-{STEPS:06d})" in proc.stderr
    assert f"--resume {out / 'checkpoints'}" in proc.stderr and "--overwrite" in proc.stderr
    assert files_under(out) == before


def test_overwrite_refused_for_bad_data_or_too_few_examples_deletes_nothing(first_run, tmp_path):
    out, _ = first_run
    before = files_under(out)
    (tmp_path / "bad.jsonl").write_text("{bad\n")
    for flags in (["--data", tmp_path / "bad.jsonl"], ["--batch-size", "100000"]):
        proc = run_script("--output-dir", out, "--overwrite", *flags, timeout=60)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert files_under(out) == before  # issue #20 review: --overwrite had deleted the outputs, then refused


@pytest.mark.parametrize("flag", ["--batch-size", "--gradient-accumulation-steps", "--logging-steps", "--eval-steps",
                                  "--save-steps"])
def test_a_zero_step_count_is_refused_before_anything_runs(flag, tmp_path):
    # issue #20 review: ZeroDivisionError after the first training step (or while splitting the data)
    proc = run_script("--output-dir", tmp_path / "out", flag, "0", timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"{flag}: expected a positive integer, got 0" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_bad_resume_and_model_paths_say_what_exists(first_run, tmp_path):
    out, _ = first_run
    proc = run_script("--output-dir", tmp_path / "a", "--resume", out / "checkpoints" / "step-12", timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "checkpoints found: " + ", ".join(str(out / "checkpoints" / f"step-{s:06d}") for s in (SAVE_AT, STEPS)) \
        in proc.stderr
    missing = tmp_path / "Phi-3-mini-4k-instruct"
    proc = run_script("--output-dir", tmp_path / "b", "--model", missing, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"--model: no such folder: {missing}" in proc.stderr
    assert f"hf download microsoft/Phi-3-mini-4k-instruct --local-dir {missing}" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_paths_given_as_flag_equals_tilde_expand(first_run, tmp_path):
    # issue #20 review: the shell leaves ~ in --output-dir=~/out: the run wrote into a folder named '~' in the
    # working directory, and --model=~/base was refused as no such folder
    out, _ = first_run
    (tmp_path / "base").symlink_to(out / "base_model")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model=~/base", "--preset", "tiny", "--output-dir=~/run",
                           *TWO_STEPS[:-1]], capture_output=True, text=True, timeout=120,
                          env=dict(script_env(), HOME=str(tmp_path)), cwd=tmp_path)
    check_ok(proc)
    assert not (tmp_path / "~").exists()
    config = json.loads((tmp_path / "run" / "summary.json").read_text())["config"]
    assert config["model"] == str(tmp_path / "base") and config["output_dir"] == str(tmp_path / "run")


def test_resume_from_a_checkpoints_folder_takes_its_latest_step(first_run, tmp_path):
    out, _ = first_run
    proc = run_script("--output-dir", tmp_path / "again", "--resume", out / "checkpoints", *SMALL)
    check_ok(proc)
    assert f"resumed from {out / 'checkpoints' / f'step-{STEPS:06d}'} at step {STEPS}" in proc.stdout
    after = [json.loads((o / "summary.json").read_text())["eval_loss_after"] for o in (out, tmp_path / "again")]
    assert after[0] == after[1]


def test_a_run_resumed_from_an_earlier_step_keeps_its_own_checkpoints(first_run, tmp_path):
    # issue #20 review: the rotation kept the highest step names, the old run's step-000024, and deleted each
    # checkpoint this run saved, its final one (and a Ctrl-C's, which the printed command then named) included
    out, _ = first_run
    run = tmp_path / "run"
    shutil.copytree(out / "checkpoints", run / "checkpoints")
    flags = [*SMALL[:SMALL.index("--max-steps")], "--max-steps", "16", "--save-steps", "2", "--eval-steps", "16"]
    check_ok(run_script("--output-dir", run, "--resume", run / "checkpoints" / f"step-{SAVE_AT:06d}", *flags,
                        "--save-total-limit", "1"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000016"]


def test_preset_tiny_on_a_local_folder_overwrite_float_alpha_and_final_checkpoint(first_run, tmp_path):
    out, _ = first_run
    new = tmp_path / "new"
    (new / "checkpoints" / "step-000400").mkdir(parents=True)  # another run's
    (new / "checkpoints" / "step-000400" / "training_state.pt").write_bytes(b"another run's")
    (new / "notes.txt").write_text("mine")
    # issue #20 review: --overwrite deleted these folders whole, a user's files and a symlink's target included
    (new / "checkpoints" / "README.md").write_text("mine")
    (new / "checkpoints" / ".step-000200.k1e2.tmp").mkdir()  # left by a rotation killed while deleting it
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "mine").mkdir(parents=True)
    (elsewhere / "model.safetensors").write_bytes(b"an earlier merge")
    (new / "merged").symlink_to(elsewhere)
    proc = run_script("--model", out / "base_model", "--preset", "tiny", "--output-dir", new, "--overwrite",
                      "--lora-alpha", "16.5", "--max-steps", "3", "--save-steps", "2", "--eval-steps", "3",
                      "--synthetic-examples", "100", "--exact-match-prompts", "2", "--batch-size", "8")
    check_ok(proc)
    assert sorted(p.name for p in (new / "checkpoints").iterdir()) == ["README.md", "step-000002", "step-000003"]
    assert (new / "notes.txt").read_text() == "mine"  # --overwrite deletes the script's outputs only
    assert (new / "checkpoints" / "README.md").read_text() == "mine"
    assert (new / "merged").is_symlink() and (elsewhere / "mine").is_dir()  # kept; the run wrote no merged model
    assert not (elsewhere / "model.safetensors").exists()  # the earlier run's, deleted through the link
    config = json.loads((new / "summary.json").read_text())["config"]
    assert config["preset"] == "tiny" and config["model"] == str(out / "base_model")
    assert config["lora"]["r"] == 32 and config["lora"]["lora_alpha"] == 16.5 and config["lora"]["use_rslora"]
    assert "alpha=16.5, rsLoRA=True" in proc.stdout
    peft = json.loads((new / "peft_adapter" / "adapter_config.json").read_text())
    assert peft["base_model_name_or_path"] == str((out / "base_model").resolve())


def test_ctrl_c_saves_a_checkpoint_and_prints_a_resume_command_that_continues_exactly(first_run, tmp_path):
    out, _ = first_run
    stopped = tmp_path / "stopped"
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), "--output-dir", str(stopped), *SMALL], text=True,
                                stdout=subprocess.PIPE, stderr=err, env=script_env(), cwd=ROOT)
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step 4/"):
                proc.send_signal(signal.SIGINT)
                break
        stdout = "".join(lines) + proc.communicate(timeout=120)[0]
    stderr = (tmp_path / "stderr").read_text()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    argv = shlex.split(stdout.strip().splitlines()[-1])
    assert argv[:2] == ["python", str(SCRIPT)] and argv[-2] == "--resume"
    checkpoint = Path(argv[-1])
    stopped_at = int(checkpoint.name.split("-")[1])
    assert checkpoint.parent == stopped / "checkpoints" and 4 <= stopped_at < STEPS
    assert (checkpoint / "training_state.pt").is_file()
    check_ok(run_script(*argv[2:]))
    full, again = train_losses(out), train_losses(stopped)
    assert sorted(again) == list(range(1, STEPS + 1))
    assert [again[s] for s in range(stopped_at + 1, STEPS + 1)] == [full[s] for s in range(stopped_at + 1, STEPS + 1)]


# Runs the script with a Ctrl-C arriving right as its handler is installed, before the run's first step.
CTRL_C_AT_START = """
import os, runpy, signal, sys
real = signal.signal
def install(signum, handler):
    old = real(signum, handler)
    if getattr(handler, "__name__", "") == "on_interrupt":
        os.kill(os.getpid(), signal.SIGINT)
    return old
signal.signal = install
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_ctrl_c_before_the_first_step_and_abbreviated_flags_give_a_working_resume_command(first_run, tmp_path):
    # issue #20 review: the command named a step-000000 checkpoint that was never saved, and kept --overw
    # (argparse's abbreviation of --overwrite), which --resume refuses
    out, _ = first_run
    wrapper = tmp_path / "ctrl_c_at_start.py"
    wrapper.write_text(CTRL_C_AT_START)
    stopped = tmp_path / "stopped"
    proc = run_script("--output-dir", stopped, "--overw", *SMALL, launcher=(str(wrapper),))
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "interrupted: at step 0, then saving a checkpoint" in proc.stdout
    argv = shlex.split(proc.stdout.strip().splitlines()[-1])
    assert argv[-2:] == ["--resume", str(stopped / "checkpoints" / "step-000000")] and "--overw" not in argv
    assert (stopped / "checkpoints" / "step-000000" / "training_state.pt").is_file()
    check_ok(run_script(*argv[2:]))
    assert train_losses(stopped) == train_losses(out)


# Runs the script with bitsandbytes' CPU 8-bit matmul logging what its CUDA one logs on every call (the
# message read from bitsandbytes' own source), and one other message once: does the script silence the first only?
INT8_CAST_LOG = """
import ast, inspect, re, runpy, sys
from bitsandbytes.autograd import _functions as f
source = inspect.getsource(f.MatMul8bitLt.forward)
message = ast.literal_eval(re.search(r'logger\\.warning\\(("MatMul8bitLt: inputs will be cast[^"]*")', source).group(1))
real, calls = f.MatMul8bitFp.apply, []
def apply(A, *args):
    f.logger.warning(message, A.dtype)
    if not calls:
        f.logger.warning("another bitsandbytes message")
    calls.append(1)
    return real(A, *args)
f.MatMul8bitFp.apply = apply
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_int8_run_silences_bitsandbytes_cast_message_only(tmp_path):
    pytest.importorskip("bitsandbytes")
    wrapper = tmp_path / "int8_cast_log.py"
    wrapper.write_text(INT8_CAST_LOG)
    proc = run_script("--output-dir", tmp_path / "int8", "--quantize", "int8", "--max-steps", "2",
                      "--synthetic-examples", "40", "--exact-match-prompts", "2", "--batch-size", "4",
                      launcher=(str(wrapper),))
    check_ok(proc)
    assert "(int8)" in proc.stdout
    assert "another bitsandbytes message" in proc.stderr and "MatMul8bitLt" not in proc.stderr, proc.stderr[-2000:]


# ----------------------------------------------------------------------------- reading top to bottom (issue #21)

MAIN_SCRIPT_LINES, FUNCTION_LINES = 250, 60


def function_lengths(source):
    """{"name:line": lines} of every function and method in ``source``: from its first decorator to its last
    line, comments and blank lines included, its docstring not."""
    lengths = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            doc = node.body[0] if ast.get_docstring(node, clean=False) is not None else None
            lengths[f"{node.name}:{node.lineno}"] = node.end_lineno - first + 1 - (
                doc.end_lineno - doc.lineno + 1 if doc else 0)
    return lengths


LENGTHS_SAMPLE = '''
@decorator
def f():
    """One

    docstring."""
    x = 1
    return x


class C:
    def m(self):
        # a comment

        return 1

    async def n(self):
        """doc"""
'''


def test_function_lengths_counts_from_the_decorator_and_skips_the_docstring():
    # counted by hand: f from @decorator to return (7 lines) less its 3 docstring lines; m 4 lines; n its def only
    assert function_lengths(LENGTHS_SAMPLE) == {"f:3": 4, "m:12": 4, "n:17": 1}


def test_main_script_is_short_and_every_example_function_fits_a_screen():
    lines = SCRIPT.read_text().splitlines()
    assert len(lines) <= MAIN_SCRIPT_LINES, f"{SCRIPT.name}: {len(lines)} lines"
    assert "def main():" in lines and lines[-2:] == ['if __name__ == "__main__":', "    run = main()"]
    long = {f"{path.name}:{name}": n for path in sorted(SCRIPT.parent.glob("*.py"))
            for name, n in function_lengths(path.read_text()).items() if n > FUNCTION_LINES}
    assert long == {}, f"functions over {FUNCTION_LINES} lines (docstring excluded): {long}"


def test_micro_batches_resume_mid_epoch_and_shard_the_sampler_order(monkeypatch):
    """phi3_data.micro_batches from index k yields what a run from 0 yields from its k-th micro-batch on, each
    rank's epoch covers its DistributedSampler shard (whole batches of it), and the chat count is right."""
    from torch.utils.data import DistributedSampler

    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import phi3_data

    # Example i holds the token i + 1, repeated over a length that varies, so a batch shows which examples it holds.
    examples = [{"input_ids": [i + 1] * (1 + i * 7 % 13), "labels": [i + 1] * (1 + i * 7 % 13)} for i in range(42)]
    n_chats, batch_size, seed = 10, 4, 3

    def rows(start, rank, n):
        batches = phi3_data.micro_batches(examples, n_chats, batch_size, seed, 2, rank, start, 0, torch.device("cpu"))
        out = []
        for _ in range(n):
            batch, chats = next(batches)
            ids = sorted(int(row[0]) - 1 for row in batch["input_ids"])
            assert chats == sum(i < n_chats for i in ids)
            out.append(ids)
        return out

    per_epoch = len(DistributedSampler(examples, num_replicas=2, rank=0, drop_last=True)) // batch_size  # 21 // 4
    for rank in (0, 1):
        full = rows(0, rank, 3 * per_epoch)
        for k in (1, per_epoch - 1, per_epoch, per_epoch + 2):
            assert rows(k, rank, 3) == full[k:k + 3], (rank, k)
        for epoch in range(3):
            sampler = DistributedSampler(examples, num_replicas=2, rank=rank, shuffle=True, seed=seed, drop_last=True)
            sampler.set_epoch(epoch)
            seen = [i for ids in full[epoch * per_epoch:(epoch + 1) * per_epoch] for i in ids]
            assert len(seen) == len(set(seen)) == per_epoch * batch_size and set(seen) <= set(sampler)
