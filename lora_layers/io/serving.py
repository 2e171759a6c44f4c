"""Whether a server loads a PEFT adapter folder: :func:`check_export` and the rules behind it.

A check reads ``adapter_config.json`` and the header of ``adapter_model.safetensors`` (the tensor
names and shapes; never the data, never a pickle). Each server is a list of small rules, each a
function of the parsed folder that returns its problems: a field, its value, and the rule it breaks.

The vLLM rules follow vLLM's own loader, ``vllm/lora/peft_helper.py`` (``PEFTHelper``:
``_validate_features``, ``_init_is_supported``, ``get_rank_and_scaling``, ``validate_legal``),
``vllm/lora/utils.py`` (``parse_fine_tuned_lora_name``: the tensor names it loads) and
``vllm/config/lora.py`` (``MaxLoRARanks``), as read from vLLM's main branch in the search tool's
stored sources on 2026-12-05 (not run here). Older vLLM releases are stricter in places
(``modules_to_save`` must be null; before PR #6909, ``use_rslora`` was ignored) and read only the
top-level ``r`` and ``lora_alpha``; an export from ``export_peft(..., server="vllm")`` gives every
module the top-level scale wherever it can, so those releases compute the same thing.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from .fileio import CheckpointError, dir_opener, read_folder
from .peft_format import (PEFT_BIN_NAME, PEFT_CONFIG_NAME, PEFT_KEY_PREFIX, PEFT_WEIGHTS_NAME, _check_patterns,
                          _is_file_in, config_json, _is_finite_number, _is_positive_int, _peft_pattern_matches)

__all__ = ["check_export", "ExportCheck"]

#: The servers :func:`check_export` knows: vLLM, and PEFT itself (what ``PeftModel.from_pretrained`` loads).
SERVERS = ("vllm", "peft")
#: vLLM's ``--max-lora-rank`` choices (``MaxLoRARanks`` in ``vllm/config/lora.py``).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# PEFT's tensor name suffixes, and which factor each holds.
_SUFFIXES = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_embedding_A": "A", "lora_embedding_B": "B",
             "lora_magnitude_vector": "M"}
# vLLM's _validate_features: modules_to_save may name only a classification head.
_VLLM_HEADS = ("classifier", "score")
# vLLM's _init_is_supported: string inits that only set the starting A and B (True and False pass too).
_VLLM_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
# Other PEFT features that vLLM's _validate_features refuses when set.
_VLLM_REFUSED = {"alora_invocation_tokens": "activated LoRA (aLoRA)", "layer_replication": "layer replication",
                 "use_bdlora": "block-diagonal LoRA (BD-LoRA)", "use_qalora": "QALoRA"}
_MAX_HEADER = 100 * 2 ** 20  # a safetensors header beyond this is damage, not an adapter


@dataclass(frozen=True)
class ExportCheck:
    """What :func:`check_export` found (and, from ``export_peft(..., server=)``, what it changed).

    Attributes:
        folder: the adapter folder checked.
        server: ``"vllm"`` or ``"peft"``.
        problems: why the server would refuse the folder or load something else than PEFT does: each
            names the field or tensor, its value and the rule. Empty when it serves.
        max_rank: the largest adapter rank: of the tensors (a fused ``qkv_proj`` exported as one
            block-diagonal adapter has rank n·r) and of ``r``/``rank_pattern``, which vLLM checks.
        min_max_lora_rank: for vLLM, the smallest ``--max-lora-rank`` that fits ``max_rank``
            (one of 1, 8, 16, 32, 64, 128, 256, 320, 512); None above 512 or for another server.
        changes: what ``export_peft(..., server=)`` changed so that the server reads the same adapter
            (``use_rslora`` folded into ``lora_alpha``, patterns recomputed); empty from :func:`check_export`.
    """

    folder: str
    server: str
    problems: Tuple[str, ...]
    max_rank: int
    min_max_lora_rank: Optional[int]
    changes: Tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when the server loads the folder as PEFT does (no problems)."""
        return not self.problems

    def __str__(self) -> str:
        head = f"{self.server}: {self.folder}: "
        if self.problems:
            head += f"refused ({len(self.problems)} problem{'s' if len(self.problems) > 1 else ''})"
        elif self.min_max_lora_rank is not None:
            head += f"servable, largest rank {self.max_rank}: --max-lora-rank {self.min_max_lora_rank} or more"
        else:
            head += f"loads, largest rank {self.max_rank}"
        lines = [head] + [f"  - {p}" for p in self.problems] + [f"  changed: {c}" for c in self.changes]
        return "\n".join(lines)


@dataclass(frozen=True)
class _Folder:
    """A parsed adapter folder: its config, and each module's tensor shapes by factor (A, B, M)."""

    config: Dict[str, Any]
    modules: Dict[str, Dict[str, Tuple[int, ...]]]
    unprefixed: Tuple[str, ...]  # keys without PEFT's prefix
    other: Tuple[str, ...]  # prefixed keys that are no LoRA factor (saved modules, biases, ...)


def check_server(server, allow_none: bool = False) -> None:
    """ValueError unless ``server`` is one of :data:`SERVERS` (or None, with ``allow_none``)."""
    if (server is None and allow_none) or (isinstance(server, str) and server in SERVERS):
        return
    known = ", ".join(repr(s) for s in SERVERS) + (" or None" if allow_none else "")
    raise ValueError(f"server must be one of {known} ('vllm': vLLM's LoRA loader; 'peft': "
                     f"PeftModel.from_pretrained), got {server!r}")


def check_export(folder, server: str = "vllm") -> ExportCheck:
    """Check a PEFT LoRA adapter folder against what ``server`` loads, without loading it.

    Reads ``adapter_config.json`` and the header of ``adapter_model.safetensors`` only (tensor names
    and shapes; nothing is unpickled). ``print()`` the result for a report.

    ``"vllm"`` applies vLLM's rules: no DoRA (``use_dora``), ``bias`` ``"none"`` and no ``lora_bias``,
    ``modules_to_save`` only ``"classifier"``/``"score"`` (a classification head), no
    ``init_lora_weights`` that rewrites the base (PiSSA, OLoRA, CorDA, LoftQ; ``True``, ``False``,
    ``"gaussian"``, ``"eva"``, ``"orthogonal"``, ``"mica"``, ``"lora_ga"`` pass), no aLoRA, layer
    replication, BD-LoRA or QALoRA, only LoRA A/B tensors, and every rank at most 512. It also gives
    ``min_max_lora_rank``, the smallest ``--max-lora-rank`` that fits the largest rank, read from
    the tensors' shapes as the server allocates it (a fused ``qkv_proj`` of r=16 on q, k, v is one
    rank-48 adapter: 64). ``"peft"`` checks what ``PeftModel.from_pretrained`` needs to load the
    adapter as saved (DoRA, biases and the rest are PEFT's own). Both check the config's values,
    that each module has an A and a B of one rank, and that this rank is the one
    ``r``/``rank_pattern`` give it, resolved as the server resolves it.

    Raises:
        ValueError: ``server`` is not ``"vllm"`` or ``"peft"``.
        FileNotFoundError: ``folder`` is not a folder, or lacks the config or the weights.
        CheckpointError (a ValueError): the config is not a JSON object; the weights are only an
            ``adapter_model.bin`` (a pickle, which this check never opens); a damaged safetensors header.
    """
    check_server(server)
    path = os.fspath(folder)
    parsed = read_folder(path, lambda fd: _read(path, fd), "PEFT adapter folder")
    return _check(parsed, path, server)


def check_adapter(config: Dict[str, Any], shapes: Dict[str, Tuple[int, ...]], folder: str, server: str,
                  changes: Tuple[str, ...] = ()) -> ExportCheck:
    """:func:`check_export` of the folder that ``config`` and tensors of these ``shapes`` make, before it is written."""
    return _check(_parse(config, shapes), folder, server, changes)


def _check(parsed: _Folder, folder: str, server: str, changes: Tuple[str, ...] = ()) -> ExportCheck:
    resolve = _vllm_rank if server == "vllm" else _peft_rank
    problems = _config_problems(parsed) + _pair_problems(parsed)
    if not problems:  # the ranks are only comparable with a valid config and whole pairs
        problems += _rank_problems(parsed, resolve, server)
    for rule in _RULES[server]:
        problems += rule(parsed)
    top = _largest_rank(parsed)
    fits = next((n for n in VLLM_MAX_LORA_RANKS if n >= top), None) if server == "vllm" else None
    return ExportCheck(folder, server, tuple(problems), top, fits, tuple(changes))


# ----------------------------------------------------------------------------- reading

def _read(path: str, dir_fd: int) -> _Folder:
    config = config_json(path, dir_fd)
    if not _is_file_in(dir_fd, PEFT_WEIGHTS_NAME):
        if _is_file_in(dir_fd, PEFT_BIN_NAME):
            raise CheckpointError(f"{path!r} holds {PEFT_BIN_NAME}, a pickle, which check_export never opens; "
                                  f"save the adapter as {PEFT_WEIGHTS_NAME} (PEFT: save_pretrained(..., "
                                  f"safe_serialization=True); lora_layers: export_peft)")
        raise FileNotFoundError(f"{path!r} has no {PEFT_WEIGHTS_NAME}")
    return _parse(config, _header_shapes(os.path.join(path, PEFT_WEIGHTS_NAME), dir_fd))


def _header_shapes(path: str, dir_fd: int) -> Dict[str, Tuple[int, ...]]:
    """Each tensor's shape, from the safetensors header alone."""
    with open(PEFT_WEIGHTS_NAME, "rb", opener=dir_opener(dir_fd)) as f:
        size_bytes = f.read(8)
        total = os.fstat(f.fileno()).st_size
        size = struct.unpack("<Q", size_bytes)[0] if len(size_bytes) == 8 else -1
        if not 2 <= size <= min(total - 8, _MAX_HEADER):
            raise CheckpointError(f"{path!r} is not a safetensors file: header size {size}, file size {total}")
        text = f.read(size)
    try:
        header = json.loads(text)
        shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except (ValueError, UnicodeDecodeError, TypeError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{path!r} has a damaged safetensors header: {exc!r}") from exc
    bad = [k for k, s in shapes.items() if not all(isinstance(n, int) and n >= 0 for n in s)]
    if bad:
        raise CheckpointError(f"{path!r} has a damaged safetensors header: shapes of {bad[:5]} are not sizes")
    return shapes


def _parse(config: Dict[str, Any], shapes: Dict[str, Tuple[int, ...]]) -> _Folder:
    modules: Dict[str, Dict[str, Tuple[int, ...]]] = {}
    unprefixed, other = [], []
    for key in sorted(shapes):
        if not key.startswith(PEFT_KEY_PREFIX):
            unprefixed.append(key)
            continue
        rest = key[len(PEFT_KEY_PREFIX):]
        suffix = next((s for s in _SUFFIXES if rest.endswith("." + s)), None)
        if suffix is None:
            other.append(key)
        else:
            modules.setdefault(rest[:-len(suffix) - 1], {})[_SUFFIXES[suffix]] = tuple(shapes[key])
    return _Folder(config, modules, tuple(unprefixed), tuple(other))


# ----------------------------------------------------------------------------- rules of both servers

def _config_problems(parsed: _Folder) -> List[str]:
    """The values every loader needs: a positive int ``r``, a finite ``lora_alpha``, valid patterns."""
    c, problems = parsed.config, []
    for key, ok, expected in (("r", _is_positive_int, "a positive integer"),
                              ("lora_alpha", _is_finite_number, "a finite number")):
        if not ok(c.get(key, 8)):
            problems.append(f"{key}={c[key]!r}: expected {expected}")
    for key in ("use_rslora", "use_dora"):
        if not isinstance(c.get(key, False), bool):
            problems.append(f"{key}={c[key]!r}: expected true or false")
    _check_patterns("rank_pattern", c.get("rank_pattern") or {}, _is_positive_int, "a positive integer", problems)
    _check_patterns("alpha_pattern", c.get("alpha_pattern") or {}, _is_finite_number, "a finite number", problems)
    return problems


def _rank(shapes: Dict[str, Tuple[int, ...]]) -> int:
    return shapes["A"][0]


def _pair_problems(parsed: _Folder) -> List[str]:
    """Each module: one A and one B (at least 2-D), of one rank."""
    problems = []
    for name, t in parsed.modules.items():
        if "A" not in t or "B" not in t:
            problems.append(f"{name}: has {sorted(t)} but needs both lora_A and lora_B")
        elif len(t["A"]) < 2 or len(t["B"]) < 2 or t["A"][0] != t["B"][1]:
            problems.append(f"{name}: lora_A {t['A']} and lora_B {t['B']} are not one adapter "
                            f"(expected A (r, in, ...) and B (out, r, ...) with one r)")
    if not parsed.modules:
        problems.append(f"{PEFT_WEIGHTS_NAME}: no LoRA tensors ({PEFT_KEY_PREFIX}<module>.lora_A.weight ...)")
    return problems


def _peft_rank(config: Dict[str, Any], name: str) -> int:
    # PEFT 0.21 (get_pattern_key): the first key that matches a dot-separated suffix, else r.
    return next((v for k, v in (config.get("rank_pattern") or {}).items() if _peft_pattern_matches(k, name)),
                config.get("r", 8))


def _vllm_rank(config: Dict[str, Any], name: str) -> int:
    # vLLM's get_rank_and_scaling: the same match, but `or self.r`, so a matched 0 falls back to r.
    return _peft_rank(config, name) or config.get("r", 8)


def _rank_problems(parsed: _Folder, resolve: Callable[[Dict[str, Any], str], int], server: str) -> List[str]:
    """A module whose tensors' rank is not the one the config gives it: PEFT fails with a size
    mismatch, vLLM scales it by alpha over the wrong rank."""
    effect = ("PEFT builds lora_A with that many rows and fails to load these" if server == "peft"
              else "vLLM computes its scale lora_alpha/r with that r")
    problems = []
    for name, t in parsed.modules.items():
        want = resolve(parsed.config, name)
        if _rank(t) != want:
            problems.append(f"{name}: its tensors have rank {_rank(t)} but r/rank_pattern give it r={want}; "
                            f"{effect}")
    return problems


def _peft_type(parsed: _Folder) -> List[str]:
    # PeftConfig picks the adapter's class from peft_type; vLLM never reads it.
    if parsed.config.get("peft_type") != "LORA":
        return [f"peft_type={parsed.config.get('peft_type')!r}: expected 'LORA'"]
    return []


def _unprefixed_keys(parsed: _Folder) -> List[str]:
    if not parsed.unprefixed:
        return []
    return [f"tensors without the {PEFT_KEY_PREFIX!r} prefix, which PEFT ignores without a word: "
            f"{list(parsed.unprefixed[:5])}{' ...' if len(parsed.unprefixed) > 5 else ''}"]


def _dora_tensors(parsed: _Folder) -> List[str]:
    """PEFT's DoRA needs each module's saved magnitude; without use_dora it ignores one."""
    dora = parsed.config.get("use_dora", False) is True
    problems = []
    for name, t in parsed.modules.items():
        if dora and "M" not in t:
            problems.append(f"{name}: use_dora=true but no lora_magnitude_vector; PEFT would start one from "
                            f"the base weight's norms, another adapter than the one trained")
        if not dora and "M" in t:
            problems.append(f"{name}: a lora_magnitude_vector (DoRA) but use_dora="
                            f"{parsed.config.get('use_dora', False)!r}; PEFT ignores it")
    return problems


# ----------------------------------------------------------------------------- vLLM's rules

def _vllm_required(parsed: _Folder) -> List[str]:
    # PEFTHelper.from_dict: r, lora_alpha and target_modules have no default.
    missing = [key for key in ("r", "lora_alpha", "target_modules") if key not in parsed.config]
    return [f"{PEFT_CONFIG_NAME} has no {missing}: vLLM requires them"] if missing else []


def _vllm_dora(parsed: _Folder) -> List[str]:
    if parsed.config.get("use_dora") is True:
        return ["use_dora=true: vLLM does not serve DoRA; serve merge_and_unload's merged model instead"]
    return []


def _vllm_bias(parsed: _Folder) -> List[str]:
    problems = []
    if parsed.config.get("bias", "none") != "none":
        problems.append(f"bias={parsed.config['bias']!r}: vLLM serves no trained biases, expected 'none'")
    if parsed.config.get("lora_bias"):
        problems.append(f"lora_bias={parsed.config['lora_bias']!r}: vLLM serves no bias on lora_B, expected false")
    return problems


def _vllm_modules_to_save(parsed: _Folder) -> List[str]:
    saved = parsed.config.get("modules_to_save") or []
    others = [m for m in saved if m not in _VLLM_HEADS] if isinstance(saved, list) else [saved]
    if others:
        return [f"modules_to_save={saved!r}: vLLM accepts only a classification head "
                f"({' / '.join(_VLLM_HEADS)}), not {others}"]
    return []


def _vllm_init(parsed: _Folder) -> List[str]:
    init = parsed.config.get("init_lora_weights", True)
    if not isinstance(init, str) or init.lower() in _VLLM_INITS:
        return []
    return [f"init_lora_weights={init!r}: vLLM refuses it (PiSSA, OLoRA, CorDA and LoftQ adapters need "
            f"their base rewritten); accepted: true, false, {', '.join(repr(i) for i in _VLLM_INITS)}"]


def _vllm_features(parsed: _Folder) -> List[str]:
    return [f"{key}={parsed.config[key]!r}: vLLM does not serve {what}"
            for key, what in _VLLM_REFUSED.items() if parsed.config.get(key)]


def _vllm_keys(parsed: _Folder) -> List[str]:
    """vLLM loads only lora_A/lora_B (and lora_embedding_A/B) tensors, and a classification head's weights."""
    def head(key: str) -> bool:
        parts = key[len(PEFT_KEY_PREFIX):].split(".")
        return any(p in _VLLM_HEADS for p in parts)

    refused = [k for k in parsed.other if not head(k)]
    refused += [f"{n}.lora_magnitude_vector" for n, t in parsed.modules.items() if "M" in t]
    if refused and parsed.config.get("use_dora") is not True:
        return [f"tensors vLLM does not load (only lora_A/lora_B and lora_embedding_A/B): "
                f"{refused[:5]}{' ...' if len(refused) > 5 else ''}"]
    return []


def _largest_rank(parsed: _Folder) -> int:
    """The tensors' largest rank, and vLLM's validate_legal's max(r, *rank_pattern.values())."""
    ranks = [_rank(t) for t in parsed.modules.values() if len(t.get("A", ())) >= 1]
    patterns = parsed.config.get("rank_pattern") or {}
    config = [parsed.config.get("r", 8)] + list(patterns.values() if isinstance(patterns, dict) else [])
    ranks += [r for r in config if _is_positive_int(r)]
    return max(ranks, default=0)


def _vllm_rank_limit(parsed: _Folder) -> List[str]:
    top = _largest_rank(parsed)
    if top > VLLM_MAX_LORA_RANKS[-1]:
        return [f"rank {top}: above vLLM's largest --max-lora-rank, {VLLM_MAX_LORA_RANKS[-1]}"]
    return []


_RULES = {
    "vllm": (_vllm_required, _vllm_dora, _vllm_bias, _vllm_modules_to_save, _vllm_init, _vllm_features, _vllm_keys,
             _vllm_rank_limit),
    "peft": (_peft_type, _unprefixed_keys, _dora_tensors),
}
