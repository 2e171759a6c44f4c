"""How the test suite is laid out (issue #21). Tests skip per test, not per file: with an optional
library hidden by conftest's ``--without``, the tests that compare with it skip and the torch-only
tests next to them still run. And a test file the docs or the code name by path exists there."""
import os
import pathlib
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _pytest(tmp_path, *args):
    """Run pytest on this checkout in a fresh process; the outcome of each test from its JUnit report."""
    report = tmp_path / "report.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if not report.exists():
        return proc, {}
    outcomes = {}
    for case in ET.parse(report).iter("testcase"):
        marks = [child for child in case if child.tag in ("skipped", "failure", "error")]
        outcome, message = (marks[0].tag, f"{marks[0].get('message')}: {marks[0].text}") if marks else ("passed", "")
        outcomes[f"{case.get('classname')}::{case.get('name')}"] = outcome, message
    return proc, outcomes


@pytest.mark.slow
def test_dora_torch_only_tests_pass_without_peft_and_its_peft_comparisons_skip(tmp_path):
    proc, outcomes = _pytest(tmp_path, "--without", "peft", "tests/variants/test_dora.py",
                             "tests/parity/test_dora_peft.py",
                             "-k", "formula or gradcheck or merge_is_exact or lora_plus or gaussian")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    torch_only = {name: result for name, result in outcomes.items() if "test_dora_peft" not in name}
    parity = {name: result for name, result in outcomes.items() if "test_dora_peft" in name}
    # forward/gradients (6), gradcheck, merge (9), LoRA+ and the Gaussian init all ran, and passed
    for fragment, count in [("test_forward_and_every_gradient_match_the_float64_formula", 6),
                            ("test_gradcheck_float64_with_the_norm_held_constant", 1),
                            ("test_merge_is_exact_and_restores_the_weight_bit_for_bit", 9),
                            ("test_lora_plus_groups", 1), ("test_gaussian_init_draws_a_from_n_0_1_over_r", 1)]:
        ran = [result for name, result in torch_only.items() if fragment in name]
        assert len(ran) == count, (fragment, sorted(torch_only))
        assert all(outcome == "passed" for outcome, _ in ran), (fragment, ran)
    # The blocker did hide PEFT: the file of comparisons with it was skipped, for want of it.
    assert parity and all(outcome == "skipped" and "peft" in message for outcome, message in parity.values()), parity


def test_without_refuses_a_library_it_does_not_know(tmp_path):
    proc, _ = _pytest(tmp_path, "--without", "peft,lorlib", "--collect-only", "tests/core/test_segments.py")
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR
    assert "--without: unknown libraries ['lorlib']" in proc.stderr


def test_every_test_file_named_by_path_exists():
    # The tests moved into tests/<folder>/ (issue #21): a path left behind in prose sends readers,
    # and the commands the docs show, to a file that is not there.
    sources = [ROOT / "README.md"] + [path for folder in ("docs", "tests", "benchmarks", "examples")
                                      for path in sorted((ROOT / folder).rglob("*"))
                                      if path.suffix in (".md", ".py", ".sh") and path.is_file()]
    cited = {}
    for path in sources:
        for ref in re.findall(r"\btests/[\w/]+\.py", path.read_text(encoding="utf-8")):
            cited.setdefault(ref, []).append(path.relative_to(ROOT).as_posix())
    assert "tests/kernels/test_kernels.py" in cited, "docs/kernels.md's command is not found: the pattern is wrong"
    missing = {ref: where for ref, where in cited.items() if not (ROOT / ref).is_file()}
    assert not missing, f"test files named by path that do not exist: {missing}"
