"""Fine-tune Phi-3 with LoRA adapters: one readable script, a hand-written training loop.

    python examples/phi3_finetune.py                        # offline demo: tiny random Phi-3, bundled data
    python examples/phi3_finetune.py --model /path/to/Phi-3-mini-4k-instruct --data chats.jsonl
    python examples/phi3_finetune.py --model /path/to/Phi-3-mini-4k-instruct --quantize nf4   # QLoRA
    torchrun --nproc_per_node 4 examples/phi3_finetune.py --model /path/to/Phi-3-mini ...   # DDP

Every key of ``training_config`` and ``lora_config`` below is also a flag
(``--learning-rate 1e-4``, ``--r 8``, ``--no-gradient-checkpointing`` ...).
Outputs, under ``--output-dir``: checkpoints/step-N/ (adapter + optimizer state,
the last ``save_total_limit`` kept), lora_adapter.safetensors, peft_adapter/,
merged/ (with ``--merge``), and the report: loss_curve.png, train_log.json and
summary.json (examples/phi3_report.py). A folder holding another run's checkpoints
is refused unless ``--resume`` or ``--overwrite`` is given. Ctrl-C saves the step
and prints the command that resumes it. See docs/phi3.md.
"""
import argparse
import contextlib
import fnmatch
import logging
import math
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import phi3_data  # noqa: E402  (examples/phi3_data.py: loading, synthetic task, tokenization)
import phi3_report  # noqa: E402  (examples/phi3_report.py: log lines, peak memory, summary, plot)

import lora_layers as lora  # noqa: E402  (loralib-style: lora.Linear, lora.mark_only_lora_as_trainable, ...)
from lora_layers.fileio import atomic_folder, remove_folder  # noqa: E402

# Each output folder is written whole (built beside it, then swapped in): a run killed while saving leaves
# the previous folder or the new one, never new weights beside an old config or tokenizer. These are the
# names save_pretrained, export_peft and save_checkpoint write; a re-run replaces them, stale or not, and
# keeps anything else found in the folder (a README).
SAVED_FILES = ("*.safetensors", "*.bin", "*.json", "*.jinja", "*.model", "*.txt", "*.pt")

# ----------------------------------------------------------------------------- configuration
# Defaults for a pretrained Phi-3 (cf. the model card's sample_finetune.py, which uses r=16,
# alpha=32, dropout 0.05 on all four projections, cosine schedule, warmup 0.2, bf16).
# training_config is the run: optimisation, schedule, precision and memory, data and evaluation.
# lora_config is the adapter: exactly the keyword arguments of lora.phi3.apply_lora.
# A new option is one more key in the dict it belongs to; parse_args makes it a flag.
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
# The offline demo (--model tiny) trains adapters on a *random* base model: it needs a larger
# learning rate and rank than a pretrained one. These replace the defaults above for
# --model tiny (explicit flags still win).
tiny_overrides = {
    "learning_rate": 1e-3, "batch_size": 32, "gradient_accumulation_steps": 1, "max_steps": 600,
    "warmup_ratio": 0.05, "logging_steps": 10, "eval_steps": 200, "save_steps": 200, "max_length": 256,
    "eval_fraction": 0.1, "synthetic_examples": 3000, "r": 32, "lora_alpha": 32, "lora_dropout": 0.0,
    "use_rslora": True,
    # Its matmuls are too small to gain from a second thread, and OpenMP threads spin badly on shared cores.
    "cpu_threads": 1,
}
tiny_model_config = {
    "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
    # The frozen random lm_head bounds a logit by about initializer_range * hidden_size (the final
    # RMSNorm fixes the hidden state's norm): 0.02 would cap confidence at ~2.6 nats; 0.06 allows ~7.7.
    "initializer_range": 0.06,
}
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


def flag_help(key, default):
    """The --help line of a config key: what it does, its default, and the tiny preset's value if different."""
    what = FLAG_HELP.get(key) or f"the random model's {key[5:]} (--model tiny only)"
    show = lambda v: ",".join(v) if isinstance(v, tuple) else v  # noqa: E731  (as the flag takes it)
    tiny = f"; tiny preset: {show(tiny_overrides[key])}" if tiny_overrides.get(key, default) != default else ""
    return f"{what} (default: {show(default)}{tiny})".replace("%", "%%")


def number(text):
    """An int where the text is one (32), else a float (16.5): alpha prints as the user wrote it."""
    return int(text) if text.strip().lstrip("+-").isdigit() else float(text)


def parse_args():
    """One flag per config key (defaults suppressed, so only explicit flags override). Paths expand ``~``, which
    the shell leaves as it is in ``--output-dir=~/out``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--quantize", choices=("nf4", "fp4", "int8"), default=None,
                   help="QLoRA: a frozen 4-bit (nf4, fp4) or 8-bit base, loaded through bitsandbytes; "
                        "--model tiny with nf4 uses lora_layers.quantize_base (torchao) (default: off)")
    for group, config, prefix in (("training_config", training_config, ""), ("lora_config", lora_config, ""),
                                  ("tiny_model_config", tiny_model_config, "tiny_")):
        g = p.add_argument_group(group)
        for key, default in config.items():
            key = prefix + key
            flag, help = "--" + key.replace("_", "-"), flag_help(key, default)
            if isinstance(default, bool) or default is None:  # None: decided at run time unless a flag says
                g.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help)
            elif isinstance(default, tuple):
                g.add_argument(flag, dest=key, default=argparse.SUPPRESS, metavar="A,B", help=help,
                               type=lambda s: tuple(x for x in s.split(",") if x))
            else:
                g.add_argument(flag, dest=key, type=number if key == "lora_alpha" else type(default),
                               default=argparse.SUPPRESS, help=help)
    return p, p.parse_args()


parser, args = parse_args()
preset = args.preset or ("tiny" if args.model == "tiny" else "pretrained")
tiny_model_config.update({k[5:]: v for k, v in vars(args).items() if k.startswith("tiny_")})
explicit = {k: v for k, v in vars(args).items() if k in training_config or k in lora_config}
for config in (training_config, lora_config):
    config.update({k: v for k, v in tiny_overrides.items() if k in config and preset == "tiny"})
    config.update({k: v for k, v in explicit.items() if k in config})
if args.data is not None and "synthetic_examples" not in explicit:  # the synthetic task goes with the default data
    training_config["synthetic_examples"] = 0
tc, lc = training_config, lora_config
if lc["lora_dtype"] in ("", "none"):
    lc["lora_dtype"] = None
elif isinstance(getattr(torch, lc["lora_dtype"], None), torch.dtype):
    lc["lora_dtype"] = getattr(torch, lc["lora_dtype"])
else:
    parser.error(f"--lora-dtype: expected float32, bfloat16, float16 or none, got {lc['lora_dtype']!r}")
for key in ("batch_size", "gradient_accumulation_steps", "logging_steps", "eval_steps", "save_steps"):
    if tc[key] < 1:  # a divisor: 0 crashed after the first step (the base loaded, --overwrite's deletions done)
        parser.error(f"--{key.replace('_', '-')}: expected a positive integer, got {tc[key]}")
if not (math.isfinite(tc["lora_plus_ratio"]) and tc["lora_plus_ratio"] >= 0):
    parser.error(f"--lora-plus-ratio: expected 0 (off) or a positive number, got {tc['lora_plus_ratio']}")
if tc["gradient_checkpointing"] is None:  # recomputation costs more than it saves on the tiny model
    tc["gradient_checkpointing"] = preset != "tiny"

# ----------------------------------------------------------------------------- output folder, resume, model path
out_dir = Path(args.output_dir)
# What --overwrite deletes: this script's outputs only, never the folder's other files (--output-dir could be ~).
OUTPUTS = ("checkpoints", "base_model", "peft_adapter", "merged", "lora_adapter.safetensors", "loss_curve.png",
           "train_log.json", "summary.json")


def step_folders(folder):
    """The checkpoints (step-N folders holding a training state) in ``folder``, oldest first."""
    return sorted(p for p in Path(folder).glob("step-*") if (p / "training_state.pt").is_file())


def resume_folder(path):
    """The checkpoint --resume names: that step folder, or the latest one in a checkpoints folder."""
    path = Path(path)
    if (path / "training_state.pt").is_file():
        return path
    if step_folders(path):
        return step_folders(path)[-1]
    found = sorted({str(p) for d in (path.parent, out_dir / "checkpoints") for p in step_folders(d)})
    parser.error(f"--resume: {path} is neither a checkpoint (a step-N folder with training_state.pt) nor a folder "
                 "of them; " + (f"checkpoints found: {', '.join(found)}" if found else
                                f"none in {path.parent} or {out_dir / 'checkpoints'} either"))


earlier = sorted(p.name for p in (out_dir / "checkpoints").glob("step-*"))
if earlier and not (args.resume or args.overwrite):  # rotation would delete this run's checkpoints, keep those
    parser.error(f"--output-dir: {out_dir} holds another run's checkpoints ({', '.join(earlier)}), which this run "
                 f"would mix with. Pass --resume {out_dir / 'checkpoints'} to continue that run, --overwrite to "
                 "delete its outputs first, or another --output-dir")
if args.resume:
    args.resume = str(resume_folder(args.resume))
# A hub id is 'name' or 'org/name': an absolute, ./relative or deeper path can only be a missing folder.
if args.model != "tiny" and not Path(args.model).is_dir() and (
        Path(args.model).exists() or os.path.isabs(args.model) or args.model.startswith((".", "~"))
        or args.model.count("/") > 1 or os.sep in args.model.replace("/", "")):
    parser.error(f"--model: no such folder: {args.model}. To get Phi-3-mini: hf download "
                 f"microsoft/Phi-3-mini-4k-instruct --local-dir {args.model} (or pass --model "
                 "microsoft/Phi-3-mini-4k-instruct to load it through the Hugging Face cache); --model tiny needs "
                 "no download")

# ----------------------------------------------------------------------------- processes and device
ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
if ddp:  # launched by torchrun
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world_size, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])
else:
    rank, world_size, local_rank = 0, 1, 0
master = rank == 0
if torch.cuda.is_available():
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
else:
    device = torch.device("cpu")
if device.type == "cpu" and tc["cpu_threads"] > 0:
    torch.set_num_threads(tc["cpu_threads"])
use_bf16 = tc["bf16"] and device.type == "cuda"
log = (lambda *a: print(*a, flush=True)) if master else (lambda *a: None)  # flushed: logs show where a run is
torch.manual_seed(tc["seed"])

# Printed now and kept in summary.json: the preset silently decides most values.
effective_config = {"model": args.model, "preset": preset, "data": str(args.data or DEFAULT_DATA),
                    "output_dir": str(out_dir), "resume": args.resume, "quantize": args.quantize,
                    "training": dict(tc), "lora": {**lc, "lora_dtype": str(lc["lora_dtype"]).replace("torch.", "")},
                    **({"tiny_model": dict(tiny_model_config)} if args.model == "tiny" else {})}
given = " ".join("--" + k.replace("_", "-") for k in sorted(explicit)) or "none"
log(f"configuration (preset {preset}; flags given: {given}):")
for group in ("training", "lora", "tiny_model"):
    if group in effective_config:
        log(f"  {group}: " + ", ".join(f"{k}={v}" for k, v in effective_config[group].items()))
if args.quantize == "int8":  # bitsandbytes logs this on every int8 matmul of fp32/bf16 inputs: thousands of lines
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(
        lambda record: not str(record.msg).startswith("MatMul8bitLt: inputs will be cast from"))

if not sys.stderr.isatty():  # redrawn with \r, transformers' loading and saving bars would fill a log file
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()

# ----------------------------------------------------------------------------- data (conversations)
try:
    chats = phi3_data.load_chat_jsonl(args.data or DEFAULT_DATA)
except ValueError as exc:
    parser.error(str(exc))
synthetic = phi3_data.synthetic_reversal(tc["synthetic_examples"], seed=tc["seed"])
chat_train, chat_eval = phi3_data.split_eval(chats, tc["eval_fraction"], tc["seed"])
syn_train, syn_eval = phi3_data.split_eval(synthetic, tc["eval_fraction"], tc["seed"]) if synthetic else ([], [])
train_chats, eval_chats = chat_train + syn_train, chat_eval + syn_eval
# Checked here, before --overwrite deletes anything (the sampler below shards the tokenized train_chats alike).
micro_per_epoch = len(DistributedSampler(train_chats, num_replicas=world_size, rank=rank, drop_last=True)) \
    // tc["batch_size"]
if micro_per_epoch < tc["gradient_accumulation_steps"]:
    parser.error(f"{len(train_chats)} training examples are too few for batch_size={tc['batch_size']} x "
                 f"gradient_accumulation_steps={tc['gradient_accumulation_steps']} x {world_size} processes")

# ----------------------------------------------------------------------------- tokenizer and model
# transformers imports torchao whenever it is installed; torchao then logs that its CUDA-only
# extensions failed to load, and torch warns about its enum registrations. Both are harmless here
# (docs/quickstart.md, "Warnings from the dependencies").
for noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(noisy).setLevel(logging.ERROR)
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, Phi3Config, Phi3ForCausalLM  # noqa: E402

dtype = torch.bfloat16 if use_bf16 and args.model != "tiny" else torch.float32  # of the base's float weights


def bnb_config(scheme):
    """QLoRA's frozen base through bitsandbytes: 4-bit blocks computing in the run's dtype, or LLM.int8."""
    if scheme == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=scheme, bnb_4bit_compute_dtype=dtype)


if args.model == "tiny":
    # A character-level tokenizer trained right now on the data, with Phi-3's special tokens and
    # chat template, and a small random Phi-3 with grouped-query attention (4 heads, 2 KV heads).
    tokenizer = phi3_data.build_char_tokenizer([m["content"] for c in chats + synthetic for m in c])
    model_config = Phi3Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              attn_implementation=args.attn_implementation, **tiny_model_config)
    torch.manual_seed(tc["seed"])  # identical base weights on every rank
    model = Phi3ForCausalLM(model_config)
    base_model_path = (out_dir / "base_model").resolve()  # saved below so the PEFT export has a base to load on
else:
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    quantized = {"quantization_config": bnb_config(args.quantize), "device_map": {"": device}} if args.quantize else {}
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation=args.attn_implementation,
                                                 **quantized)
    # Recorded in the PEFT export: a local folder absolute, so that it loads from anywhere; a hub id as given.
    base_model_path = Path(args.model).resolve() if Path(args.model).is_dir() else args.model
if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
model.config.use_cache = False
model.to(device)
# The first write: a refused or failed start (bad data, a model that does not load) has deleted nothing.
if master and args.overwrite:
    # Only what a run writes, as a run replaces it: the step folders and the saved folders' own files (SAVED_FILES),
    # not a user's other files there; a symlinked folder is emptied the same way through the link, which stays.
    for path in (out_dir / name for name in OUTPUTS):
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
if master:
    out_dir.mkdir(parents=True, exist_ok=True)
if master and args.model == "tiny":
    with atomic_folder(base_model_path, "the base model", owned=SAVED_FILES) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
if args.model == "tiny" and args.quantize == "nf4":  # torchao's NF4, in place, for the layers apply_lora takes
    lora.quantize_base(model, targets=list(lc["targets"]))
elif args.model == "tiny" and args.quantize:  # bitsandbytes quantizes while loading: reload the saved base
    if ddp:
        dist.barrier()  # rank 0 has written it
    model = Phi3ForCausalLM.from_pretrained(base_model_path, dtype=dtype, quantization_config=bnb_config(args.quantize),
                                            device_map={"": device}, attn_implementation=args.attn_implementation)
    model.config.use_cache = False

# ----------------------------------------------------------------------------- LoRA surgery
# qkv_proj and gate_up_proj become MergedLinear (GQA-aware splits [q | k | v], [gate | up]);
# o_proj and down_proj become Linear. apply_lora also freezes everything but the adapters and
# sets up checkpointing so that gradients still reach them through the frozen base. With
# lean=True, model(**batch) with labels returns the loss and logits=None (docs/phi3.md).
replaced = lora.phi3.apply_lora(model, **lc, gradient_checkpointing=tc["gradient_checkpointing"])
log(lora.summary(model))  # adapted modules, ranks, variants, trainable/total parameters, adapter bytes
n_trainable = lora.count_lora_parameters(model)
n_total = model.num_parameters()  # counts a 4-bit weight's logical elements, not its packed bytes
adapted = [model.get_submodule(name) for name in replaced]
# The base weights under the adapters: packed bytes (data and scales) when quantized, next to bf16's 2 bytes each.
base_weights = {"quantize": args.quantize, "bytes": sum(lora.quantized.weight_nbytes(m) for m in adapted),
                "bf16_bytes": 2 * sum(m.in_features * m.out_features for m in adapted)}
raw_model = model
if ddp:
    model = DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)

# ----------------------------------------------------------------------------- data (tokens)
def encode(conversations):
    return [phi3_data.tokenize_chat(tokenizer, c, tc["max_length"]) for c in conversations]


train_data, eval_data = encode(train_chats), encode(eval_chats)
eval_sets = {"all": eval_data, "chat": encode(chat_eval), "synthetic": encode(syn_eval)}
eval_sets = {name: examples for name, examples in eval_sets.items() if examples}
exact_match_set = syn_eval[: tc["exact_match_prompts"]]
# DistributedSampler shards across ranks (one shard without torchrun); its order depends only on
# (seed, epoch), so a resumed run can rebuild exactly where it was.
sampler = DistributedSampler(train_data, num_replicas=world_size, rank=rank, shuffle=True, seed=tc["seed"],
                             drop_last=True)
steps_per_epoch = micro_per_epoch // tc["gradient_accumulation_steps"]
max_steps = tc["max_steps"] if tc["max_steps"] > 0 else steps_per_epoch * tc["num_epochs"]


def micro_batches(start):
    """``(micro-batch, how many of its examples are chats)`` from global micro-batch index ``start`` on."""
    epoch, skip = divmod(start, micro_per_epoch)
    while True:
        sampler.set_epoch(epoch)
        batches = phi3_data.length_grouped_batches(list(sampler), [len(e["input_ids"]) for e in train_data],
                                                   tc["batch_size"], seed=tc["seed"] + epoch)
        for idx in batches[skip:micro_per_epoch]:
            batch = phi3_data.collate([train_data[j] for j in idx], tokenizer.pad_token_id)
            yield {k: v.to(device) for k, v in batch.items()}, sum(j < len(chat_train) for j in idx)
        epoch, skip = epoch + 1, 0


# ----------------------------------------------------------------------------- optimizer and schedule
# LoRA+ (Hayou et al. 2024) only changes the parameter groups: lora_B gets lora_plus_ratio * lr.
if tc["lora_plus_ratio"] > 0:
    param_groups = lora.lora_plus_param_groups(raw_model, tc["learning_rate"], tc["lora_plus_ratio"],
                                               tc["weight_decay"])
else:
    param_groups = lora.lora_parameters(raw_model)
optimizer = torch.optim.AdamW(param_groups, lr=tc["learning_rate"], weight_decay=tc["weight_decay"])
warmup_steps = int(tc["warmup_ratio"] * max_steps)


def lr_lambda(step):
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if tc["lr_scheduler"] == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return tc["min_lr_ratio"] + (1 - tc["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def eval_loss(examples):
    """Token-weighted mean loss over ``examples`` (eval mode merges the adapters: fast)."""
    raw_model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), tc["batch_size"]):
        batch = {k: v.to(device) for k, v in
                 phi3_data.collate(examples[i:i + tc["batch_size"]], tokenizer.pad_token_id).items()}
        with autocast:
            loss = raw_model(**batch).loss
        n = int((batch["labels"][:, 1:] != phi3_data.IGNORE_INDEX).sum())
        total, count = total + float(loss) * n, count + n
    raw_model.train()
    return total / max(count, 1)


@torch.no_grad()
def generate(conversations, max_new_tokens):
    """Greedy replies to every conversation's prompt (batched by prompt length: no padding)."""
    raw_model.eval()
    prompts = [phi3_data.prompt_ids(tokenizer, c) for c in conversations]
    replies = [None] * len(prompts)
    by_length = {}
    for i, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(i)
    for group in by_length.values():
        for j in range(0, len(group), 64):
            rows = group[j:j + 64]
            ids = torch.tensor([prompts[i] for i in rows], device=device)
            with autocast:
                out = raw_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                         max_new_tokens=max_new_tokens, eos_token_id=phi3_data.stop_token_ids(tokenizer),
                                         pad_token_id=tokenizer.pad_token_id, use_cache=True)
            for i, seq in zip(rows, out[:, ids.shape[1]:]):
                replies[i] = tokenizer.decode(seq, skip_special_tokens=True).strip()
    raw_model.train()
    return replies


def exact_match(conversations):
    """Share of greedy replies equal to the reference answer (None without synthetic data)."""
    if not conversations:
        return None
    replies = generate(conversations, max_new_tokens=16)
    return sum(r == c[-1]["content"] for r, c in zip(replies, conversations)) / len(conversations)


def evaluate_all():
    return {name: eval_loss(examples) for name, examples in eval_sets.items()}


# ----------------------------------------------------------------------------- resume or start
step, history, baseline = 0, {"train": [], "eval": []}, None
if args.resume:
    state = lora.load_training_state(args.resume, raw_model, optimizer, scheduler)
    step = int(state["step"])
    extra = state.get("extra") or {}
    history, baseline = extra.get("history", history), extra.get("baseline")
    if extra.get("max_steps") not in (None, max_steps):
        log(f"warning: the checkpoint was made for max_steps={extra['max_steps']}, now {max_steps}: "
            f"the learning-rate schedule differs from the original run")
    log(f"resumed from {args.resume} at step {step}")
if baseline is None:  # the untrained model's figures, kept in checkpoints for resumed runs
    baseline = {"eval_loss": evaluate_all(), "exact_match": exact_match(exact_match_set)}

log(f"model: {args.model}  LoRA on {len(replaced)} modules ({', '.join(lc['targets'])}), r={lc['r']}, "
    f"alpha={lc['lora_alpha']}, rsLoRA={lc['use_rslora']}, DoRA={lc['use_dora']}"
    + (f", LoRA+ ratio {tc['lora_plus_ratio']:g}" if tc["lora_plus_ratio"] > 0 else ""))
log(f"trainable params: {n_trainable:,} / {n_total:,} ({100 * n_trainable / n_total:.2f}%)")
base_weights_line = (f"base weights of the adapted projections: {base_weights['bytes'] / 2**20:,.2f} MiB "
                     f"({args.quantize or 'not quantized'}) vs {base_weights['bf16_bytes'] / 2**20:,.2f} MiB in bf16 "
                     f"({base_weights['bytes'] / base_weights['bf16_bytes']:.2f}x)")
log(base_weights_line)
if chat_train and syn_train:
    log("note: length grouping keeps chat and synthetic examples in separate batches, so the train loss jumps up on "
        "chat steps (real language, which a small model learns slowly); that is not divergence: loss_curve.png "
        "plots the two sources apart")
log(f"data: {len(train_data)} train / {len(eval_data)} eval conversations; {max_steps} steps of "
    f"{tc['batch_size']} x {tc['gradient_accumulation_steps']} x {world_size}; device {device}, world {world_size}")
log(f"before training: eval loss {phi3_report.describe(baseline['eval_loss'])}" + (
    f"; synthetic exact match {baseline['exact_match']:.1%}" if exact_match_set else ""))


def save_checkpoint(step):
    """LoRA-only checkpoint + training state in checkpoints/step-N, written whole; keeps the last N folders."""
    (out_dir / "checkpoints").mkdir(exist_ok=True)
    with atomic_folder(out_dir / "checkpoints" / f"step-{step:06d}", "a checkpoint", owned=SAVED_FILES) as tmp:
        lora.save_lora(raw_model, Path(tmp) / "adapter.safetensors", metadata={"step": str(step)})
        lora.save_training_state(tmp, raw_model, optimizer, scheduler, step=step,
                                 extra={"history": history, "baseline": baseline, "max_steps": max_steps})
    # The oldest go, never this one: a run resumed from an earlier step may have later step folders beside it.
    others = [p for p in sorted((out_dir / "checkpoints").glob("step-*"))
              if p.is_dir() and not p.is_symlink() and p.name != f"step-{step:06d}"]
    for old in others[:max(0, len(others) - tc["save_total_limit"] + 1)] if tc["save_total_limit"] > 0 else []:
        remove_folder(old)  # never left half-deleted, where --resume could still find a training_state.pt


# ----------------------------------------------------------------------------- training loop
def on_interrupt(signum, frame):
    """First Ctrl-C: stop at the end of this step (a checkpoint cut mid-update would not resume exactly)."""
    global interrupted
    interrupted = True
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once, saving nothing
    at = f"finishing step {step + 1}" if updating else f"at step {step}"  # evaluating or saving it
    log(f"\ninterrupted: {at}, then saving a checkpoint (Ctrl-C again to quit without it)")


def resume_command(checkpoint):
    """This run's command line, continuing from ``checkpoint`` (without --resume/--overwrite it was given)."""
    flags = [flag for action in parser._actions for flag in action.option_strings]

    def means(arg, flag):  # the flag itself, or an abbreviation argparse takes for it (--over, --res=...)
        name = arg.split("=", 1)[0]
        return name == flag or (len(name) > 2 and flag.startswith(name)
                                and not any(f.startswith(name) for f in flags if f != flag))

    argv, kept, skip = sys.argv[1:], [], False
    for arg in argv:
        if skip or means(arg, "--overwrite") or (means(arg, "--resume") and "=" in arg):
            skip = False
        elif means(arg, "--resume"):
            skip = True
        else:
            kept.append(arg)
    launcher = ["torchrun", f"--nproc_per_node={world_size}"] if ddp else ["python"]
    return shlex.join([*launcher, sys.argv[0], *kept, "--resume", str(checkpoint)])


def log_step(step, loss_value, lr):
    """The progress bar's figures on a terminal; elsewhere (a log file) a plain line every logging_steps."""
    if bar is not None:
        bar.update(1)
    if step % tc["logging_steps"] and step != max_steps:
        return
    figures = dict(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_seen / train_time:,.0f}")
    if bar is not None:
        bar.set_postfix(**figures)
    else:
        log(f"step {step}/{max_steps}: " + ", ".join(f"{k} {v}" for k, v in figures.items()))


model.train()
batches = micro_batches(step * tc["gradient_accumulation_steps"])
params = lora.lora_parameters(raw_model)
accum = tc["gradient_accumulation_steps"]
tokens_seen, train_time, interrupted, updating = 0, 0.0, False, False
# tqdm draws on stderr; redirected to a file, its redraws would fill the log with \r updates.
bar = tqdm(total=max_steps, initial=step, dynamic_ncols=True) if master and sys.stderr.isatty() else None
signal.signal(signal.SIGINT, on_interrupt)
while step < max_steps and not interrupted:
    updating = True
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), device=device)
    tokens, chats = 0, 0
    for micro in range(accum):
        batch, n_chat = next(batches)
        # Gradients are all-reduced (DDP) only on the last micro-batch of the step.
        sync = contextlib.nullcontext() if not ddp or micro == accum - 1 else model.no_sync()
        with sync:
            with autocast:
                loss = model(**batch).loss / accum
            loss.backward()
        loss_sum += loss.detach()
        tokens += int(batch["attention_mask"].sum())
        chats += n_chat
    torch.nn.utils.clip_grad_norm_(params, tc["max_grad_norm"])
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    step += 1
    updating = False
    if ddp:  # the logged loss and throughput cover all ranks; one rank's Ctrl-C stops them all at this step
        stats = torch.tensor([float(loss_sum), tokens, chats, interrupted], device=device, dtype=torch.float64)
        dist.all_reduce(stats)
        loss_value, tokens, chats, interrupted = float(stats[0]) / world_size, int(stats[1]), int(stats[2]), \
            bool(stats[3])
    else:
        loss_value = float(loss_sum)
    train_time += time.perf_counter() - t0
    tokens_seen += tokens
    chat_share = round(chats / (tc["batch_size"] * accum * world_size), 4)
    history["train"].append({"step": step, "loss": loss_value, "lr": lr, "chat_share": chat_share})
    log_step(step, loss_value, lr)
    if step % tc["eval_steps"] == 0 or step == max_steps:
        losses = evaluate_all()
        history["eval"].append({"step": step, **losses})
        (bar.write if bar is not None else log)(f"step {step}: eval loss {phi3_report.describe(losses)}")
    if master and (step % tc["save_steps"] == 0 or step == max_steps or interrupted):
        save_checkpoint(step)
signal.signal(signal.SIGINT, signal.default_int_handler)
if bar is not None:
    bar.close()
if interrupted and step < max_steps:  # at the last step, the run ends as usual
    checkpoint = out_dir / "checkpoints" / f"step-{step:06d}"
    if master and not (checkpoint / "training_state.pt").is_file():  # Ctrl-C before this run's first step
        save_checkpoint(step)
    log(f"stopped at step {step} of {max_steps}; checkpoint {checkpoint}. To continue:\n  {resume_command(checkpoint)}")
    if ddp:
        dist.destroy_process_group()
    sys.exit(130)  # the shell's code for a run ended by Ctrl-C

# ----------------------------------------------------------------------------- final evaluation
final = {"eval_loss": history["eval"][-1] if history["eval"] else evaluate_all(),
         "exact_match": exact_match(exact_match_set)}
samples = (syn_eval[:2] + chat_eval[:2])[:4]
replies = generate(samples, max_new_tokens=64)
peak_memory = phi3_report.peak_memory(device)  # before the exports below allocate

# ----------------------------------------------------------------------------- save (rank 0)
if master:
    lora.save_lora(raw_model, out_dir / "lora_adapter.safetensors", metadata={"step": str(step)})
    with atomic_folder(out_dir / "peft_adapter", "the PEFT adapter", owned=SAVED_FILES) as tmp:
        lora.export_peft(raw_model, tmp, base_model_name_or_path=str(base_model_path))
        tokenizer.save_pretrained(tmp)

# ----------------------------------------------------------------------------- report (rank 0)
if master:
    summary = phi3_report.summarize(
        model=args.model, steps=step, world_size=world_size, device=device, baseline=baseline, final=final,
        eval_names=list(eval_sets), exact_match_prompts=len(exact_match_set), trainable_params=n_trainable,
        total_params=n_total, tokens_seen=tokens_seen, train_time=train_time, peak_memory=peak_memory,
        samples=samples, replies=replies)
    summary["base_weights"] = base_weights
    summary["config"] = effective_config
    phi3_report.write(out_dir, history, summary)
    phi3_report.print_summary(summary, out_dir)

if args.merge and master:  # last: merge_and_unload turns the LoRA layers back into plain nn.Linear
    bnb_loaded = getattr(raw_model, "hf_quantizer", None) is not None  # loaded with a BitsAndBytesConfig
    merged = lora.merge_and_unload(raw_model)  # over a quantized base: the dequantized weight plus s·BA
    if bnb_loaded:
        # Save a plain model in the run's dtype (LLM.int8 dequantizes to fp16): dequantize the layers that took no
        # adapter (with none left, merge_and_unload has dropped transformers' record of the quantization).
        if getattr(merged, "hf_quantizer", None) is not None:
            merged = merged.dequantize(dtype=dtype)
        merged.to(dtype)
    merged.config.use_cache = True
    with atomic_folder(out_dir / "merged", "the merged model", owned=SAVED_FILES) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"merged model saved to {out_dir / 'merged'}")
if ddp:
    dist.barrier()
    dist.destroy_process_group()
