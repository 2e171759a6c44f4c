"""Packaging promises: the core needs only torch + safetensors; metadata and CI agree with the README.

The "only torch + safetensors" checks run in a fresh interpreter in which a
``sys.meta_path`` finder makes every optional package look uninstalled (it
raises ``ModuleNotFoundError``, exactly what a missing package raises), so an
accidental module-level import, or a code path that quietly needs one of them,
fails here rather than on a user's minimal install.
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

BLOCKER = textwrap.dedent(f"""
    import importlib.abc
    import sys

    OPTIONAL = {OPTIONAL!r}
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


def run_without_optional(tmp_path, body: str) -> subprocess.CompletedProcess:
    """Run ``body`` after the blocker in a new interpreter; fail with its output if it fails."""
    script = tmp_path / "script.py"
    script.write_text(BLOCKER + textwrap.dedent(body), encoding="utf-8")
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
    """``extras_require`` as setup.py passes it to ``setup()`` (run with ``setup`` replaced)."""
    import runpy
    from unittest import mock

    import setuptools

    with mock.patch.object(setuptools, "setup") as setup:
        runpy.run_path(str(ROOT / "setup.py"))
    return setup.call_args.kwargs["extras_require"]


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
