"""The ``timeout`` setting: one check's time limit, looked at between its passes.

Unit tests call ``check_gradients`` on models whose forward sleeps: a check past its limit
stops between passes, fails with :class:`GradcheckTimeout` naming the limit, its origin, the
time taken and what was running, and gives the model back exactly as it was. The pytester
tests set the limit from the ini file and from the marker, with and without pytest-xdist, and
read the JUnit XML pytest wrote. A forward that never returns is pytest-timeout's to stop:
that still works, with and without pytest-xdist (audit cases C04 and C07).
"""

from __future__ import annotations

import re
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from torch import nn

from pytest_gradcheck import GradcheckError, GradcheckTimeout, check_gradients
from pytest_gradcheck.settings import resolve

pytestmark = pytest.mark.usefixtures("inner_environment")  # runs pytest in-process


class Slow(nn.Module):
    """A small model whose forward sleeps: state of every kind a check must give back (a
    train-mode BatchNorm's buffers, an eval-mode child, an existing ``.grad``)."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.delay = delay
        self.a = nn.Linear(4, 8)
        self.norm = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.1).eval()
        self.b = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay)
        return self.b(self.drop(torch.relu(self.norm(self.a(x)))))


class SlowSearch(nn.Module):
    """NaN gradients (log of zero); every forward after the first sleeps, so the time goes
    to the NaN/Inf origin search that re-runs the pass."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.delay = delay
        self.calls = 0
        self.a = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > 1:
            time.sleep(self.delay)
        h = self.a(x)
        return torch.log(h - h)


def state(model: nn.Module) -> dict[str, object]:
    """Everything a check promises to give back, as comparable values."""
    return {
        **{name: value.detach().clone() for name, value in model.state_dict().items()},
        "grads": [id(p.grad) if p.grad is not None else None for p in model.parameters()],
        "versions": [p._version for p in model.parameters()],
        "flags": [m.training for m in model.modules()],
        "rng": torch.get_rng_state(),
    }


def assert_same(before: dict[str, object], after: dict[str, object]) -> None:
    assert before.keys() == after.keys()
    for name, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[name]), name  # type: ignore[arg-type]
        else:
            assert value == after[name], name


@pytest.fixture(scope="module", autouse=True)
def _warm() -> None:
    """The first optimizer step of a process imports and sets up torch.optim (about a second
    on a busy machine): done once here, so the limits below time the steps alone."""
    check_gradients(nn.Linear(4, 2), torch.randn(3, 4), steps=2, device="cpu")


# -- the setting ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"), [(None, None), ("off", None), ("none", None), ("2.5", 2.5), (30, 30.0)]
)
def test_timeout_is_off_or_seconds(raw: object, expected: float | None) -> None:
    assert resolve([("the test", {"timeout": raw})]).timeout == expected
    assert resolve([]).timeout is None  # off by default


@pytest.mark.parametrize("raw", [0, -1, "abc", float("inf"), float("nan"), True, "1e999"])
def test_a_bad_timeout_names_the_value_and_where_it_came_from(raw: object) -> None:
    with pytest.raises(GradcheckError, match=r"^timeout=.* from the marker on test_x: timeout"):
        resolve([("the marker on test_x", {"timeout": raw})])


# -- the engine -------------------------------------------------------------------------------


def test_steps_stop_at_the_timeout_and_the_model_is_given_back() -> None:
    model = Slow(delay=0.05)
    model.a.weight.grad = torch.ones_like(model.a.weight)
    batch = torch.randn(8, 4)
    before = state(model)
    started = time.monotonic()
    with pytest.raises(GradcheckTimeout) as caught:
        check_gradients(model, batch, steps=1000, timeout=0.5, device="cpu")
    assert time.monotonic() - started < 30  # 1000 steps take at least 50 s
    message = str(caught.value)
    assert message.startswith(
        "the check ran past timeout=0.5 s (from check_gradients() arguments): "
    )
    step = re.search(r" s had passed at the end of step (\d+) of 1000; at this pace", message)
    assert step is not None, message
    assert 1 <= int(step.group(1)) < 1000, message
    assert "gave the model back as it was" in message
    assert re.search(r"Raise timeout \(e\.g\. timeout=\d+\)", message), message
    assert "pytest-timeout (--timeout)" in message
    assert_same(before, state(model))
    assert isinstance(caught.value, GradcheckError)  # a timeout is one of the check's errors


def test_a_check_within_its_timeout_passes() -> None:
    report = check_gradients(Slow(delay=0.0), torch.randn(8, 4), steps=3, timeout=60)
    assert report.ok
    assert report.settings["timeout"] == 60


def test_a_one_pass_check_past_its_timeout_names_the_pass() -> None:
    model, batch = Slow(delay=0.3), torch.randn(8, 4)
    before = state(model)
    with pytest.raises(GradcheckTimeout, match=r"at the end of the forward/backward pass, so"):
        check_gradients(model, batch, timeout=0.1, device="cpu")
    assert_same(before, state(model))


def test_the_nan_origin_search_counts_and_the_findings_are_named() -> None:
    model, batch = SlowSearch(delay=1.5), torch.randn(3, 4)
    before = state(model)
    with pytest.raises(GradcheckTimeout) as caught:
        check_gradients(model, batch, timeout=1, device="cpu")
    message = str(caught.value)
    assert "at the end of the NaN/Inf origin search, so it stopped there" in message
    assert re.search(r"It had found \d+ problem\(s\) by then \(nonfinite\)\.", message)
    assert model.calls == 2  # the pass, then the search
    assert_same(before, state(model))


def test_without_a_timeout_the_search_runs_to_its_end() -> None:
    report = check_gradients(SlowSearch(delay=0.05), torch.randn(3, 4), device="cpu")
    assert not report.ok
    assert report.diagnosis


# -- pytest: ini key, marker, command line; plain and -n 2 ------------------------------------

TESTS = """
import time

import pytest
import torch
from torch import nn

torch.set_num_threads(1)


class Slow(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        time.sleep(0.05)
        return self.fc(x)


@pytest.mark.gradient_health(steps=1000)
def test_ini_limit(gradcheck):
    gradcheck(Slow(), torch.randn(8, 4))


@pytest.mark.gradient_health(steps=1000, timeout=0.5)
def test_marker_limit(gradcheck):
    gradcheck(Slow(), torch.randn(8, 4))


@pytest.mark.gradient_health  # one pass: well within the limit, even as a worker's first check
def test_within_the_limit(gradcheck):
    gradcheck(nn.Linear(4, 2), torch.randn(8, 4))
"""


def write_ini(pytester: pytest.Pytester, *lines: str) -> None:
    pytester.makeini(
        "\n".join(
            [
                "[pytest]",
                "addopts = --strict-markers -p no:benchmark -p no:randomly -p no:cacheprovider",
                "filterwarnings =",
                "    error",
                "gradcheck_device = cpu",
                *lines,
            ]
        )
        + "\n"
    )


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """xdist runs in a subprocess (its workers are processes anyway), the rest in-process."""
    if "-n" in args:
        return pytester.runpytest_subprocess(*args)
    return pytester.runpytest(*args)


def failures(path: Path) -> dict[str, str]:
    """``{test name: failure message}`` from the JUnit XML pytest wrote (passed: ``""``)."""
    found: dict[str, str] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        failure = case.find("failure")
        found[case.get("name", "")] = "" if failure is None else failure.get("message", "")
    return found


@pytest.mark.parametrize("plugin_args", [[], ["-n", "2"]], ids=["plain", "n2"])
def test_the_ini_key_and_the_marker_fail_the_test_with_the_limit(
    pytester: pytest.Pytester, plugin_args: list[str]
) -> None:
    write_ini(pytester, "gradcheck_timeout = 2")
    pytester.makepyfile(test_slow=TESTS)
    result = run(pytester, *plugin_args, "--junitxml=out.xml")
    result.assert_outcomes(passed=1, failed=2)
    for line in (  # in either order: -n 2 reports the failures as the workers finish
        "*GradcheckTimeout: the check ran past timeout=2 s (from the ini option "
        "gradcheck_timeout in tox.ini): * s had passed at the end of step * of 1000*",
        "*GradcheckTimeout: the check ran past timeout=0.5 s (from the gradient_health "
        "marker on test_marker_limit): *",
    ):
        result.stdout.fnmatch_lines([line])
    cases = failures(pytester.path / "out.xml")
    assert cases["test_within_the_limit"] == ""
    for name, limit in (("test_ini_limit", "2"), ("test_marker_limit", "0.5")):
        assert cases[name].startswith(
            f"pytest_gradcheck.results.GradcheckTimeout: the check ran past timeout={limit} s"
        ), cases[name]
        assert "of 1000" in cases[name]
        assert "Raise timeout" in cases[name]


def test_the_command_line_option_is_validated_and_applied(pytester: pytest.Pytester) -> None:
    write_ini(pytester)
    pytester.makepyfile(test_slow=TESTS)
    bad = pytester.runpytest("--gradcheck-timeout=0")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(
        ["*argument --gradcheck-timeout: timeout must be a positive number or None, got '0'"]
    )
    result = pytester.runpytest("--gradcheck-timeout=1", "-k", "ini_limit")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*ran past timeout=1 s (from --gradcheck-timeout)*"])


# -- pytest-timeout: a forward that never returns ---------------------------------------------

HANGS = """
import time

import pytest
import torch
from torch import nn

torch.set_num_threads(1)
torch.manual_seed(0)


class Hangs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.hang = True

    def forward(self, x):
        if self.hang:
            time.sleep(3600)
        return self.fc(x)


MODEL = Hangs().eval()
GRAD = torch.ones(2, 4)
MODEL.fc.weight.grad = GRAD


@pytest.mark.gradient_health(timeout=1)
def test_hangs(gradcheck):
    gradcheck(MODEL, torch.randn(3, 4))


def test_given_back():
    assert not MODEL.training and MODEL.fc.weight.grad is GRAD and MODEL.fc.bias.grad is None
"""


@pytest.mark.parametrize("plugin_args", [[], ["-n", "2"]], ids=["plain", "n2"])
def test_pytest_timeout_stops_a_forward_that_never_returns(
    pytester: pytest.Pytester, plugin_args: list[str]
) -> None:
    pytest.importorskip("pytest_timeout", reason="pytest-timeout stops a hung forward")
    write_ini(pytester)
    pytester.makepyfile(test_hangs=HANGS)
    # --dist loadfile: both tests on one worker, so the second sees what the first left
    dist = ["--dist", "loadfile"] if plugin_args else []
    result = run(
        pytester,
        *plugin_args,
        *dist,
        "--timeout=3",
        "--timeout-method=signal",
        "--junitxml=out.xml",
    )
    result.assert_outcomes(passed=1, failed=1)
    cases = failures(pytester.path / "out.xml")
    assert "Timeout (>3.0s) from pytest-timeout" in cases["test_hangs"], cases
    assert cases["test_given_back"] == ""


def test_the_readme_documents_the_setting_and_pytest_timeout() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    assert "| `timeout` | `--gradcheck-timeout` | `gradcheck_timeout` | off |" in readme
    text = " ".join(readme.split())
    assert "a forward that never returns" in text
    assert "pytest-timeout" in text
