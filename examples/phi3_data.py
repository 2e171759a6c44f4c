"""Data and base model for examples/phi3_finetune.py: chat JSONL loading, the synthetic task,
tokenization and batching, the tiny random Phi-3 and the loading of a pretrained one.

Kept out of the main script so that it reads top to bottom; nothing here knows
about the adapters (quantize_tiny calls lora_layers.quantize_base, which quantizes the
base). Conversations use the ultrachat layout::

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
"""
from __future__ import annotations

import json
import logging
import random
import string
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Sequence, Tuple

import torch
from torch.utils.data import DistributedSampler

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # label value that torch's cross-entropy skips

# The Phi-3 special tokens and chat template (as in Phi-3-mini-4k-instruct): each turn
# is "<|role|>\n" + content + "<|end|>\n"; a generation prompt ends with "<|assistant|>\n",
# a finished conversation with the eos token.
PHI3_BOS, PHI3_EOS, PHI3_UNK = "<s>", "<|endoftext|>", "<unk>"
PHI3_EXTRA_TOKENS = ["</s>", "<|assistant|>", "<|system|>", "<|user|>", "<|end|>"]
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

SYNTHETIC_PROMPT = "Reverse the letters: "

# The offline demo (--model tiny) trains adapters on a *random* base model: it needs a larger
# learning rate and rank than a pretrained one. These replace the defaults of phi3_finetune.py's
# training_config and lora_config for --model tiny (explicit flags still win).
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


# ----------------------------------------------------------------------------- loading

def load_chat_jsonl(path) -> List[List[Dict[str, str]]]:
    """Read an ultrachat-style JSONL file into a list of conversations.

    Args:
        path: a file with one ``{"messages": [{"role", "content"}, ...]}`` object per
            line; blank lines are skipped.

    Returns:
        The conversations (lists of ``{"role", "content"}`` dicts).

    Raises:
        ValueError: the file is missing, a line is not JSON, or a record does not
            have the expected schema; the message names the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--data: file not found: {path}")
    conversations = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            conversations.append(_check_record(record, where))
    if not conversations:
        raise ValueError(f"--data: {path} holds no conversations")
    return conversations


def _check_record(record, where: str) -> List[Dict[str, str]]:
    expected = 'expected {"messages": [{"role": "user"|"assistant"|"system", "content": "..."}, ...]}'
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list) or not record["messages"]:
        raise ValueError(f"{where}: wrong schema, {expected}; got {str(record)[:80]!r}")
    messages = []
    for i, m in enumerate(record["messages"]):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: wrong schema in messages[{i}], {expected}; got {str(m)[:80]!r}")
        messages.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: the conversation has no assistant turn to learn from")
    return messages


def synthetic_reversal(n: int, seed: int, length: int = 5) -> List[List[Dict[str, str]]]:
    """``n`` distinct string-reversal chats, deterministic in ``seed``.

    A task a tiny random model can learn in minutes on CPU, with an exact answer
    so greedy exact-match accuracy measures learning directly.
    """
    rng = random.Random(seed)
    words, seen = [], set()
    while len(words) < n:
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(length))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return [[{"role": "user", "content": SYNTHETIC_PROMPT + w},
             {"role": "assistant", "content": w[::-1]}] for w in words]


def load_conversations(path, synthetic_examples: int, eval_fraction: float, seed: int) -> SimpleNamespace:
    """The chats in ``path`` and ``synthetic_examples`` reversal chats, each source split into train and eval.

    Returns a namespace: ``chats``, ``synthetic`` (all of each), ``chat_train``, ``chat_eval``, ``syn_train``,
    ``syn_eval``, and ``train``, ``eval`` (chats first, then synthetic). Raises ValueError as load_chat_jsonl.
    """
    chats = load_chat_jsonl(path)
    synthetic = synthetic_reversal(synthetic_examples, seed=seed)
    chat_train, chat_eval = split_eval(chats, eval_fraction, seed)
    syn_train, syn_eval = split_eval(synthetic, eval_fraction, seed) if synthetic else ([], [])
    return SimpleNamespace(chats=chats, synthetic=synthetic, chat_train=chat_train, chat_eval=chat_eval,
                           syn_train=syn_train, syn_eval=syn_eval, train=chat_train + syn_train,
                           eval=chat_eval + syn_eval)


def split_eval(conversations: Sequence, eval_fraction: float, seed: int) -> Tuple[list, list]:
    """Shuffle deterministically and hold out ``eval_fraction`` (at least one example)."""
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(order) * eval_fraction)) if len(order) > 1 else 0
    return [conversations[i] for i in order[n_eval:]], [conversations[i] for i in order[:n_eval]]


# ----------------------------------------------------------------------------- tokenizer

def build_char_tokenizer(texts: Sequence[str]):
    """Train a character-level tokenizer on ``texts`` with the ``tokenizers`` library.

    Character tokens keep the vocabulary (and so the frozen random ``lm_head``) tiny
    and make a letter-level task like reversal learnable in minutes. It carries the
    Phi-3 special tokens and chat template, wrapped as a ``PreTrainedTokenizerFast``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PHI3_UNK, PHI3_BOS, PHI3_EOS] + PHI3_EXTRA_TOKENS
    tok = Tokenizer(models.WordLevel(unk_token=PHI3_UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per char
    tok.decoder = decoders.Fuse()
    # "\n" is part of the chat template itself, so it is in the vocabulary whatever the data holds.
    tok.train_from_iterator(list(texts) + ["\n"], trainers.WordLevelTrainer(special_tokens=specials, min_frequency=1))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=PHI3_BOS, eos_token=PHI3_EOS, unk_token=PHI3_UNK,
        pad_token=PHI3_EOS, extra_special_tokens=PHI3_EXTRA_TOKENS,
    )
    tokenizer.chat_template = PHI3_CHAT_TEMPLATE
    return tokenizer


def stop_token_ids(tokenizer) -> List[int]:
    """Token ids that end an assistant turn (``<|end|>`` and eos) for ``generate``."""
    ids = {tokenizer.eos_token_id}
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    if isinstance(end, int) and end != tokenizer.unk_token_id:
        ids.add(end)
    return sorted(i for i in ids if i is not None)


# ----------------------------------------------------------------------------- tokenization

def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _encode(tokenizer, text: str) -> List[int]:
    # The template already holds every special token it needs.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_chat(tokenizer, messages, max_length: int) -> Dict[str, List[int]]:
    """Apply the chat template and label only the assistant turns.

    Every token of the system/user turns and of the ``<|assistant|>`` headers gets
    label -100; the assistant content, its ``<|end|>`` and (for the last turn) the
    eos token are learned. Sequences are truncated to ``max_length`` tokens.
    """
    ids = _encode(tokenizer, _render(tokenizer, messages, False))
    labels = [IGNORE_INDEX] * len(ids)
    eos = tokenizer.eos_token or ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_encode(tokenizer, _render(tokenizer, messages[:i], True)))
        if i == len(messages) - 1:
            end = len(ids)
        else:
            text = _render(tokenizer, messages[:i + 1], False)
            end = len(_encode(tokenizer, text[: -len(eos)] if eos and text.endswith(eos) else text))
        labels[start:end] = ids[start:end]
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def prompt_ids(tokenizer, messages) -> List[int]:
    """Token ids of every turn but the last assistant one, ending in ``<|assistant|>\\n``."""
    return _encode(tokenizer, _render(tokenizer, messages[:-1], True))


def length_grouped_batches(order: Sequence[int], lengths: Sequence[int], batch_size: int, seed: int,
                           group: int = 16) -> List[List[int]]:
    """Split ``order`` into micro-batches of similar lengths, in a shuffled batch order.

    Short and long conversations mixed in one batch waste most of it on padding, so
    each window of ``group`` batches is sorted by length before it is cut. The
    result depends only on the arguments, which a resumed run can rebuild.
    """
    batches = []
    window = batch_size * group
    for w in range(0, len(order) - len(order) % batch_size, window):
        chunk = sorted(order[w:w + window], key=lambda i: lengths[i])
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk) - batch_size + 1, batch_size)]
    random.Random(seed).shuffle(batches)
    return batches


def collate(examples: Sequence[Dict[str, List[int]]], pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-pad a micro-batch; padded positions get attention 0 and label -100."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def tokenize_sets(tokenizer, data: SimpleNamespace, max_length: int):
    """``(train, eval, eval_sets)``: the train and eval conversations of ``data`` (load_conversations) tokenized,
    and the eval sets by name ("all", "chat", "synthetic"), the empty ones left out."""
    def encode(conversations):
        return [tokenize_chat(tokenizer, c, max_length) for c in conversations]

    train, evaluation = encode(data.train), encode(data.eval)
    eval_sets = {"all": evaluation, "chat": encode(data.chat_eval), "synthetic": encode(data.syn_eval)}
    return train, evaluation, {name: examples for name, examples in eval_sets.items() if examples}


def micro_batches(examples, n_chats: int, batch_size: int, seed: int, world_size: int, rank: int, start: int,
                  pad_id: int, device):
    """``(micro-batch on device, how many of its examples are chats)`` from global micro-batch index ``start`` on,
    for ever. ``examples`` holds the ``n_chats`` chats first.

    DistributedSampler shards across ranks (one shard without torchrun); its order depends only on
    (seed, epoch), so a resumed run can rebuild exactly where it was.
    """
    sampler = DistributedSampler(examples, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    micro_per_epoch = len(sampler) // batch_size
    lengths = [len(e["input_ids"]) for e in examples]
    epoch, skip = divmod(start, micro_per_epoch)
    while True:
        sampler.set_epoch(epoch)
        batches = length_grouped_batches(list(sampler), lengths, batch_size, seed=seed + epoch)
        for idx in batches[skip:micro_per_epoch]:
            batch = collate([examples[j] for j in idx], pad_id)
            yield {k: v.to(device) for k, v in batch.items()}, sum(j < n_chats for j in idx)
        epoch, skip = epoch + 1, 0


# ----------------------------------------------------------------------------- base model

def quiet_logs(quantize) -> None:
    """Keep the run's log readable: no line per int8 matmul, no progress bars redrawn into a file."""
    if quantize == "int8":  # bitsandbytes logs this on every int8 matmul of fp32/bf16 inputs: thousands of lines
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(
            lambda record: not str(record.msg).startswith("MatMul8bitLt: inputs will be cast from"))
    if not sys.stderr.isatty():  # redrawn with \r, transformers' loading and saving bars would fill a log file
        import transformers.utils.logging

        transformers.utils.logging.disable_progress_bar()


def load_base_model(run, data: SimpleNamespace):
    """``(tokenizer, model, base_model_path)``: the frozen base of ``run.args.model`` on ``run.device``, in
    ``run.dtype``, with use_cache off; and the base path the PEFT export records.

    ``--model tiny`` builds a random one (build_tiny_model) on the texts of ``data``; its path is
    ``run.out_dir / "base_model"``, where the caller saves it.
    """
    args = run.args
    # transformers imports torchao whenever it is installed; torchao then logs that its CUDA-only
    # extensions failed to load, and torch warns about its enum registrations. Both are harmless here
    # (docs/quickstart.md, "Warnings from the dependencies").
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.model == "tiny":
        # A character-level tokenizer trained right now on the data, with Phi-3's special tokens and
        # chat template, and a small random Phi-3 with grouped-query attention (4 heads, 2 KV heads).
        tokenizer, model = build_tiny_model([m["content"] for c in data.chats + data.synthetic for m in c], run.tiny,
                                            args.attn_implementation, run.tc["seed"])
        base_model_path = (run.out_dir / "base_model").resolve()
    else:
        tokenizer, model = load_pretrained(args.model, run.dtype, args.attn_implementation, args.quantize,
                                           run.device)
        # Recorded in the PEFT export: a local folder absolute, so that it loads from anywhere; a hub id as given.
        base_model_path = Path(args.model).resolve() if Path(args.model).is_dir() else args.model
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.use_cache = False
    return tokenizer, model.to(run.device), base_model_path


def quantize_tiny(run, model, base_model_path):
    """--quantize on the tiny model: torchao's NF4 in place (lora_layers.quantize_base) for the layers
    apply_lora takes; otherwise bitsandbytes, which quantizes while loading, so the saved base is reloaded."""
    if run.args.quantize == "nf4":
        import lora_layers

        lora_layers.quantize_base(model, targets=list(run.lc["targets"]))
        return model
    if run.ddp:
        torch.distributed.barrier()  # rank 0 has written it
    return load_quantized_phi3(base_model_path, run.dtype, run.args.attn_implementation, run.args.quantize,
                               run.device)


def build_tiny_model(texts: Sequence[str], model_config: dict, attn_implementation: str, seed: int):
    """``(tokenizer, model)``: a character-level tokenizer trained on ``texts`` (build_char_tokenizer) and a
    random ``Phi3ForCausalLM`` of ``model_config``'s sizes, seeded alike on every rank."""
    from transformers import Phi3Config, Phi3ForCausalLM

    tokenizer = build_char_tokenizer(texts)
    config = Phi3Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        attn_implementation=attn_implementation, **model_config)
    torch.manual_seed(seed)  # identical base weights on every rank
    return tokenizer, Phi3ForCausalLM(config)


def bnb_config(scheme: str, dtype: torch.dtype):
    """QLoRA's frozen base through bitsandbytes: 4-bit blocks computing in ``dtype``, or LLM.int8."""
    from transformers import BitsAndBytesConfig

    if scheme == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=scheme, bnb_4bit_compute_dtype=dtype)


def load_pretrained(name: str, dtype: torch.dtype, attn_implementation: str, quantize, device):
    """``(tokenizer, model)`` from a local folder or a hub id; with ``quantize`` (nf4, fp4, int8) the base
    is quantized by bitsandbytes while it loads, onto ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    quantized = {"quantization_config": bnb_config(quantize, dtype), "device_map": {"": device}} if quantize else {}
    return tokenizer, AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation=attn_implementation,
                                                           **quantized)


def load_quantized_phi3(folder, dtype: torch.dtype, attn_implementation: str, quantize: str, device):
    """The Phi-3 saved in ``folder``, quantized by bitsandbytes while it loads (it quantizes nothing in place)."""
    from transformers import Phi3ForCausalLM

    model = Phi3ForCausalLM.from_pretrained(folder, dtype=dtype, quantization_config=bnb_config(quantize, dtype),
                                            device_map={"": device}, attn_implementation=attn_implementation)
    model.config.use_cache = False
    return model
