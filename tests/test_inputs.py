"""Arbitrary and mutated input files: YAML suites and policies, JUnit XML reports and
baseline JSON files, drawn by hypothesis.

The audit's Y and R cases pin single files; here the documents are generated (mappings with
known and random keys, values of every YAML type, text with control characters, ``::``,
line breaks, backticks and ``<``, deep nesting, aliases) and their text mutated (characters
inserted and cut, lines doubled, brackets opened). What must hold for every input:

- the suite reader (:func:`pytest_gradcheck.suite.load_suite`) and the policy reader
  (:func:`pytest_gradcheck.policy.load_policy`) load it or raise
  :class:`~pytest_gradcheck.policy.ConfigError` (a suite's :class:`SuiteError` is one) whose
  message starts with the file's path and starts no workflow command on any line; never a
  raw ``KeyError``, ``TypeError``, ``RecursionError``, ``OverflowError`` or YAML error;
- ``gradcheck-report summary`` (plain and ``--github``), ``merge`` and ``diff`` exit 0, 1 or
  2 with no traceback; no stdout or stderr line starts a workflow command but the gate's own
  ``::error`` annotations, whose data holds no line break; the step summary's Markdown holds
  no HTML element but the gate's own; a merged JUnit file is well-formed XML.
"""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pytest_gradcheck import report as cli
from pytest_gradcheck.baseline import FORMAT
from pytest_gradcheck.conventions import BUILTIN_CONVENTIONS
from pytest_gradcheck.policy import POLICY_KEYS, RULE_KEYS, RULE_SETTINGS, ConfigError, load_policy
from pytest_gradcheck.settings import SETTING_NAMES
from pytest_gradcheck.suite import ENTRY_KEYS, SUITE_KEYS, load_suite

EXAMPLES = settings(
    max_examples=int(os.environ.get("GC_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# -- text and values --------------------------------------------------------------------------

DANGEROUS = list(":#[]{}\n\r\t |`<>&%,;\\*!@'\"-?~ \x00\x1b\x0b\x0c\x85\u2028\u2029\u202e\xa0²")
CHARS = st.one_of(st.sampled_from(DANGEROUS), st.characters(exclude_categories=("Cs",)))
TEXT = st.text(CHARS, max_size=24)
SPECIAL = [
    "",
    "off",
    "none",
    "::error file=a,line=1::forged",
    "x\n::warning::y",
    "##[add-mask]z",
    "`<img src=x>`",
    "<b>bold</b>",
    "re:(a+)+$",
    "re:([",
    "*",
    "1e999",
    "-0",
    "0x10",
    "2001-13-45",
    "gc_models:mlp",
    "gc_models:nothing",
    "os:system",
    "gc_models",
    "../../outside.yaml",
    "policy.yaml",
]
SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([10**400, -(10**400), 2**63, 2**64, -1, 0]),
    st.floats(allow_nan=True, allow_infinity=True),
    TEXT,
    st.sampled_from(SPECIAL),
)
KNOWN_KEYS = sorted(
    {
        *SUITE_KEYS,
        *ENTRY_KEYS,
        *POLICY_KEYS,
        *RULE_KEYS,
        *SETTING_NAMES,
        *(c.name for c in BUILTIN_CONVENTIONS),
        *("shape", "dtype", "vocab", "fill", "low", "high", "file", "same_as", "xfail"),
        *("max", "max_depth", "factor", "reason", "strict", "skip"),
    }
)
KEY = st.one_of(st.sampled_from(KNOWN_KEYS), TEXT, st.integers(-3, 3), st.booleans())
VALUE = st.recursive(
    SCALAR,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEY, inner, max_size=4)),
    max_leaves=25,
)
SHAPE = st.lists(st.integers(-2, 6), max_size=4) | VALUE
BATCH = st.one_of(
    st.fixed_dictionaries({"shape": SHAPE}, optional={"dtype": VALUE, "vocab": VALUE}),
    st.lists(st.fixed_dictionaries({"shape": SHAPE}), max_size=3),
    st.dictionaries(TEXT, st.fixed_dictionaries({"shape": SHAPE}), max_size=2),
    VALUE,
)
SETTING_VALUES = st.dictionaries(st.sampled_from(SETTING_NAMES), SCALAR, max_size=4)
ENTRY = st.one_of(
    st.builds(
        lambda base, more: {**base, **more},
        st.fixed_dictionaries(
            {"model": st.sampled_from(["gc_models:mlp", "gc_models:nothing"]) | SCALAR},
            optional={"batch": BATCH, "args": VALUE, "loss": SCALAR, "marks": VALUE},
        ),
        SETTING_VALUES,
    ),
    VALUE,
)
ENTRY_NAME = st.one_of(st.sampled_from(["mlp", "a.b-c_1", "ok\n", "x y"]), TEXT)
SUITE = st.one_of(
    st.builds(
        lambda base, more: {**base, **more},
        st.fixed_dictionaries(
            {"models": st.dictionaries(ENTRY_NAME, ENTRY, max_size=3) | VALUE},
            optional={"defaults": SETTING_VALUES | VALUE, "description": SCALAR, "policy": SCALAR},
        ),
        st.dictionaries(KEY, VALUE, max_size=2),
    ),
    VALUE,
)
RULE = st.one_of(
    st.fixed_dictionaries(
        {"match": st.sampled_from(["encoder.*", "re:.*\\.q", "*"]) | SCALAR},
        optional={
            "ignore": VALUE,
            "ignore_kinds": st.lists(st.sampled_from(["dead", "unused", "x"]) | SCALAR),
            "settings": st.dictionaries(st.sampled_from(RULE_SETTINGS), SCALAR) | VALUE,
            "reason": SCALAR,
        },
    ),
    VALUE,
)
CONVENTIONS = st.dictionaries(
    st.sampled_from([c.name for c in BUILTIN_CONVENTIONS]) | TEXT,
    st.booleans() | st.dictionaries(st.sampled_from(["max", "max_depth", "factor"]) | TEXT, SCALAR),
    max_size=3,
)
POLICY = st.one_of(
    st.builds(
        lambda base, more: {**base, **more},
        st.fixed_dictionaries(
            {},
            optional={
                "extends": SCALAR,
                "description": SCALAR,
                "settings": SETTING_VALUES | VALUE,
                "rules": st.lists(RULE, max_size=3) | VALUE,
                "conventions": CONVENTIONS | VALUE,
            },
        ),
        st.dictionaries(KEY, VALUE, max_size=2),
    ),
    VALUE,
)

# Text-level mutations: what an editor, a merge conflict or an attacker leaves in a file.
SNIPPETS = [
    "\x00",
    "\x1b[31m",
    "\t",
    "\r",
    "\ufeff",
    "::",
    "\n::error::x\n",
    "`",
    "&a ",
    "*a",
    "<<: *a",
    "&a [*a, *a, *a]",
    "!!python/name:os.system",
    "!!binary AAAA",
    "!!set {a}",
    "!!timestamp 2001-13-45",
    "? [a, b]\n",
    "{",
    "[" * 120,
    "- ",
    ": ",
    "'",
    '"',
    "%YAML 1.1\n---\n",
    "\n---\n",
    "\n...\n",
    "x: &b 1\ny: *b\n",
    "<![CDATA[",
    "]]>",
    "&lt;",
    "&#0;",
    "&bogus;",
    '<!DOCTYPE x [<!ENTITY e "ee">]>',
    "</testcase>",
    "<testcase>",
    "<property name='gradcheck.verdict' value='unhealthy'/>",
    "NaN",
    "Infinity",
    "1" * 400,
    "[" * 3000,
]
MUTATION = st.tuples(
    st.sampled_from(["insert", "cut", "double", "snippet"]),
    st.floats(0, 1),
    st.integers(1, 40),
    TEXT,
    st.sampled_from(SNIPPETS),
)


def mutate(text: str, mutations: list[tuple[str, float, int, str, str]]) -> str:
    for kind, where, size, chars, snippet in mutations:
        at = int(where * len(text))
        if kind == "insert":
            text = text[:at] + chars + text[at:]
        elif kind == "cut":
            text = text[:at] + text[at + size :]
        elif kind == "double":
            lines = text.splitlines(keepends=True)
            if lines:
                i = min(int(where * len(lines)), len(lines) - 1)
                lines.insert(i, lines[i])
            text = "".join(lines)
        else:
            text = text[:at] + snippet + text[at:]
    return text


def yaml_text(document: Any) -> str:
    return yaml.safe_dump(document, allow_unicode=True, sort_keys=False)


def commands(text: str) -> list[str]:
    """The lines that could be read as workflow commands: ``::`` after leading white space,
    or ``##[`` anywhere, with every line break Python knows (the runner's ``\\r`` and
    ``\\n``, and ``\\x85``, ``\\u2028``, ... that a log viewer may show as one)."""
    return [line for line in text.splitlines() if line.lstrip().startswith("::") or "##[" in line]


def runner_lines(text: str) -> list[str]:
    """``text`` split where the GitHub runner ends a line: at ``\\r\\n``, ``\\r`` or ``\\n``."""
    return re.split(r"\r\n|\r|\n", text)


# -- YAML suites and policies -----------------------------------------------------------------

VALID_SUITE = """\
description: a suite
defaults:
  seed: 0
models:
  mlp:
    model: gc_models:mlp
    args: {width: 8}
    batch: {shape: [4, 8]}
    max_norm: 1000
    timeout: 30
    marks: [slow]
  kw:
    model: gc_models:mlp
    batch:
      x: {shape: [2, 8]}
      y: {same_as: x}
"""
VALID_POLICY = """\
description: a policy
settings:
  max_norm: 1000
  steps: 2
rules:
  - match: "encoder.*"
    ignore_kinds: [dead]
    reason: frozen on purpose
  - match: 're:.*\\.q_proj'
    settings: {vanishing_ratio: 1.0e-6}
conventions:
  saturating_chain: {max: 2}
  normalized_stacks: false
"""
GC_MODELS = """\
from torch import nn


def mlp(width: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 2))
"""


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rootdir with the only module a suite here may import (``gc_models``)."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "gc_models.py").write_text(GC_MODELS, encoding="utf-8")
    (root / "policy.yaml").write_text(VALID_POLICY, encoding="utf-8")
    return root


def read_or_refuse(path: Path, load: Callable[[Path], object]) -> object:
    """Load ``path``; a refusal must be the project's own error, naming the file, one line per
    mistake and no workflow command."""
    try:
        return load(path)
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith(str(path)), message
        assert commands(message) == [], message
        return None


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    return path


def test_the_valid_documents_load(home: Path) -> None:
    suite = load_suite(
        write(home / "gradcheck_valid.yaml", VALID_SUITE), home, None, ("gc_models",)
    )
    assert [entry.name for entry in suite.entries] == ["mlp", "kw"]
    policy = load_policy(home / "policy.yaml", root=home)
    assert len(policy.rules) == 2


@EXAMPLES
@given(document=SUITE, mutations=st.lists(MUTATION, max_size=2))
@example(document={"models": {"m": {"model": "gc_models:mlp", "max_norm": 10**400}}}, mutations=[])
@example(document={"models": {"mlp": {"model": "gc_models:mlp", "args": {0: None}}}}, mutations=[])
@example(document={"models": {"m": {"batch": {"shape": [2], "low": 10**400}}}}, mutations=[])
@example(document={"models": {}, "policy": "1" * 300}, mutations=[])  # a name too long
@example(document={"models": {}, "policy": "a\x00b"}, mutations=[])
@example(
    document={"models": {"m": {"model": "gc_models:mlp", "batch": {"file": "x" * 300}}}},
    mutations=[],
)
def test_any_suite_document_loads_or_is_refused_naming_the_file(
    home: Path, document: Any, mutations: list[tuple[str, float, int, str, str]]
) -> None:
    path = write(home / "gradcheck_s.yaml", mutate(yaml_text(document), mutations))
    read_or_refuse(path, lambda p: load_suite(p, home, None, ("gc_models",)))


@EXAMPLES
@given(mutations=st.lists(MUTATION, min_size=1, max_size=4))
@example(mutations=[("snippet", 0.0, 1, "", "!!timestamp 2001-13-45")])
@example(mutations=[("insert", 0.655, 1, "0", "")])  # marks: [s0low], unregistered
def test_a_mutated_suite_loads_or_is_refused_naming_the_file(
    home: Path, mutations: list[tuple[str, float, int, str, str]]
) -> None:
    path = write(home / "gradcheck_m.yaml", mutate(VALID_SUITE, mutations))
    read_or_refuse(path, lambda p: load_suite(p, home, None, ("gc_models",)))


@EXAMPLES
@given(document=POLICY, mutations=st.lists(MUTATION, max_size=2))
@example(document={"settings": {"timeout": 10**400}}, mutations=[])
@example(document={"conventions": {"max_parameters": {"max": 10**400}}}, mutations=[])
@example(document={}, mutations=[("snippet", 0.0, 1, "", "!!timestamp 2001-13-45")])
@example(document={"extends": "a\x00b"}, mutations=[])
@example(document={"extends": "y" * 300}, mutations=[])
def test_any_policy_document_loads_or_is_refused_naming_the_file(
    home: Path, document: Any, mutations: list[tuple[str, float, int, str, str]]
) -> None:
    path = write(home / "p.yaml", mutate(yaml_text(document), mutations))
    read_or_refuse(path, lambda p: load_policy(p, root=home))


@EXAMPLES
@given(mutations=st.lists(MUTATION, min_size=1, max_size=4))
def test_a_mutated_policy_loads_or_is_refused_naming_the_file(
    home: Path, mutations: list[tuple[str, float, int, str, str]]
) -> None:
    path = write(home / "pm.yaml", mutate(VALID_POLICY, mutations))
    read_or_refuse(path, lambda p: load_policy(p, root=home))


# -- gradcheck-report over JUnit XML and baseline files ---------------------------------------

PROPERTY_KEYS = ["verdict", "problems", "worst_layer", "min_grad_norm", "max_grad_norm"]
PROPERTY_NAMES = [
    f"gradcheck.{key}{suffix}"
    for key in [*PROPERTY_KEYS, "profile", "baseline", "step", "seconds"]
    for suffix in ("", ".2", ".²", ".0", ".99999999999999999999")
]
VERDICTS = ["healthy", "unhealthy", "weird", ""]
PROPERTY = st.one_of(
    st.tuples(st.just("gradcheck.verdict"), st.sampled_from(VERDICTS)),
    st.tuples(st.sampled_from(PROPERTY_NAMES) | TEXT, st.sampled_from(SPECIAL) | TEXT),
    st.tuples(
        st.sampled_from(["gradcheck.profile", "gradcheck.profile.2"]),
        st.dictionaries(TEXT, SCALAR, max_size=3).map(lambda d: json.dumps(d)) | TEXT,
    ),
)
CASE = st.fixed_dictionaries(
    {
        "name": TEXT,
        "classname": st.sampled_from(["test_m", "tests.test_m.TestX", ""]) | TEXT,
        "properties": st.lists(PROPERTY, max_size=6),
        "outcome": st.sampled_from(["passed", "failure", "error", "skipped"]),
        "message": st.sampled_from(SPECIAL) | TEXT,
    },
    optional={"file": st.sampled_from(["test_m.py", "a/b.py"]) | TEXT, "line": TEXT},
)
JUNIT = st.lists(st.lists(CASE, max_size=4), min_size=1, max_size=2)


def junit_text(suites: list[list[dict[str, Any]]]) -> str:
    """The JUnit XML of ``suites`` (text that XML cannot hold is left in: a malformed file)."""
    root = ET.Element("testsuites")
    for cases in suites:
        suite = ET.SubElement(root, "testsuite", name="pytest", tests=str(len(cases)))
        for case in cases:
            attributes = {"classname": case["classname"], "name": case["name"]}
            attributes.update({key: case[key] for key in ("file", "line") if key in case})
            element = ET.SubElement(suite, "testcase", attributes)
            group = ET.SubElement(element, "properties")
            for name, value in case["properties"]:
                ET.SubElement(group, "property", name=name, value=value)
            if case["outcome"] != "passed":
                ET.SubElement(element, case["outcome"], message=case["message"]).text = "text"
    return ET.tostring(root, encoding="unicode")


BASELINE = st.one_of(
    st.fixed_dictionaries(
        {
            "format": st.just(FORMAT) | SCALAR,
            "version": st.just(1) | SCALAR,
            "checks": st.dictionaries(
                TEXT, st.dictionaries(TEXT, SCALAR, max_size=3) | VALUE, max_size=3
            )
            | VALUE,
        }
    ),
    VALUE,
)
VALID_BASELINE = (
    '{\n  "format": "pytest-gradcheck baseline",\n  "version": 1,\n  "checks": {\n'
    '    "test_m.py::test_a": {"0":0.0123,"2":0.457},\n'
    '    "test_m.py::test_b": {"<root>":1.5,"enc.0":null}\n  }\n}\n'
)
TAGS = {"code", "/code", "details", "/details", "summary", "/summary"}
ANNOTATION = re.compile(r"::(error|notice) [^\r\n]*::[^\r\n]*")


def html_tags(markdown: str) -> set[str]:
    return set(re.findall(r"<(/?[A-Za-z][^\s>/]*)", markdown))


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert status in (0, 1, 2), (argv, status)
    assert "Traceback" not in err
    assert commands(err) == []
    return status, out, err


def assert_only_annotations(out: str) -> None:
    """Every line that the runner reads as a command is one of the gate's own annotations
    (which ends at the runner's line break, so its data holds none), and no other line
    starts one."""
    annotations = [line for line in runner_lines(out) if line.startswith("::")]
    for line in annotations:
        assert ANNOTATION.fullmatch(line), line
    rest = "\n".join(line for line in runner_lines(out) if not line.startswith("::"))
    assert commands(rest) == []


def summarise(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, path: Path
) -> None:
    folder = path.parent
    status, out, _ = run_cli(capsys, "summary", str(path), "--root", str(folder))
    assert commands(out) == []
    step = folder / "step.md"
    step.unlink(missing_ok=True)
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step))
    github, out, _ = run_cli(capsys, "summary", str(path), "--github", "--root", str(folder))
    assert github == status
    assert_only_annotations(out)
    if status != 2:
        assert html_tags(step.read_text(encoding="utf-8")) <= TAGS
        for command in cli.github_annotations(cli.read_results([path], folder)):
            assert "\n" not in command
            assert "\r" not in command
    merged = folder / "merged.xml"
    merged.unlink(missing_ok=True)
    status, out, _ = run_cli(capsys, "merge", str(path), "-o", str(merged))
    assert commands(out) == []
    if status == 0:
        ET.parse(merged)  # well-formed
    _, out, _ = run_cli(capsys, "diff", str(path), str(path), "--root", str(folder))
    assert commands(out) == []


@EXAMPLES
@given(suites=JUNIT, mutations=st.lists(MUTATION, max_size=2))
@example(
    suites=[
        [
            {
                "name": "t",
                "classname": "test_m",
                "properties": [("gradcheck.verdict.²", "unhealthy")],
                "outcome": "failure",
                "message": "m",
            }
        ]
    ],
    mutations=[],
)
@example(  # a test name with NEL: a line break to Python, not to the runner
    suites=[
        [
            {
                "name": "\x85::error::x",
                "classname": "test_m",
                "properties": [("gradcheck.verdict", "unhealthy")],
                "outcome": "failure",
                "message": "",
            }
        ]
    ],
    mutations=[],
)
def test_any_junit_file_is_summarised_or_refused(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    suites: list[list[dict[str, Any]]],
    mutations: list[tuple[str, float, int, str, str]],
) -> None:
    path = write(tmp_path / "r.xml", mutate(junit_text(suites), mutations))
    summarise(capsys, monkeypatch, path)


@EXAMPLES
@given(document=BASELINE, mutations=st.lists(MUTATION, max_size=2))
@example(document={"format": FORMAT, "version": 1, "checks": {"t": {"a": 10**400}}}, mutations=[])
def test_any_baseline_file_is_compared_or_refused(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    document: Any,
    mutations: list[tuple[str, float, int, str, str]],
) -> None:
    text = json.dumps(document, allow_nan=True) if not isinstance(document, str) else document
    path = write(tmp_path / "new.json", mutate(text, mutations))
    old = write(tmp_path / "old.json", VALID_BASELINE)
    for argv in (
        ("diff", str(old), str(path)),
        ("diff", str(path), str(old)),
        ("merge", str(old), str(path), "-o", str(tmp_path / "merged.json")),
    ):
        status, out, _ = run_cli(capsys, *argv)
        assert commands(out) == []
        if argv[0] == "merge" and status == 0:
            assert json.loads((tmp_path / "merged.json").read_text(encoding="utf-8"))


@EXAMPLES
@given(mutations=st.lists(MUTATION, min_size=1, max_size=4))
def test_a_mutated_baseline_is_compared_or_refused(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    mutations: list[tuple[str, float, int, str, str]],
) -> None:
    path = write(tmp_path / "b.json", mutate(VALID_BASELINE, mutations))
    status, out, _ = run_cli(capsys, "diff", str(path), str(path))
    assert commands(out) == []
    if status != 2:
        assert out.startswith("gradient baseline: ")  # the comparison, not an error


def test_text_that_xml_cannot_hold_makes_a_malformed_file_not_a_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    case = {"name": "a\x00b", "classname": "t", "properties": [], "outcome": "passed"}
    path = write(tmp_path / "r.xml", junit_text([[{**case, "message": ""}]]))
    status, _, err = run_cli(capsys, "summary", str(path))
    assert status == 2
    assert err.startswith(f"gradcheck-report: error: {path}:")
