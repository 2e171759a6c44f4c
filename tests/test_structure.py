"""The package's shape (issue #21): tiers as folders, old import paths kept, short functions,
tests that mirror the folders. docs/design.md's own block checks the import direction."""
import ast
import importlib
import pathlib
import re
import subprocess
import sys
from unittest import mock

import pytest

import lora_layers

PACKAGE = pathlib.Path(lora_layers.__file__).parent
TESTS = pathlib.Path(__file__).parent
FOLDERS = ("core", "variants", "bases", "layers", "model", "io", "models", "kernels")

# Every module path users could import before the tiers became folders, and where it lives now.
OLD_PATHS = {
    "lora_layers.functional": "lora_layers.functional",  # a module of its own: the API from core and variants
    "lora_layers.loss": "lora_layers.core.loss",
    "lora_layers.segments": "lora_layers.core.segments",
    "lora_layers.recipes": "lora_layers.core.recipes",
    "lora_layers.merging": "lora_layers.core.merging",
    "lora_layers.validation": "lora_layers.core.spec",
    "lora_layers.quantized": "lora_layers.bases.quantized",
    "lora_layers.base": "lora_layers.layers.base",
    "lora_layers.layers": "lora_layers.layers",
    "lora_layers.utils": "lora_layers.model.params",
    "lora_layers.surgery": "lora_layers.model.surgery",
    "lora_layers.qlora": "lora_layers.model.quantize",
    "lora_layers.fileio": "lora_layers.io.fileio",
    "lora_layers.checkpoint": "lora_layers.io.checkpoint",
    "lora_layers.peft_format": "lora_layers.io.peft_format",
    "lora_layers.training_state": "lora_layers.io.training_state",
    "lora_layers.adapters": "lora_layers.io.adapters",
    "lora_layers.phi3": "lora_layers.models.phi3",
    "lora_layers.lean": "lora_layers.models.phi3.lean",
    "lora_layers.kernels": "lora_layers.kernels",
}

# Names the docs, tests and example import from the old paths (a sample of each module's contract).
OLD_NAMES = {
    "lora_layers.functional": ["lora_linear", "lora_embedding", "lora_conv", "dora_weight_norm", "dora_row_scale",
                               "row_sq_norm", "draw_seed", "dropout_mask", "keep_mask", "keep_scale", "BACKENDS"],
    "lora_layers.layers": ["Linear", "MergedLinear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "LoRALayer"],
    "lora_layers.utils": ["lora_modules", "lora_parameters", "named_lora_parameters", "mark_only_lora_as_trainable",
                          "lora_state_dict", "merge_lora", "unmerge_lora"],
    "lora_layers.surgery": ["inject_lora", "merge_and_unload", "unload", "select_modules", "ALL_LINEAR"],
    "lora_layers.checkpoint": ["save_lora", "load_lora", "CheckpointError", "LoadResult", "META_MODULES",
                               "read_checkpoint", "fitting_call"],
    "lora_layers.peft_format": ["export_peft", "import_peft", "PEFT_CONFIG_NAME", "PEFT_WEIGHTS_NAME"],
    "lora_layers.training_state": ["save_training_state", "load_training_state", "TRAINING_STATE_FILE"],
    "lora_layers.fileio": ["atomic_write", "atomic_folder", "read_folder", "safetensors_bytes", "CheckpointError"],
    "lora_layers.quantized": ["QuantizedBase", "quantized_base", "weight_nbytes", "record_compute_dtype"],
    "lora_layers.segments": ["Segments", "Block"],
    "lora_layers.merging": ["weight_sums", "same_sums", "merge_into", "restore_from"],
    "lora_layers.loss": ["fused_linear_cross_entropy", "default_chunk_size"],
    "lora_layers.phi3": ["apply_lora", "enable_lean", "disable_lean", "enable_gradient_checkpointing",
                         "qkv_split_sizes", "TARGETS"],
    "lora_layers.kernels": ["is_available", "supports"],
}


@pytest.mark.parametrize("old", sorted(OLD_PATHS))
def test_old_module_path_imports_the_new_module(old):
    module = importlib.import_module(old)
    assert module is importlib.import_module(OLD_PATHS[old])
    assert getattr(lora_layers, old.rpartition(".")[2]) is module  # `from lora_layers import checkpoint`
    for name in OLD_NAMES.get(old, ()):
        assert hasattr(module, name), f"{old}.{name}"


# Every public name each flat module had at 867da2b (the release before the folders): its __all__ and
# the public names it defined, by the old path. An import of one of them that worked then works now.
OLD_PUBLIC = {
    "adapters": ["AdapterSummary", "load_adapter", "summary"],
    "base": ["ADAPTER_NAMES", "ADAPTER_PREFIX", "LoRALayer", "MAGNITUDE_NAME"],
    "checkpoint": ["CheckpointError", "FAMILY_CALLS", "FORMAT_NAME", "FORMAT_VERSION", "LoadResult", "META_BIAS",
                   "META_FORMAT", "META_FORMAT_VERSION", "META_HF_FORMAT", "META_LIBRARY_VERSION", "META_MODULES",
                   "META_SHA256", "RESERVED_PREFIX", "adapter_payload", "apply_copies", "canonical_payload",
                   "dropout_arg", "fitting_call", "load_lora", "plan_load", "read_checkpoint", "read_native",
                   "save_lora"],
    "fileio": ["CheckpointError", "PICKLE_PROTOCOLS", "ZIP_MAGIC", "as_path", "atomic_folder", "atomic_write",
               "check_destination", "dir_opener", "raw_bytes", "read_file", "read_folder", "remove_folder",
               "safetensors_bytes", "tensor_checksum", "to_storable"],
    "functional": ["AUTO_USES_TRITON", "BACKENDS", "BACKEND_ENV", "dora_row_scale", "dora_weight_norm", "draw_seed",
                   "drop_mask", "dropout_mask", "keep_mask", "keep_scale", "lora_conv", "lora_embedding",
                   "lora_linear", "resolve_backend", "row_sq_norm"],
    "kernels": ["MAX_RANK", "draw_seed", "is_available", "keep_mask", "lora_linear", "supports",
                "unavailable_reason"],
    "layers": ["CONV_LAYOUTS", "Conv1d", "Conv2d", "Conv3d", "Embedding", "Linear", "LoRALayer", "MergedLinear"],
    "lean": ["LeanCausalLMForward", "LeanRMSNorm", "LeanSwiGLUMLP", "PHI3_PRODUCERS", "disable", "enable", "is_lean"],
    "loss": ["REDUCTIONS", "default_chunk_size", "fused_linear_cross_entropy"],
    "merging": ["BASE_CHECK", "BITS_DTYPE", "Blocks", "ExactMerge", "MERGED_CHECK", "MERGED_FACTORS", "MERGED_MARK",
                "accumulation_dtype", "check_mergeable", "merge_into", "merged_copy", "restore_from", "same_sums",
                "weight_sums"],
    "peft_format": ["PEFT_BIN_NAME", "PEFT_CONFIG_NAME", "PEFT_KEY_PREFIX", "PEFT_WEIGHTS_NAME", "export_peft",
                    "import_peft"],
    "phi3": ["QKV_PARTS", "TARGETS", "apply_lora", "disable_lean", "enable_gradient_checkpointing", "enable_lean",
             "qkv_split_sizes"],
    "qlora": ["SCHEMES", "quantize_base"],
    "quantized": ["QuantizedBase", "is_quantized_linear", "quantized_base", "record_compute_dtype", "torchao_nf4",
                  "weight_nbytes"],
    "recipes": ["Recipe", "apply_rebuilding_input", "find", "recording", "register"],
    "segments": ["Block", "Segments"],
    "surgery": ["ALL_LINEAR", "Targets", "build_layers", "inject_lora", "merge_and_unload", "select_modules",
                "unload"],
    "training_state": ["FILE_SUFFIX", "KEY_FORMAT", "KEY_TRAINED", "TRAINING_STATE_FILE", "TRAINING_STATE_FORMAT",
                       "TRAINING_STATE_VERSION", "load_training_state", "payload_sha256", "save_training_state"],
    "utils": ["BIAS_MODES", "check_bias", "count_lora_parameters", "lora_modules", "lora_parameters",
              "lora_plus_param_groups", "lora_state_dict", "mark_only_lora_as_trainable", "merge_layers",
              "merge_lora", "merged_state_dict", "named_bias_parameters", "named_lora_parameters", "unmerge_lora"],
    "validation": ["INITS", "LORA_DTYPES", "check_alpha", "check_backend", "check_dora", "check_dropout",
                   "check_init", "check_lora_args", "check_lora_dtype", "check_rank"],
}

# Each flat module's __all__ at 867da2b: ``from lora_layers.X import *`` still gives each of these names.
OLD_ALL = {
    "adapters": ["load_adapter", "summary", "AdapterSummary"],
    "base": ["LoRALayer", "ADAPTER_NAMES", "ADAPTER_PREFIX", "MAGNITUDE_NAME"],
    "checkpoint": ["FORMAT_NAME", "FORMAT_VERSION", "CheckpointError", "LoadResult", "save_lora", "load_lora"],
    "fileio": ["CheckpointError", "as_path", "check_destination", "atomic_write", "atomic_folder", "read_folder",
               "remove_folder", "dir_opener", "to_storable", "raw_bytes", "safetensors_bytes", "tensor_checksum",
               "read_file"],
    "functional": ["lora_linear", "lora_embedding", "lora_conv", "dora_weight_norm", "row_sq_norm", "draw_seed",
                   "drop_mask", "keep_mask", "keep_scale", "dora_row_scale", "dropout_mask", "BACKENDS",
                   "BACKEND_ENV"],
    "kernels": ["is_available", "unavailable_reason", "supports", "lora_linear", "keep_mask", "draw_seed",
                "MAX_RANK"],
    "layers": ["LoRALayer", "Linear", "MergedLinear", "Embedding", "Conv1d", "Conv2d", "Conv3d"],
    "lean": ["LeanRMSNorm", "LeanSwiGLUMLP", "LeanCausalLMForward", "enable", "disable", "is_lean"],
    "loss": ["fused_linear_cross_entropy", "default_chunk_size", "REDUCTIONS"],
    "merging": ["BITS_DTYPE", "accumulation_dtype", "check_mergeable", "merge_into", "restore_from", "merged_copy",
                "weight_sums", "same_sums", "ExactMerge", "MERGED_MARK", "MERGED_FACTORS", "MERGED_CHECK",
                "BASE_CHECK"],
    "peft_format": ["export_peft", "import_peft", "PEFT_CONFIG_NAME", "PEFT_WEIGHTS_NAME", "PEFT_KEY_PREFIX"],
    "phi3": ["TARGETS", "QKV_PARTS", "qkv_split_sizes", "apply_lora", "enable_gradient_checkpointing", "enable_lean",
             "disable_lean"],
    "qlora": ["SCHEMES", "quantize_base"],
    "quantized": ["QuantizedBase", "quantized_base", "is_quantized_linear", "weight_nbytes", "torchao_nf4",
                  "record_compute_dtype"],
    "recipes": ["Recipe", "register", "find", "recording", "apply_rebuilding_input"],
    "segments": ["Block", "Segments"],
    "surgery": ["ALL_LINEAR", "inject_lora", "merge_and_unload", "unload", "select_modules"],
    "training_state": ["TRAINING_STATE_FILE", "save_training_state", "load_training_state"],
    "utils": ["BIAS_MODES", "lora_modules", "lora_parameters", "named_lora_parameters",
              "mark_only_lora_as_trainable", "lora_state_dict", "merge_lora", "unmerge_lora", "merged_state_dict",
              "lora_plus_param_groups", "count_lora_parameters"],
    "validation": ["LORA_DTYPES", "INITS", "check_init", "check_rank", "check_alpha", "check_dropout",
                   "check_backend", "check_lora_dtype", "check_lora_args", "check_dora"],
}


@pytest.mark.parametrize("old", sorted(OLD_PUBLIC))
def test_every_public_name_of_the_old_flat_modules_imports_by_its_old_path(old):
    module = importlib.import_module(f"lora_layers.{old}")
    missing = [name for name in OLD_PUBLIC[old] if not hasattr(module, name)]
    assert not missing, f"lora_layers.{old} lost {missing}"
    namespace = {}
    exec(f"from lora_layers.{old} import *", namespace)
    missing = [name for name in OLD_ALL[old] if name not in namespace]
    assert not missing, f"from lora_layers.{old} import * no longer gives {missing}"


def test_a_family_call_registered_by_its_old_name_is_consulted():
    # lora_layers.checkpoint.FAMILY_CALLS was where a model family registered its fitting call
    # (the phi3 docstring named it); the registry is model.families.FITTING_CALLS now: the same list.
    from lora_layers.model.families import FITTING_CALLS

    assert lora_layers.checkpoint.FAMILY_CALLS is FITTING_CALLS


def test_auto_uses_triton_set_by_its_old_path_is_the_flag_the_router_reads(monkeypatch):
    # Before the folders the router read lora_layers.functional.AUTO_USES_TRITON itself; setting it
    # there (benchmarks, a user who has validated the kernels) must still switch "auto" to triton.
    import lora_layers.functional as functional
    from lora_layers.core import functional as core

    assert "AUTO_USES_TRITON" in dir(functional)
    monkeypatch.setattr(functional, "AUTO_USES_TRITON", True)
    assert core.AUTO_USES_TRITON is True and functional.AUTO_USES_TRITON is True
    monkeypatch.undo()
    assert core.AUTO_USES_TRITON is False and functional.AUTO_USES_TRITON is False
    with mock.patch("lora_layers.functional.AUTO_USES_TRITON", True):
        assert core.AUTO_USES_TRITON is True
    assert core.AUTO_USES_TRITON is False and functional.AUTO_USES_TRITON is False
    monkeypatch.setattr(core, "AUTO_USES_TRITON", True)  # set where it lives now: read live by the old path
    assert functional.AUTO_USES_TRITON is True


def test_lora_layers_phi3_still_says_what_the_preset_does():
    # help(lora_layers.phi3) and docs/api.md's "::: lora_layers.phi3" show the folder's docstring,
    # which before the folders was phi3.py's: what Phi-3 fuses and how apply_lora adapts each part.
    doc = lora_layers.phi3.__doc__
    assert doc.startswith("Phi-3 preset: LoRA on transformers'"), doc
    assert "qkv_proj" in doc and "gate_up_proj" in doc and 'qkv=("q", "v")' in doc


def _resolves(dotted: str) -> bool:
    obj = lora_layers
    parts = dotted.split(".")
    for i, part in enumerate(parts[1:], 1):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        try:
            obj = importlib.import_module(".".join(parts[: i + 1]))
        except ImportError:
            return False
    return True


def test_every_dotted_lora_layers_name_in_the_code_and_docs_resolves():
    # Docstrings (help(), the API page) and docs name modules and functions by path; after the move into
    # folders, a path to a module that is gone (lora_layers._wrap, lora_layers._unwrap) sends readers nowhere.
    from lora_layers.io import checkpoint

    not_paths = {value for key, value in vars(checkpoint).items()  # the header's metadata keys
                 if key.startswith(("META_", "FORMAT_NAME")) and isinstance(value, str)}
    not_paths |= {"lora_layers.NAME", "lora_layers.utils.X"}  # placeholders in prose
    root = PACKAGE.parent
    files = [*PACKAGE.rglob("*.py"), *(root / "docs").glob("*.md"), root / "README.md"]
    stale = set()
    for path in files:
        for dotted in re.findall(r"lora_layers(?:\.[A-Za-z_]\w*)+", path.read_text(encoding="utf-8")):
            if dotted not in not_paths and not _resolves(dotted):
                stale.add(f"{path.relative_to(root)}: {dotted}")
    assert not stale, sorted(stale)


def test_the_backend_debug_log_keeps_its_logger_name(caplog):
    # docs/kernels.md: the triton backend "falls back to torch (debug log)"; users turn that log on by
    # the module's name, lora_layers.functional, whose lines must not move to another logger.
    from lora_layers.core import functional as core

    assert core.log.name == "lora_layers.functional"
    with caplog.at_level("DEBUG", logger="lora_layers.functional"):
        core.log.debug("probe")
    assert [r.name for r in caplog.records] == ["lora_layers.functional"]


def test_old_paths_work_in_a_fresh_interpreter():
    """``import lora_layers.X`` as a first statement (nothing imported before it)."""
    code = "; ".join(f"import {old}" for old in OLD_PATHS) + "; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_every_public_name_resolves():
    for name in lora_layers.__all__:
        assert getattr(lora_layers, name) is not None, name


@pytest.mark.parametrize("folder", FOLDERS)
def test_each_folder_states_its_contract(folder):
    module = importlib.import_module(f"lora_layers.{folder}")
    assert module.__doc__, f"lora_layers/{folder}/__init__.py has no docstring"
    names = getattr(module, "__all__", None)
    if folder == "variants" and names is None:
        return  # empty until a variant lands
    assert names is not None, f"lora_layers.{folder} has no __all__"
    assert len(set(names)) == len(names), f"lora_layers.{folder}.__all__ repeats a name"
    for name in names:
        assert hasattr(module, name), f"lora_layers.{folder}.__all__ names {name!r}, which it lacks"


def _code_lines(node) -> int:
    """Lines of a function from its first decorator to its end, less its docstring."""
    start = min([node.lineno] + [d.lineno for d in node.decorator_list])
    body = node.body
    doc = 0
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        doc = body[0].end_lineno - body[0].lineno + 1
    return node.end_lineno - start + 1 - doc


def long_functions(root: pathlib.Path, limit: int):
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _code_lines(node) > limit:
                found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({_code_lines(node)} lines)")
    return found


def test_long_functions_finds_a_long_one(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    (pkg / "m.py").write_text(f'def long():\n    """doc\n\n    more doc\n    """\n{body}\n\n\ndef short():\n    return 1\n')
    assert long_functions(pkg, 60) == ["pkg/m.py:1 long (62 lines)"]  # the def line + 61 statements
    assert long_functions(pkg, 62) == []


def test_no_function_of_the_package_is_over_60_lines():
    assert long_functions(PACKAGE, 60) == []


def test_the_tests_mirror_the_package_folders():
    for folder in FOLDERS:
        if any((PACKAGE / folder).glob("[!_]*.py")):
            assert (TESTS / folder).is_dir(), f"tests/{folder}/ is missing for lora_layers/{folder}/"
    assert (TESTS / "parity").is_dir()
    names = [p.name for p in TESTS.rglob("test_*.py")]
    assert len(names) == len(set(names)), "two test files share a name (pytest imports them by basename)"


def test_docstring_cross_references_resolve():
    """Every ``:func:`lora_layers.X.y``` (and :mod:, :class:, ...) in the package's docstrings names something
    that exists: the old private module paths (``lora_layers._unwrap``, ``lora_layers._wrap``) do not (issue #21 review)."""
    import pathlib
    import re

    root = pathlib.Path(lora_layers.__file__).parent
    broken = []
    for path in sorted(root.rglob("*.py")):
        for ref in re.findall(r":(?:func|mod|class|data|meth|attr):`~?(lora_layers\.[\w.]+)`", path.read_text()):
            parts = ref.split(".")
            for i in range(len(parts), 0, -1):
                try:
                    obj, rest = importlib.import_module(".".join(parts[:i])), parts[i:]
                    break
                except ImportError:
                    continue
            for attr in rest:
                if not hasattr(obj, attr):
                    broken.append(f"{path.relative_to(root.parent)}: {ref}")
                    break
                obj = getattr(obj, attr)
    assert broken == []
