"""Reporting for examples/phi3_finetune.py: evaluation, log lines, peak memory, and the final report.

Kept out of the main script so that it reads top to bottom; nothing here trains
or knows about LoRA. The report is what rank 0 leaves under ``--output-dir``:

- ``train_log.json``: the loss and lr of every step, and every evaluation;
- ``loss_curve.png``: train and eval loss against the step, each data source apart;
- ``summary.json``: the figures before and after training, and a few sample replies;

plus the summary table printed at the end of a run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

import phi3_data

try:  # POSIX only; without it (Windows) a CPU run reports no peak memory
    import resource
except ImportError:
    resource = None


class Evaluator:
    """The held-out figures of ``model``: token-weighted eval loss, greedy replies and their exact match.

    Each call runs in eval mode (which merges the adapters: fast) and returns the model to train mode.
    """

    def __init__(self, model, tokenizer, device: torch.device, autocast, batch_size: int):
        self.model, self.tokenizer, self.device, self.autocast = model, tokenizer, device, autocast
        self.batch_size = batch_size

    @torch.no_grad()
    def loss(self, examples: Sequence[dict]) -> float:
        """Token-weighted mean loss over tokenized ``examples``."""
        self.model.eval()
        total, count = 0.0, 0
        for i in range(0, len(examples), self.batch_size):
            batch = {k: v.to(self.device) for k, v in
                     phi3_data.collate(examples[i:i + self.batch_size], self.tokenizer.pad_token_id).items()}
            with self.autocast:
                loss = self.model(**batch).loss
            n = int((batch["labels"][:, 1:] != phi3_data.IGNORE_INDEX).sum())
            total, count = total + float(loss) * n, count + n
        self.model.train()
        return total / max(count, 1)

    def losses(self, eval_sets: Dict[str, Sequence[dict]]) -> Dict[str, float]:
        """The loss of each eval set, by name."""
        return {name: self.loss(examples) for name, examples in eval_sets.items()}

    @torch.no_grad()
    def generate(self, conversations: Sequence[list], max_new_tokens: int) -> List[str]:
        """Greedy replies to every conversation's prompt (batched by prompt length: no padding)."""
        self.model.eval()
        tokenizer = self.tokenizer
        prompts = [phi3_data.prompt_ids(tokenizer, c) for c in conversations]
        replies = [None] * len(prompts)
        by_length = {}
        for i, ids in enumerate(prompts):
            by_length.setdefault(len(ids), []).append(i)
        for group in by_length.values():
            for j in range(0, len(group), 64):
                rows = group[j:j + 64]
                ids = torch.tensor([prompts[i] for i in rows], device=self.device)
                with self.autocast:
                    out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                              max_new_tokens=max_new_tokens,
                                              eos_token_id=phi3_data.stop_token_ids(tokenizer),
                                              pad_token_id=tokenizer.pad_token_id, use_cache=True)
                for i, seq in zip(rows, out[:, ids.shape[1]:]):
                    replies[i] = tokenizer.decode(seq, skip_special_tokens=True).strip()
        self.model.train()
        return replies

    def exact_match(self, conversations: Sequence[list]) -> Optional[float]:
        """Share of greedy replies equal to the reference answer (None without synthetic data)."""
        if not conversations:
            return None
        replies = self.generate(conversations, max_new_tokens=16)
        return sum(r == c[-1]["content"] for r, c in zip(replies, conversations)) / len(conversations)


def log_config(log, preset: str, explicit: Sequence[str], config: dict) -> None:
    """The settings in effect, and which flags set them."""
    given = " ".join("--" + k.replace("_", "-") for k in sorted(explicit)) or "none"
    log(f"configuration (preset {preset}; flags given: {given}):")
    for group in ("training", "lora", "tiny_model"):
        if group in config:
            log(f"  {group}: " + ", ".join(f"{k}={v}" for k, v in config[group].items()))


def log_start(run, baseline: dict, n_data: Tuple[int, int], exact_match: bool) -> None:
    """The lines before the first step: the adapters, parameters, base weights, data and the untrained figures.

    Args:
        run: the run's settings and figures (phi3_finetune.py), ``log``, ``n_adapted`` (modules), ``n_params``
            (trainable, total) and ``base_weights`` included.
        n_data: (train, eval) conversations.
        exact_match: whether there is an exact-match set (its share is then logged).
    """
    tc, lc, log, (n_trainable, n_total), base_weights = run.tc, run.lc, run.log, run.n_params, run.base_weights
    log(f"model: {run.args.model}  LoRA on {run.n_adapted} modules ({', '.join(lc['targets'])}), r={lc['r']}, "
        f"alpha={lc['lora_alpha']}, rsLoRA={lc['use_rslora']}, DoRA={lc['use_dora']}"
        + (f", LoRA+ ratio {tc['lora_plus_ratio']:g}" if tc["lora_plus_ratio"] > 0 else ""))
    log(f"trainable params: {n_trainable:,} / {n_total:,} ({100 * n_trainable / n_total:.2f}%)")
    log(f"base weights of the adapted projections: {base_weights['bytes'] / 2**20:,.2f} MiB "
        f"({run.args.quantize or 'not quantized'}) vs {base_weights['bf16_bytes'] / 2**20:,.2f} MiB in bf16 "
        f"({base_weights['bytes'] / base_weights['bf16_bytes']:.2f}x)")
    if run.data.chat_train and run.data.syn_train:
        log("note: length grouping keeps chat and synthetic examples in separate batches, so the train loss jumps up "
            "on chat steps (real language, which a small model learns slowly); that is not divergence: "
            "loss_curve.png plots the two sources apart")
    log(f"data: {n_data[0]} train / {n_data[1]} eval conversations; {run.max_steps} steps of "
        f"{tc['batch_size']} x {tc['gradient_accumulation_steps']} x {run.world_size}; device {run.device}, "
        f"world {run.world_size}")
    log(f"before training: eval loss {describe(baseline['eval_loss'])}" + (
        f"; synthetic exact match {baseline['exact_match']:.1%}" if exact_match else ""))


class Progress:
    """The training loop's output: on a terminal, a progress bar showing the step's figures; elsewhere (a log
    file, which tqdm's redraws would fill) a plain line every ``every`` steps and at the last one."""

    def __init__(self, log, total: int, initial: int, every: int, bar: bool):
        self.log, self.total, self.every = log, total, every
        self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True) if bar else None

    def step(self, step: int, figures: Dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.update(1)
        if step % self.every and step != self.total:
            return
        if self.bar is not None:
            self.bar.set_postfix(**figures)
        else:
            self.log(f"step {step}/{self.total}: " + ", ".join(f"{k} {v}" for k, v in figures.items()))

    def write(self, line: str) -> None:
        """A line of its own (the bar redrawn below it)."""
        (self.bar.write if self.bar is not None else self.log)(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def describe(losses: Dict[str, float]) -> str:
    """'0.3746 (ppl 1.45); chat 2.8855, synthetic 0.0524' for the log."""
    parts = [f"{name} {value:.4f}" for name, value in losses.items() if name != "all"]
    return f"{losses['all']:.4f} (ppl {math.exp(min(losses['all'], 50)):.2f})" + ("; " if parts else "") + \
        ", ".join(parts)


def peak_memory(device: torch.device) -> Tuple[Optional[int], Optional[str]]:
    """``(bytes, kind)``: CUDA's max_memory_allocated, else this process's peak RSS.

    Returns ``(None, None)`` on CPU where the ``resource`` module does not exist.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "max_memory_allocated"
    if resource is None:
        return None, None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS"  # Linux reports KiB


def summarize(*, model: str, steps: int, world_size: int, device: torch.device, baseline: dict, final: dict,
              eval_names: Sequence[str], exact_match_prompts: int, trainable_params: int, total_params: int,
              tokens_seen: int, train_time: float, peak_memory: Tuple[Optional[int], Optional[str]],
              samples: Sequence[list], replies: Sequence[str]) -> dict:
    """The run's figures as the JSON-ready dict written to ``summary.json``.

    Args:
        baseline, final: ``{"eval_loss": {eval set: loss}, "exact_match": share or None}``
            before and after training.
        eval_names: the eval sets, ``"all"`` first.
        samples, replies: conversations and the model's greedy replies to their prompts.
    """
    before, after = baseline["eval_loss"]["all"], final["eval_loss"]["all"]
    memory_bytes, memory_kind = peak_memory
    return {
        "model": model, "steps": steps, "world_size": world_size, "device": str(device),
        "eval_loss_before": baseline["eval_loss"], "eval_loss_after": {k: final["eval_loss"][k] for k in eval_names},
        "eval_loss_reduction": 1 - after / before,
        "exact_match_before": baseline["exact_match"], "exact_match_after": final["exact_match"],
        "exact_match_prompts": exact_match_prompts,
        "trainable_params": trainable_params, "total_params": total_params,
        "tokens_per_second": tokens_seen / train_time if train_time else None,
        "train_seconds_this_run": train_time, "peak_memory_bytes": memory_bytes, "peak_memory_kind": memory_kind,
        "samples": [{"prompt": c[:-1], "reply": r, "reference": c[-1]["content"]} for c, r in zip(samples, replies)],
    }


def report(run, *, steps: int, baseline: dict, final: dict, exact_match_prompts: int, tokens_seen: int,
           train_time: float, peak_memory: Tuple[Optional[int], Optional[str]], samples: Sequence[list],
           replies: Sequence[str]) -> None:
    """Write the report under ``run.out_dir`` and print its summary (summarize, write, print_summary)."""
    summary = summarize(model=run.args.model, steps=steps, world_size=run.world_size, device=run.device,
                        baseline=baseline, final=final, eval_names=list(run.eval_sets),
                        exact_match_prompts=exact_match_prompts, trainable_params=run.n_params[0],
                        total_params=run.n_params[1], tokens_seen=tokens_seen, train_time=train_time,
                        peak_memory=peak_memory, samples=samples, replies=replies)
    summary["base_weights"] = run.base_weights
    summary["config"] = run.config
    write(run.out_dir, run.history, summary)
    print_summary(summary, run.out_dir)


def write(out_dir: Path, history: Dict[str, List[dict]], summary: dict) -> None:
    """Write train_log.json, loss_curve.png and summary.json into ``out_dir``."""
    (out_dir / "train_log.json").write_text(json.dumps(history, indent=1))
    _plot_loss_curve(out_dir / "loss_curve.png", history, summary)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))


def _plot_loss_curve(path: Path, history: Dict[str, List[dict]], summary: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    # One line drawn through chat and synthetic steps alike looks like divergence (a chat batch's loss is far
    # higher): each source gets its own colour, its train steps as faint dots, its eval as a line.
    fig, ax = plt.subplots(figsize=(7, 4))
    colours = {"synthetic": "tab:blue", "chat": "tab:orange", None: "tab:gray"}
    for source, colour in colours.items():  # None: steps logged before the source was (a resumed old run)
        steps = [h for h in history["train"] if _source(h) == source]
        if steps:
            ax.plot([h["step"] for h in steps], [h["loss"] for h in steps], ".", color=colour, alpha=0.35,
                    markersize=4, label=f"train steps, mostly {source} batches" if source else "train steps")
    for name, style in (("synthetic", "o-"), ("chat", "o-"), ("all", "--")):
        if name in summary["eval_loss_before"]:
            ax.plot([0] + [h["step"] for h in history["eval"]],
                    [summary["eval_loss_before"][name]] + [h[name] for h in history["eval"]], style,
                    color=colours.get(name, "black"), label=f"eval, {name} held out")
    ax.set(xlabel="step", ylabel="loss (log scale)", yscale="log", title=f"Phi-3 LoRA ({summary['model']})")
    ax.legend(fontsize="small", loc="lower left")  # the corner the falling curves leave empty
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _source(step: dict) -> Optional[str]:
    """The data source of most of a step's examples, from its logged chat share."""
    share = step.get("chat_share")
    return None if share is None else "chat" if share >= 0.5 else "synthetic"


def print_summary(summary: dict, out_dir: Path) -> None:
    """The console table: eval loss, exact match, parameters, throughput, memory, samples."""
    s = summary
    before, after = s["eval_loss_before"]["all"], s["eval_loss_after"]["all"]
    print("\n==== summary ====")
    print(f"eval loss        {before:.4f} -> {after:.4f}  ({s['eval_loss_reduction']:.1%} lower; "
          f"ppl {math.exp(min(before, 50)):.1f} -> {math.exp(min(after, 50)):.2f})")
    for name, loss in s["eval_loss_after"].items():
        if name != "all":
            print(f"  {name:<15}{s['eval_loss_before'][name]:.4f} -> {loss:.4f}")
    if s["exact_match_prompts"]:
        print(f"exact match      {s['exact_match_before']:.1%} -> {s['exact_match_after']:.1%}  "
              f"(greedy, {s['exact_match_prompts']} held-out reversal prompts)")
    n_trainable, n_total = s["trainable_params"], s["total_params"]
    print(f"parameters       {n_trainable:,} trainable / {n_total:,} total ({100 * n_trainable / n_total:.2f}%)")
    print(f"throughput       {s['tokens_per_second'] or 0:,.0f} tokens/s over "
          f"{s['train_seconds_this_run']:.1f} s of training")
    if s["peak_memory_bytes"] is not None:
        print(f"peak memory      {s['peak_memory_bytes'] / 2**20:,.0f} MiB ({s['peak_memory_kind']}, rank 0)")
    for sample in s["samples"]:
        print(f"--- {sample['prompt'][-1]['content']!r}\n    -> {sample['reply']!r}  "
              f"(reference {sample['reference']!r})")
    if any(not sample["reply"] for sample in s["samples"]):
        print("(a reply '' means the model ended it at once: a small random base learns the reversal task in "
              "a few hundred steps, but a few dozen chats cannot teach it English)")
    print(f"outputs in {out_dir}/")
