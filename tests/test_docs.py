"""The docs cannot rot: every ```python block in README.md and docs/*.md runs.

Each Markdown file's ``python`` blocks run in order in one namespace (a page
reads top to bottom, so later blocks may use earlier names), in a fresh
temporary working directory, with the network blocked and the Hugging Face
libraries in offline mode. A block that must not run is fenced as something
else (```text, ```bash), or preceded by the line

    <!-- docs-test: skip <reason> -->

right before its fence. Skipped blocks are reported by name and reason in the
test summary (one SKIPPED entry each), never dropped silently; they must still
compile and name only ``lora_layers`` attributes that exist. A page runs at least
one block unless ``PAGES_WITHOUT_PYTHON`` lists it with a reason, so a page whose
blocks all stopped running fails instead of passing with nothing run.

Also checked here: ``docs/api.md`` has a mkdocstrings entry (``::: lora_layers.NAME``)
for every name in ``lora_layers.__all__`` and for nothing that does not exist,
``docs/index.md`` links every page, and relative links resolve. The site build
itself, with its search index, is tests/test_docs_site.py.
"""
from __future__ import annotations

import ast
import importlib
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import pytest
import torch
from conftest import ORACLES

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md"] + sorted(DOCS.glob("*.md"))

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\s]*)[^`]*$")
SKIP = re.compile(r"^\s*<!--\s*docs-test:\s*skip\b[\s:-]*(?P<reason>.*?)\s*-->\s*$")
# Spellings of Python that would silently escape the test if they were allowed.
PYTHON_ALIASES = {"py", "python3", "py3", "pycon", "ipython", "Python"}
PAGE_TIMEOUT_S = 300  # a generous per-page ceiling; the budget is kept by the owners of heavy pages
# Pages that run no python block, and why. Every other page must run at least one.
PAGES_WITHOUT_PYTHON = {
    "docs/api.md": "mkdocstrings entries, rendered from the code by the site build (tests/test_docs_site.py)",
    "docs/benchmarks.md": "measured tables; the benchmarks are the scripts under benchmarks/",
    "docs/kernels.md": "its commands are shell commands: kernel tests, benchmarks and GPU runs",
}


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the first code line
    lang: str
    code: str
    skip_reason: Optional[str]

    @property
    def label(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def parse_blocks(text: str, path: Path) -> List[Block]:
    """Fenced code blocks of a Markdown text, with their skip markers.

    A fence closes on the same character repeated at least as often (CommonMark);
    an indented fence (inside a list) has its indentation removed from the code.

    Raises:
        ValueError: an unclosed fence, or a skip marker without a reason or not
            directly followed by a fence.
    """
    lines = text.splitlines()
    blocks, i, pending_skip = [], 0, None
    while i < len(lines):
        skip = SKIP.match(lines[i])
        if skip:
            if not skip.group("reason"):
                raise ValueError(f"{path}:{i + 1}: a docs-test skip marker needs a reason")
            if i + 1 >= len(lines) or not FENCE.match(lines[i + 1]):
                raise ValueError(f"{path}:{i + 1}: a docs-test skip marker must be the line right before a fence")
            pending_skip = skip.group("reason")
            i += 1
            continue
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, indent = opening.group("fence"), len(opening.group("indent"))
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        start, j = i + 1, i + 1
        while j < len(lines) and not closing.match(lines[j]):
            j += 1
        if j == len(lines):
            raise ValueError(f"{path}:{i + 1}: unclosed code fence {fence}")
        code = "\n".join(line[indent:] if line[:indent].strip() == "" else line for line in lines[start:j])
        blocks.append(Block(path, start + 1, opening.group("info"), code + "\n", pending_skip))
        pending_skip = None
        i = j + 1
    return blocks


def _python_blocks(path: Path) -> List[Block]:
    return [b for b in parse_blocks(path.read_text(encoding="utf-8"), path) if b.lang == "python"]


def _skipped() -> List[Block]:
    return [b for page in PAGES for b in _python_blocks(page) if b.skip_reason]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """A temp cwd, Hugging Face offline, and no network connections at all."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("LORA_LAYERS_BACKEND", raising=False)
    real_connect = socket.socket.connect

    def connect(sock, address):
        if sock.family == getattr(socket, "AF_UNIX", None):
            return real_connect(sock, address)
        raise OSError(f"docs tests run offline: a doc block tried to connect to {address!r}")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.chdir(tmp_path)
    yield tmp_path


@pytest.mark.timeout(PAGE_TIMEOUT_S)
@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_python_blocks_run(page, offline, capsys):
    blocks = _python_blocks(page)
    namespace = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    grad, dtype, threads = torch.is_grad_enabled(), torch.get_default_dtype(), torch.get_num_threads()
    ran, skipped, started = 0, 0, time.perf_counter()
    try:
        for block in blocks:
            if block.skip_reason:
                skipped += 1
                continue
            # Pad with blank lines so tracebacks point at the Markdown file's own line numbers.
            source = "\n" * (block.line - 1) + block.code
            try:
                exec(compile(source, str(block.path), "exec"), namespace)
            except Exception as exc:
                if isinstance(exc, ModuleNotFoundError) and exc.name in ORACLES and re.search(
                        rf"^\s*(import|from)\s+{exc.name}\b", block.code, re.M):
                    # The block itself imports an optional library (loralib, PEFT, ...) that is missing: skip,
                    # as pytest.importorskip would, rather than fail (python -m pytest --without loralib).
                    pytest.skip(f"the python block at {block.label} imports {exc.name}, which is not installed")
                raise AssertionError(f"the python block at {block.label} failed: {type(exc).__name__}: {exc}") from exc
            ran += 1
    finally:
        torch.set_grad_enabled(grad)
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)
    label = str(page.relative_to(ROOT))
    with capsys.disabled():
        print(f"\n[docs] {label}: {ran} block(s) ran, {skipped} skipped, "
              f"{time.perf_counter() - started:.1f} s", end="")
    if label in PAGES_WITHOUT_PYTHON:
        assert ran == 0, f"{label} now runs {ran} python block(s): take it off PAGES_WITHOUT_PYTHON"
    else:
        assert ran > 0, (f"{label}: no python block ran ({skipped} skipped); show runnable code or list "
                         f"the page in PAGES_WITHOUT_PYTHON with a reason")


def test_pages_without_python_exist():
    pages = {str(p.relative_to(ROOT)) for p in PAGES}
    assert set(PAGES_WITHOUT_PYTHON) <= pages, f"stale PAGES_WITHOUT_PYTHON: {set(PAGES_WITHOUT_PYTHON) - pages}"


def missing_lora_layers_names(code: str) -> List[str]:
    """The ``lora_layers`` names that ``code`` imports or reads as attributes and that do not exist."""
    import lora_layers

    tree = ast.parse(code)
    aliases = {}  # local name -> attribute path below lora_layers
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "lora_layers":  # "import lora_layers.phi3" binds lora_layers
                    aliases[a.asname or "lora_layers"] = a.name.split(".")[1:] if a.asname else []
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "lora_layers":
            aliases.update({a.asname or a.name: node.module.split(".")[1:] + [a.name] for a in node.names})
    paths = list(aliases.values())
    for node in ast.walk(tree):
        attrs = []
        while isinstance(node, ast.Attribute):
            attrs.insert(0, node.attr)
            node = node.value
        if attrs and isinstance(node, ast.Name) and node.id in aliases:
            paths.append(aliases[node.id] + attrs)
    missing = set()
    for path in paths:
        obj = lora_layers
        for i, part in enumerate(path):
            name = ".".join(["lora_layers", *path[:i + 1]])
            try:
                obj = getattr(obj, part) if hasattr(obj, part) else importlib.import_module(name)
            except ImportError:
                missing.add(name)
                break
    return sorted(missing)


@pytest.mark.parametrize("block", _skipped(), ids=lambda b: b.label)
def test_skipped_blocks_compile_and_are_reported(block):
    """A block marked ``docs-test: skip`` does not run, but it must still compile and
    name only ``lora_layers`` attributes that exist; then it gets one SKIPPED entry
    (shown by ``-ra``)."""
    try:
        compile(block.code, block.label, "exec")
    except SyntaxError as exc:
        raise AssertionError(f"the skipped python block at {block.label} does not compile: {exc}") from exc
    missing = missing_lora_layers_names(block.code)
    assert not missing, f"the skipped python block at {block.label} names what lora_layers lacks: {missing}"
    pytest.skip(f"docs block {block.label} not run: {block.skip_reason}")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_are_fenced_as_python(page):
    """```py or ```python3 would escape the test: Python code is fenced ```python."""
    bad = [b.label for b in parse_blocks(page.read_text(encoding="utf-8"), page) if b.lang in PYTHON_ALIASES]
    assert not bad, f"fence these blocks as ```python so they are tested (or as ```text): {bad}"


def test_parser_handles_skip_markers_and_fences(tmp_path):
    text = "\n".join([
        "# t", "```python", "a = 1", "```",
        "<!-- docs-test: skip needs a GPU -->", "```python", "b = 2", "```",
        "- item", "  ```python", "  c = a + 1", "  ```",
        "````markdown", "```python", "not code", "```", "````",
        "```bash", "ls", "```",
    ])
    blocks = parse_blocks(text, tmp_path / "t.md")
    assert [(b.lang, b.code, b.skip_reason, b.line) for b in blocks] == [
        ("python", "a = 1\n", None, 3), ("python", "b = 2\n", "needs a GPU", 7),
        ("python", "c = a + 1\n", None, 11), ("markdown", "```python\nnot code\n```\n", None, 14),
        ("bash", "ls\n", None, 19)]
    with pytest.raises(ValueError, match="needs a reason"):
        parse_blocks("<!-- docs-test: skip -->\n```python\nx\n```", tmp_path / "t.md")
    with pytest.raises(ValueError, match="right before a fence"):
        parse_blocks("<!-- docs-test: skip slow -->\n\n```python\nx\n```", tmp_path / "t.md")
    with pytest.raises(ValueError, match="unclosed"):
        parse_blocks("```python\nx = 1\n", tmp_path / "t.md")



def test_missing_lora_layers_names_finds_what_does_not_exist():
    code = "\n".join([
        "import torch", "import lora_layers as lora", "import lora_layers.phi3",
        "from lora_layers import Linear, no_such_function", "from lora_layers.phi3 import apply_lora as al",
        "lora.phi3.apply_lora(m); lora.load_lora(m, 'x'); lora.phi3.nope(m); lora_layers.Linear.from_module",
        "y = lora.Linear(1, 2).not_checked; torch.nn.Linear",
    ])
    assert missing_lora_layers_names(code) == ["lora_layers.no_such_function", "lora_layers.phi3.nope"]


# ----------------------------------------------------------------------------- api.md

API_ENTRY = re.compile(r"^::: (\S+)\s*$", re.M)


def test_api_page_has_an_entry_for_every_public_name():
    """Each name of ``lora_layers.__all__`` has its own ``::: lora_layers.NAME`` entry, which
    mkdocstrings renders from the code (tests/test_docs_site.py builds it)."""
    import lora_layers

    entries = set(API_ENTRY.findall((DOCS / "api.md").read_text(encoding="utf-8")))
    missing = [f"::: lora_layers.{name}" for name in lora_layers.__all__ if f"lora_layers.{name}" not in entries]
    assert not missing, "docs/api.md lacks these entries; add each under its section:\n" + "\n".join(missing)


def test_api_page_documents_only_names_that_exist():
    import lora_layers

    entries = API_ENTRY.findall((DOCS / "api.md").read_text(encoding="utf-8"))
    assert entries, "docs/api.md has no ::: entries"
    for qualified in entries:
        obj = lora_layers
        assert qualified.split(".")[0] == "lora_layers", f"docs/api.md documents {qualified}, outside lora_layers"
        for part in qualified.split(".")[1:]:
            assert hasattr(obj, part), f"docs/api.md documents {qualified}, which does not exist"
            obj = getattr(obj, part)


# ----------------------------------------------------------------------------- links

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_index_links_every_page():
    text = (DOCS / "index.md").read_text(encoding="utf-8")
    linked = {target.split("#")[0] for target in LINK.findall(text)}
    missing = [p.name for p in DOCS.glob("*.md") if p.name != "index.md" and p.name not in linked]
    assert not missing, f"docs/index.md does not link {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    text = page.read_text(encoding="utf-8")
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # external URL or in-page anchor
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"
