"""Write docs/api.md from the code: signatures from ``inspect``, text from docstrings.

Rerun after changing a public signature or docstring::

    python docs/gen_api.py           # rewrites docs/api.md
    python docs/gen_api.py --check   # exit 1 if docs/api.md is stale

``tests/test_docs.py`` fails when the page is stale, so the page cannot rot.
Errors that a docstring does not list (mostly the validation done by the layer
constructors) are written in ``EXTRA`` below.
"""
from __future__ import annotations

import argparse
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lora_layers  # noqa: E402

API_MD = ROOT / "docs" / "api.md"

# (section title, [(qualified name, object)]); names missing from here but in
# lora_layers.__all__ land in "Other" so the page always covers everything.
LAYER_METHODS = ["from_module", "merge", "unmerge", "unmerged_weight", "merged_weight", "adapter_parameters", "has_adapter",
                 "reset_lora_parameters"]

SECTIONS = [
    ("Layers", ["Linear", "MergedLinear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "LoRALayer"]),
    ("Model utilities", ["mark_only_lora_as_trainable", "lora_state_dict", "lora_parameters",
                         "named_lora_parameters", "lora_modules", "merge_lora", "unmerge_lora",
                         "merged_state_dict", "lora_plus_param_groups", "count_lora_parameters"]),
    ("Model surgery", ["inject_lora", "merge_and_unload", "unload"]),
    ("Quantized bases (QLoRA)", ["quantize_base"]),
    ("Phi-3 preset (`lora_layers.phi3`)", ["phi3", "phi3.apply_lora", "phi3.enable_lean", "phi3.disable_lean",
                                           "phi3.qkv_split_sizes", "phi3.enable_gradient_checkpointing",
                                           "phi3.TARGETS", "phi3.QKV_PARTS"]),
    ("Checkpoints", ["save_lora", "load_lora", "load_adapter", "LoadResult", "CheckpointError",
                     "save_training_state", "load_training_state"]),
    ("Inspecting adapters", ["summary", "AdapterSummary"]),
    ("PEFT interop", ["export_peft", "import_peft"]),
    ("The functional core", ["lora_linear", "fused_linear_cross_entropy"]),
    ("Package", ["__version__"]),
]

_LAYER_ERRORS = (
    "- `ValueError`: `r` is not a non-negative integer; `lora_alpha` is not a finite number; "
    "`lora_dropout` is not in `[0, 1)`; `backend` is not one of `\"auto\"`, `\"torch\"`, `\"triton\"`.\n"
    "`init` is not `\"kaiming\"` or `\"gaussian\"`; `use_dora=True` without an adapter (`r=0`).\n"
    "- `TypeError`: `lora_dtype` is not one of fp16, bf16, fp32, fp64.\n"
    "- Anything `nn.{base}` itself raises for its own arguments."
)
_CONV_ERRORS = ("**Raises** (constructor), in addition to those of `Linear`\n\n"
                "- `ValueError`: `kernel_size` is a sequence of the wrong length for the layer's dimension; "
                "`layout` is not `\"lora_layers\"` or `\"loralib\"`; `layout=\"loralib\"` with a non-square "
                "kernel, or with a kernel other than 1 on Conv1d/Conv3d.\n"
                "- `TypeError`: `use_dora=True` (DoRA is implemented for `Linear` and `MergedLinear`).")
EXTRA = {
    "Linear": "**Raises** (constructor)\n\n" + _LAYER_ERRORS.format(base="Linear"),
    "MergedLinear": (
        "**Raises** (constructor), in addition to those of `Linear`\n\n"
        "- `ValueError`: `enable_lora` is not a non-empty sequence of bools; `split_sizes` is not a sequence "
        "of positive integers; `len(enable_lora) != len(split_sizes)`; `split_sizes` does not sum to "
        "`out_features`; without `split_sizes`, `out_features` is not divisible by `len(enable_lora)`.\n\n"
        "All-disabled `enable_lora` gives a plain layer (no `lora_A`/`lora_B`; `has_adapter` is False)."),
    "Embedding": ("**Raises** (constructor)\n\n"
                  "- `ValueError`: `r` is not a non-negative integer; `lora_alpha` is not a finite number.\n"
                  "- `TypeError`: `lora_dtype` is not a floating `torch.dtype`.\n\n"
                  "With `max_norm` set, the layer never merges: `eval()` leaves it unmerged and `merge()` "
                  "raises `ValueError`."),
    "Conv1d": _CONV_ERRORS,
    "Conv2d": _CONV_ERRORS,
    "Conv3d": _CONV_ERRORS,
    "LoRALayer": (
        "The mixin every layer above inherits; not constructed directly. Its methods:"),
    "LoRALayer.from_module": (
        "**Raises, in detail**\n\n- `TypeError`: `module` is not the wrapped torch type (`nn.Linear` for `Linear` and "
        "`MergedLinear`, and so on), is already a LoRA layer, or an unknown keyword is passed.\n"
        "- `ValueError`: a hyper-parameter is out of range (as the constructor); the weight's shape "
        "disagrees with `fan_in_fan_out`; bad `enable_lora`/`split_sizes` (MergedLinear); a kernel size "
        "that does not match the weight (conv).\n\nThe module passed in is not changed by a failed call."),
    "LoRALayer.merge": ("**Raises**\n\n- `ValueError`: `safe_merge=True` and the merged weight would not be "
                        "finite (the weight is left unchanged); an `Embedding` with `max_norm`.\n"
                        "- `TypeError`: the weight's dtype is not fp16, bf16, fp32 or fp64."),
    "lora_state_dict": "**Raises**\n\n- `ValueError`: `bias` is not `\"none\"`, `\"all\"` or `\"lora_only\"`.",
    "merge_lora": "**Raises**: as `LoRALayer.merge`.",
    "lora_linear": (
        "**Raises**\n\n- `ValueError`: `dropout_p` is not in `[0, 1)` (when `training`); `lora_A`/`lora_B` "
        "shapes do not fit `weight` and `segments`; segments that overlap or leave `[0, out)`; a `backend` "
        "(or `LORA_LAYERS_BACKEND`) other than `\"auto\"`, `\"torch\"`, `\"triton\"`.\n"
        "- `RuntimeError`: `backend=\"triton\"` but triton is not usable here.\n\n"
        "The same function is `lora_layers.functional.lora_linear`; see [kernels.md](kernels.md) for the "
        "backends and the math."),
    "phi3": "The Phi-3 preset module, `import lora_layers.phi3` or `lora_layers.phi3`.",
    "phi3.TARGETS": "The four Phi-3 projections the preset can adapt.",
    "phi3.QKV_PARTS": "The parts of the fused `qkv_proj`, for `apply_lora(qkv=...)`.",
    "__version__": "The library version, a string (also recorded in every `save_lora` header).",
}


class _Raw:
    """An annotation shown as written (``int``), not as a quoted string (``'int'``)."""

    def __init__(self, text):
        self.text = text

    def __repr__(self):
        return self.text


def signature_text(obj) -> str:
    """``str(inspect.signature(obj))`` with string annotations unquoted.

    The modules use ``from __future__ import annotations``, so every annotation
    is a string; quoting each one would make the page hard to read.
    """
    if isinstance(obj, type) and issubclass(obj, BaseException):
        try:
            sig = inspect.signature(obj)
        except ValueError:  # builtin exception __init__
            return "(*args)"
    else:
        sig = inspect.signature(obj)

    def unquote(annotation):
        return _Raw(annotation) if isinstance(annotation, str) else annotation

    params = [p.replace(annotation=unquote(p.annotation)) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=unquote(sig.return_annotation)))


def _resolve(name):
    obj = lora_layers
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _md(text: str) -> str:
    """reStructuredText-isms of the docstrings -> Markdown."""
    text = re.sub(r":(?:func|class|meth|mod|attr|data|exc):`~[\w.]*?(\w+)`", r"`\1`", text)
    text = re.sub(r":(?:func|class|meth|mod|attr|data|exc):`([^`]+)`", r"`\1`", text)
    return re.sub(r"``(.+?)``", r"`\1`", text, flags=re.S)


SECTION_HEAD = re.compile(r"^(Args|Arguments|Returns|Raises|Attributes|Yields|Example|Examples)::?\s*$")


# "name: text", "a, b: text", "CheckpointError (a ValueError): text", "X / Y: text"
ITEM = re.compile(r"^([\w*][\w*,./ ]*?(?:\s*\([^)]*\))?):\s+(.*)$", re.S)


def render_docstring(obj) -> str:
    """A Google-style docstring as Markdown: prose, then bulleted Args/Raises/Attributes."""
    doc = inspect.getdoc(obj) or ""
    out, lines, i = [], doc.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        head = SECTION_HEAD.match(line)
        if head or line.rstrip().endswith("::"):
            body = []
            i += 1
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith(" ")):
                body.append(lines[i][4:] if lines[i].startswith("    ") else lines[i].strip())
                i += 1
            while body and not body[-1].strip():
                body.pop()
            while body and not body[0].strip():
                body.pop(0)
            title = head.group(1) if head else None
            if title in ("Args", "Arguments", "Raises", "Attributes"):
                out.append(f"**{title}**\n")
                items = []
                for b in body:
                    if b and not b.startswith(" ") and (not items or ITEM.match(b)):
                        items.append(b)
                    elif items:
                        items[-1] += " " + b.strip()
                for item in items:
                    m = ITEM.match(item)
                    out.append(f"- `{m.group(1).strip()}`: {_md(m.group(2))}" if m else f"- {_md(item)}")
                out.append("")
            elif title in ("Returns", "Yields"):
                out.append(f"**{title}**: " + _md(" ".join(b.strip() for b in body)) + "\n")
            else:
                prose = line.rstrip()[:-2].rstrip() if not head else ""
                if prose:
                    out.append(_md(prose) + ":\n")
                elif title:
                    out.append(f"**{title}**\n")
                out.append("```text\n" + "\n".join(body).replace("```", "'''") + "\n```\n")
            continue
        prose = [line]
        i += 1
        while i < len(lines) and lines[i].strip() and not SECTION_HEAD.match(lines[i]) \
                and not lines[i].rstrip().endswith("::"):
            prose.append(lines[i])
            i += 1
        out.append(_md("\n".join(prose)))
    return "\n".join(out).strip() + "\n"


def _entry(qualified: str, key: str, obj, level: int = 3) -> str:
    hashes = "#" * level
    parts = [f"{hashes} `{qualified}`\n"]
    short = qualified.rsplit(".", 1)[-1]
    if inspect.ismodule(obj):
        parts.append(EXTRA.get(key, "") + "\n")
        return "\n".join(parts)
    if callable(obj) and not isinstance(obj, property):
        kind = "class " if isinstance(obj, type) else ""
        sig = signature_text(obj)
        if level > 3:  # a method: shown as called on an instance
            sig = re.sub(r"^\(self(, )?", "(", sig)
        parts.append(f"```text\n{kind}{qualified.rsplit('.', 1)[0] + '.' if '.' in qualified else ''}"
                     f"{short}{sig}\n```\n")
    elif isinstance(obj, property):
        parts.append(f"```text\nproperty {short}\n```\n")
    elif isinstance(obj, str):  # __version__: its value would make the page stale on every release
        parts.append(f"```text\n{short}: str\n```\n")
    else:
        parts.append(f"```text\n{short} = {obj!r}\n```\n")
    if callable(obj) or isinstance(obj, property):
        doc_owner = obj.fget if isinstance(obj, property) else obj
        if not (isinstance(obj, type) and obj.__doc__ is None):
            parts.append(render_docstring(doc_owner))
    extra = EXTRA.get(key)
    if extra:
        parts.append(extra + "\n")
    return "\n".join(parts)


def _qualified(name: str) -> str:
    top = name.split(".")[0]
    return f"lora_layers.{name}" if top in lora_layers.__all__ or hasattr(lora_layers, top) else name


def render() -> str:
    """The full text of docs/api.md."""
    listed = {n for _, names in SECTIONS for n in names}
    sections = list(SECTIONS)
    other = [n for n in lora_layers.__all__ if n not in listed]
    if other:
        sections.append(("Other", other))
    doc = [
        "# API reference\n",
        "<!-- Generated by docs/gen_api.py from the code; do not edit by hand. "
        "Rerun: python docs/gen_api.py -->\n",
        "Every public name of `lora_layers` (its `__all__`), the Phi-3 preset `lora_layers.phi3`, "
        "and the functional core. Signatures are the code's own (`inspect.signature`); the text is the "
        "docstring. `import lora_layers as lora` gives all of them.\n",
        "Errors follow one rule: bad input raises `ValueError` or `TypeError` naming the argument, the "
        "value and what was expected, and the failed call changes nothing.\n",
        "Contents: " + " · ".join(f"[{title}](#{re.sub(r'[^a-z0-9 -]', '', title.lower()).replace(' ', '-')})"
                                  for title, _ in sections) + "\n",
    ]
    for title, names in sections:
        doc.append(f"## {title}\n")
        for name in names:
            obj = _resolve(name)
            doc.append(_entry(_qualified(name), name, obj))
            if name == "Linear":  # DoRA's re-sync, Linear's own (MergedLinear inherits it)
                doc.append(_entry("lora_layers.Linear.reset_magnitude", "Linear.reset_magnitude",
                                  obj.reset_magnitude, 4))
            if name == "LoRALayer":
                for method in LAYER_METHODS:
                    member = inspect.getattr_static(obj, method)
                    if isinstance(member, classmethod):
                        member = getattr(obj, method)
                    doc.append(_entry(f"lora_layers.LoRALayer.{method}", f"LoRALayer.{method}", member, 4))
        if title == "Model utilities":
            doc.append("`bias` is `\"none\"` (freeze/skip every bias), `\"all\"` (every parameter named exactly "
                       "`bias`) or `\"lora_only\"` (the biases of LoRA layers); anything else raises "
                       "`ValueError` and changes nothing. Adapters are found by identity (the `lora_A`/`lora_B` "
                       "Parameters of LoRA layers), never by a `\"lora_\"` substring.\n")
    return "\n".join(doc).rstrip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is stale, write nothing")
    args = parser.parse_args(argv)
    text = render()
    current = API_MD.read_text(encoding="utf-8") if API_MD.exists() else ""
    if args.check:
        if text != current:
            print("docs/api.md is stale: run python docs/gen_api.py", file=sys.stderr)
            return 1
        return 0
    if text != current:
        API_MD.write_text(text, encoding="utf-8")
        print(f"wrote {API_MD.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
