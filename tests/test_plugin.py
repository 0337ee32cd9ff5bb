"""End-to-end tests of the pytest plugin: pytester runs real test files through pytest.

The main runs are parametrised over no xdist, ``-n 0`` and ``-n 2`` (syrupy's
``plugin_args`` pattern); xdist runs go through a subprocess, the others run in-process.
Every generated test file pins torch to one thread before it builds a model.
"""

from __future__ import annotations

import os
import re
import textwrap
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("inner_environment")  # runs pytest in-process

HEADER = '''
import pytest
import torch
from torch import nn

from pytest_gradcheck import GradientHealthError, gradient_health

torch.set_num_threads(1)


def sigmoid_mlp(depth=12):
    """Vanishing: a deep Sigmoid MLP with PyTorch's default init."""
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(8, 8), nn.Sigmoid()]
    return nn.Sequential(*layers)


def relu_mlp(depth=4):
    """Healthy: a ReLU MLP with He init."""
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        linear = nn.Linear(8, 8)
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers)


class LogOfZero(nn.Module):
    """Non-finite: log(h - h) is -inf, and its gradient NaN/Inf."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.log(h - h))


def sample():
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
'''

MAIN = """
def test_vanishing(gradcheck):
    gradcheck(sigmoid_mlp(), sample())


@gradient_health(max_norm=1e3)
def test_healthy(gradcheck):
    report = gradcheck(relu_mlp(), sample())
    assert report.ok and len(report.layers) == 4
    assert report.settings["max_norm"] == 1e3
    model = relu_mlp(depth=3)
    model[0].bias.requires_grad_(False)
    second = gradcheck(model, sample(), seed=1, loss_fn=lambda out: out.pow(2).mean())
    assert second.settings["seed"] == 1 and len(second.layers) == 3


def test_nonfinite(gradcheck):
    gradcheck(LogOfZero(), sample())


@gradient_health
class TestAutoUnhealthy:
    @pytest.fixture
    def model(self):
        return sigmoid_mlp()

    @pytest.fixture
    def batch(self):
        return sample()

    def test_body_passes(self, model):
        assert isinstance(model, nn.Module)


@gradient_health
class TestAutoHealthy:
    @pytest.fixture
    def model(self):
        return relu_mlp()

    @pytest.fixture
    def batch(self):
        return sample()

    def test_body_passes(self):
        pass


@gradient_health
def test_marked_without_model():
    pass


def test_unrelated():
    pass
"""

PROPERTY_NAMES = {
    "gradcheck.verdict",
    "gradcheck.problems",
    "gradcheck.min_grad_norm",
    "gradcheck.max_grad_norm",
    "gradcheck.worst_layer",
    "gradcheck.device",
    "gradcheck.precision",
    "gradcheck.steps",
    "gradcheck.loss_source",
    "gradcheck.frozen_params",
    "gradcheck.seconds",
}


@pytest.fixture(params=[[], ["-n", "0"], ["-n", "2"]], ids=["plain", "n0", "n2"])
def plugin_args(request: pytest.FixtureRequest) -> list[str]:
    args: list[str] = request.param
    return args


def write_ini(pytester: pytest.Pytester, **keys: str) -> None:
    """The inner runs' tox.ini: strict, warnings as errors, checks on the CPU.

    The device is pinned so that the expected texts hold on a machine with a GPU too (where
    ``auto`` picks CUDA). pytest-benchmark, where installed, warns under xdist: kept out.
    """
    lines = [
        "[pytest]",
        "addopts = --strict-markers -p no:benchmark",
        "filterwarnings =",
        "    error",
        "gradcheck_device = cpu",
    ]
    lines += [f"{key} = {value}" for key, value in keys.items()]
    pytester.makeini("\n".join(lines) + "\n")


def make_tests(pytester: pytest.Pytester, body: str, name: str = "test_inner") -> Path:
    return pytester.makepyfile(**{name: HEADER + textwrap.dedent(body)})


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """xdist runs in a subprocess (its workers are processes anyway), the rest in-process."""
    if "-n" in args and args[args.index("-n") + 1] != "0":
        return pytester.runpytest_subprocess(*args)
    return pytester.runpytest(*args)


def summary_lines(result: pytest.RunResult) -> list[str]:
    """The lines of the ``gradcheck`` terminal section (empty when there is none)."""
    lines = result.outlines
    starts = [i for i, line in enumerate(lines) if re.fullmatch(r"=+ gradcheck =+", line)]
    if not starts:
        return []
    assert len(starts) == 1
    section = []
    for line in lines[starts[0] + 1 :]:
        if line.startswith("="):
            break
        section.append(line)
    return section


def junit_properties(path: Path) -> dict[str, dict[str, str]]:
    """``{classname::name: {property: value}}`` from the JUnit XML pytest wrote."""
    root = ET.parse(path).getroot()
    cases: dict[str, dict[str, str]] = {}
    for case in root.iter("testcase"):
        key = f"{case.get('classname')}::{case.get('name')}"
        assert key not in cases
        cases[key] = {p.get("name", ""): p.get("value", "") for p in case.iter("property")}
    return cases


# -- end to end -----------------------------------------------------------------------------


def test_end_to_end(pytester: pytest.Pytester, plugin_args: list[str]) -> None:
    write_ini(pytester)
    make_tests(pytester, MAIN, "test_e2e")
    result = run(pytester, *plugin_args, "-rP", "-W", "error", "--junitxml=out.xml")

    result.assert_outcomes(failed=4, passed=3)
    # The vanishing model: the compact table and a hint from the model's structure.
    result.stdout.fnmatch_lines(
        [
            "*_ test_vanishing _*",
            ">*gradcheck(sigmoid_mlp(), sample())",
            "E*GradientHealthError: gradient check failed: * (vanishing) in * of 12 layers on cpu",
            "E*layer*kind*value*limit*what",
            "E*0 *vanishing*",
            "E*hint*Sigmoid*",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*_ test_nonfinite _*",
            "E*GradientHealthError: gradient check failed: * (nonfinite) in *",
            "E*<loss>*nonfinite*",
        ]
    )
    # The auto-check of a marked class with model/batch fixtures, and a marked test without.
    result.stdout.fnmatch_lines(
        [
            "*_ TestAutoUnhealthy.test_body_passes _*",
            "gradient check failed: * (vanishing) in * of 12 layers on cpu",
            "*checked the `model` and `batch` fixtures after the test passed*",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*_ test_marked_without_model _*",
            "test_marked_without_model is marked gradient_health but ran no gradient check*"
            "call the gradcheck fixture*provide `model` and `batch` fixtures*",
        ]
    )
    # Plugin and engine frames are hidden; healthy tests print nothing (not even under -rP).
    result.stdout.no_fnmatch_line("*pytest_gradcheck*.py:*")
    result.stdout.no_fnmatch_line("*All traceback entries are hidden*")
    result.stdout.no_fnmatch_line("*_ test_healthy _*")
    result.stdout.no_fnmatch_line("*_ TestAutoHealthy.test_body_passes _*")

    default = "(cpu, fp32, loss: default projection)"
    assert summary_lines(result) == [
        "unhealthy  test_e2e.py::TestAutoUnhealthy::test_body_passes  worst layer: 0  "
        f"problems: vanishing:0,vanishing:2,vanishing:4,vanishing:6 (+1 more)  {default}",
        "unhealthy  test_e2e.py::test_nonfinite  worst layer: a  "
        f"problems: nonfinite:<loss>,nonfinite:a,nonfinite:b  {default}",
        "unhealthy  test_e2e.py::test_vanishing  worst layer: 0  "
        f"problems: vanishing:0,vanishing:2,vanishing:4,vanishing:6 (+1 more)  {default}",
        f"healthy    test_e2e.py::TestAutoHealthy::test_body_passes  smallest gradient: 4  {default}",
        f"healthy    test_e2e.py::test_healthy  smallest gradient: 4  {default}",
        "healthy    test_e2e.py::test_healthy (check 2)  smallest gradient: 4  "
        "(cpu, fp32, loss: loss_fn, 1 frozen)",
    ]

    cases = junit_properties(pytester.path / "out.xml")
    assert cases["test_e2e::test_unrelated"] == {}
    assert cases["test_e2e::test_marked_without_model"] == {}
    vanishing = cases["test_e2e::test_vanishing"]
    assert set(vanishing) == PROPERTY_NAMES
    assert vanishing["gradcheck.verdict"] == "unhealthy"
    assert vanishing["gradcheck.problems"].split(",")[0] == "vanishing:0"
    assert vanishing["gradcheck.worst_layer"] == "0"
    assert vanishing["gradcheck.device"] == "cpu"
    assert 0 < float(vanishing["gradcheck.min_grad_norm"]) < 1e-6
    assert float(vanishing["gradcheck.max_grad_norm"]) > 1e3 * float(
        vanishing["gradcheck.min_grad_norm"]
    )
    assert float(vanishing["gradcheck.seconds"]) >= 0
    assert (vanishing["gradcheck.precision"], vanishing["gradcheck.steps"]) == ("fp32", "1")
    assert vanishing["gradcheck.loss_source"] == "default projection"
    assert vanishing["gradcheck.frozen_params"] == "0"
    healthy = cases["test_e2e::test_healthy"]
    assert set(healthy) == PROPERTY_NAMES | {f"{name}.2" for name in PROPERTY_NAMES}
    assert healthy["gradcheck.verdict"] == healthy["gradcheck.verdict.2"] == "healthy"
    assert healthy["gradcheck.problems"] == ""
    assert healthy["gradcheck.loss_source.2"] == "loss_fn"
    assert healthy["gradcheck.frozen_params.2"] == "1"
    assert (
        0 < float(healthy["gradcheck.min_grad_norm"]) <= float(healthy["gradcheck.max_grad_norm"])
    )
    nonfinite = cases["test_e2e::test_nonfinite"]
    assert nonfinite["gradcheck.verdict"] == "unhealthy"
    assert nonfinite["gradcheck.worst_layer"] == "a"
    assert "nonfinite:<loss>" in nonfinite["gradcheck.problems"].split(",")
    auto = cases["test_e2e.TestAutoUnhealthy::test_body_passes"]
    assert auto["gradcheck.problems"] == vanishing["gradcheck.problems"]
    assert cases["test_e2e.TestAutoHealthy::test_body_passes"]["gradcheck.verdict"] == "healthy"


def test_xdist_matches_no_xdist(pytester: pytest.Pytester) -> None:
    write_ini(pytester)
    make_tests(pytester, MAIN, "test_e2e")
    serial = run(pytester, "-n", "0", "--junitxml=serial.xml")
    parallel = run(pytester, "-n", "2", "--junitxml=parallel.xml")

    assert serial.parseoutcomes() == parallel.parseoutcomes() == {"failed": 4, "passed": 3}
    assert len(summary_lines(serial)) == 6
    assert summary_lines(parallel) == summary_lines(serial)

    def without_seconds(path: Path) -> dict[str, dict[str, str]]:
        return {
            case: {k: v for k, v in props.items() if not k.startswith("gradcheck.seconds")}
            for case, props in junit_properties(path).items()
        }

    expected = without_seconds(pytester.path / "serial.xml")
    # checks x properties, less gradcheck.seconds
    assert sum(len(props) for props in expected.values()) == 6 * (len(PROPERTY_NAMES) - 1)
    assert without_seconds(pytester.path / "parallel.xml") == expected


@pytest.mark.parametrize("family", ["xunit1", "xunit2"])
def test_junit_family(pytester: pytest.Pytester, family: str) -> None:
    write_ini(pytester)
    make_tests(
        pytester,
        """
        def test_call(gradcheck):
            gradcheck(relu_mlp(), sample())


        @gradient_health(min_norm=1e-6)
        class TestAuto:
            @pytest.fixture
            def model(self):
                return relu_mlp()

            @pytest.fixture
            def batch(self):
                return sample()

            def test_auto(self):
                pass
        """,
    )
    result = run(pytester, "-W", "error", "-o", f"junit_family={family}", "--junitxml=out.xml")
    result.assert_outcomes(passed=2)
    result.stdout.no_fnmatch_line("*[Ww]arning*")
    cases = junit_properties(pytester.path / "out.xml")
    for case in ("test_inner::test_call", "test_inner.TestAuto::test_auto"):
        assert set(cases[case]) == PROPERTY_NAMES
        assert cases[case]["gradcheck.verdict"] == "healthy"
        assert cases[case]["gradcheck.device"] == "cpu"


# -- settings: precedence and validation ----------------------------------------------------

PRECEDENCE = """
def test_run_level(gradcheck):
    report = gradcheck(relu_mlp(), sample())
    print("run-level max_norm:", report.settings["max_norm"])


@gradient_health(max_norm=1e3)
def test_marker(gradcheck):
    report = gradcheck(relu_mlp(), sample())
    assert report.settings["max_norm"] == 1e3


@gradient_health(max_norm=1e3)
def test_call_beats_marker(gradcheck):
    gradcheck(relu_mlp(), sample(), max_norm=2e-3)


@gradient_health(max_norm=1e-3, seed=5)
class TestClassMarker:
    @gradient_health(max_norm=1e3)
    def test_function_marker_wins(self, gradcheck):
        report = gradcheck(relu_mlp(), sample())
        assert report.settings["max_norm"] == 1e3
        assert report.settings["seed"] == 5
"""


def test_ini_overrides_defaults_and_marker_overrides_ini(pytester: pytest.Pytester) -> None:
    make_tests(pytester, PRECEDENCE)

    write_ini(pytester)  # defaults: no absolute ceiling, the healthy model passes
    result = run(pytester, "-s")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*run-level max_norm: None*"])
    result.stdout.fnmatch_lines(["*_ test_call_beats_marker _*", "E*exploding*0.002*"])

    write_ini(pytester, gradcheck_max_norm="1e-3")  # ini over defaults
    result = run(pytester)
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*_ test_run_level _*",
            "E*gradient check failed: * (exploding) in 4 of 4 layers on cpu",
            "E*exploding*0.001*max_norm 0.001",
        ]
    )
    result.stdout.fnmatch_lines(["*_ test_call_beats_marker _*", "E*exploding*0.002*"])

    result = run(pytester, "--gradcheck-max-norm", "5e-3")  # command line over ini
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(["*_ test_run_level _*", "E*exploding*max_norm 0.005"])
    result.stdout.no_fnmatch_line("*max_norm 0.001*")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gradcheck-max-norm", "-1"], "*argument --gradcheck-max-norm: max_norm must be *-1*"),
        (["--gradcheck-mode", "training"], "*argument --gradcheck-mode: mode must be one of*"),
        (["--gradcheck-relative", "maybe"], "*argument --gradcheck-relative: relative must be*"),
        (["--gradcheck-seed", "1.5"], "*argument --gradcheck-seed: seed must be an integer*"),
        (["--gradcheck-device", "gpu"], "*argument --gradcheck-device: device must be *'gpu'*"),
        (["--gradcheck-threads", "0"], "*argument --gradcheck-threads: threads must be auto, *"),
    ],
)
def test_bad_command_line_value(pytester: pytest.Pytester, args: list[str], message: str) -> None:
    write_ini(pytester)
    make_tests(pytester, "def test_x():\n    pass\n")
    result = run(pytester, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


@pytest.mark.parametrize(
    ("where", "message"),
    [
        (
            "ini",
            "ERROR: max_norm='-1' from the ini option gradcheck_max_norm in tox.ini: "
            "max_norm must be a positive number*",
        ),
        (
            "-o",
            "ERROR: max_norm='-1' from -o gradcheck_max_norm=-1: max_norm must be a positive*",
        ),
        (
            "pyproject",
            "ERROR: max_norm='-1' from the ini option gradcheck_max_norm in pyproject.toml: *",
        ),
    ],
)
def test_bad_ini_value(pytester: pytest.Pytester, where: str, message: str) -> None:
    make_tests(pytester, "def test_x():\n    pass\n")
    args: list[str] = []
    if where == "ini":
        write_ini(pytester, gradcheck_max_norm="-1")
    elif where == "-o":
        write_ini(pytester)
        args = ["-o", "gradcheck_max_norm=-1"]
    else:
        pytester.makepyprojecttoml('[tool.pytest.ini_options]\ngradcheck_max_norm = "-1"\n')
    result = run(pytester, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_bad_threads_ini_value(pytester: pytest.Pytester) -> None:
    write_ini(pytester, gradcheck_threads="many")
    make_tests(pytester, "def test_x():\n    pass\n")
    result = run(pytester)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["ERROR: gradcheck_threads='many' from the ini option gradcheck_threads in tox.ini: *"]
    )


def test_bad_combinations(pytester: pytest.Pytester) -> None:
    make_tests(pytester, "def test_x():\n    pass\n")
    write_ini(pytester, gradcheck_min_norm="5")
    result = run(pytester, "--gradcheck-max-norm", "1")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "ERROR: min_norm=5 (from the ini option gradcheck_min_norm in tox.ini) must be "
            "below max_norm=1 (from --gradcheck-max-norm)",
            "Fix or remove that value*",
        ]
    )

    write_ini(pytester)
    result = run(pytester, "--gradcheck-relative", "off", "--gradcheck-exploding-ratio", "10")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "ERROR: --gradcheck-exploding-ratio has no effect with --gradcheck-relative off*"
            "drop --gradcheck-exploding-ratio or turn the rule on"
        ]
    )
    # Either alone is fine.
    result = run(pytester, "--gradcheck-relative", "off")
    result.assert_outcomes(passed=1)


def test_marker_misuse_fails_at_setup(pytester: pytest.Pytester) -> None:
    write_ini(pytester)
    make_tests(
        pytester,
        """
        @gradient_health(max_nrom=1e3)
        def test_typo(gradcheck):
            raise AssertionError("the body must not run")


        @gradient_health(1e3)
        def test_positional(gradcheck):
            raise AssertionError("the body must not run")


        @gradient_health(max_norm=-1)
        def test_bad_value(gradcheck):
            raise AssertionError("the body must not run")


        @gradient_health(min_norm=1.0, max_norm=0.5)
        def test_inconsistent(gradcheck):
            raise AssertionError("the body must not run")
        """,
    )
    result = run(pytester)
    result.assert_outcomes(errors=4)
    result.stdout.no_fnmatch_line("*the body must not run*")
    valid = "min_norm, max_norm, device, seed, mode, loss_fn, relative, vanishing_ratio, *"
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_typo*",
            "unknown gradcheck setting 'max_nrom' from the gradient_health marker on "
            f"test_typo; valid settings: {valid}",
            "*ERROR at setup of test_positional*",
            "the gradient_health marker on test_positional got positional arguments (1000.0,);"
            f" it takes keywords only, e.g. *; valid keywords: {valid}",
            "*ERROR at setup of test_bad_value*",
            "max_norm=-1 from the gradient_health marker on test_bad_value: *positive*",
            "*ERROR at setup of test_inconsistent*",
            "min_norm=1 (from the gradient_health marker on test_inconsistent) must be below*",
        ]
    )


def test_auto_check_explains_what_is_missing(pytester: pytest.Pytester) -> None:
    write_ini(pytester)
    make_tests(
        pytester,
        """
        @gradient_health
        class TestNotAModule:
            @pytest.fixture
            def model(self):
                return "not a module"

            @pytest.fixture
            def batch(self):
                return sample()

            def test_it(self):
                pass


        @gradient_health
        class TestNoBatch:
            @pytest.fixture
            def model(self):
                return relu_mlp()

            def test_it(self):
                pass


        @gradient_health
        class TestBodyFails:
            @pytest.fixture
            def model(self):
                raise AssertionError("the model fixture must not be built")

            def test_it(self):
                assert 1 == 2
        """,
    )
    result = run(pytester)
    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines(
        [
            "*_ TestNotAModule.test_it _*",
            "the gradient check of the `model` and `batch` fixtures could not run: "
            "model must be a torch.nn.Module, got str*",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*_ TestNoBatch.test_it _*",
            "test_it is marked gradient_health but ran no gradient check, and no 'batch' "
            "fixture is available.*",
        ]
    )
    result.stdout.fnmatch_lines(["*_ TestBodyFails.test_it _*", "E*assert 1 == 2"])
    result.stdout.no_fnmatch_line("*the model fixture must not be built*")
    assert summary_lines(result) == []


# -- threads --------------------------------------------------------------------------------


@pytest.fixture
def _restore_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("_restore_threads")
@pytest.mark.parametrize(
    ("args", "workers", "expected"),
    [
        # an integer: every check runs with it, the test's own setting is restored after
        (["--gradcheck-threads", "3"], None, ([3, 3], 1)),
        # auto under an xdist worker: cpu_count // workers, set once at the first check
        ([], 1, ([os.cpu_count() or 1, 1], os.cpu_count() or 1)),
        # auto outside xdist, and off: torch is left alone
        ([], None, ([1, 1], 1)),
        (["-o", "gradcheck_threads=off"], 1, ([1, 1], 1)),
    ],
    ids=["integer", "auto-xdist", "auto-plain", "off"],
)
def test_threads(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    workers: int | None,
    expected: tuple[list[int], int],
) -> None:
    if workers is not None:
        monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", str(workers))
    write_ini(pytester)
    make_tests(
        pytester,
        f"""
        def test_threads(gradcheck):
            seen = []

            def loss_fn(output):
                seen.append(torch.get_num_threads())  # the thread count during the check
                return output.sum()

            torch.set_num_threads(1)
            gradcheck(relu_mlp(), sample(), loss_fn=loss_fn)
            after_first = torch.get_num_threads()
            torch.set_num_threads(1)
            gradcheck(relu_mlp(), sample(), loss_fn=loss_fn)
            assert (seen, after_first) == {expected!r}
        """,
    )
    run(pytester, *args).assert_outcomes(passed=1)


# -- summary, markers, enabling -------------------------------------------------------------


def test_summary_collapses_many_healthy_checks(pytester: pytest.Pytester) -> None:
    write_ini(pytester)
    make_tests(
        pytester,
        """
        @pytest.mark.parametrize("i", range(31))
        def test_many(gradcheck, i):
            gradcheck(nn.Linear(8, 8), sample())


        def test_bad(gradcheck):
            gradcheck(LogOfZero(), sample(), diagnose=False)
        """,
    )
    result = run(pytester)
    result.assert_outcomes(passed=31, failed=1)
    lines = summary_lines(result)
    assert lines == [
        "unhealthy  test_inner.py::test_bad  worst layer: a  "
        "problems: nonfinite:<loss>,nonfinite:a,nonfinite:b  (cpu, fp32, loss: default projection)",
        "healthy    31 checks (-v lists them)",
    ]
    verbose = summary_lines(run(pytester, "-v"))
    assert len(verbose) == 32
    assert verbose[0] == lines[0]
    assert verbose[1:] == [
        f"healthy    test_inner.py::test_many[{i}]  smallest gradient: <root>  "
        "(cpu, fp32, loss: default projection)"
        for i in sorted(range(31), key=lambda i: f"test_many[{i}]")
    ]


def test_check_in_a_fixture_is_reported(pytester: pytest.Pytester) -> None:
    write_ini(pytester)
    make_tests(
        pytester,
        """
        @pytest.fixture
        def checked_model(gradcheck):
            model = sigmoid_mlp()
            gradcheck(model, sample())
            return model


        def test_uses_it(checked_model):
            pass
        """,
    )
    result = run(pytester, "--junitxml=out.xml")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*ERROR at setup of test_uses_it*", "E*(vanishing)*"])
    assert summary_lines(result) == [
        "unhealthy  test_inner.py::test_uses_it  worst layer: 0  "
        "problems: vanishing:0,vanishing:2,vanishing:4,vanishing:6 (+1 more)  "
        "(cpu, fp32, loss: default projection)"
    ]
    case = junit_properties(pytester.path / "out.xml")["test_inner::test_uses_it"]
    assert case["gradcheck.verdict"] == "unhealthy"


def test_no_summary_without_checks(pytester: pytest.Pytester) -> None:
    write_ini(pytester)
    make_tests(pytester, "def test_x():\n    pass\n")
    result = run(pytester)
    result.assert_outcomes(passed=1)
    assert summary_lines(result) == []


def test_strict_markers_and_marker_help(pytester: pytest.Pytester) -> None:
    write_ini(pytester)
    make_tests(
        pytester,
        """
        @pytest.mark.gradient_health(max_norm=1e3)
        def test_marked(gradcheck):
            gradcheck(relu_mlp(), sample())
        """,
    )
    run(pytester, "--strict-markers", "--strict-config").assert_outcomes(passed=1)
    result = run(pytester, "--markers")
    result.stdout.fnmatch_lines(
        [
            "@pytest.mark.gradient_health(min_norm=None, max_norm=None, device=None, seed=0, "
            "mode='train', loss_fn=None, *): check the gradients *"
        ]
    )


def test_disabled_with_no_gradcheck(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\naddopts = --strict-markers\n")  # no gradcheck_* keys
    make_tests(
        pytester,
        """
        def test_uses_fixture(gradcheck):
            pass
        """,
    )
    result = run(pytester, "-p", "no:gradcheck")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'gradcheck' not found*"])
    result = run(pytester, "-p", "no:gradcheck", "--help")
    result.stdout.no_fnmatch_line("*--gradcheck-*")
    pytester.makepyfile(
        test_marked="from pytest_gradcheck import gradient_health\n\n\n"
        "@gradient_health\ndef test_marked():\n    pass\n"
    )
    # A subprocess: in-process runs share pytest.mark, which caches registered markers.
    result = pytester.runpytest_subprocess("-p", "no:gradcheck", "test_marked.py")
    result.stdout.fnmatch_lines(["*'gradient_health' not found in `markers` configuration*"])


def test_help_lists_options(pytester: pytest.Pytester) -> None:
    result = run(pytester, "--help")
    result.stdout.fnmatch_lines(
        [
            "gradient health checks (pytest-gradcheck):",
            "*--gradcheck-min-norm=MIN_NORM*",
            "*--gradcheck-max-norm=MAX_NORM*",
            "*--gradcheck-device=DEVICE*",
            "*--gradcheck-seed=SEED*",
            "*--gradcheck-mode=MODE*",
            "*--gradcheck-relative=on|off*",
        ]
    )
    result.stdout.fnmatch_lines(["*--gradcheck-threads=auto|off|N*"])
    result.stdout.fnmatch_lines(["*gradcheck_max_norm (string):*"])
    result.stdout.no_fnmatch_line("*--gradcheck-loss-fn*")
