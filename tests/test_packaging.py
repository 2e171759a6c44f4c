"""Packaging promises: the core needs only torch + safetensors; metadata and CI agree with the README.

The "only torch + safetensors" checks run in a fresh interpreter in which a
``sys.meta_path`` finder makes every optional package look uninstalled (it
raises ``ModuleNotFoundError``, exactly what a missing package raises), so an
accidental module-level import, or a code path that quietly needs one of them,
fails here rather than on a user's minimal install.

The documented example runs go further: each runs in a venv that holds only what its documented
``pip install`` line brings (the extras read from setup.py), so an extra that lacks a package fails here.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("transformers", "peft", "loralib", "triton", "tokenizers", "numpy", "matplotlib", "hypothesis")

BLOCKER = textwrap.dedent("""
    import importlib.abc
    import sys

    OPTIONAL = {blocked!r}
    ATTEMPTS = []

    class BlockOptional(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in OPTIONAL:
                ATTEMPTS.append(name)
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by test_packaging)", name=name)
            return None

    sys.meta_path.insert(0, BlockOptional())
    for cached in [m for m in sys.modules if m.split(".")[0] in OPTIONAL]:
        del sys.modules[cached]
""")


def run_without_optional(tmp_path, body: str, blocked=OPTIONAL) -> subprocess.CompletedProcess:
    """Run ``body`` after the blocker of ``blocked`` in a new interpreter; fail with its output if it fails."""
    script = tmp_path / "script.py"
    script.write_text(BLOCKER.format(blocked=blocked) + textwrap.dedent(body), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    env.pop("LORA_LAYERS_BACKEND", None)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc


def test_import_and_train_need_only_torch(tmp_path):
    proc = run_without_optional(tmp_path, """
        import torch
        ATTEMPTS.clear()  # torch itself probes for numpy; only lora_layers' own imports matter here
        import lora_layers as lora
        assert ATTEMPTS == [], f"import lora_layers tried to import optional packages: {ATTEMPTS}"
        for name in lora.__all__:
            getattr(lora, name)

        torch.manual_seed(0)
        model = torch.nn.Sequential(
            lora.Linear(16, 32, r=4, lora_alpha=8, lora_dropout=0.1),
            lora.MergedLinear(32, 48, r=2, lora_alpha=4, lora_dropout=0.1, enable_lora=[True, False, True],
                              split_sizes=[32, 8, 8]),
        )
        lora.mark_only_lora_as_trainable(model)
        for p in lora.lora_parameters(model):
            torch.nn.init.normal_(p, std=0.1)
        x = torch.randn(3, 5, 16, requires_grad=True)
        model.train()
        model(x).square().mean().backward()
        grads = [p.grad for p in lora.lora_parameters(model)]
        assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
        assert x.grad is not None and all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)

        # merge / unmerge: same outputs, base weights restored bit for bit
        for layer in model:
            layer.lora_dropout.p = 0.0
        weights = [layer.weight.detach().clone() for layer in model]
        with torch.no_grad():
            unmerged = model(x)
            model.eval()
            assert all(layer.merged for layer in model)
            torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
        model.train()
        assert all(torch.equal(layer.weight, w) for layer, w in zip(model, weights))
        print("ok", sorted(set(ATTEMPTS)))
    """)
    assert proc.stdout.startswith("ok")


def test_save_load_round_trip_needs_only_torch_and_safetensors(tmp_path):
    run_without_optional(tmp_path, """
        import os
        import torch
        import lora_layers as lora

        def build():
            torch.manual_seed(0)
            return torch.nn.Sequential(
                lora.Linear(16, 32, r=4, lora_alpha=8),
                lora.MergedLinear(32, 48, r=2, lora_alpha=4, enable_lora=[True, False, True], split_sizes=[32, 8, 8]),
            )

        model = build()
        lora.mark_only_lora_as_trainable(model)
        with torch.no_grad():
            for p in lora.lora_parameters(model):
                p.normal_(0, 0.1)
        path = os.path.join(os.getcwd(), "adapter.safetensors")
        lora.save_lora(model, path, metadata={"run": "packaging"})
        with open(path, "rb") as f:
            assert f.read(1) != b"\\x80", "save_lora must write safetensors, not a pickle"

        fresh = build()
        result = lora.load_lora(fresh, path)
        assert result.missing_keys == result.unexpected_keys == [] and result.metadata == {"run": "packaging"}
        for (name, a), (_, b) in zip(lora.named_lora_parameters(model), lora.named_lora_parameters(fresh)):
            assert torch.equal(a, b), name
        x = torch.randn(4, 16)
        model.eval(), fresh.eval()
        assert torch.equal(model(x), fresh(x))
    """)


def test_every_public_name_resolves():
    import lora_layers

    assert len(set(lora_layers.__all__)) == len(lora_layers.__all__), "duplicates in lora_layers.__all__"
    missing = [name for name in lora_layers.__all__ if not hasattr(lora_layers, name)]
    assert not missing, f"lora_layers.__all__ names what lora_layers lacks: {missing}"


def test_version_matches_setup_metadata():
    import lora_layers

    proc = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    version = proc.stdout.strip().splitlines()[-1]
    assert version == lora_layers.__version__



def test_quantize_base_without_torchao_gives_the_install_from_a_checkout(tmp_path):
    # lora_layers is not on the package index: `pip install 'lora_layers[qlora]'` would find nothing.
    proc = run_without_optional(tmp_path, """
        import torch
        import lora_layers as lora

        model = torch.nn.Sequential(torch.nn.Linear(128, 128))
        weight = model[0].weight
        try:
            lora.quantize_base(model)
        except ImportError as exc:
            print(exc)
        else:
            raise AssertionError("quantize_base ran with torchao blocked")
        assert model[0].weight is weight and type(weight) is torch.nn.Parameter, "the model changed"
    """, blocked=OPTIONAL + ("torchao",))
    assert 'pip install -e ".[qlora]"' in proc.stdout and "lora_layers[qlora]" not in proc.stdout, proc.stdout


def test_plain_lora_imports_no_quantization_package_and_prints_nothing(tmp_path):
    # Where torchao is installed, importing it prints load failures and warnings (docs/quickstart.md).
    import importlib.util

    for package in ("torchao", "bitsandbytes"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed, so nothing here could import it")
    script = tmp_path / "plain.py"
    script.write_text(textwrap.dedent("""
        import sys
        import torch
        import lora_layers as lora

        model = torch.nn.Sequential(lora.Linear(16, 32, r=4, lora_alpha=8, lora_dropout=0.1),
                                    lora.MergedLinear(32, 48, r=2, lora_alpha=4, enable_lora=[True, False, True]))
        lora.mark_only_lora_as_trainable(model)
        optimizer = torch.optim.AdamW(lora.lora_parameters(model), lr=1e-2)
        model(torch.randn(3, 16)).square().mean().backward()
        optimizer.step()
        lora.save_lora(model, "adapter.safetensors")
        lora.load_lora(model, "adapter.safetensors")
        model.eval()
        model(torch.randn(3, 16))
        loaded = {name.split(".")[0] for name in sys.modules} & {"torchao", "bitsandbytes", "accelerate"}
        assert not loaded, f"plain LoRA imported {sorted(loaded)}"
    """), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "LORA_LAYERS_BACKEND")}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and proc.stdout == proc.stderr == "", f"exit {proc.returncode}\n{proc.stderr}"

# ----------------------------------------------------------------------------- extras cover what the docs run (issue #24)
#
# A command the docs give must run in an environment that has exactly what the documented
# `pip install` lines put there. The suite's own environment ([dev]) has more (PEFT pulls in
# accelerate, for one), so a missing extra only shows in a fresh venv: these tests build one
# from links to the installed distributions that the extras require, transitively, and nothing else.

EXAMPLE = "examples/phi3_finetune.py"
# Appended to each documented run: a couple of steps on the tiny model (argparse keeps the last value).
FEW_STEPS = ["--max-steps", "2", "--synthetic-examples", "40", "--exact-match-prompts", "2", "--batch-size", "4",
             "--eval-steps", "2", "--save-steps", "2", "--logging-steps", "1"]
# Arguments that name the user's own files or models: such a documented line cannot run here.
USERS_OWN = ("--model", "--data", "--resume")


def setup_arguments() -> dict:
    """The keyword arguments setup.py gives setuptools.setup (setup.py run with setup stubbed out)."""
    import runpy
    from unittest import mock

    import setuptools

    captured = {}
    with mock.patch.object(setuptools, "setup", lambda **kwargs: captured.update(kwargs)):
        runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    return captured


def project_requirements(extras, others=()) -> list:
    """What `pip install -e ".[extras]" others...` asks for: the core, the extras (read from setup.py, not from
    the installed metadata, which may predate it) and the other requirement strings."""
    args = setup_arguments()
    unknown = sorted(set(extras) - set(args["extras_require"]))
    assert not unknown, f"setup.py has no extra {unknown}; it has {sorted(args['extras_require'])}"
    return list(args["install_requires"]) + [r for e in extras for r in args["extras_require"][e]] + list(others)


def installed_closure(requirements):
    """The installed distributions that ``requirements`` pull in, transitively (markers and extras honoured),
    as {canonical name: Distribution}, and the requirements that are not installed here."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found, missing, seen = {}, [], set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if (name, frozenset(req.extras)) in seen:
            continue
        seen.add((name, frozenset(req.extras)))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.append(str(req))
            continue
        found[name] = dist
        for spec in dist.requires or []:
            sub = Requirement(spec)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in ["", *sorted(req.extras)]):
                todo.append(sub)
    return found, missing


def _pip_install_requirements(words):
    """The (extras, other requirements) of a `pip install` shell step split into words, or None for another."""
    if words[:2] not in (["pip", "install"], ["pip3", "install"]) and words[1:4] != ["-m", "pip", "install"]:
        return None
    extras, others = [], []
    for word in words[words.index("install") + 1:]:
        project = re.fullmatch(r"\.(?:\[(.*)\])?", word)
        if project:
            extras += [e.strip() for e in (project.group(1) or "").split(",") if e.strip()]
        elif not word.startswith("-"):
            others.append(word)
    return extras, others


def documented_example_runs():
    """Each line of a ```bash block in README.md or docs/ that runs the example after `pip install` steps in
    the same block, as (page, install (extras, others), example arguments); lines that need the user's own
    files or models are left out."""
    import shlex

    runs = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(encoding="utf-8"), re.S):
            extras, others = [], []
            for line in block.replace("\\\n", " ").splitlines():
                for words in (shlex.split(step) for step in line.split("#")[0].split("&&")):
                    pip = _pip_install_requirements(words)
                    if pip:
                        extras, others = extras + pip[0], others + pip[1]
                    if (pip is None and len(words) > 1 and words[0] in ("python", "python3") and words[1] == EXAMPLE
                            and (extras or others) and not set(words) & set(USERS_OWN)):
                        runs.append((page.relative_to(ROOT).as_posix(), (extras, others), words[2:]))
    return runs


def extras_only_venv(path: Path, dists) -> Path:
    """A venv at ``path`` whose site-packages links to the files of ``dists`` (installed distributions) and of
    no other; returns its python."""
    from collections import defaultdict
    from importlib import metadata

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    (site,) = path.glob("lib/python*/site-packages")
    owners = defaultdict(set)  # a top-level name installed by several distributions is linked file by file
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        for top in {file.parts[0] for file in dist.files or []}:
            owners[top].add(name)
    for dist in dists:
        for file in dist.files or []:
            if file.parts[0] == "..":  # console scripts and data outside site-packages
                continue
            shared = len(owners[file.parts[0]]) > 1
            target = site / (file if shared else file.parts[0])
            if not os.path.lexists(target):
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(dist.locate_file(file if shared else file.parts[0]))
    return path / "bin" / "python"


def test_the_docs_give_the_install_for_the_default_and_each_quantized_example_run():
    runs = documented_example_runs()
    quantize = {args[args.index("--quantize") + 1] if "--quantize" in args else None for _, _, args in runs}
    assert {None, "nf4", "fp4", "int8"} <= quantize, \
        f"README.md and docs/ should show, under their `pip install` line, the example's default run and one " \
        f"with each --quantize value; found {runs}"


@pytest.mark.slow
@pytest.mark.parametrize("page, install, args", [
    pytest.param(*run, id=f"{run[0]}: {' '.join(run[2]) or 'default'}") for run in documented_example_runs()])
def test_documented_example_run_works_with_just_the_documented_install(page, install, args, tmp_path):
    dists, missing = installed_closure(project_requirements(*install))
    if missing:
        pytest.skip(f"not installed here, so no venv can be made from them: {missing}")
    python = extras_only_venv(tmp_path / "venv", dists.values())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}  # the checkout, as `pip install -e` gives it
    proc = subprocess.run([str(python), EXAMPLE, *args, *FEW_STEPS, "--output-dir", str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    command = f"pip install -e \".[{','.join(install[0])}]\" {' '.join(install[1])}, then python {EXAMPLE} " \
              f"{' '.join(args)} ({page})"
    assert proc.returncode == 0, f"{command}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    noise = [line for line in proc.stderr.splitlines() if "torchao" in line or "_pytree" in line]
    assert not noise, f"{command}: torchao's import noise reached stderr:\n" + "\n".join(noise)


def _required_imports(source: str) -> set:
    """Top-level names that ``source`` imports outright: not through pytest.importorskip, not under a
    ``try`` that catches ImportError (a missing package only skips those), and not relative."""
    import ast

    tree = ast.parse(source)
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError", "Exception")
                for h in node.handlers):
            guarded |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_dev_extra_covers_what_the_readme_test_command_imports():
    """`pip install -e ".[dev]" && pytest` runs the tests, the benchmarks and examples they start, and every
    python block of the docs: each package they import outright must come with [dev]."""
    from importlib import metadata

    from packaging.utils import canonicalize_name

    sources = {p.relative_to(ROOT).as_posix(): p.read_text(encoding="utf-8")
               for folder in ("tests", "benchmarks", "examples") for p in sorted((ROOT / folder).rglob("*.py"))}
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for i, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S)):
            sources[f"{page.name}, python block {i + 1}"] = code
    local = {"lora_layers", *(Path(where).stem for where in sources if where.endswith(".py"))}
    dev, missing = installed_closure(project_requirements(["dev"]))
    if missing:
        pytest.skip(f"[dev] is not fully installed here: {missing}")
    providers = metadata.packages_distributions()
    uncovered = {}
    for where, source in sources.items():
        for name in sorted(_required_imports(source) - local - set(sys.stdlib_module_names)):
            if not {canonicalize_name(d) for d in providers.get(name, [])} & set(dev):
                uncovered.setdefault(name, []).append(where)
    assert not uncovered, f"imported outright, but not installed by [dev] (setup.py): {uncovered}"


def test_ci_runs_the_documented_qlora_install_in_a_fresh_venv():
    import shlex

    smoke = ROOT / ".ci" / "extras_smoke.sh"
    ci = _ci_commands()
    assert f"bash {smoke.relative_to(ROOT)}" in ci[:-1], f".ci/run must run {smoke.name} before pytest: {ci}"
    text = smoke.read_text(encoding="utf-8")
    steps = (shlex.split(line.split("||")[0]) for line in text.splitlines() if "pip install" in line)
    installs = [pip for pip in map(_pip_install_requirements, steps) if pip]
    documented = {tuple(extras) for _, (extras, _), args in documented_example_runs() if "--quantize" in args}
    assert [extras for extras, _ in installs if extras] == [list(e) for e in documented], \
        f"{smoke.name} installs {installs}; the docs' --quantize runs install {documented}"
    assert re.search(r"for quantize in nf4 fp4 int8; do", text), f"{smoke.name} must run each --quantize value"



def _readme_commands():
    """The shell commands in README.md's ```bash blocks, with the comment line above each."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        comment = ""
        for line in block.splitlines():
            if line.strip().startswith("#"):
                comment = line.strip("# ").lower()
            elif line.strip():
                commands.append((comment, line.strip()))
    return commands


def _ci_commands():
    lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def test_ci_pins_torch_and_runs_the_readme_test_command():
    tests = [cmd for comment, cmd in _readme_commands() if "test" in comment]
    assert len(tests) == 1, f"README.md should state exactly one test command (a ```bash line under a '# ... test' " \
                            f"comment), found {tests}"
    steps = [s.strip() for s in tests[0].split("&&")]
    pytest_step = steps[-1]
    assert "pytest" in pytest_step, f"README's test command should end with the pytest run: {tests[0]!r}"

    ci = _ci_commands()
    assert ci[-1] == pytest_step, f".ci/run must end with the README's test command {pytest_step!r}, got {ci[-1]!r}"
    torch_pin = [i for i, c in enumerate(ci) if re.search(r"pip install .*\btorch==2\.13\.0\b", c)]
    project = [i for i, c in enumerate(ci) if re.search(r"pip install .*-e [\"']?\.\[dev[],]", c)]
    assert torch_pin, ".ci/run must pin torch==2.13.0"
    assert project, ".ci/run must install the project with its dev extra (pip install -e \".[dev]\")"
    assert torch_pin[0] < project[0], ".ci/run must pin torch before installing the project"
    # The README's install steps are the same ones.
    assert any("torch==2.13.0" in s for s in steps[:-1]) and any(".[dev]" in s for s in steps[:-1]), tests[0]


def _extras_require():
    """``extras_require`` as setup.py passes it to ``setup()``."""
    return setup_arguments()["extras_require"]


def test_docs_extra_provides_what_the_site_build_imports_and_ci_installs_it():
    from importlib.metadata import packages_distributions

    docs = {re.split(r"[<>=!~ ;\[]", req, maxsplit=1)[0].lower() for req in _extras_require()["docs"]}
    # the modules tests/test_docs_site.py needs: mkdocs, the material theme, the mkdocstrings python handler
    providers = packages_distributions()
    for module in ("mkdocs", "material", "mkdocstrings_handlers"):
        if module not in providers:
            pytest.skip(f"the [docs] extra is not installed here ({module})")
        assert {d.lower() for d in providers[module]} & docs, f"no distribution of the [docs] extra provides {module}"
    installs = [c for c in _ci_commands() if re.search(r"pip install .*-e [\"']?\.\[[\w,]*\bdocs\b", c)]
    assert installs, ".ci/run must install the docs extra, or tests/test_docs_site.py skips in CI"
