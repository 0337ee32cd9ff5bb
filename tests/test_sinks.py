"""Untrusted text at every output sink, end to end: layer names (and test ids) of arbitrary
text, through the real terminal summary, the failure text, ``gradcheck-report summary``
(plain and ``--github``) and a JUnit file that pytest wrote.

The audit's S1/S2/B6 cases pin single names; here hypothesis draws them, with the characters
that matter (line breaks, ``:``, ``#``, ``[``, ``,``, ``%``, backticks, ``<``, control and
format characters, lone surrogates) drawn often. What must hold for every name:

- no stdout line starts a GitHub workflow command (``::`` after leading white space, or
  ``##[`` anywhere) but the gate's own ``::error`` annotation;
- the step summary's Markdown holds no HTML element but its own (``code``, ``details``,
  ``summary``);
- the JUnit XML stays well-formed, and the ``gradcheck.problems`` list reads back through
  :func:`pytest_gradcheck.properties.read` as the very pairs that were written.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_gradcheck import properties
from pytest_gradcheck import report as cli
from pytest_gradcheck.results import LayerStats, ParamStats, Problem, Report
from pytest_gradcheck.session import summary_lines

pytestmark = pytest.mark.usefixtures("inner_environment")  # runs pytest in-process

DANGEROUS = list(":#[]\n\r\t |`<>&%,;\\*_~!@./= \x00\x1b\x0b\x0c\x85\u2028\u2029\u202e\xa0")
CHARS = st.one_of(st.sampled_from(DANGEROUS), st.characters(exclude_categories=()))
NAME = st.text(CHARS, min_size=1, max_size=40)
NAMES = st.lists(NAME, min_size=1, max_size=3, unique=True)
FORGED = ["x\n::error file=a,line=1::forged", "##[add-mask]y", "::warning::z", "a,dead:b"]
TAGS = {"code", "/code", "details", "/details", "summary", "/summary"}


def commands(text: str) -> list[str]:
    """The lines the GitHub runner reads as workflow commands."""
    return [line for line in text.splitlines() if line.lstrip().startswith("::") or "##[" in line]


def html_tags(markdown: str) -> set[str]:
    return set(re.findall(r"<(/?[A-Za-z][^\s>/]*)", markdown))


def _param(layer: str) -> ParamStats:
    return ParamStats(
        f"{layer}.weight", layer, (4, 4), "float32", 16, True, 0.0, 0.0, 0.0, 0, 0, 1.0
    )


def dead_report(names: list[str]) -> Report:
    """A report whose every layer is dead: the names reach the problems and the worst layer."""
    return Report(
        layers=tuple(
            LayerStats(name, "Linear", d, (_param(name),)) for d, name in enumerate(names)
        ),
        problems=tuple(
            Problem("dead", name, None, 0.0, None, f"{name}: gradient is exactly zero")
            for name in names
        ),
        notes=tuple(f"note on {name}" for name in names),
    )


# -- the formatting functions, over many names ------------------------------------------------


@given(NAMES, st.text(CHARS, max_size=30))
def test_terminal_summary_and_failure_text_forge_no_command(names: list[str], node: str) -> None:
    report = dead_report(names)
    (recorded,) = properties.read(properties.write(report))
    assert recorded.problems == tuple(f"dead:{name}" for name in names)
    healthy = properties.read(properties.write(Report(layers=report.layers, problems=())))
    lines = summary_lines([(node, recorded), (node, *healthy)], verbose=True)
    assert len(lines) == 2
    assert commands("\n".join(lines)) == []
    failure = report.format_failure()
    assert commands(failure) == []
    assert len(failure.splitlines()) == 2 + 2 * len(names)  # a row and a note each: no more


@given(NAMES, st.text(CHARS, min_size=1, max_size=30))
def test_report_text_markdown_and_annotations_forge_nothing(names: list[str], test: str) -> None:
    recorded = properties.read(properties.write(dead_report(names)))[0]
    check = cli.Check(
        nodeid=f"test_m.py::test_m[{test}]",
        index=1,
        path="test_m.py",
        line=3,
        outcome="failed",
        verdict=recorded.verdict,
        problems=recorded.problems,
        worst_layer=recorded.worst_layer,
        min_grad_norm="0",
        max_grad_norm="0",
        baseline=f"moved: {names[0]} 20x larger (20 vs 1)",
        message=dead_report(names).format_failure(),
    )
    results = cli.Results([check], {"failed": 1})
    assert commands(cli.text_summary(results)) == []
    markdown = cli.markdown_summary(results)
    assert html_tags(markdown) <= TAGS
    assert "\r" not in markdown
    (annotation,) = cli.github_annotations(results)
    assert annotation.startswith("::error file=test_m.py,line=3,title=gradcheck%3A dead x")
    assert "\n" not in annotation
    assert "\r" not in annotation


# -- a JUnit file that pytest wrote, read by gradcheck-report ---------------------------------

INNER_TEST = """
import json
from pathlib import Path

import pytest

from pytest_gradcheck import properties
from pytest_gradcheck.results import LayerStats, ParamStats, Problem, Report

DATA = json.loads(Path(__file__).with_name("names.json").read_text(encoding="utf-8"))


def _param(layer):
    return ParamStats(f"{layer}.weight", layer, (4, 4), "float32", 16, True, 0.0, 0.0, 0.0, 0, 0, 1.0)


@pytest.mark.parametrize("v", [0], ids=[DATA["id"]])
def test_m(record_property, v):
    names = DATA["names"]
    report = Report(
        layers=tuple(LayerStats(n, "Linear", d, (_param(n),)) for d, n in enumerate(names)),
        problems=tuple(Problem("dead", n, None, 0.0, None, f"{n}: all zero") for n in names),
    )
    for name, value in properties.write(report):
        record_property(name, value)
    report.raise_if_unhealthy()
"""


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    names=st.one_of(NAMES, st.just(FORGED)),
    # pytest prints a test id as it is in lines of its own (the failure's header, the short
    # summary): a '#' there is pytest's to escape, not the plugin's.
    test_id=st.text(CHARS.filter(lambda char: char != "#"), min_size=1, max_size=20),
)
def test_a_pytest_run_and_its_junit_file_forge_nothing(
    pytester: pytest.Pytester,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    names: list[str],
    test_id: str,
) -> None:
    pytester.makeini(
        "[pytest]\naddopts = --strict-markers -p no:cacheprovider -p no:randomly\n"
        "filterwarnings =\n    error\njunit_family = xunit1\n"
    )
    pytester.path.joinpath("names.json").write_text(
        json.dumps({"names": names, "id": test_id}), encoding="utf-8"
    )
    pytester.path.joinpath("test_names.py").write_text(INNER_TEST, encoding="utf-8")
    result = pytester.runpytest("--junitxml=r.xml")
    result.assert_outcomes(failed=1)
    assert "gradcheck" in "\n".join(result.outlines)  # the summary section ran
    assert commands("\n".join(result.outlines + result.errlines)) == []

    # The file is well-formed, and the problem list reads back exactly.
    root = ET.parse(pytester.path / "r.xml").getroot()
    (case,) = root.iter("testcase")
    pairs = [(prop.get("name", ""), prop.get("value", "")) for prop in case.iter("property")]
    (recorded,) = properties.read(pairs)
    assert recorded.verdict == "unhealthy"
    assert recorded.problems == tuple(f"dead:{name}" for name in names)

    capsys.readouterr()
    assert cli.main(["summary", "r.xml", "--root", str(pytester.path)]) == 1
    out = capsys.readouterr().out
    assert commands(out) == []

    step = Path(pytester.path / "step.md")
    step.unlink(missing_ok=True)
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step))
    assert cli.main(["summary", "r.xml", "--github", "--root", str(pytester.path)]) == 1
    out = capsys.readouterr().out
    (annotation,) = commands(out)  # the gate's own, and nothing else
    assert annotation.startswith("::error file=test_names.py,line=")
    assert html_tags(step.read_text(encoding="utf-8")) <= TAGS
