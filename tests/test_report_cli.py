"""The CI gate end to end: pytester writes real JUnit files (unsharded, two pytest-split
shards, an xdist run), then ``gradcheck-report`` reads them: the plain and Markdown
summaries, the GitHub annotations, exit codes, and gradient baselines (a regression caught,
an unchanged model passing).

Inner runs are in-process (torch is already imported here) except the xdist run and the
console-script run, which need processes of their own.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_gradcheck import report as cli
from pytest_gradcheck.baseline import (
    Baseline,
    BaselineError,
    Shift,
    compare_profiles,
    decode_profile,
    encode_profile,
)
from pytest_gradcheck.escape import markdown_code

pytestmark = pytest.mark.usefixtures("inner_environment")  # runs pytest in-process

SUITE = '''
import os

import pytest
import torch
from torch import nn

from pytest_gradcheck import GradientHealthError, gradient_health

torch.set_num_threads(1)
SCALE = float(os.environ.get("GRADCHECK_TEST_SCALE", "1"))
"""A pull request that changes an init: the last layer's weights are scaled by SCALE."""


def relu_mlp(depth=3, last_scale=1.0):
    """Healthy: Linear (He init, no bias) and ReLU; layers 0, 2, 4 for depth 3."""
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        linear = nn.Linear(8, 8, bias=False)
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        layers += [linear, nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    with torch.no_grad():
        model[-1].weight.mul_(last_scale)
    return model


def sigmoid_mlp(depth=12):
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(8, 8), nn.Sigmoid()]
    return nn.Sequential(*layers)


class LogOfZero(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.log(h - h))


def sample():
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(0))


def test_healthy(gradcheck):
    gradcheck(relu_mlp(), sample())


@pytest.mark.parametrize(
    "depth",
    [2, 4],
)
def test_depth(gradcheck, depth):
    gradcheck(relu_mlp(depth), sample())


def test_init_scale(gradcheck):
    gradcheck(relu_mlp(last_scale=SCALE), sample())


@gradient_health(min_norm=1e-12)
def test_vanishing(gradcheck):
    gradcheck(sigmoid_mlp(), sample())


def test_nonfinite(gradcheck):
    gradcheck(LogOfZero(), sample())


class TestTwoChecks:
    def test_two(self, gradcheck):
        gradcheck(relu_mlp(), sample())
        gradcheck(relu_mlp(2), sample())


@gradient_health(  # a decorator over several lines
    min_norm=1e-12,
)
def test_caught(gradcheck):
    with pytest.raises(GradientHealthError):
        gradcheck(sigmoid_mlp(), sample())


def test_no_check():
    pass
'''

NODEIDS = [
    "test_models.py::test_healthy",
    "test_models.py::test_depth[2]",
    "test_models.py::test_depth[4]",
    "test_models.py::test_init_scale",
    "test_models.py::test_vanishing",
    "test_models.py::test_nonfinite",
    "test_models.py::TestTwoChecks::test_two",
    "test_models.py::test_caught",
    "test_models.py::test_no_check",
]


def write_suite(pytester: pytest.Pytester, source: str = SUITE) -> None:
    pytester.makeini(
        textwrap.dedent(
            """
            [pytest]
            addopts = --strict-markers -p no:benchmark -p no:randomly -p no:cacheprovider
            filterwarnings =
                error
            gradcheck_device = cpu
            """
        )
    )
    pytester.makepyfile(test_models=source)
    # pytest-split's stored durations: equal, so that each shard gets about half the tests.
    durations = {nodeid: 1.0 for nodeid in NODEIDS}
    pytester.path.joinpath(".test_durations").write_text(json.dumps(durations))


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    if "-n" in args:
        return pytester.runpytest_subprocess(*args)
    return pytester.runpytest(*args)


def cases(path: Path) -> list[tuple[str, str]]:
    """(classname, name) of every test case pytest wrote, read with the standard library."""
    return [
        (case.get("classname", ""), case.get("name", ""))
        for case in ET.parse(path).getroot().iter("testcase")
    ]


def cli_run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def source_line(pytester: pytest.Pytester, text: str) -> int:
    """1-based line of the first line of ``test_models.py`` that starts with ``text``."""
    lines = pytester.path.joinpath("test_models.py").read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if line.strip().startswith(text))


# -- shards -----------------------------------------------------------------------------------


def test_shards_partition_the_suite_and_merge_to_the_unsharded_summary(
    pytester: pytest.Pytester, capsys: pytest.CaptureFixture[str]
) -> None:
    write_suite(pytester)
    full = run(pytester, "--junitxml=full.xml")  # junit_family xunit2, pytest's default
    full.assert_outcomes(passed=7, failed=2)
    first = run(pytester, "--splits", "2", "--group", "1", "--junitxml=shard-1.xml")
    second = run(
        pytester,
        *("--splits", "2", "--group", "2", "-o", "junit_family=xunit1"),
        "--junitxml=shard-2.xml",
    )
    first.stdout.fnmatch_lines(["*Running group 1/2*"])
    second.stdout.fnmatch_lines(["*Running group 2/2*"])

    whole = cases(pytester.path / "full.xml")
    one, two = cases(pytester.path / "shard-1.xml"), cases(pytester.path / "shard-2.xml")
    assert len(whole) == len(set(whole)) == len(NODEIDS)
    assert one
    assert two
    assert not set(one) & set(two)
    assert sorted(one + two) == sorted(whole)
    outcomes = {
        key: first.parseoutcomes().get(key, 0) + second.parseoutcomes().get(key, 0)
        for key in ("passed", "failed")
    }
    assert outcomes == {"passed": 7, "failed": 2}

    status, out, _ = cli_run(capsys, "merge", "shard-1.xml", "shard-2.xml", "-o", "merged.xml")
    assert status == 0
    assert out == f"merged 2 JUnit file(s), {len(NODEIDS)} tests -> merged.xml\n"
    assert sorted(cases(pytester.path / "merged.xml")) == sorted(whole)

    # One family per shard (xunit2 has no file/line), yet the same summary and annotations.
    status_merged, merged_text, _ = cli_run(capsys, "summary", "merged.xml")
    status_full, full_text, _ = cli_run(capsys, "summary", "full.xml")
    assert status_merged == status_full == 1
    assert merged_text == full_text
    assert len(merged_text.splitlines()) == 1 + 1 + 9 + 1  # headline, header, checks, footnote
    merged = cli.read_results([pytester.path / "merged.xml"], pytester.path)
    unsharded = cli.read_results([pytester.path / "full.xml"], pytester.path)
    assert cli.github_annotations(merged) == cli.github_annotations(unsharded)
    lines = {check.name: check.line for check in merged.checks}
    assert lines == {check.name: check.line for check in unsharded.checks}
    assert lines["test_models.py::test_depth[4]"] == source_line(pytester, "@pytest.mark.param")
    assert lines["test_models.py::TestTwoChecks::test_two"] == source_line(pytester, "def test_two")
    # Shard 2 wrote xunit1 (pytest's own file and line), the unsharded run xunit2 (lines
    # from the source): they agree, for a multi-line decorator and a method too.
    assert {("test_models", "test_caught"), ("test_models.TestTwoChecks", "test_two")} <= set(two)
    assert lines["test_models.py::test_caught"] == source_line(
        pytester, "@gradient_health(  # a decorator"
    )


def test_summary_lists_problems_first(
    pytester: pytest.Pytester, capsys: pytest.CaptureFixture[str]
) -> None:
    write_suite(pytester)
    run(pytester, "--junitxml=out.xml").assert_outcomes(passed=7, failed=2)
    status, out, err = cli_run(capsys, "summary", "out.xml")
    assert status == 1
    assert err == ""
    lines = out.splitlines()
    assert lines[0] == (
        "gradcheck: 2 of 9 check(s) unhealthy; 1 expected unhealthy (in tests that passed "
        "or were skipped); tests: 7 passed, 2 failed"
    )
    assert re.split(r"\s{2,}", lines[1]) == list(cli._COLUMNS)
    rows = [re.split(r"\s{2,}", line) for line in lines[2:11]]
    # The worst kind first (nonfinite before vanishing), then expected, then healthy by name.
    assert [row[:2] for row in rows] == [
        ["unhealthy", "test_models.py::test_nonfinite"],
        ["unhealthy", "test_models.py::test_vanishing"],
        ["expected", "test_models.py::test_caught (test passed)"],
        ["healthy", "test_models.py::TestTwoChecks::test_two"],
        ["healthy", "test_models.py::TestTwoChecks::test_two (check 2)"],
        ["healthy", "test_models.py::test_depth[2]"],
        ["healthy", "test_models.py::test_depth[4]"],
        ["healthy", "test_models.py::test_healthy"],
        ["healthy", "test_models.py::test_init_scale"],
    ]
    assert re.fullmatch(r"nonfinite x\d+", rows[0][2])
    assert re.fullmatch(r"vanishing x\d+", rows[1][2])
    assert rows[1][3] == "worst: 0"  # the first Linear
    assert rows[2][2].startswith("vanishing x")
    assert all(row[2] == "-" for row in rows[3:])
    assert all(row[3].startswith("smallest gradient: ") for row in rows[3:])
    # What each check ran with, from its own properties.
    assert all(row[6].startswith("cpu, fp32, loss: ") for row in rows)
    assert lines[11].startswith("expected: unhealthy in a test that passed or was skipped")
    assert len(lines) == 12
    # The numbers are the plugin's, as written into the JUnit file.
    props = {
        prop.get("name"): prop.get("value")
        for case in ET.parse(pytester.path / "out.xml").getroot().iter("testcase")
        if case.get("name") == "test_vanishing"
        for prop in case.iter("property")
    }
    assert rows[1][4:6] == [props["gradcheck.min_grad_norm"], props["gradcheck.max_grad_norm"]]
    assert rows[1][6] == f"cpu, fp32, loss: {props['gradcheck.loss_source']}"
    assert float(rows[1][4]) < 1e-6 < float(rows[1][5])


# -- GitHub -----------------------------------------------------------------------------------


def test_github_step_summary_and_annotations(
    pytester: pytest.Pytester, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_suite(pytester)
    run(pytester, "--junitxml=out.xml").assert_outcomes(passed=7, failed=2)
    summary = pytester.path / "summary.md"
    summary.write_text("## an earlier step\n", encoding="utf-8")
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))

    status, out, err = cli_run(capsys, "summary", "out.xml", "--github")
    assert (status, err) == (1, "")
    markdown = summary.read_text(encoding="utf-8").splitlines()
    assert markdown[0] == "## an earlier step"  # appended, not overwritten
    assert markdown[1].startswith("### \N{CROSS MARK} Gradient health: 2 of 9 check(s) unhealthy")
    header = "| | test | problems | worst layer | min grad norm | max grad norm | setup |"
    table = markdown.index(header)
    rows = markdown[table + 2 : table + 5]
    code = markdown_code
    assert [row.split(" | ")[:3] for row in rows] == [
        ["| \N{CROSS MARK}", code("test_models.py::test_nonfinite"), rows[0].split(" | ")[2]],
        ["| \N{CROSS MARK}", code("test_models.py::test_vanishing"), rows[1].split(" | ")[2]],
        [
            "| \N{WARNING SIGN}\N{VARIATION SELECTOR-16}",
            f"{code('test_models.py::test_caught')} (test passed: expected)",
            rows[2].split(" | ")[2],
        ],
    ]
    number = r"<code>[0-9.e\\+-]+</code>"
    assert re.fullmatch(
        rf"\| \N{{CROSS MARK}} \| {re.escape(code('test_models.py::test_vanishing'))} \| "
        rf"<code>vanishing x\d+</code> \| <code>0</code> \| {number} \| {number} \| "
        rf"{re.escape(code('cpu, fp32, loss: default projection'))} \|",
        rows[1],
    )
    assert markdown[table + 5] == ""
    assert "<details><summary>6 healthy check(s)</summary>" in markdown
    assert "| | test | problems | smallest gradient | min grad norm | max grad norm | setup |" in (
        markdown
    )
    assert sum(line.startswith("| \u2705 |") for line in markdown) == 6
    assert "</details>" in markdown

    # The same text on stdout, then one ::error per failing check, worst first.
    assert out.startswith(cli.text_summary(cli.read_results([pytester.path / "out.xml"])))
    errors = [line for line in out.splitlines() if line.startswith("::")]
    assert len(errors) == 2
    nonfinite = source_line(pytester, "def test_nonfinite")
    vanishing = source_line(pytester, "@gradient_health(min_norm=1e-12)")  # its decorator
    assert errors[0].startswith(
        f"::error file=test_models.py,line={nonfinite},title=gradcheck%3A nonfinite x"
    )
    assert errors[1].startswith(
        f"::error file=test_models.py,line={vanishing},title=gradcheck%3A vanishing x"
    )
    message = errors[1].split("::", 2)[2]
    assert "\n" not in message
    assert "%0A" in message
    decoded = message.replace("%0A", "\n").replace("%25", "%")
    assert decoded.startswith("test_models.py::test_vanishing: unhealthy gradients (vanishing x")
    assert "worst layer: 0; layer gradient norms from " in decoded
    assert "problems: vanishing:0, vanishing:2" in decoded
    assert "GradientHealthError: gradient check failed:" in decoded
    # What to do comes before the table of layers, so a cut annotation keeps it.
    quoted = decoded.splitlines()
    hint = next(i for i, line in enumerate(quoted) if line.startswith("hint (vanishing):"))
    first_row = next(i for i, line in enumerate(quoted) if line.startswith("  layer "))
    assert hint < first_row
    assert "pytest_gradcheck.results." not in decoded

    # GitHub shows 10 error annotations per step: past the limit, a notice counts the rest.
    status, out, _ = cli_run(capsys, "summary", "out.xml", "--github", "--max-annotations", "1")
    commands = [line for line in out.splitlines() if line.startswith("::")]
    assert status == 1
    assert len(commands) == 2
    assert commands[0] == errors[0]
    assert commands[1].startswith(
        "::notice title=gradcheck::1 more unhealthy check(s) not annotated"
    )


@pytest.mark.parametrize("family", ["xunit1", "xunit2"])
def test_a_suite_entry_is_annotated_at_its_yaml_line(
    pytester: pytest.Pytester,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    family: str,
) -> None:
    pytester.makeini(
        f"[pytest]\naddopts = -p no:benchmark\ngradcheck_device = cpu\njunit_family = {family}\n"
    )
    pytester.makepyfile(
        yaml_factories="""
        import torch
        from torch import nn

        torch.set_num_threads(1)


        def sigmoid_mlp():
            torch.manual_seed(0)
            return nn.Sequential(*[m for _ in range(12) for m in (nn.Linear(8, 8), nn.Sigmoid())])
        """
    )
    pytester.makefile(
        ".yaml",
        gradcheck_models=textwrap.dedent(
            """\
            models:
              healthy:
                model: torch.nn:Linear
                args: {in_features: 8, out_features: 8}
                batch: {shape: [4, 8]}
              "deep.sigmoid":
                model: yaml_factories:sigmoid_mlp
                batch: {shape: [4, 8]}
            """
        ),
    )
    run(pytester, "--junitxml=out.xml").assert_outcomes(passed=1, failed=1)
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(pytester.path / "summary.md"))
    status, out, _ = cli_run(capsys, "summary", "out.xml", "--github")
    assert status == 1
    (error,) = [line for line in out.splitlines() if line.startswith("::error")]
    assert error.startswith(
        "::error file=gradcheck_models.yaml,line=6,title=gradcheck%3A vanishing"
    )


def test_github_flag_outside_github_prints_plain_text(
    pytester: pytest.Pytester, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_suite(pytester)
    run(pytester, "--junitxml=out.xml", "-k", "healthy or depth")
    summary = pytester.path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))  # but GITHUB_ACTIONS is unset
    status, out, err = cli_run(capsys, "summary", "out.xml", "--github")
    assert status == 0
    assert out.startswith("gradcheck: all 3 check(s) healthy; tests: 3 passed\n")
    assert "::" not in out.replace("py::", "")
    assert "not running in GitHub Actions" in err
    assert not summary.exists()


# -- exit codes -------------------------------------------------------------------------------


def test_exit_codes(
    pytester: pytest.Pytester, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    write_suite(pytester)
    run(pytester, "--junitxml=healthy.xml", "-k", "healthy or depth")
    assert cli_run(capsys, "summary", "healthy.xml")[0] == 0

    status, _, err = cli_run(capsys, "summary", "missing.xml")
    assert (status, err) == (2, "gradcheck-report: error: missing.xml: no such file\n")

    broken = pytester.path / "broken.xml"
    broken.write_text('<?xml version="1.0"?>\n<testsuites>\n  <testsuite>\n</testsuites>\n')
    status, _, err = cli_run(capsys, "summary", "healthy.xml", str(broken))
    assert status == 2
    assert err == f"gradcheck-report: error: {broken}:4:2: malformed XML: mismatched tag\n"

    other = pytester.path / "other.xml"
    other.write_text("<coverage/>")
    status, _, err = cli_run(capsys, "summary", str(other))
    assert status == 2
    assert f"{other}: not a JUnit XML report" in err

    status, _, err = cli_run(capsys, "merge", "healthy.xml", "base.json", "-o", "x.xml")
    assert status == 2
    assert "not both" in err
    status, _, err = cli_run(capsys, "summary")  # argparse: a usage error
    assert status == 2
    assert "the following arguments are required: JUNIT_XML" in err
    status, _, err = cli_run(capsys, "diff", "a.json", "b.json", "--factor", "0.5")
    assert status == 2
    assert "the baseline factor must be a finite number > 1, got '0.5'" in err
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "format": "pytest-gradcheck baseline",\n  "version": 1,\n  checks\n}')
    status, _, err = cli_run(capsys, "diff", str(bad), str(bad))
    assert status == 2
    assert f"{bad}:4:3: not valid JSON" in err
    assert cli_run(capsys, "--version")[0] == 0


def test_console_script_runs_without_torch_or_pytest(pytester: pytest.Pytester) -> None:
    write_suite(pytester)
    run(pytester, "--junitxml=out.xml", "-k", "vanishing").assert_outcomes(failed=1)
    script = Path(sys.executable).with_name("gradcheck-report")
    assert script.exists(), "pip install -e . installs the gradcheck-report console script"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "GITHUB_"))}
    done = subprocess.run(
        [str(script), "summary", "out.xml"],
        cwd=pytester.path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert done.stdout.splitlines()[2].startswith("unhealthy  test_models.py::test_vanishing  ")

    code = (
        "import json, sys\n"
        "from pytest_gradcheck.report import main\n"
        "status = main(['summary', 'out.xml'])\n"
        "loaded = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'pytest', '_pytest'})\n"
        "print(json.dumps({'status': status, 'loaded': loaded}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=pytester.path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert json.loads(done.stdout.splitlines()[-1]) == {"status": 1, "loaded": []}


# -- gradient baselines -----------------------------------------------------------------------

PULL_REQUEST = SUITE.replace(
    """def test_no_check():""",
    """def test_new_model(gradcheck):
    gradcheck(relu_mlp(5), sample())


def test_no_check():""",
).replace("""    [2, 4],\n)""", """    [2],\n)""")


SAVE_LOG = """
import os

from pytest_gradcheck.baseline import Baseline

_save = Baseline.save


def _logged_save(self, path):
    with open("saves.log", "a") as log:
        log.write(f"{os.environ.get('PYTEST_XDIST_WORKER', 'controller')} {path}\\n")
    _save(self, path)


Baseline.save = _logged_save
"""


def test_baseline_catches_a_changed_init_and_passes_an_unchanged_model(
    pytester: pytest.Pytester, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The main branch saves the baseline.
    write_suite(pytester)
    main = run(pytester, "--gradcheck-save-baseline=baseline.json", "--junitxml=main.xml")
    main.assert_outcomes(passed=7, failed=2)
    main.stdout.fnmatch_lines(
        ["*= gradcheck baseline =*", "saved the gradient profiles of 9 check(s) to baseline.json"]
    )
    saved = Baseline.load(pytester.path / "baseline.json")
    assert sorted(saved.checks) == sorted(
        [nodeid for nodeid in NODEIDS if nodeid != "test_models.py::test_no_check"]
        + ["test_models.py::TestTwoChecks::test_two (check 2)"]
    )
    assert list(saved.checks["test_models.py::test_healthy"]) == ["0", "2", "4"]

    # A pull request scales the last layer's init by 20, adds a model and drops one; it runs
    # under xdist: the workers compare, the controller saves the new profiles once.
    pytester.makepyfile(test_models=PULL_REQUEST)
    pytester.makeconftest(SAVE_LOG)
    monkeypatch.setenv("GRADCHECK_TEST_SCALE", "20")
    pr = run(
        pytester,
        *("-n", "2", "--gradcheck-baseline=baseline.json", "--gradcheck-save-baseline=pr.json"),
        "--junitxml=pr.xml",
    )
    pr.assert_outcomes(passed=6, failed=3)
    pr.stdout.fnmatch_lines(
        [
            "*_ test_init_scale _*",
            "E*GradientHealthError: gradient check failed: 2 problem(s) (regression) in 2 of 3 "
            "layers on cpu",
            "E*layer*kind*value*limit*what",
            "E*0 *regression*20 *10 *gradient norm * vs * in the baseline: 20x larger",
            "E*2 *regression*20 *10 *gradient norm * vs * in the baseline: 20x larger",
            "E*hint (regression): the layer gradient norms moved more than 10x from the "
            "baseline baseline.json*",
        ]
    )
    pr.stdout.no_fnmatch_line("E*4 *regression*")  # the scaled layer's own gradient is unchanged
    pr.stdout.fnmatch_lines(
        [
            "*= gradcheck baseline =*",
            "compared 8 check(s) with baseline.json (factor 10): 1 moved, 1 new",
            "moved      test_models.py::test_init_scale: 0 20x larger (*), 2 20x larger (*)",
            "new        test_models.py::test_new_model (not in the baseline: not compared)",
            "not run    1 baseline check(s) (removed, deselected, failed before the check or "
            "run in another shard): test_models.py::test_depth[4]",
            "saved the gradient profiles of 9 check(s) to pr.json",
        ]
    )
    # Written once, by the controller; the workers only read baseline.json.
    assert (pytester.path / "saves.log").read_text() == "controller pr.json\n"
    outcomes = {
        case.get("name"): "failed" if case.find("failure") is not None else "passed"
        for case in ET.parse(pytester.path / "pr.xml").getroot().iter("testcase")
    }
    assert outcomes["test_healthy"] == outcomes["test_two"] == outcomes["test_new_model"]
    assert outcomes["test_new_model"] == "passed"
    assert outcomes["test_init_scale"] == "failed"

    # The CLI prints the same comparison from the two baselines, or from the JUnit file.
    status, out, _ = cli_run(capsys, "diff", "baseline.json", "pr.json")
    assert status == 1
    lines = out.splitlines()
    assert lines[0] == (
        "gradient baseline: baseline.json -> pr.json (factor 10): 1 moved, 7 unchanged, "
        "1 new, 1 removed"
    )
    assert re.fullmatch(
        r"moved      test_models.py::test_init_scale: 0 20x larger \(\S+ vs \S+\), "
        r"2 20x larger \(\S+ vs \S+\)",
        lines[1],
    )
    assert lines[2:5] == [
        "new        test_models.py::test_new_model (not in the baseline: not compared)",
        "removed    test_models.py::test_depth[4] (in the baseline only)",
        "unchanged  7 check(s) within 10x (largest change 1x)",
    ]
    assert cli_run(capsys, "diff", "baseline.json", "pr.xml")[1] == out.replace("pr.json", "pr.xml")
    assert cli_run(capsys, "diff", "baseline.json", "pr.json", "--factor", "25")[0] == 0
    assert cli_run(capsys, "diff", "baseline.json", "main.xml")[:2] == (
        0,
        "gradient baseline: baseline.json -> main.xml (factor 10): 0 moved, 9 unchanged, "
        "0 new, 0 removed\nunchanged  9 check(s) within 10x (largest change 1x)\n",
    )

    # The summary shows the regression like any other problem.
    status, out, _ = cli_run(capsys, "summary", "pr.xml")
    assert status == 1
    row = next(line for line in out.splitlines() if "test_init_scale" in line)
    assert re.split(r"\s{2,}", row)[:4] == [
        "unhealthy",
        "test_models.py::test_init_scale",
        "regression x2",
        "worst: 0",
    ]
    assert "  test_models.py::test_init_scale: moved: 0 20x larger" in out


def test_shard_baselines_merge_into_one(
    pytester: pytest.Pytester, capsys: pytest.CaptureFixture[str]
) -> None:
    write_suite(pytester)
    run(pytester, "--gradcheck-save-baseline=whole.json", "-k", "not vanishing and not nonfinite")
    for group in ("1", "2"):
        run(
            pytester,
            *("--splits", "2", "--group", group, "-k", "not vanishing and not nonfinite"),
            f"--gradcheck-save-baseline=part-{group}.json",
        )
    parts = [Baseline.load(pytester.path / f"part-{g}.json").checks for g in "12"]
    assert parts[0]
    assert parts[1]
    assert not set(parts[0]) & set(parts[1])
    status, out, _ = cli_run(capsys, "merge", "part-1.json", "part-2.json", "-o", "merged.json")
    assert status == 0
    assert out == "merged 2 baseline file(s), 7 checks -> merged.json\n"
    merged = (pytester.path / "merged.json").read_text()
    assert merged == (pytester.path / "whole.json").read_text()


# -- options ----------------------------------------------------------------------------------


def test_baseline_options_fail_early(pytester: pytest.Pytester) -> None:
    write_suite(pytester)
    result = run(pytester, "--gradcheck-baseline=missing.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "ERROR: --gradcheck-baseline: missing.json: no such file",
            "Save a baseline on the main branch with --gradcheck-save-baseline=missing.json, "
            "or drop --gradcheck-baseline.",
        ]
    )
    result = run(pytester, "--gradcheck-save-baseline=b.json", "--gradcheck-baseline-factor=1")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*--gradcheck-baseline-factor: the baseline factor must be a finite number > 1, got '1'"]
    )
    result = run(
        pytester, "--gradcheck-save-baseline=b.json", "-o", "gradcheck_baseline_factor=ten"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "ERROR: the baseline factor must be a finite number > 1, got 'ten' "
            "(from -o gradcheck_baseline_factor=ten)"
        ]
    )


def test_baseline_factor_from_the_ini_file(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_suite(pytester)
    run(pytester, "-k", "init_scale", "--gradcheck-save-baseline=b.json").assert_outcomes(passed=1)
    monkeypatch.setenv("GRADCHECK_TEST_SCALE", "20")
    strict = run(pytester, "-k", "init_scale", "--gradcheck-baseline=b.json")
    strict.assert_outcomes(failed=1)
    loose = run(
        pytester,
        "-k",
        "init_scale",
        "--gradcheck-baseline=b.json",
        "-o",
        "gradcheck_baseline_factor=25",
    )
    loose.assert_outcomes(passed=1)
    loose.stdout.fnmatch_lines(["compared 1 check(s) with b.json (factor 25): 0 moved, 0 new"])


# -- the baseline module ----------------------------------------------------------------------


def test_shifts_and_comparison() -> None:
    old = {"a": 1.0, "b": 2.0, "c": 0.0, "d": None, "gone": 3.0, "z": 0.0}
    new = {"a": 0.05, "b": 2.5, "c": 1e-3, "d": 7.0, "z": 0.0, "added": 1.0}
    comparison = compare_profiles("t", old, new, 10.0)
    assert [(s.layer, s.fold, s.direction) for s in comparison.moved] == [
        ("c", math.inf, "larger"),
        ("a", 20.0, "smaller"),
    ]
    assert comparison.compared == 4  # a, b, c, z; d has no finite baseline
    assert comparison.largest == Shift("c", 0.0, 1e-3)
    assert comparison.new_layers == ("added",)
    assert comparison.removed_layers == ("gone",)
    assert comparison.status() == (
        "moved: c infx larger (0.001 vs 0), a 20x smaller (0.05 vs 1); "
        "new layers: added; removed layers: gone"
    )
    same = compare_profiles("t", old, old, 10.0)
    assert same.ok
    assert same.status() == "unchanged"
    assert same.largest is not None
    assert same.largest.fold == 1.0


finite_norms = st.one_of(
    st.none(), st.floats(min_value=0, max_value=1e30, allow_nan=False, allow_infinity=False)
)
profiles = st.dictionaries(st.text(min_size=1, max_size=12), finite_norms, max_size=8)


@given(st.dictionaries(st.text(max_size=40), profiles, max_size=6))
def test_baseline_file_round_trip(checks: dict[str, dict[str, float | None]]) -> None:
    text = Baseline(checks).dumps()
    assert json.loads(text)["checks"] == checks
    for key, profile in checks.items():
        assert decode_profile(encode_profile(profile), key) == profile


@given(profiles, profiles, st.floats(min_value=1.5, max_value=1e3))
def test_comparison_is_symmetric(
    old: dict[str, float | None], new: dict[str, float | None], factor: float
) -> None:
    forward = compare_profiles("t", old, new, factor)
    backward = compare_profiles("t", new, old, factor)
    assert {s.layer for s in forward.moved} == {s.layer for s in backward.moved}
    assert forward.new_layers == tuple(k for k in new if k not in old)
    assert set(forward.new_layers) == set(backward.removed_layers)
    assert all(s.fold > factor for s in forward.moved)


def test_malformed_baselines_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    for text, expected in [
        ("{\n  nope", f"{path}:2:3: not valid JSON"),
        ("[]", f"{path}: not a gradient baseline"),
        (
            '{"format": "pytest-gradcheck baseline", "version": 9, "checks": {}}',
            f"{path}: baseline version 9 is not supported",
        ),
        (
            '{"format": "pytest-gradcheck baseline", "version": 1, "checks": {"t": {"a": -1}}}',
            f"{path}: t: layer 'a' has norm -1; expected a finite number >= 0 or null",
        ),
    ]:
        path.write_text(text)
        with pytest.raises(BaselineError) as error:
            Baseline.load(path)
        assert str(error.value).startswith(expected)


@pytest.mark.parametrize("kind", ["suite", "policy"])
def test_schema_prints_the_packaged_json_schema(
    capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    """An installed package has no examples/ or repository paths: the command prints the
    schema an editor's YAML language server reads."""
    status, out, err = cli_run(capsys, "schema", kind)
    assert (status, err) == (0, "")
    schema = json.loads(out)
    assert schema["title"] == f"pytest-gradcheck {kind}"
    shipped = Path(cli.__file__).parent / "schema" / f"{kind}.schema.json"
    assert schema == json.loads(shipped.read_text())
    assert cli_run(capsys, "schema", "suites")[0] == 2
