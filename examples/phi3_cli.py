"""Command line of examples/phi3_finetune.py: its flags and their checks, torchrun's processes, and the
command that resumes a stopped run.

Kept out of the main script so that it reads top to bottom. The defaults stay in the script's config
dicts (the tiny preset's in phi3_data.py); each key of them becomes a flag here. Every check runs before
the run writes anything, and a failed one exits with argparse's usage error (code 2), not a traceback.
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

import phi3_data
import phi3_report
import phi3_sweep

DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "chat_instructions.jsonl"
# --help's line for each config key; its default (and the tiny preset's, where it differs) is appended.
FLAG_HELP = {
    "learning_rate": "peak learning rate", "batch_size": "micro-batch per process",
    "gradient_accumulation_steps": "micro-batches per optimizer step", "num_epochs": "passes over the data",
    "max_steps": "optimizer steps; > 0 overrides --num-epochs", "warmup_ratio": "share of the steps warming up",
    "lr_scheduler": "cosine (decay to --min-lr-ratio * lr after warmup) or constant",
    "min_lr_ratio": "floor of the cosine decay, as a share of the lr", "weight_decay": "AdamW weight decay",
    "lora_plus_ratio": "> 0: LoRA+, every lora_B at ratio * lr (e.g. 16); 0: one lr for all",
    "max_grad_norm": "gradient clipping norm", "seed": "seed of the data split, order, model and dropout",
    "logging_steps": "log the train loss every N steps", "eval_steps": "evaluate every N steps (and at the end)",
    "save_steps": "checkpoint every N steps (and at the end)", "save_total_limit": "checkpoints kept",
    "bf16": "autocast and bf16 base weights on CUDA (CPU runs fp32)",
    "gradient_checkpointing": "recompute activations in backward; unset: off for the tiny preset, else on",
    "cpu_threads": "torch threads on CPU; 0 keeps torch's default", "max_length": "tokens per conversation, cut",
    "eval_fraction": "share of each data source held out", "synthetic_examples": "string-reversal chats added",
    "exact_match_prompts": "held-out synthetic prompts scored by greedy exact match",
    "r": "LoRA rank", "lora_alpha": "LoRA alpha (scaling alpha/r, or alpha/sqrt(r) with rsLoRA); a float is fine",
    "lora_dropout": "dropout on the adapters' input", "targets": "projections that get adapters",
    "qkv": "parts of the fused qkv_proj that get adapters", "use_rslora": "rsLoRA scaling alpha/sqrt(r)",
    "use_dora": "DoRA: a trainable magnitude per output row (docs/dora.md)",
    "lean": "fused loss and recomputed adapter inputs: same losses, less memory",
    "lora_dtype": "adapter dtype: float32, bfloat16, float16 or none (the base's)",
}
# Step counts that divide: 0 crashed after the first step (the base loaded, --overwrite's deletions done).
POSITIVE = ("batch_size", "gradient_accumulation_steps", "logging_steps", "eval_steps", "save_steps")


def flag_help(key, default, tiny_overrides):
    """The --help line of a config key: what it does, its default, and the tiny preset's value if different."""
    what = FLAG_HELP.get(key) or f"the random model's {key[5:]} (--model tiny only)"
    show = lambda v: ",".join(v) if isinstance(v, tuple) else v  # noqa: E731  (as the flag takes it)
    tiny = f"; tiny preset: {show(tiny_overrides[key])}" if tiny_overrides.get(key, default) != default else ""
    return f"{what} (default: {show(default)}{tiny})".replace("%", "%%")


def number(text):
    """An int where the text is one (32), else a float (16.5): alpha prints as the user wrote it."""
    return int(text) if text.strip().lstrip("+-").isdigit() else float(text)


def build_parser(description, configs, tiny_overrides):
    """The script's own flags, then one per key of each ``(group name, config dict, flag prefix)`` in ``configs``.
    Paths expand ``~``, which the shell leaves as it is in ``--output-dir=~/out``."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", type=os.path.expanduser,
                   help="'tiny' (offline random Phi-3), a local folder or a hub id for from_pretrained (default: tiny)")
    p.add_argument("--preset", choices=("tiny", "pretrained"), default=None,
                   help="default settings: tiny (the offline demo's, for a small random model, also with --model "
                        "<folder>) or pretrained (default: tiny for --model tiny, else pretrained)")
    p.add_argument("--data", default=None, type=os.path.expanduser,
                   help="ultrachat-style JSONL (default: the bundled chats + the synthetic reversal task)")
    p.add_argument("--output-dir", default="out/phi3-lora", type=os.path.expanduser,
                   help="where outputs go (default: %(default)s)")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", default=None, type=os.path.expanduser,
                        help="continue exactly from a checkpoints/step-N folder, or the latest step in a checkpoints "
                             "folder (default: none, start afresh)")
    resume.add_argument("--overwrite", action="store_true", help="first delete this script's outputs from "
                        "--output-dir, another run's checkpoints included, and nothing else there (default: off: "
                        "refuse such a folder)")
    p.add_argument("--attn-implementation", default="sdpa", help="sdpa | eager | flash_attention_2 "
                   "(default: %(default)s)")
    p.add_argument("--merge", action="store_true", help="also save a merged model (merge_and_unload) "
                   "(default: off)")
    p.add_argument("--fsdp", action="store_true", help="under torchrun, shard the model over the processes with "
                   "FSDP2 (lora_layers.phi3.fully_shard: each decoder layer, then the root) instead of DDP; see "
                   "docs/distributed.md (default: off)")
    p.add_argument("--quantize", choices=("nf4", "fp4", "int8"), default=None,
                   help="QLoRA: a frozen 4-bit (nf4, fp4) or 8-bit base, loaded through bitsandbytes; "
                        "--model tiny with nf4 uses lora_layers.quantize_base (torchao) (default: off)")
    for group, config, prefix in configs:
        add_config_flags(p.add_argument_group(group), config, prefix, tiny_overrides)
    phi3_sweep.add_flags(p)
    return p


def add_config_flags(group, config, prefix, tiny_overrides):
    """One flag per key, defaults suppressed: only an explicit flag lands in the parsed namespace."""
    for key, default in config.items():
        key = prefix + key
        flag, help = "--" + key.replace("_", "-"), flag_help(key, default, tiny_overrides)
        if isinstance(default, bool) or default is None:  # None: decided at run time unless a flag says
            group.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help)
        elif isinstance(default, tuple):
            group.add_argument(flag, dest=key, default=argparse.SUPPRESS, metavar="A,B", help=help,
                               type=lambda s: tuple(x for x in s.split(",") if x))
        else:
            group.add_argument(flag, dest=key, type=number if key == "lora_alpha" else type(default),
                               default=argparse.SUPPRESS, help=help)


def parse(description, training_config, lora_config):
    """Parse and check the command line: the settings of this run, with copies of the config dicts resolved.

    Returns a namespace: ``parser``, ``args``, ``preset``, ``explicit`` (the config keys given as flags),
    ``tc``, ``lc``, ``tiny`` (the training, LoRA and tiny-model settings) and ``out_dir``.
    """
    tiny_overrides, tiny_model_config = phi3_data.tiny_overrides, phi3_data.tiny_model_config
    parser = build_parser(description, (("training_config", training_config, ""), ("lora_config", lora_config, ""),
                                        ("tiny_model_config", tiny_model_config, "tiny_")), tiny_overrides)
    args = parser.parse_args()
    preset = args.preset or ("tiny" if args.model == "tiny" else "pretrained")
    tiny = {**tiny_model_config, **{k[5:]: v for k, v in vars(args).items() if k.startswith("tiny_")}}
    explicit = {k: v for k, v in vars(args).items() if k in training_config or k in lora_config}
    tc, lc = dict(training_config), dict(lora_config)
    for config in (tc, lc):
        config.update({k: v for k, v in tiny_overrides.items() if k in config and preset == "tiny"})
        config.update({k: v for k, v in explicit.items() if k in config})
    if args.data is not None and "synthetic_examples" not in explicit:  # the synthetic task goes with the default data
        tc["synthetic_examples"] = 0
    cli = SimpleNamespace(parser=parser, args=args, preset=preset, explicit=explicit, tc=tc, lc=lc, tiny=tiny,
                          out_dir=Path(args.output_dir))
    check_settings(cli)
    check_fsdp(cli)
    phi3_sweep.check(cli)  # --adapters N: sets cli.sweep (None without it)
    check_paths(cli)
    return cli


def check_settings(cli):
    """Refuse settings that would fail later; turn --lora-dtype into a torch dtype and settle checkpointing."""
    tc, lc, parser = cli.tc, cli.lc, cli.parser
    if lc["lora_dtype"] in ("", "none"):
        lc["lora_dtype"] = None
    elif isinstance(getattr(torch, lc["lora_dtype"], None), torch.dtype):
        lc["lora_dtype"] = getattr(torch, lc["lora_dtype"])
    else:
        parser.error(f"--lora-dtype: expected float32, bfloat16, float16 or none, got {lc['lora_dtype']!r}")
    for key in POSITIVE:
        if tc[key] < 1:
            parser.error(f"--{key.replace('_', '-')}: expected a positive integer, got {tc[key]}")
    if not (math.isfinite(tc["lora_plus_ratio"]) and tc["lora_plus_ratio"] >= 0):
        parser.error(f"--lora-plus-ratio: expected 0 (off) or a positive number, got {tc['lora_plus_ratio']}")
    if tc["gradient_checkpointing"] is None:  # recomputation costs more than it saves on the tiny model
        tc["gradient_checkpointing"] = cli.preset != "tiny"


def check_fsdp(cli):
    """Refuse --fsdp without torchrun's processes, and with --quantize (issue #22: see the message)."""
    args, parser = cli.args, cli.parser
    if not args.fsdp:
        return
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        parser.error("--fsdp: shards the model over torchrun's processes, and this is one process; launch it with "
                     "torchrun --nproc_per_node N (N >= 2) examples/phi3_finetune.py --fsdp, or leave --fsdp out")
    if args.quantize:  # refused while parsing: otherwise every rank would build, quantize and fail in fully_shard
        parser.error(f"--quantize {args.quantize} with --fsdp: this example quantizes a real model with bitsandbytes, "
                     "whose weights FSDP2 cannot shard (lora_layers refuses them: fully_shard drops their quantization "
                     "state), and the tiny model's projections are too small for torchao's NF4 to split over the "
                     "ranks (one NF4 scale factor per projection; lora_layers.phi3.fully_shard refuses that too). "
                     "QLoRA under FSDP2 takes lora_layers.quantize_base (torchao NF4) on a model whose projections "
                     "split, in your own script (docs/distributed.md); here leave --quantize or --fsdp out")


def step_folders(folder):
    """The checkpoints (step-N folders holding a training state) in ``folder``, oldest first."""
    return sorted(p for p in Path(folder).glob("step-*") if (p / "training_state.pt").is_file())


def resume_folder(cli, path):
    """The checkpoint --resume names: that step folder, or the latest one in a checkpoints folder."""
    path, out_dir = Path(path), cli.out_dir
    if (path / "training_state.pt").is_file():
        return path
    if step_folders(path):
        return step_folders(path)[-1]
    found = sorted({str(p) for d in (path.parent, out_dir / "checkpoints") for p in step_folders(d)})
    cli.parser.error(f"--resume: {path} is neither a checkpoint (a step-N folder with training_state.pt) nor a "
                     "folder of them; " + (f"checkpoints found: {', '.join(found)}" if found else
                                           f"none in {path.parent} or {out_dir / 'checkpoints'} either"))


def check_paths(cli):
    """Refuse an output folder holding another run's checkpoints and a --model path that does not exist;
    resolve --resume to the step folder it means."""
    args, out_dir, parser = cli.args, cli.out_dir, cli.parser
    earlier = sorted(p.name for p in (out_dir / "checkpoints").glob("step-*"))
    if earlier and not (args.resume or args.overwrite):  # rotation would delete this run's checkpoints, keep those
        parser.error(f"--output-dir: {out_dir} holds another run's checkpoints ({', '.join(earlier)}), which this "
                     f"run would mix with. Pass --resume {out_dir / 'checkpoints'} to continue that run, --overwrite "
                     "to delete its outputs first, or another --output-dir")
    if args.resume:
        args.resume = str(resume_folder(cli, args.resume))
    # A hub id is 'name' or 'org/name': an absolute, ./relative or deeper path can only be a missing folder.
    if args.model != "tiny" and not Path(args.model).is_dir() and (
            Path(args.model).exists() or os.path.isabs(args.model) or args.model.startswith((".", "~"))
            or args.model.count("/") > 1 or os.sep in args.model.replace("/", "")):
        parser.error(f"--model: no such folder: {args.model}. To get Phi-3-mini: hf download "
                     f"microsoft/Phi-3-mini-4k-instruct --local-dir {args.model} (or pass --model "
                     "microsoft/Phi-3-mini-4k-instruct to load it through the Hugging Face cache); --model tiny needs "
                     "no download")


def conversations(run):
    """The --data chats and the synthetic ones, each split into train and eval (phi3_data.load_conversations),
    and the micro-batches per epoch on this rank. Refuses a bad file, or too few examples for one step."""
    tc, world_size = run.tc, run.world_size
    try:
        data = phi3_data.load_conversations(run.args.data or DEFAULT_DATA, tc["synthetic_examples"],
                                            tc["eval_fraction"], tc["seed"])
    except ValueError as exc:
        run.parser.error(str(exc))
    # Checked here, before --overwrite deletes anything (phi3_data.micro_batches shards the train set alike).
    micro_per_epoch = len(DistributedSampler(data.train, num_replicas=world_size, rank=run.rank, drop_last=True)) \
        // tc["batch_size"]
    if micro_per_epoch < tc["gradient_accumulation_steps"]:
        run.parser.error(f"{len(data.train)} training examples are too few for batch_size={tc['batch_size']} x "
                         f"gradient_accumulation_steps={tc['gradient_accumulation_steps']} x {world_size} processes")
    return data, micro_per_epoch


def effective_config(cli):
    """The settings as summary.json keeps them: the preset silently decides most values."""
    args, tc, lc = cli.args, cli.tc, cli.lc
    return {"model": args.model, "preset": cli.preset, "data": str(args.data or DEFAULT_DATA),
            "output_dir": str(cli.out_dir), "resume": args.resume, "quantize": args.quantize, "fsdp": args.fsdp,
            "training": dict(tc), "lora": {**lc, "lora_dtype": str(lc["lora_dtype"]).replace("torch.", "")},
            **({"tiny_model": dict(cli.tiny)} if args.model == "tiny" else {}),
            **({"sweep": phi3_sweep.config(cli.sweep)} if cli.sweep else {})}


def start(cli):
    """Join torchrun's processes (if launched by it), pick the device, seed torch and log the configuration.

    Returns ``cli`` with ``ddp``, ``rank``, ``world_size``, ``local_rank``, ``master``, ``saves``, ``device``, ``log``
    (print on rank 0, flushed; nothing elsewhere), ``use_bf16`` (autocast), ``dtype`` (of the base's float
    weights) and ``config`` (effective_config) added.
    """
    cli.ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1  # several processes: DDP, or FSDP2 with --fsdp
    cli.fsdp = cli.args.fsdp
    if cli.ddp:  # launched by torchrun
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        cli.rank, cli.world_size, cli.local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])
    else:
        cli.rank, cli.world_size, cli.local_rank = 0, 1, 0
    cli.master = cli.rank == 0
    cli.saves = cli.master or cli.fsdp  # who calls the savers: rank 0; under --fsdp every rank (collectives there)
    if torch.cuda.is_available():
        cli.device = torch.device("cuda", cli.local_rank)
        torch.cuda.set_device(cli.device)
    else:
        cli.device = torch.device("cpu")
    if cli.device.type == "cpu" and cli.tc["cpu_threads"] > 0:
        torch.set_num_threads(cli.tc["cpu_threads"])
    cli.use_bf16 = cli.tc["bf16"] and cli.device.type == "cuda"
    cli.dtype = torch.bfloat16 if cli.use_bf16 and cli.args.model != "tiny" else torch.float32  # the base's weights
    cli.log = (lambda *a: print(*a, flush=True)) if cli.master else (lambda *a: None)  # flushed: logs show progress
    torch.manual_seed(cli.tc["seed"])
    cli.config = effective_config(cli)  # printed now and kept in summary.json
    phi3_report.log_config(cli.log, cli.preset, cli.explicit, cli.config)
    phi3_data.quiet_logs(cli.args.quantize)
    return cli


def all_ranks(run, loss_sum, tokens, chats, interrupted):
    """A step's figures over every rank: ``(mean loss, tokens, chat examples, whether any rank had a Ctrl-C)``."""
    if not run.ddp:
        return float(loss_sum), tokens, chats, interrupted
    stats = torch.tensor([float(loss_sum), tokens, chats, interrupted], device=run.device, dtype=torch.float64)
    dist.all_reduce(stats)
    return float(stats[0]) / run.world_size, int(stats[1]), int(stats[2]), bool(stats[3])


def exit_interrupted(run, step, save):
    """After a Ctrl-C: make sure checkpoints/step-N exists (``save(step)``), print the command that resumes from
    it, and exit with the shell's code for a run ended by Ctrl-C (130)."""
    checkpoint = run.out_dir / "checkpoints" / f"step-{step:06d}"
    if not (checkpoint / "adapter.safetensors").is_file():  # Ctrl-C before this run's first step; every rank
        save(step)  # calls it (a collective under --fsdp), rank 0 writes
    run.log(f"stopped at step {step} of {run.max_steps}; checkpoint {checkpoint}. To continue:\n  "
            f"{resume_command(run.parser, checkpoint, run.world_size)}")
    if run.ddp:
        dist.destroy_process_group()
    sys.exit(130)


def stop(run):
    """Leave torchrun's process group once every rank is done (nothing to do in a single process)."""
    if run.ddp:
        dist.barrier()
        dist.destroy_process_group()


def resume_command(parser, checkpoint, world_size):
    """This run's command line, continuing from ``checkpoint`` (without --resume/--overwrite it was given)."""
    flags = [flag for action in parser._actions for flag in action.option_strings]

    def means(arg, flag):  # the flag itself, or an abbreviation argparse takes for it (--over, --res=...)
        name = arg.split("=", 1)[0]
        return name == flag or (len(name) > 2 and flag.startswith(name)
                                and not any(f.startswith(name) for f in flags if f != flag))

    kept, skip = [], False
    for arg in sys.argv[1:]:
        if skip or means(arg, "--overwrite") or (means(arg, "--resume") and "=" in arg):
            skip = False
        elif means(arg, "--resume"):
            skip = True
        else:
            kept.append(arg)
    launcher = ["torchrun", f"--nproc_per_node={world_size}"] if world_size > 1 else ["python"]
    return shlex.join([*launcher, sys.argv[0], *kept, "--resume", str(checkpoint)])
