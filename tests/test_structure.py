"""The package's shape (issue #21): tiers as folders, old import paths kept, short functions,
tests that mirror the folders. docs/design.md's own block checks the import direction."""
import ast
import importlib
import pathlib
import subprocess
import sys

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


# ``__all__`` of the old modules at 867da2b, for their io ones (issue #21 review): ``from lora_layers.X import *``
# gave these names, so the new module's ``__all__`` still lists them.
OLD_ALL = {
    "lora_layers.checkpoint": ["FORMAT_NAME", "FORMAT_VERSION", "CheckpointError", "LoadResult", "save_lora",
                               "load_lora"],
    "lora_layers.adapters": ["load_adapter", "summary", "AdapterSummary"],
}


@pytest.mark.parametrize("old", sorted(OLD_ALL))
def test_old_module_star_import_keeps_its_names(old):
    namespace = {}
    exec(f"from {old} import *", namespace)
    assert [name for name in OLD_ALL[old] if name not in namespace] == []


def test_family_calls_keeps_its_old_name():
    """``lora_layers.checkpoint.FAMILY_CALLS`` was the registry a model family appends its fitting call to
    (issue #21 review): it is still that registry, the one ``load_lora``'s hint reads."""
    from lora_layers import checkpoint
    from lora_layers.model.families import FITTING_CALLS
    from lora_layers.models.phi3.preset import _fitting_call

    assert checkpoint.FAMILY_CALLS is FITTING_CALLS
    assert _fitting_call in checkpoint.FAMILY_CALLS

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
