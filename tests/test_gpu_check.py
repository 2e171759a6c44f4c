"""benchmarks/gpu_check.sh, the script prepared for the first GPU run, exercised on CPU.

``--dry-run --quick`` runs all five steps at their smallest sizes (about 35 s of
CPU); the failure test checks that a failing step makes the script fail.
"""
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ["env", "tests", "kernels", "phi3", "example"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="gpu_check.sh needs bash and coreutils' timeout")


def run(tmp_path, *args, **env):
    out = tmp_path / "out"
    full_env = dict(os.environ, OUT=str(out), GPU_CHECK_PYTHON=sys.executable)
    full_env.update(env)
    full_env.pop("TRITON_INTERPRET", None)  # the script sets what it needs
    proc = subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=full_env, capture_output=True,
                          text=True, timeout=600)
    return proc, out


def test_dry_run_quick_runs_every_step(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    pytest.importorskip("triton")
    proc, out = run(tmp_path, "--dry-run", "--quick")
    summary = (out / "summary.txt").read_text() if (out / "summary.txt").exists() else ""
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    lines = summary.splitlines()
    assert [line.split(":")[0] for line in lines[:5]] == [f"step {i} {n}" for i, n in enumerate(STEPS, 1)]
    assert all(": ok in " in line for line in lines[:5]), summary
    assert lines[5] == f"gpu_check: 0 step(s) failed; summary in {out / 'summary.txt'}"
    # what the device tool brings back: at most 8 files, none deeper than $OUT
    files = sorted(p.name for p in out.rglob("*"))
    assert files == sorted([f"step{i}_{n}.log" for i, n in enumerate(STEPS, 1)]
                           + ["summary.txt", "kernels.md", "phi3_step.json"]), files
    env_log = (out / "step1_env.log").read_text()
    assert "kernels.is_available(): True" in env_log and "AUTO_USES_TRITON: False" in env_log
    assert "no package is installed" in env_log
    assert " passed" in (out / "step2_tests.log").read_text()
    assert "check qkv: ok" in (out / "step3_kernels.log").read_text()


def test_a_failing_step_fails_the_script(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'broken python' >&2\nexit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    proc, out = run(tmp_path, "--dry-run", "--steps", "1,2", GPU_CHECK_PYTHON=str(fake))
    assert proc.returncode == 2, proc.stdout
    summary = (out / "summary.txt").read_text().splitlines()
    assert summary[0].startswith("step 1 env: FAILED (exit 3)"), summary
    assert summary[1].startswith("step 2 tests: FAILED (exit 3)"), summary
    assert summary[2].startswith("gpu_check: 2 step(s) failed")
    assert "broken python" in (out / "step2_tests.log").read_text()


def test_bad_arguments_change_nothing(tmp_path):
    proc, out = run(tmp_path, "--dryrun")
    assert proc.returncode == 64 and "unknown argument '--dryrun'" in proc.stderr
    proc, out = run(tmp_path, "--quick")
    assert proc.returncode == 64 and "--quick only shrinks a --dry-run" in proc.stderr
    assert not out.exists()
