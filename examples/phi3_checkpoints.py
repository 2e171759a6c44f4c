"""Checkpoints of examples/phi3_finetune.py: --overwrite, saving and rotating step folders, resuming, Ctrl-C.

Kept out of the main script so that it reads top to bottom. A checkpoint is checkpoints/step-N/ under
``--output-dir``: the adapter (adapter.safetensors) and the training state (optimizer, schedule, RNG,
and the run's history in ``extra``), from which ``--resume`` continues exactly.
"""
from __future__ import annotations

import fnmatch
import signal
from pathlib import Path

import lora_layers as lora
from lora_layers.fileio import atomic_folder, remove_folder

# Each output folder is written whole (built beside it, then swapped in): a run killed while saving leaves
# the previous folder or the new one, never new weights beside an old config or tokenizer. These are the
# names save_pretrained, export_peft and save_checkpoint write; a re-run replaces them, stale or not, and
# keeps anything else found in the folder (a README).
SAVED_FILES = ("*.safetensors", "*.bin", "*.json", "*.jinja", "*.model", "*.txt", "*.pt")
# What --overwrite deletes: this script's outputs only, never the folder's other files (--output-dir could be ~).
# Patterns (glob): --adapters N adds adapters/, peft_adapter_<name>/ and sweep.json (examples/phi3_sweep.py).
OUTPUTS = ("checkpoints", "base_model", "peft_adapter", "merged", "lora_adapter.safetensors", "loss_curve.png",
           "train_log.json", "summary.json", "adapters", "peft_adapter_*", "sweep.json")


def prepare_output_dir(out_dir, overwrite):
    """Create ``out_dir``; with ``overwrite`` (--overwrite), first delete what an earlier run wrote there."""
    if overwrite:
        clear_outputs(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def clear_outputs(out_dir):
    """Delete what a run writes in ``out_dir``, as a run replaces it, and nothing else.

    That is the step folders and the saved folders' own files (SAVED_FILES), not a user's other files
    there; a symlinked folder is emptied the same way through the link, which stays.
    """
    patterns = sorted(p for name in OUTPUTS if "*" in name for p in out_dir.glob(name))
    for path in [out_dir / name for name in OUTPUTS if "*" not in name] + patterns:
        if path.is_dir():
            for p in list(path.iterdir()):
                folder = p.is_dir() and not p.is_symlink()
                if path.name == "checkpoints" and folder and (p.name.startswith("step-") or (  # or one left
                        p.name.startswith(".step-") and p.name.endswith((".tmp", ".old")))):  # by a killed swap
                    remove_folder(p)  # renamed aside first: --resume never finds a half-deleted checkpoint
                elif path.name != "checkpoints" and not folder and any(fnmatch.fnmatchcase(p.name, g)
                                                                       for g in SAVED_FILES):
                    p.unlink()
            if not path.is_symlink() and not any(path.iterdir()):
                path.rmdir()
        elif path.exists() or path.is_symlink():
            path.unlink()


class Folders:
    """How the savers write a folder: whole (atomic_folder), by this process, which also does the rest of a save.
    Under --fsdp every rank calls the savers and rank 0 writes: phi3_fsdp.RankZeroFolders."""
    writer = True  # this process writes (creates folders, deletes old checkpoints, saves a tokenizer)

    def open(self, path, what, make_parent=False):
        """A context giving the temp folder that becomes ``path`` when the block succeeds."""
        if make_parent:
            path.parent.mkdir(exist_ok=True)
        return atomic_folder(path, what, owned=SAVED_FILES)


def save_checkpoint(out_dir, model, optimizer, scheduler, step, extra, keep, folders=Folders()):
    """LoRA-only checkpoint + training state in checkpoints/step-N, written whole; keeps the last ``keep`` folders
    (all of them if ``keep`` <= 0). ``optimizer`` None: the adapter only, which --resume does not take.
    ``folders``: see Folders (under --fsdp, called on every rank: save_lora and save_training_state gather the
    shards there, the optimizer's included, and rank 0 writes)."""
    with folders.open(out_dir / "checkpoints" / f"step-{step:06d}", "a checkpoint", make_parent=True) as tmp:
        lora.save_lora(model, Path(tmp) / "adapter.safetensors", metadata={"step": str(step)})
        if optimizer is not None:
            lora.save_training_state(tmp, model, optimizer, scheduler, step=step, extra=extra)
    if not folders.writer:
        return
    # The oldest go, never this one: a run resumed from an earlier step may have later step folders beside it.
    others = [p for p in sorted((out_dir / "checkpoints").glob("step-*"))
              if p.is_dir() and not p.is_symlink() and p.name != f"step-{step:06d}"]
    for old in others[:max(0, len(others) - keep + 1)] if keep > 0 else []:
        remove_folder(old)  # never left half-deleted, where --resume could still find a training_state.pt


def resume(folder, model, optimizer, scheduler, max_steps, log):
    """Load the checkpoint in ``folder`` into the model, optimizer and schedule.

    Returns ``(step, history, baseline)``: the step it was saved at, the run's history up to it and the
    untrained model's figures (None in a checkpoint that lacks them).
    """
    state = lora.load_training_state(folder, model, optimizer, scheduler)
    step = int(state["step"])
    extra = state.get("extra") or {}
    history, baseline = extra.get("history", {"train": [], "eval": []}), extra.get("baseline")
    if extra.get("max_steps") not in (None, max_steps):
        log(f"warning: the checkpoint was made for max_steps={extra['max_steps']}, now {max_steps}: "
            f"the learning-rate schedule differs from the original run")
    log(f"resumed from {folder} at step {step}")
    return step, history, baseline


class CtrlC:
    """Within ``with``: the first Ctrl-C sets ``interrupted``, and the run stops at the end of its step (a
    checkpoint cut mid-update would not resume exactly); a second one stops at once, saving nothing.

    The training loop keeps ``step`` (the last finished step) and ``updating`` (inside an update) current,
    for the message.
    """

    def __init__(self, log, step):
        self.log, self.step, self.updating, self.interrupted = log, step, False, False

    def __enter__(self):
        signal.signal(signal.SIGINT, self.on_interrupt)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def on_interrupt(self, signum, frame):
        self.interrupted = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        at = f"finishing step {self.step + 1}" if self.updating else f"at step {self.step}"  # evaluating or saving
        self.log(f"\ninterrupted: {at}, then saving a checkpoint (Ctrl-C again to quit without it)")
