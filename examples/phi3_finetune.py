"""Fine-tune Phi-3 with LoRA adapters: one readable script, a hand-written training loop.

    python examples/phi3_finetune.py                        # offline demo: tiny random Phi-3, bundled data
    python examples/phi3_finetune.py --model /path/to/Phi-3-mini-4k-instruct --data chats.jsonl
    python examples/phi3_finetune.py --model /path/to/Phi-3-mini-4k-instruct --quantize nf4   # QLoRA
    torchrun --nproc_per_node 4 examples/phi3_finetune.py --model /path/to/Phi-3-mini ...   # DDP
    torchrun --nproc_per_node 2 examples/phi3_finetune.py --fsdp   # FSDP2: each process 1/N of the model
    python examples/phi3_finetune.py --adapters 3 --adapter-ranks 8,16,32   # a sweep: 3 adapters in one run

Every key of ``training_config`` and ``lora_config`` below is also a flag
(``--learning-rate 1e-4``, ``--r 8``, ``--no-gradient-checkpointing`` ...).
Outputs, under ``--output-dir``: checkpoints/step-N/ (adapter + optimizer state,
the last ``save_total_limit`` kept), lora_adapter.safetensors, peft_adapter/,
merged/ (with ``--merge``), and the report: loss_curve.png, train_log.json and
summary.json (examples/phi3_report.py). A folder holding another run's checkpoints
is refused unless ``--resume`` or ``--overwrite`` is given. Ctrl-C saves the step
and prints the command that resumes it. See docs/phi3.md.
"""
import math
import os
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import phi3_checkpoints  # noqa: E402  (examples/phi3_checkpoints.py: --overwrite, checkpoints, resume, Ctrl-C)
import phi3_cli  # noqa: E402  (examples/phi3_cli.py: the flags and their checks, the processes)
import phi3_data  # noqa: E402  (examples/phi3_data.py: data, tokenization, batches, the base model)
import phi3_export  # noqa: E402  (examples/phi3_export.py: the base, adapter and merged-model folders)
import phi3_fsdp  # noqa: E402  (examples/phi3_fsdp.py: --fsdp, sharding, the folders rank 0 writes)
import phi3_report  # noqa: E402  (examples/phi3_report.py: evaluation, log lines, peak memory, summary, plot)
import phi3_sweep  # noqa: E402  (examples/phi3_sweep.py: --adapters N, several adapters trained in one run)

import lora_layers as lora  # noqa: E402  (loralib-style: lora.Linear, lora.mark_only_lora_as_trainable, ...)

# ----------------------------------------------------------------------------- configuration
# Defaults for a pretrained Phi-3 (cf. the model card's sample_finetune.py, which uses r=16,
# alpha=32, dropout 0.05 on all four projections, cosine schedule, warmup 0.2, bf16).
# training_config is the run: optimisation, schedule, precision and memory, data and evaluation. lora_config is
# the adapter: exactly apply_lora's keyword arguments. A new option is one more key; phi3_cli.parse makes it a flag.
training_config = {
    # optimisation and schedule
    "learning_rate": 2e-4,
    "batch_size": 4,                   # micro-batch per process
    "gradient_accumulation_steps": 4,
    "num_epochs": 1,
    "max_steps": -1,                   # > 0 overrides num_epochs
    "warmup_ratio": 0.1,
    "lr_scheduler": "cosine",          # linear warmup, then cosine decay to min_lr_ratio * lr
    "min_lr_ratio": 0.0,
    "weight_decay": 0.0,
    "lora_plus_ratio": 0.0,            # > 0: LoRA+, every lora_B at ratio * lr (e.g. 16); 0: one lr for all
    "max_grad_norm": 1.0,
    "seed": 42,
    # logging, evaluation and checkpoints
    "logging_steps": 20,
    "eval_steps": 100,
    "save_steps": 100,
    "save_total_limit": 2,             # checkpoints kept
    # precision, memory and threads
    "bf16": True,                      # autocast (and bf16 weights) on CUDA; CPU runs fp32
    "gradient_checkpointing": None,    # None: on for real checkpoints, off for --model tiny
    "cpu_threads": 0,                  # torch threads on CPU; 0 keeps torch's default
    # data
    "max_length": 2048,
    "eval_fraction": 0.05,             # held out of each data source
    "synthetic_examples": 0,           # string-reversal chats added to the data
    "exact_match_prompts": 200,        # held-out synthetic prompts scored by greedy exact match
}
lora_config = {
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "targets": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "qkv": ("q", "k", "v"),            # which parts of the fused qkv_proj get adapters
    "use_rslora": False,               # scaling alpha/sqrt(r) instead of alpha/r
    "use_dora": False,                 # DoRA: a trainable magnitude per output row (docs/dora.md)
    "lean": True,                      # fused loss, recomputed adapter inputs: same losses, less memory
    "lora_dtype": "float32",           # fp32 adapters on a bf16 base
}


def main():
    """Flags, data, base model, LoRA, optimizer, training, evaluation, exports, report: the run, top to bottom.
    Returns its state (a namespace: the tests read the model from it)."""
    # ------------------------------------------------------------------------- flags, data, model, LoRA
    # `run` holds the settings (phi3_cli.parse), the processes (phi3_cli.start) and what main() builds below.
    run = phi3_cli.start(phi3_cli.parse(__doc__, training_config, lora_config))  # a bad flag exits with code 2
    args, tc = run.args, run.tc
    run.data, micro_per_epoch = phi3_cli.conversations(run)  # the chats and the synthetic task, split
    model, tokenizer = add_adapters(run, *phi3_data.load_base_model(run, run.data))

    # ------------------------------------------------------------------------- tokens, optimizer, evaluation
    train_data, eval_data, run.eval_sets = phi3_data.tokenize_sets(tokenizer, run.data, tc["max_length"])
    exact_match_set = run.data.syn_eval[: tc["exact_match_prompts"]]
    steps_per_epoch = micro_per_epoch // tc["gradient_accumulation_steps"]
    run.max_steps = tc["max_steps"] if tc["max_steps"] > 0 else steps_per_epoch * tc["num_epochs"]
    run.optimizer, run.scheduler = optimizer_and_schedule(model, tc, run.max_steps, phi3_sweep.groups(run, model))
    run.autocast = torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.use_bf16)
    evaluator = phi3_report.Evaluator(model, tokenizer, run.device, run.autocast, tc["batch_size"])

    # ------------------------------------------------------------------------- resume or start, then train
    step, run.history, baseline = 0, {"train": [], "eval": []}, None
    if args.resume:
        step, run.history, baseline = phi3_checkpoints.resume(args.resume, model, run.optimizer, run.scheduler,
                                                              run.max_steps, run.log)
    if baseline is None:  # the untrained model's figures, kept in checkpoints for resumed runs
        baseline = {"eval_loss": evaluator.losses(run.eval_sets), "exact_match": evaluator.exact_match(exact_match_set)}
    phi3_report.log_start(run, baseline, (len(train_data), len(eval_data)), bool(exact_match_set))

    def save(step):  # called on every rank: rank 0 saves; under --fsdp every rank (collectives), rank 0 writes
        if run.saves:
            extra = {"history": run.history, "baseline": baseline, "max_steps": run.max_steps}
            phi3_checkpoints.save_checkpoint(run.out_dir, run.raw_model, run.optimizer,
                                             run.scheduler, step, extra, tc["save_total_limit"], run.folders)

    batches = phi3_data.micro_batches(train_data, len(run.data.chat_train), tc["batch_size"], tc["seed"],
                                      run.world_size, run.rank, step * tc["gradient_accumulation_steps"],
                                      tokenizer.pad_token_id, run.device)
    step, interrupted, tokens_seen, train_time = train(run, evaluator, step, batches, save)
    if interrupted and step < run.max_steps:  # at the last step, the run ends as usual
        phi3_cli.exit_interrupted(run, step, save)  # after saving checkpoints/step-N, and printing how to resume

    # ------------------------------------------------------------------------- final evaluation, exports, report
    final = {"eval_loss": run.history["eval"][-1] if run.history["eval"] else evaluator.losses(run.eval_sets),
             "exact_match": evaluator.exact_match(exact_match_set)}
    samples = (run.data.syn_eval[:2] + run.data.chat_eval[:2])[:4]
    replies = evaluator.generate(samples, max_new_tokens=64)
    peak_memory = phi3_report.peak_memory(run.device)  # before the exports below allocate
    if run.saves:  # rank 0; under --fsdp every rank, as save_lora and export_peft are collectives there
        phi3_export.save_adapters(model, tokenizer, run.out_dir, step, run.base_model_path, run.folders)
    if run.master:
        phi3_report.report(run, baseline=baseline, final=final, exact_match_prompts=len(exact_match_set),
                           steps=step, tokens_seen=tokens_seen, train_time=train_time, peak_memory=peak_memory,
                           samples=samples, replies=replies)
    phi3_sweep.finish(run, evaluator, exact_match_set, tokenizer, step)  # --adapters N: the table, each one's files
    if args.merge and run.saves:  # last: merge_and_unload turns the LoRA layers back into plain nn.Linear
        phi3_export.save_merged(model, tokenizer, run.out_dir, run.dtype, run.folders)  # --fsdp: merged_state_dict
    phi3_cli.stop(run)
    return run


def add_adapters(run, tokenizer, model, base_model_path):
    """``(model, tokenizer)``: the base with LoRA adapters, after the run's first write (its output folder)."""
    args, log = run.args, run.log
    if run.master:  # the first write: a refused or failed start (bad data, a model that does not load) deleted nothing
        phi3_checkpoints.prepare_output_dir(run.out_dir, args.overwrite)
        if args.model == "tiny":  # so that the PEFT export has a base to load on
            phi3_export.save_base_model(model, tokenizer, base_model_path)
    if args.model == "tiny" and args.quantize:
        model = phi3_data.quantize_tiny(run, model, base_model_path)
    # qkv_proj, gate_up_proj become MergedLinear (GQA-aware splits [q | k | v], [gate | up]); o_proj, down_proj Linear.
    # apply_lora also freezes everything but the adapters and sets up checkpointing so that gradients still reach them
    # through the frozen base. lean=True: model(**batch) with labels returns the loss and logits=None (docs/phi3.md).
    replaced = lora.phi3.apply_lora(model, **run.lc, gradient_checkpointing=run.tc["gradient_checkpointing"])
    phi3_sweep.add(run, model)  # --adapters N: adapters sweep1 ... beside the default one (nothing otherwise)
    log(lora.summary(model))  # adapted modules, ranks, variants, trainable/total parameters, adapter bytes
    run.n_adapted, run.base_model_path = len(replaced), base_model_path
    run.n_params = (lora.count_lora_parameters(model), model.num_parameters())  # a 4-bit weight: its elements
    adapted = [model.get_submodule(name) for name in replaced]
    # The base weights under the adapters: packed bytes (data and scales) when quantized, next to bf16's 2 bytes each.
    run.base_weights = {"quantize": args.quantize, "bytes": sum(lora.quantized.weight_nbytes(m) for m in adapted),
                        "bf16_bytes": 2 * sum(m.in_features * m.out_features for m in adapted)}
    run.raw_model = run.model = phi3_fsdp.shard(run, model) if run.fsdp else model
    run.folders = phi3_fsdp.RankZeroFolders(run) if run.fsdp else phi3_checkpoints.Folders()  # where savers write
    if run.ddp and not run.fsdp:
        run.model = DistributedDataParallel(model, device_ids=[run.local_rank] if run.device.type == "cuda" else None)
    return model, tokenizer


def optimizer_and_schedule(model, tc, max_steps, param_groups=None):
    """AdamW over the adapters (or ``param_groups``), its schedule: linear warmup, then cosine decay (or constant)."""
    if param_groups is None and tc["lora_plus_ratio"] > 0:  # LoRA+ (Hayou et al. 2024): lora_B at ratio * lr
        param_groups = lora.lora_plus_param_groups(model, tc["learning_rate"], tc["lora_plus_ratio"],
                                                   tc["weight_decay"])
    elif param_groups is None:  # else --adapters N: one group per adapter at its own lr (phi3_sweep.groups)
        param_groups = lora.lora_parameters(model)
    optimizer = torch.optim.AdamW(param_groups, lr=tc["learning_rate"], weight_decay=tc["weight_decay"])
    warmup_steps = int(tc["warmup_ratio"] * max_steps)

    def lr_lambda(step):
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if tc["lr_scheduler"] == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return tc["min_lr_ratio"] + (1 - tc["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)


def train(run, evaluator, step, batches, save):
    """Optimizer steps from ``step`` until max_steps or a Ctrl-C, evaluating and saving on the way.
    Returns ``(step, interrupted, tokens seen, seconds spent training)``."""
    tc, history = run.tc, run.history
    run.model.train()
    params, tokens_seen, train_time = lora.lora_parameters(run.raw_model), 0, 0.0
    # tqdm draws on stderr; redirected to a file, its redraws would fill the log with \r updates.
    bar = run.master and sys.stderr.isatty()
    progress = phi3_report.Progress(run.log, run.max_steps, step, tc["logging_steps"], bar)
    with phi3_checkpoints.CtrlC(run.log, step) as ctrl_c:
        while step < run.max_steps and not ctrl_c.interrupted:
            ctrl_c.updating, t0 = True, time.perf_counter()
            loss_sum, tokens, chats, lr = (phi3_sweep.step if run.sweep else train_step)(run, batches, params)
            step = ctrl_c.step = step + 1
            ctrl_c.updating = False
            # The logged loss and throughput cover all ranks; one rank's Ctrl-C stops them all at this step.
            loss, tokens, chats, ctrl_c.interrupted = phi3_cli.all_ranks(run, loss_sum, tokens, chats,
                                                                         ctrl_c.interrupted)
            train_time += time.perf_counter() - t0
            tokens_seen += tokens
            share = round(chats / (tc["batch_size"] * tc["gradient_accumulation_steps"] * run.world_size), 4)
            history["train"].append({"step": step, "loss": loss, "lr": lr, "chat_share": share})
            progress.step(step, dict(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_seen / train_time:,.0f}"))
            if step % tc["eval_steps"] == 0 or step == run.max_steps:
                losses = evaluator.losses(run.eval_sets)
                history["eval"].append({"step": step, **losses})
                progress.write(f"step {step}: eval loss {phi3_report.describe(losses)}")
            if step % tc["save_steps"] == 0 or step == run.max_steps or ctrl_c.interrupted:  # rank 0 writes
                save(step)
    progress.close()
    return step, ctrl_c.interrupted, tokens_seen, train_time


def train_step(run, batches, params):
    """One optimizer step over gradient_accumulation_steps micro-batches: ``(loss, tokens, chats, lr)``, the
    loss summed over the micro-batches, and the lr the step used."""
    accum = run.tc["gradient_accumulation_steps"]
    loss_sum, tokens, chats = torch.zeros((), device=run.device), 0, 0
    for micro in range(accum):
        batch, n_chat = next(batches)
        # Gradients are reduced over the ranks (DDP, FSDP2) only on the last micro-batch of the step.
        with phi3_fsdp.gradient_sync(run, micro == accum - 1):
            with run.autocast:
                loss = run.model(**batch).loss / accum
            loss.backward()
        loss_sum += loss.detach()
        tokens, chats = tokens + int(batch["attention_mask"].sum()), chats + n_chat
    torch.nn.utils.clip_grad_norm_(params, run.tc["max_grad_norm"])
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss_sum, tokens, chats, lr


if __name__ == "__main__":
    run = main()
