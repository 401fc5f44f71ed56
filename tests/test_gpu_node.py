"""scripts/gpu_node.sh, the offline GPU node's one command, with a stand-in Python that records its calls: the
wheelhouse checked first, pip check before the install, the --no-deps fallback when the node's own packages
are inconsistent, gpu_check's budget taken from what the 570 s limit leaves, and a report whatever happens.
(The real node's run is the GPU rehearsal's gpu-command step: make gpu-rehearsal.)"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAND_IN = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
case "$*" in
  "-m pip check") if [ -n "${BROKEN:-}" ]; then echo "torch 2.11.0 has requirement triton==3.5.0, but you have triton 3.4.0."; exit 1; fi
                  echo "No broken requirements."; exit 0 ;;
  *"pip install"*"--no-deps"*) exit 0 ;;
  *"pip install"*) if [ -n "${BROKEN:-}" ]; then echo "ERROR: ResolutionImpossible: torch 2.11.0 requires triton==3.5.0"; exit 1; fi; exit 0 ;;
  *"scripts/gpu_check.py"*) [ -n "${NO_REPORT:-}" ] && exit 1; echo '{"failed_checks": []}' > "$3"/gpu_report.json; exit 0 ;;
  -*) exec "$REAL_PYTHON" "$@" ;;
esac
"""


def node(tmp_path, wheelhouse=True, **env):
    """Run gpu_node.sh in a node-like folder with the stand-in Python; (exit code, output, calls, out folder)."""
    work = tmp_path / "repo"
    (work / "scripts").mkdir(parents=True)
    if wheelhouse:
        (work / "wheelhouse").mkdir()
        for name in ("requirements.txt", "requirements-nodeps.txt", "a-1.0-py3-none-any.whl", "b-2.0-py3-none-any.whl"):
            (work / "wheelhouse" / name).write_text("x")
    python = tmp_path / "python"
    python.write_text(STAND_IN)
    python.chmod(0o755)
    calls = tmp_path / "calls.txt"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_node.sh"), str(tmp_path / "out"), "--tiny"], cwd=work,
                          env=dict(os.environ, PYTHON=str(python), CALLS=str(calls), REAL_PYTHON=sys.executable, **env),
                          capture_output=True, text=True, timeout=60)
    lines = calls.read_text().splitlines() if calls.exists() else []
    return done.returncode, done.stdout + done.stderr, lines, tmp_path / "out"


def test_a_healthy_node_installs_then_checks_within_the_limit(tmp_path):
    code, output, calls, out = node(tmp_path)
    assert code == 0, output
    assert output.splitlines()[0].startswith("wheelhouse: 2 wheels, ")
    assert calls[0] == "-m pip check"  # before anything is installed
    installs = [c for c in calls if "pip install" in c]
    assert len(installs) == 3 and "--no-deps" not in installs[0]
    check = next(c.split() for c in calls if "scripts/gpu_check.py" in c)
    budget = float(check[check.index("--budget-s") + 1])
    assert 500 <= budget <= 570 - 35 and check[-1] == "--tiny"  # the limit less the installs, the grace, start and end
    assert sorted(p.name for p in out.iterdir()) == ["gpu_report.json", "install-nodeps.log", "install-project.log",
                                                     "install.log", "pip-check.log"]
    assert (out / "pip-check.log").read_text().count("== pip check") == 2  # before and after the install


def test_a_node_whose_own_packages_disagree_falls_back_to_no_deps_in_one_line(tmp_path):
    code, output, calls, out = node(tmp_path, BROKEN="1")
    assert code == 0, output
    assert "FAILED pip-check" in output and "FAILED install" in output
    assert sum("without dependency checks (--no-deps)" in line for line in output.splitlines()) == 1
    installs = [c for c in calls if "pip install" in c and "requirements.txt" in c]
    assert len(installs) == 2 and "--no-deps" in installs[1]
    assert "ResolutionImpossible" in (out / "install.log").read_text()
    assert any("scripts/gpu_check.py" in c for c in calls)  # the check still runs


def test_a_missing_wheelhouse_is_one_line_and_a_report(tmp_path):
    code, output, calls, out = node(tmp_path, wheelhouse=False)
    assert code == 3 and output.strip().startswith("no wheelhouse in ") and len(output.strip().splitlines()) == 1
    assert not any("pip install" in c for c in calls)
    report = json.loads((out / "gpu_report.json").read_text())
    assert report["failed_checks"][0].startswith("no wheelhouse/requirements.txt in ")


def test_a_check_that_writes_no_report_still_leaves_one(tmp_path):
    code, output, calls, out = node(tmp_path, NO_REPORT="1")
    assert code == 1
    report = json.loads((out / "gpu_report.json").read_text())
    assert report["failed_checks"] == ["gpu_check exited 1 without a report (see its output)"]
    assert "no broken requirements" in report["install_logs"]["pip-check"]
