"""Data for examples/phi3_finetune.py: chat JSONL loading, the synthetic task, tokenization.

Kept out of the main script so that it reads top to bottom; nothing here knows
about LoRA. Conversations use the ultrachat layout::

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
"""
from __future__ import annotations

import json
import random
import string
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

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
