"""Gradient-flow charts: ``pytest_gradcheck.plot`` and the ``--gradcheck-plots`` option."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from fixtures.zoo import case
from pytest_gradcheck import LayerStats, ParamStats, Problem, Report, check_gradients

pytest.importorskip("matplotlib")

from pytest_gradcheck.plot import (
    plot_comparison,
    plot_file_name,
    plot_gradient_flow,
    threshold_band,
)

pytestmark = pytest.mark.usefixtures("inner_environment")  # runs pytest in-process

PNG = b"\x89PNG\r\n\x1a\n"


def _layer(name: str, norm: float, depth: int, numel: int = 16) -> LayerStats:
    param = ParamStats(
        f"{name}.weight", name, (4, 4), "float32", numel, True, norm, norm, 0.0, 0, 0, 1.0
    )
    return LayerStats(name=name, type="Linear", depth=depth, params=(param,))


def _report(norms: list[float], **settings: object) -> Report:
    layers = tuple(_layer(f"layers.{i}", n, i) for i, n in enumerate(norms))
    return Report(layers=layers, problems=(), settings=dict(settings))


# -- the chart ------------------------------------------------------------------------------


def test_chart_of_a_failing_check(tmp_path: Path) -> None:
    zoo = case("rnn_vanishing")  # vanishing layers and a time panel
    report = check_gradients(*zoo.build(), activations=True)
    assert not report.ok
    assert report.activation_steps
    path = plot_gradient_flow(report, tmp_path / "nested" / "rnn.png", title="rnn_vanishing")
    assert path == tmp_path / "nested" / "rnn.png"
    data = path.read_bytes()
    assert data.startswith(PNG)
    assert len(data) > 10_000


def test_chart_of_zero_and_nonfinite_layers(tmp_path: Path) -> None:
    """Values a log axis cannot show (0, NaN, no gradient) are drawn at its edges."""
    nan = ParamStats("b.weight", "b", (2,), "float32", 2, True, float("nan"), 1.0, 0, 2, 0, 1.0)
    unused = ParamStats("c.weight", "c", (2,), "float32", 2, False, 0.0, 0.0, 1.0, 0, 0, 1.0)
    layers = (
        _layer("a", 0.0, 0),
        LayerStats(name="b", type="Linear", depth=1, params=(nan,)),
        LayerStats(name="c", type="Linear", depth=2, params=(unused,)),
        _layer("d", 1.0, 3),
    )
    problems = (
        Problem("dead", "a", None, 0.0, None, "zero"),
        Problem("nonfinite", "b", "b.weight", 2.0, 0.0, "NaN"),
        Problem("unused", "c", "c.weight", 2.0, None, "no grad"),
    )
    report = Report(layers=layers, problems=problems, activation_grads=(("d", 0.5),))
    assert plot_gradient_flow(report, tmp_path / "edges.png").read_bytes().startswith(PNG)


def test_threshold_band() -> None:
    # Relative rule: ratios times the median norm of the third of the layers nearest the loss.
    report = _report([1e-6, 1e-4, 1e-2, 1.0, 2.0, 3.0])
    lower, upper = threshold_band(report)
    assert lower == pytest.approx(1e-4 * 2.5)
    assert upper == pytest.approx(1e3 * 2.5)
    # Absolute bounds win; ceiling_norm caps the relative upper edge.
    assert threshold_band(_report([1.0, 2.0], min_norm=0.5, max_norm=4.0)) == (0.5, 4.0)
    lower, upper = threshold_band(_report([1.0, 2.0, 3.0], ceiling_norm=10.0))
    assert upper == 10.0
    assert lower == pytest.approx(3e-4)
    assert threshold_band(_report([1.0, 2.0, 3.0], relative=False)) == (None, 1e6)


def test_comparison_panels(tmp_path: Path) -> None:
    def stack(scale: float) -> Report:
        layers = [
            _layer(f"{part}.layers.{i}.linear2", scale * (i + 1), depth)
            for depth, (part, i) in enumerate(
                (part, i) for part in ("encoder", "decoder") for i in range(3)
            )
        ]
        return Report(layers=(*layers, _layer("out", 1.0, 6)), problems=())

    path = plot_comparison(
        {"Post-LN": stack(1.0), "Pre-LN": stack(0.5)},
        tmp_path / "cmp.png",
        match=r"(encoder|decoder)\.layers\.\d+\.linear2$",
        title="FFN W2",
    )
    assert path.read_bytes().startswith(PNG)
    with pytest.raises(ValueError, match=r"no layer matches 'attn'.*encoder\.layers\.0"):
        plot_comparison({"a": stack(1.0)}, tmp_path / "none.png", match="attn")


def test_file_names_are_safe_and_unique() -> None:
    a = plot_file_name("tests/test_x.py::test_y[a/b]")
    b = plot_file_name("tests/test_x.py::test_y[a_b]")
    assert a != b
    assert a.startswith("tests_test_x.py_test_y_a_b-")
    assert a.endswith(".png")
    for name in (a, b, plot_file_name("../../etc::x"), plot_file_name("::")):
        assert "/" not in name
        assert "\\" not in name
        assert not name.startswith(".")
    assert plot_file_name("t.py::x", 2).endswith("-2.png")
    assert len(plot_file_name("t.py::" + "x" * 500)) < 120


def test_missing_matplotlib_names_the_extra(tmp_path: Path) -> None:
    """Run in a fresh process: hiding matplotlib in this one would break other libraries
    that look for it (transformers does), for the rest of the session."""
    code = (
        "import sys\n"
        "sys.modules['matplotlib'] = None  # as if it were not installed\n"
        "from pytest_gradcheck import Report\n"
        "from pytest_gradcheck.plot import plot_gradient_flow\n"
        "try:\n"
        f"    plot_gradient_flow(Report(layers=(), problems=()), {str(tmp_path / 'x.png')!r})\n"
        "except ModuleNotFoundError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'pytest-gradcheck[plot]'" in out.stdout
    assert not (tmp_path / "x.png").exists()


def test_plotting_never_imports_torch(tmp_path: Path) -> None:
    """Reporting reads the plain report: drawing one in a fresh process loads no torch."""
    code = textwrap.dedent(
        f"""
        import sys
        from pytest_gradcheck import LayerStats, ParamStats, Report
        from pytest_gradcheck.plot import plot_gradient_flow
        p = ParamStats("a.w", "a", (2,), "float32", 2, True, 0.5, 0.5, 0.0, 0, 0, 1.0)
        report = Report(layers=(LayerStats("a", "Linear", 0, (p,)),), problems=())
        plot_gradient_flow(report, {str(tmp_path / "plain.png")!r})
        assert "torch" not in sys.modules, "torch was imported"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)
    assert (tmp_path / "plain.png").read_bytes().startswith(PNG)


# -- the plugin option ----------------------------------------------------------------------

TESTS = """
import pytest
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


def test_vanishing(gradcheck):
    gradcheck(mlp(nn.Sigmoid, 12), sample())


def test_healthy(gradcheck):
    gradcheck(mlp(nn.Identity, 3), sample())
"""


def _setup(pytester: pytest.Pytester, *ini: str) -> None:
    lines = [
        "[pytest]",
        "addopts = --strict-markers -p no:benchmark -p no:randomly",
        "filterwarnings =",
        "    error",
        "gradcheck_device = cpu",
        *ini,
    ]
    pytester.makeini("\n".join(lines) + "\n")
    pytester.makepyfile(test_models=TESTS)


def _pngs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.png")) if directory.exists() else []


def test_option_draws_failures_only(pytester: pytest.Pytester) -> None:
    _setup(pytester)
    result = pytester.runpytest("--gradcheck-plots=charts", "--junitxml=out.xml")
    result.assert_outcomes(passed=1, failed=1)
    charts = pytester.path / "charts"
    names = _pngs(charts)
    assert names == [plot_file_name("test_models.py::test_vanishing")]
    assert (charts / names[0]).read_bytes().startswith(PNG)
    result.stdout.fnmatch_lines([f"gradcheck: wrote 1 gradient-flow chart(s) to {charts}"])
    props = {
        p.get("name"): p.get("value")
        for case_ in ET.parse(pytester.path / "out.xml").getroot().iter("testcase")
        if case_.get("name") == "test_vanishing"
        for p in case_.iter("property")
    }
    assert props["gradcheck.plot"] == str(charts / names[0])


def test_option_all_under_xdist(pytester: pytest.Pytester) -> None:
    _setup(pytester)
    result = pytester.runpytest_subprocess(
        "-n", "2", "--gradcheck-plots=charts", "--gradcheck-plots-for=all"
    )
    result.assert_outcomes(passed=1, failed=1)
    assert _pngs(pytester.path / "charts") == sorted(
        plot_file_name(f"test_models.py::{name}") for name in ("test_vanishing", "test_healthy")
    )


def test_ini_keys_resolve_relative_to_the_ini_file(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    _setup(pytester, "gradcheck_plots = out/charts", "gradcheck_plots_for = all")
    sub = pytester.mkdir("sub")
    monkeypatch.chdir(sub)  # invoked from elsewhere: the ini file's directory still counts
    result = pytester.runpytest(str(pytester.path))
    result.assert_outcomes(passed=1, failed=1)
    assert len(_pngs(pytester.path / "out" / "charts")) == 2
    assert not (sub / "out").exists()


def test_no_option_no_charts(pytester: pytest.Pytester) -> None:
    _setup(pytester)
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, failed=1)
    assert not list(pytester.path.rglob("*.png"))
    result.stdout.no_fnmatch_line("*gradient-flow chart*")


def test_bad_usage_fails_early(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    _setup(pytester, "gradcheck_plots_for = sometimes")
    result = pytester.runpytest("--gradcheck-plots=charts")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*gradcheck_plots_for='sometimes' from the ini option*"])

    result = pytester.runpytest("--gradcheck-plots-for=never")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*invalid choice: 'never'*"])

    # In a fresh process, as if matplotlib were not installed (hiding it in this process
    # would upset libraries that look for it later in the session).
    pytester.makepyfile(hide_matplotlib="import sys\nsys.modules['matplotlib'] = None\n")
    result = pytester.runpytest_subprocess(
        "-p", "hide_matplotlib", "--gradcheck-plots=charts", "-o", "gradcheck_plots_for=all"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*--gradcheck-plots needs matplotlib*pip install 'pytest-gradcheck?plot?'*"]
    )


def test_attached_to_the_html_report(pytester: pytest.Pytester) -> None:
    pytest.importorskip("pytest_html")
    _setup(pytester)
    result = pytester.runpytest(
        "--gradcheck-plots=charts", "--html=report.html", "--self-contained-html"
    )
    result.assert_outcomes(passed=1, failed=1)
    html = (pytester.path / "report.html").read_text()
    name = plot_file_name("test_models.py::test_vanishing")
    assert f"gradient flow: {name}" in html
    assert html.count("data:image/png;base64,") == 1


# -- the documented figure: Xiong et al. 2020 -----------------------------------------------


def test_postln_gradients_grow_toward_the_output_preln_stay_flat(tmp_path: Path) -> None:
    """The trend of Figure 3 of Xiong et al. 2020 at initialisation, on the example's models."""
    from examples.postln_vs_preln import ffn_norms, main, run

    reports = run(d_model=64, seed=0)
    post, pre = reports["Post-LN"], reports["Pre-LN"]
    for stack in ("encoder", "decoder"):
        post_norms, pre_norms = ffn_norms(post, stack), ffn_norms(pre, stack)
        assert len(post_norms) == len(pre_norms) == 6
        post_trend = post_norms[-1] / post_norms[0]
        pre_trend = pre_norms[-1] / pre_norms[0]
        assert post_trend > 1.0
        assert pre_trend < 1.0
        assert post_trend > 1.5 * pre_trend
        assert post_norms[-1] > 2 * pre_norms[-1]  # the top layers: Post-LN's are far larger
    assert ffn_norms(post, "decoder")[-1] > 3 * ffn_norms(post, "decoder")[0]
    assert max(ffn_norms(pre, "decoder")) < 1.5 * min(ffn_norms(pre, "decoder"))

    out = tmp_path / "figure.png"
    assert main(["--out", str(out), "--d-model", "32"]) == 0
    assert out.read_bytes().startswith(PNG)
