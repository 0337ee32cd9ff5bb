"""The GitHub workflow files and the composite action are valid, offline.

check-jsonschema validates them against its vendored schemas; actionlint (the build that
ships wheels on PyPI) checks expressions, job needs, action inputs and the inputs given to
the reusable workflow and to ``./action.yml``. Each tool's test is skipped, saying so, where
the tool is not installed (``make install-dev`` installs both).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
GATE = ROOT / ".github" / "workflows" / "gradient-gate.yml"
ACTION = ROOT / "action.yml"


def tool(name: str) -> str:
    """The tool's executable next to this interpreter, else on PATH; skip when missing."""
    local = Path(sys.executable).with_name(name)
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (make install-dev installs it)")
    return found


def run(*command: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data


def test_there_are_workflows_to_check() -> None:
    assert GATE in WORKFLOWS
    assert ACTION.is_file()


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_schema(path: Path) -> None:
    done = run(tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def test_action_schema() -> None:
    done = run(tool("check-jsonschema"), "--builtin-schema", "vendor.github-actions", str(ACTION))
    assert done.returncode == 0, done.stdout + done.stderr


def test_actionlint() -> None:
    done = run(tool("actionlint"), "-oneline", *(str(p.relative_to(ROOT)) for p in WORKFLOWS))
    assert done.returncode == 0, done.stdout + done.stderr


def test_actionlint_catches_a_wrong_input_name(tmp_path: Path) -> None:
    """A caller's typo in an input of the reusable workflow or of the action fails the lint."""
    actionlint = tool("actionlint")
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed: actionlint finds local actions from the git root")
    shutil.copytree(ROOT / ".github", tmp_path / ".github")
    shutil.copy(ACTION, tmp_path / "action.yml")
    assert run(git, "init", "-q", ".", cwd=tmp_path).returncode == 0
    caller = tmp_path / ".github" / "workflows" / "caller.yml"
    caller.write_text(
        """\
name: caller
on: pull_request
permissions:
  contents: read
  actions: read
jobs:
  gate:
    uses: ./.github/workflows/gradient-gate.yml
    with:
      test-path: tests
  step:
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v5
      - uses: ./
        with:
          pytest-arg: -x
""",
        encoding="utf-8",
    )
    done = run(actionlint, "-oneline", ".github/workflows/caller.yml", cwd=tmp_path)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert len(lines) == 2, done.stdout
    assert 'input "test-path" is not defined in "./.github/workflows/gradient-gate.yml"' in lines[0]
    assert 'input "pytest-arg" is not defined in action' in lines[1]
    caller.write_text(
        caller.read_text()
        .replace("test-path:", "test-paths:")
        .replace("pytest-arg:", "pytest-args:")
    )
    done = run(actionlint, "-oneline", ".github/workflows/caller.yml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout


def test_reusable_workflow_shape() -> None:
    """The inputs the README documents, the pytest-split matrix, the merge and the report."""
    gate = load(GATE)
    trigger = gate[True]  # YAML 1.1 reads the key `on` as True
    inputs = trigger["workflow_call"]["inputs"]
    assert {"python-version", "test-paths", "shards", "pytest-args", "baseline-artifact"} <= set(
        inputs
    )
    assert inputs["shards"]["type"] == "number"
    jobs = gate["jobs"]
    assert (
        jobs["test"]["strategy"]["matrix"]["group"] == "${{ fromJSON(needs.plan.outputs.groups) }}"
    )
    shard = "\n".join(step.get("run", "") for step in jobs["test"]["steps"])
    assert '--splits "$SHARDS" --group "$GROUP" --durations-path "$DURATIONS"' in shard
    assert "--dist loadgroup" not in GATE.read_text()
    report = "\n".join(step.get("run", "") for step in jobs["report"]["steps"])
    assert "gradcheck-report merge shards/gradcheck-shard-*.xml -o gradcheck-report.xml" in report
    assert "gradcheck-report summary gradcheck-report.xml --github" in report
    uploads = [
        s
        for s in jobs["report"]["steps"]
        if str(s.get("uses", "")).startswith("actions/upload-artifact@")
    ]
    assert [u["with"]["name"] for u in uploads] == [
        "gradcheck-report",
        "${{ inputs.baseline-artifact }}",
    ]
    # The report job runs when shards fail, so that their failures are summarised.
    assert jobs["report"]["if"].startswith("always()")


def test_action_runs_the_gate_and_the_summary() -> None:
    action = load(ACTION)
    assert action["runs"]["using"] == "composite"
    steps = action["runs"]["steps"]
    assert all(step.get("shell") == "bash" for step in steps if "run" in step)
    text = "\n".join(step.get("run", "") for step in steps)
    assert '"$PYTHON" -m pytest "${words[@]}" "${args[@]}"' in text
    assert '"$PYTHON" -m pytest_gradcheck.report summary "$JUNITXML" --github' in text


# -- the steps' shell scripts, run here as GitHub runs them -----------------------------------

SUITE = """
import torch
from torch import nn

torch.set_num_threads(1)


def mlp(activation, depth):
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(8, 8), activation()]
    return nn.Sequential(*layers)


def sample():
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(0))


def test_healthy(gradcheck):
    gradcheck(mlp(nn.ReLU, 3), sample())


def test_also_healthy(gradcheck):
    gradcheck(mlp(nn.Tanh, 2), sample())


def test_vanishing(gradcheck):
    gradcheck(mlp(nn.Sigmoid, 12), sample())
"""


def steps(path: Path, job: str | None = None) -> dict[str, dict[str, Any]]:
    data = load(path)
    found = data["runs"]["steps"] if job is None else data["jobs"][job]["steps"]
    return {step["name"]: step for step in found if "name" in step}


def bash(
    script: str, cwd: Path, env: dict[str, str], tmp_path: Path
) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
    """Run a step's script as GitHub does (bash -eo pipefail); return it and its outputs."""
    outputs = tmp_path / "github_output"
    outputs.write_text("")
    full = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "OMP_NUM_THREADS": "1",
        "GITHUB_OUTPUT": str(outputs),
        **env,
    }
    done = subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    values = dict(line.split("=", 1) for line in outputs.read_text().splitlines() if "=" in line)
    return done, values


@pytest.fixture
def project(pytester: pytest.Pytester) -> Path:
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    pytester.makeini(
        "[pytest]\naddopts = -p no:cacheprovider -p no:randomly\ngradcheck_device = cpu\n"
    )
    pytester.makepyfile(test_models=SUITE)
    durations = {f"test_models.py::{name}": 1.0 for name in ("test_healthy", "test_also_healthy")}
    durations["test_models.py::test_vanishing"] = 2.0
    (pytester.path / ".test_durations").write_text(json.dumps(durations))
    return pytester.path


def test_reusable_workflow_scripts_shard_merge_and_report(project: Path, tmp_path: Path) -> None:
    test_steps = steps(GATE, "test")
    shard = test_steps["Tests (pytest-split group ${{ matrix.group }} of ${{ inputs.shards }})"]
    for group in ("1", "2"):
        done, _ = bash(
            shard["run"],
            project,
            {
                "GROUP": group,
                "SHARDS": "2",
                "TEST_PATHS": "test_models.py",
                "PYTEST_ARGS": '-k "healthy or vanishing" -W "error::DeprecationWarning"',
                "DURATIONS": ".test_durations",
                "PLOTS": "",
                "SAVE": "true",
            },
            tmp_path,
        )
        assert f"Running group {group}/2" in done.stdout, done.stdout + done.stderr
    shards = project / "shards"
    shards.mkdir()
    for name in ("gradcheck-shard-1.xml", "gradcheck-shard-2.xml"):
        (project / name).rename(shards / name)
    for name in ("gradient-baseline-1.json", "gradient-baseline-2.json"):
        (project / name).rename(shards / name)

    report = steps(GATE, "report")
    done, _ = bash(report["Merge the shards' JUnit files"]["run"], project, {}, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "merged 2 JUnit file(s), 3 tests -> gradcheck-report.xml" in done.stdout
    summary = tmp_path / "step_summary.md"
    github = {"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary)}
    done, _ = bash(report["Gradient summary and annotations"]["run"], project, github, tmp_path)
    assert done.returncode == 1  # the vanishing model fails the gate
    errors = [line for line in done.stdout.splitlines() if line.startswith("::error ")]
    assert len(errors) == 1
    assert errors[0].startswith("::error file=test_models.py,line=")
    assert "test_vanishing" in errors[0]
    assert "Gradient health: 1 of 3 check(s) unhealthy" in summary.read_text()
    done, _ = bash(report["Merge the shards' gradient baselines"]["run"], project, {}, tmp_path)
    assert done.returncode == 0, done.stderr
    merged = json.loads((project / "gradient-baseline.json").read_text())["checks"]
    assert sorted(merged) == [
        "test_models.py::test_also_healthy",
        "test_models.py::test_healthy",
        "test_models.py::test_vanishing",
    ]


def test_action_scripts_run_the_gate(project: Path, tmp_path: Path) -> None:
    action = steps(ACTION)
    env = {
        "PYTHON": sys.executable,
        "TEST_PATHS": "test_models.py",
        "PYTEST_ARGS": "-k 'not also'",
        "JUNITXML": "report.xml",
        "BASELINE": "missing.json",
        "SAVE_BASELINE": "baseline.json",
        "PLOTS": "",
    }
    done, outputs = bash(action["Tests with gradient checks"]["run"], project, env, tmp_path)
    assert done.returncode == 0, (
        done.stderr
    )  # the step records pytest's status, the last step gates
    assert outputs == {"exit-code": "1"}
    assert "::notice title=gradient gate::no baseline at missing.json" in done.stdout
    assert "1 deselected" in done.stdout
    assert sorted(json.loads((project / "baseline.json").read_text())["checks"]) == [
        "test_models.py::test_healthy",
        "test_models.py::test_vanishing",
    ]
    summary = tmp_path / "step_summary.md"
    github = {"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary), **env}
    done, _ = bash(action["Gradient summary and annotations"]["run"], project, github, tmp_path)
    assert done.returncode == 1
    assert sum(line.startswith("::error ") for line in done.stdout.splitlines()) == 1
    assert "Gradient health: 1 of 2 check(s) unhealthy" in summary.read_text()
    gate = action["Gate on pytest's exit status"]["run"]
    assert bash(gate, project, {"STATUS": "1"}, tmp_path)[0].returncode == 1
    assert bash(gate, project, {"STATUS": "0"}, tmp_path)[0].returncode == 0
