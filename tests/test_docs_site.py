"""The docs as a site: ``mkdocs build --strict`` passes and its search finds what a reader looks for.

The build runs once per session into a temporary folder (a few seconds). It
needs the ``[docs]`` extra (mkdocs, mkdocs-material, mkdocstrings-python); without
it these tests skip, and ``.ci/run`` installs it so that CI runs them. Strict mode
turns every mkdocs warning into a failure: a broken link or anchor, a page left
out of the nav, a ``:::`` reference mkdocstrings cannot resolve, a docstring
griffe cannot parse.
"""
from __future__ import annotations

import html
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NAV_GROUPS = ["Getting started", "Guides", "Distributed and serving", "Reference", "Benchmarks"]
BUILD_TIMEOUT_S = 180


def _require_docs_extra():
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        pytest.importorskip(module, reason=f"the [docs] extra is not installed ({module}): pip install -e \".[docs]\"")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The folder ``mkdocs build --strict`` wrote; the build's log is in the failure message."""
    _require_docs_extra()
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    assert proc.returncode == 0, f"mkdocs build --strict failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
    return out


def _docs_module(name: str):
    """A helper script of docs/ (not a package), imported from its file."""
    spec = importlib.util.spec_from_file_location(name, DOCS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _search_docs(site):
    return json.loads((site / "search" / "search_index.json").read_text(encoding="utf-8"))["docs"]


def _headings(page: Path):
    """The ``#``-``###`` headings of a Markdown page, outside code fences, as plain text."""
    titles, fence = [], None
    for line in page.read_text(encoding="utf-8").splitlines():
        marker = re.match(r"^\s*(`{3,}|~{3,})", line)
        if fence is None and marker:
            fence = marker.group(1)
        elif fence is not None and re.fullmatch(rf"\s*{re.escape(fence[0])}{{{len(fence)},}}\s*", line):
            fence = None
        elif fence is None and re.match(r"^#{1,3} ", line):
            titles.append(line.lstrip("#").strip().replace("`", ""))
    return titles


def test_search_finds_fused_linear_cross_entropy_in_the_api_reference(site):
    hits = [d["location"] for d in _search_docs(site) if "fused_linear_cross_entropy" in d["title"] + d["text"]]
    assert any(loc.startswith("api/#lora_layers.fused_linear_cross_entropy") for loc in hits), hits


def test_search_finds_every_heading_of_the_phi3_guide(site):
    titles = {html.unescape(re.sub(r"<[^>]+>", "", d["title"])) for d in _search_docs(site)
              if d["location"].startswith("phi3/")}
    expected = _headings(DOCS / "phi3.md")
    assert len(expected) > 10, expected  # the parser found the guide's headings
    missing = [t for t in expected if t not in titles]
    assert not missing, f"the search index lacks these headings of docs/phi3.md: {missing}"


@pytest.mark.timeout(120)
def test_search_box_in_headless_chromium_finds_the_api_entry(site, tmp_path):
    """The browser side of the search (docs/search_check.py); runs where Chromium is installed."""
    if not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")):
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium)")
    search = _docs_module("search_check").search
    found = search(str(site), "fused_linear_cross_entropy", str(tmp_path / "search.png"))
    assert "lora_layers.fused_linear_cross_entropy" in found["hits"], found
    assert (tmp_path / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _listed_members():
    """(object, member) for each ``members: [...]`` option of a ``:::`` entry in docs/api.md."""
    import yaml

    pairs = []
    for name, options in re.findall(r"^::: (\S+)\n((?:    .*\n)*)", (DOCS / "api.md").read_text(encoding="utf-8"), re.M):
        members = (yaml.safe_load(re.sub(r"^    ", "", options, flags=re.M)) or {}).get("options", {}).get("members")
        pairs += [(name, member) for member in members or []]
    return pairs


def test_api_reference_renders_every_public_name_from_its_docstring(site):
    """mkdocstrings gives each object the anchor ``id="lora_layers.NAME"`` and its docstring's text."""
    import lora_layers

    page = (site / "api" / "index.html").read_text(encoding="utf-8")
    missing = [name for name in lora_layers.__all__ if f'id="lora_layers.{name}"' not in page]
    assert not missing, f"the built API page has no entry for {missing}"
    text = html.unescape(re.sub(r"<[^>]+>", "", page))
    first_line = lora_layers.save_lora.__doc__.strip().splitlines()[0].replace("``", "")
    assert first_line in text, first_line
    missing = [f"{name}.{member}" for name, member in _listed_members() if f'id="{name}.{member}"' not in page]
    assert not missing, f"docs/api.md lists these members, but the built page has no entry for them: {missing}"
    # docs/griffe_rst_roles.py turned the docstrings' Sphinx roles and ``code`` into Markdown
    leftovers = sorted(set(re.findall(r":(?:func|class|meth|mod|attr|data|exc|obj):\S+|``[^`]+``", text)))
    assert not leftovers, leftovers


def test_griffe_extension_reads_roles_literal_blocks_and_grouped_arguments():
    pytest.importorskip("griffe", reason="the [docs] extra is not installed")
    markdown = _docs_module("griffe_rst_roles").markdown
    docstring = "\n".join([
        "Use :func:`~lora_layers.inject_lora` or :class:`Linear`, as in ``loralib``::", "",
        "    model = f(x)", "",
        "Args:",
        "    in_features, out_features, **kwargs: as ``nn.Linear``,",
        "        two lines.", "",
        "    r: rank, not split: a, b: c.",
        "Returns:",
        "    a, b: prose, left alone.",
    ])
    assert markdown(docstring).splitlines() == [
        "Use `inject_lora` or `Linear`, as in ``loralib``:", "",
        "    model = f(x)", "",
        "Args:",
        "    in_features: as ``nn.Linear``,", "        two lines.",
        "    out_features: as ``nn.Linear``,", "        two lines.",
        "    **kwargs: as ``nn.Linear``,", "        two lines.", "",
        "    r: rank, not split: a, b: c.",
        "Returns:",
        "    a, b: prose, left alone.",
    ]


def test_nav_is_grouped_and_lists_every_page_once():
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    groups = [next(iter(entry)) for entry in config["nav"]]
    assert groups == NAV_GROUPS, groups

    def pages(node):
        if isinstance(node, str):
            return [node] if not re.match(r"^[a-z]+:", node) else []
        items = node.values() if isinstance(node, dict) else node
        return [p for item in items for p in pages(item)]

    listed = pages(config["nav"])
    on_disk = sorted(p.name for p in DOCS.glob("*.md"))
    assert sorted(listed) == on_disk, f"nav pages {sorted(listed)} != docs/*.md {on_disk}"
