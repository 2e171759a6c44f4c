"""``--adapters N`` of examples/phi3_finetune.py: a sweep of N adapters trained in one run over one frozen base.

    python examples/phi3_finetune.py --adapters 3                            # lr/2, lr, 2·lr
    python examples/phi3_finetune.py --adapters 3 --adapter-ranks 8,16,32    # ranks, at one lr
    python examples/phi3_finetune.py --adapters 2 --adapter-lrs 1e-3,3e-3 --adapter-ranks 16,16

Adapter 0 is the model's ``"default"`` adapter (apply_lora's); the others are named ``sweep1``, ``sweep2`` ...
(lora.add_adapter), with the run's LoRA settings but their own rank. Every micro-batch is one mixed batch
(lora.mixed_batch): row i trains adapter i mod N, so each adapter sees about batch_size / N rows of every
micro-batch and the N adapters cost about one forward and backward of the base. Each adapter's loss is the
mean over its own rows' tokens, its gradient norm is clipped on its own, and it has its own AdamW parameter
group at its own learning rate (the schedule scales them all alike): each adapter trains exactly as a run of
its own on its rows would (tests/test_example.py checks it against such runs).

The periodic eval lines, summary.json and the exports of the default run describe adapter 0; the sweep adds
the per-adapter table (printed, and sweep.json with each step's per-adapter train loss), adapters/<name>.safetensors
(save_lora(adapter=name): a file a single-adapter model loads) and peft_adapter_<name>/ (export_peft(adapter=name)).
See docs/multi-adapter.md.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import lora_layers as lora

IGNORE_INDEX = -100


def _numbers(kind):
    def parse(text):
        return tuple(kind(x) for x in text.split(",") if x.strip())
    return parse


def add_flags(parser) -> None:
    """The sweep's flags, in a group of their own."""
    g = parser.add_argument_group("sweep (--adapters N; examples/phi3_sweep.py, docs/multi-adapter.md)")
    g.add_argument("--adapters", type=int, default=None, metavar="N",
                   help="train N >= 2 adapters in one run over one frozen base, each micro-batch a mixed batch "
                        "(row i trains adapter i mod N), then compare them in a per-adapter eval table; adapter 0 "
                        "is 'default', the others sweep1, sweep2 ... (default: off, one adapter)")
    g.add_argument("--adapter-lrs", type=_numbers(float), default=None, metavar="LR1,LR2,...",
                   help="each adapter's peak learning rate, one AdamW parameter group each (default: halving and "
                        "doubling around --learning-rate: adapter k at lr * 2^(k - (N-1)//2))")
    g.add_argument("--adapter-ranks", type=_numbers(int), default=None, metavar="R1,R2,...",
                   help="each adapter's rank, same alpha (default: --r for every adapter)")


def check(cli) -> None:
    """Refuse what the sweep does not take; set ``cli.sweep`` (None without --adapters) and --r to adapter 0's."""
    args, parser, tc, lc = cli.args, cli.parser, cli.tc, cli.lc
    cli.sweep = None
    if args.adapters is None:
        for flag in ("adapter_lrs", "adapter_ranks"):
            if getattr(args, flag) is not None:
                parser.error(f"--{flag.replace('_', '-')} sets one value per adapter of --adapters N; "
                             "give --adapters N too")
        return
    n = args.adapters
    if n < 2:
        parser.error(f"--adapters: expected an integer >= 2 (the adapters of the sweep), got {n}")
    refused = _refused(args, tc, n)
    if refused:
        parser.error(f"--adapters {n} with {refused}")
    lrs = args.adapter_lrs or tuple(tc["learning_rate"] * 2.0 ** (k - (n - 1) // 2) for k in range(n))
    ranks = args.adapter_ranks or (lc["r"],) * n
    for flag, values, ok, what in (("--adapter-lrs", lrs, lambda v: math.isfinite(v) and v > 0, "positive numbers"),
                                   ("--adapter-ranks", ranks, lambda v: v >= 1, "positive integers")):
        if len(values) != n or not all(ok(v) for v in values):
            parser.error(f"{flag}: expected {n} {what} separated by commas (one per adapter of --adapters {n}), "
                         f"got {','.join(map(str, values))!r}")
    lc["r"] = ranks[0]  # apply_lora's default adapter is adapter 0
    cli.sweep = SimpleNamespace(names=("default",) + tuple(f"sweep{k}" for k in range(1, n)), lrs=lrs,
                                ranks=ranks, losses=[])


def _refused(args, tc, n):
    """What of the command line the sweep does not take, said with the reason; None if it takes it all."""
    if args.fsdp or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return ("--fsdp or torchrun's processes (DDP): this example runs a sweep in one process; the mixed "
                "batches themselves work under DDP, but the per-adapter losses here are not reduced over ranks")
    if args.resume:
        return ("--resume: the checkpoints hold every adapter and its AdamW state (lora.load_training_state "
                "restores them), but this example does not rebuild the sweep's per-adapter log from them")
    if args.merge:
        return "--merge: a merged model holds one adapter; merge one with lora.merge_and_unload(model, adapter=name)"
    if tc["lora_plus_ratio"] > 0:
        return "--lora-plus-ratio: the sweep gives each adapter one parameter group at its own lr"
    if tc["batch_size"] < n:
        return (f"--batch-size {tc['batch_size']}: every adapter needs a row of each micro-batch; "
                f"give --batch-size {n} or more")
    return None


def config(sweep) -> dict:
    """The sweep as summary.json's config keeps it."""
    return {"names": list(sweep.names), "learning_rates": list(sweep.lrs), "ranks": list(sweep.ranks)}


def add(run, model) -> None:
    """Add adapters 1..N-1 beside apply_lora's default (nothing without --adapters)."""
    sweep, lc = run.sweep, run.lc
    if sweep is None:
        return
    for name, r in zip(sweep.names[1:], sweep.ranks[1:]):
        lora.add_adapter(model, name, r=r, lora_alpha=lc["lora_alpha"], lora_dropout=lc["lora_dropout"],
                         use_rslora=lc["use_rslora"], use_dora=lc["use_dora"])
    run.log("sweep: " + ", ".join(f"{name} (r={r}, lr {lr:g})" for name, r, lr in
                                  zip(sweep.names, sweep.ranks, sweep.lrs)) +
            "; each micro-batch's row i trains adapter i mod N. The periodic eval lines and summary.json are "
            "adapter 'default''s; the table at the end compares them all")


def groups(run, model):
    """One AdamW parameter group per adapter at its own lr (None without --adapters)."""
    if run.sweep is None:
        return None
    return [{"params": [p for _, p in lora.named_lora_parameters(model, adapter=name)], "lr": lr}
            for name, lr in zip(run.sweep.names, run.sweep.lrs)]


def adapter_losses(model, batch, n: int) -> torch.Tensor:
    """``(n,)``: adapter k's loss, the mean over the tokens of rows k, k + n, ... (transformers' causal-LM
    loss on those rows alone), with the fused loss (no logits kept), under the current mixed batch."""
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    head = model.get_output_embeddings()
    labels = F.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]  # position t predicts token t + 1
    return torch.stack([lora.fused_linear_cross_entropy(hidden[k::n], head.weight, labels[k::n], head.bias)
                        for k in range(n)])


def step(run, batches, params):
    """phi3_finetune.train_step for a sweep: ``(mean loss over the adapters, tokens, chats, adapter 0's lr)``;
    each adapter's own loss goes to ``run.sweep.losses``."""
    sweep, accum, model = run.sweep, run.tc["gradient_accumulation_steps"], run.raw_model
    n = len(sweep.names)
    losses, tokens, chats = torch.zeros(n, device=run.device), 0, 0
    for _ in range(accum):
        batch, n_chat = next(batches)
        names = [sweep.names[i % n] for i in range(batch["input_ids"].shape[0])]
        with lora.mixed_batch(model, names):
            with run.autocast:
                loss = adapter_losses(model, batch, n) / accum
            loss.sum().backward()  # adapter k's gradient is its own loss's: the others do not depend on it
        losses += loss.detach()
        tokens, chats = tokens + int(batch["attention_mask"].sum()), chats + n_chat
    for group in run.optimizer.param_groups:  # as N separate runs would clip
        torch.nn.utils.clip_grad_norm_(group["params"], run.tc["max_grad_norm"])
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    sweep.losses.append([float(x) for x in losses])
    return losses.mean(), tokens, chats, lr


def finish(run, evaluator, exact_match_set, tokenizer, step) -> None:
    """After training: each adapter's eval figures (set_adapter), its files, the table and sweep.json (nothing
    without --adapters)."""
    sweep, model, out_dir = run.sweep, run.raw_model, run.out_dir
    if sweep is None:
        return
    rows = []
    for name, r, lr in zip(sweep.names, sweep.ranks, sweep.lrs):
        lora.set_adapter(model, name)
        rows.append({"adapter": name, "r": r, "learning_rate": lr, "eval_loss": evaluator.losses(run.eval_sets),
                     "exact_match": evaluator.exact_match(exact_match_set)})
    lora.set_adapter(model, "default")
    with run.folders.open(out_dir / "adapters", "the sweep's adapters") as tmp:  # all old or all new after a kill
        for name in sweep.names:
            lora.save_lora(model, Path(tmp) / f"{name}.safetensors", metadata={"step": str(step)}, adapter=name)
    for name in sweep.names:
        with run.folders.open(out_dir / f"peft_adapter_{name}", f"the PEFT adapter {name}") as tmp:
            lora.export_peft(model, tmp, base_model_name_or_path=str(run.base_model_path), adapter=name)
            tokenizer.save_pretrained(tmp)
    train = [{"step": i + 1, **dict(zip(sweep.names, losses))} for i, losses in enumerate(sweep.losses)]
    (out_dir / "sweep.json").write_text(json.dumps({**config(sweep), "eval": rows, "train": train}, indent=1))
    print_table(rows, len(exact_match_set))


def print_table(rows, exact_match_prompts: int) -> None:
    """The console table: one line per adapter."""
    sets = [k for k in rows[0]["eval_loss"] if k != "all"]
    print("\n==== sweep: one line per adapter (the summary above is adapter 'default''s) ====")
    print(f"{'adapter':<10}{'r':>4}{'lr':>10}{'eval loss':>11}" + "".join(f"{s:>11}" for s in sets)
          + (f"  exact match ({exact_match_prompts})" if exact_match_prompts else ""))
    for row in rows:
        losses = row["eval_loss"]
        print(f"{row['adapter']:<10}{row['r']:>4}{row['learning_rate']:>10.2e}{losses['all']:>11.4f}"
              + "".join(f"{losses[s]:>11.4f}" for s in sets)
              + (f"  {row['exact_match']:.1%}" if row["exact_match"] is not None else ""))
