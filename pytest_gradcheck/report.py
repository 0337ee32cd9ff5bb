"""``gradcheck-report``: merge, summarise and compare gradient-check results in CI.

    gradcheck-report merge shard-*.xml -o report.xml            # JUnit files of shards or runs
    gradcheck-report merge gradient-baseline-*.json -o gradient-baseline.json
    gradcheck-report summary report.xml [--github] [--max-annotations 10]
    gradcheck-report diff old.json new.json [--factor 10]   # baselines, or JUnit files

``summary`` reads the ``gradcheck.*`` properties that the plugin writes into JUnit XML
(either junit family, read back with :mod:`.properties`) and prints one line per check: verdict, problem kinds, worst layer and
the smallest and largest layer gradient norm, problems first. With ``--github`` inside GitHub
Actions it also appends the same as Markdown to ``$GITHUB_STEP_SUMMARY`` and prints one
``::error`` workflow command per failing check (the worst first, at most
``--max-annotations``), pointing at the test's file and line.

A check *fails the gate* when its verdict is unhealthy and its test failed. An unhealthy
check in a test that passed or was skipped (the test expects it: ``pytest.raises``, xfail)
is listed as ``expected``.

Exit codes: 0 all healthy, 1 a check failed the gate (``diff``: a layer moved), 2 usage
error (a missing file, malformed XML with its path and line, a bad option).

Reads XML with junitparser; imports :mod:`.properties`, :mod:`.baseline` and
:mod:`.results`, never torch, pytest or the plugin.
"""

from __future__ import annotations

import argparse
import ast
import functools
import os
import re
import sys
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from junitparser import Attr, Error, Failure, JUnitXml, JUnitXmlError, Properties, Skipped
from junitparser import TestCase as _JUnitCase

from . import __version__, properties
from .baseline import (
    DEFAULT_FACTOR,
    REGRESSION,
    Baseline,
    BaselineError,
    check_key,
    decode_profile,
    diff,
    merge,
    parse_factor,
)
from .escape import (
    annotation_data,
    annotation_property,
    excerpt,
    markdown_code,
    stdout_line,
)
from .results import KINDS

GITHUB_ANNOTATION_LIMIT = 10
"""GitHub shows at most 10 error annotations per step (and 50 per job)."""

_SEVERITY = {kind: rank for rank, kind in enumerate((*KINDS, REGRESSION))}
_MAX_MESSAGE_LINES = 16
"""Lines of the test's failure message quoted in an annotation."""


_VERDICTS = ("healthy", "unhealthy")


class UsageError(Exception):
    """Bad input: exit status 2, the message on stderr."""


class _Case(_JUnitCase):
    """A ``<testcase>`` with the ``file`` and ``line`` attributes of pytest's xunit1 family."""

    file = Attr()
    line = Attr()


# -- reading JUnit XML ------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One gradient check, read back from a test case's ``gradcheck.*`` properties."""

    nodeid: str
    index: int
    path: str
    """The test's file, relative to pytest's rootdir."""
    line: int | None
    """1-based line of the test function (its first decorator), when known."""
    outcome: str
    """The test's outcome: ``passed``, ``failed``, ``error`` or ``skipped``."""
    verdict: str
    problems: tuple[str, ...]
    """``kind:layer`` pairs, most severe first."""
    worst_layer: str
    min_grad_norm: str
    max_grad_norm: str
    baseline: str = ""
    """``gradcheck.baseline``: unchanged, moved: ..., new (empty without a baseline)."""
    profile: str = ""
    """``gradcheck.profile``: the per-layer norms as compact JSON (with a baseline option)."""
    message: str = ""
    """The test's failure message, if it failed."""
    setup: str = ""
    """What the check ran with (:meth:`~pytest_gradcheck.properties.RecordedCheck.setup_text`)."""

    @property
    def layer_text(self) -> str:
        """The layer a reader looks at first: the worst one, or the smallest gradient's."""
        if not self.worst_layer:
            return "-"
        which = "smallest gradient" if self.verdict == "healthy" else "worst"
        return f"{which}: {self.worst_layer}"

    @property
    def name(self) -> str:
        return check_key(self.nodeid, self.index)

    @property
    def status(self) -> str:
        """``unhealthy`` (fails the gate), ``expected`` (unhealthy in a test that passed or
        was skipped) or ``healthy``."""
        if self.verdict == "healthy":
            return "healthy"
        return "unhealthy" if self.outcome in ("failed", "error") else "expected"

    def kinds(self) -> list[tuple[str, int]]:
        """Problem kinds with their number of layers, most severe first."""
        counts: dict[str, int] = {}
        for problem in self.problems:
            kind = problem.split(":", 1)[0]
            counts[kind] = counts.get(kind, 0) + 1
        return sorted(counts.items(), key=lambda item: _SEVERITY.get(item[0], len(_SEVERITY)))

    def kinds_text(self) -> str:
        return ", ".join(f"{kind} x{count}" for kind, count in self.kinds())

    def severity(self) -> tuple[int, int, str]:
        """Sort key, worst first: the most severe kind, then the most problems."""
        kinds = self.kinds()
        rank = _SEVERITY.get(kinds[0][0], len(_SEVERITY)) if kinds else len(_SEVERITY) + 1
        return (rank, -len(self.problems), self.name)


@dataclass
class Results:
    """Every check of one or more JUnit files, and the outcomes of all their tests."""

    checks: list[Check] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)

    def ordered(self) -> list[Check]:
        """Gate failures (worst first), then expected-unhealthy checks, then healthy ones."""
        order = {"unhealthy": 0, "expected": 1, "healthy": 2}
        return sorted(
            self.checks,
            key=lambda c: (order[c.status], c.severity() if c.verdict != "healthy" else c.name),
        )

    def count(self, status: str) -> int:
        return sum(1 for check in self.checks if check.status == status)


def _load(path: Path) -> JUnitXml:
    """Parse one JUnit file; a missing or malformed file is a :class:`UsageError`."""
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        return JUnitXml.fromfile(str(path))
    except SyntaxError as exc:  # xml.etree's ParseError (and lxml's XMLSyntaxError) are
        line, column = getattr(exc, "position", None) or (exc.lineno, exc.offset)
        reason = re.sub(r":? line \d+, column \d+$", "", str(exc))
        raise UsageError(f"{path}:{line}:{column}: malformed XML: {reason}") from None
    except JUnitXmlError:
        raise UsageError(
            f"{path}: not a JUnit XML report (its root element is neither <testsuites> nor "
            "<testsuite>); pass the file that pytest --junitxml wrote"
        ) from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the file: {exc.strerror or exc}") from None


def _outcome(case: _JUnitCase) -> str:
    results = case.result
    if any(isinstance(r, Error) for r in results):
        return "error"
    if any(isinstance(r, Failure) for r in results):
        return "failed"
    if any(isinstance(r, Skipped) for r in results):
        return "skipped"
    return "passed"


def _failure_message(case: _JUnitCase) -> str:
    """The failure message, less the exception's module path (``GradientHealthError: ...``).

    pytest 9.2 cuts a long ``message`` attribute short (``[+4 more lines; full report in
    element text]``): then the message is the last block of ``E`` lines of the element text,
    the exception as the traceback shows it."""
    for result in case.result:
        if isinstance(result, (Failure, Error)):
            message = str(result.message or result.text or "")
            if _CUT_SHORT.search(message):
                message = _exception_lines(str(result.text or "")) or message
            return re.sub(r"^(?:\w+\.)+(\w+: )", r"\1", message)
    return ""


_CUT_SHORT = re.compile(r"\n\[(?:\+\d+ more lines?|truncated); full report in element text\]$")


def _exception_lines(text: str) -> str:
    """The last block of ``E`` lines of a pytest traceback, without the ``E`` and the
    indentation they share."""
    block: list[str] = []
    last: list[str] = []
    for line in text.splitlines():
        if line.startswith("E ") or line == "E":
            block.append(line[1:])
        elif block:
            last, block = block, []
    return textwrap.dedent("\n".join(block or last))


def _properties(case: _JUnitCase) -> list[tuple[str, str]]:
    return [
        (str(prop.name), str(prop.value or ""))
        for group in case.iterchildren(Properties)  # type: ignore[no-untyped-call]
        for prop in group
    ]


def _locate(case: _Case, root: Path) -> tuple[str, str, int | None]:
    """The test's node id, file and 1-based line.

    xunit1 writes ``file`` and a 0-based ``line``; xunit2 (pytest's default) writes neither,
    so the file comes from the dotted ``classname`` (the longest prefix that names a file
    under ``root``, else the parts before the first capitalised one) and the line from the
    Python source.
    """
    classname = str(case.classname or "")
    name = str(case.name or "")
    parts = [part for part in classname.split(".") if part]
    file = str(case.file or "").replace("\\", "/")
    line: int | None = None
    if file:
        module = re.sub(r"\.py$", "", file).replace("/", ".")
        rest = classname[len(module) :] if classname.startswith(module) else ""
        classes = [part for part in rest.split(".") if part]
        if str(case.line or "").isdigit():
            line = int(str(case.line)) + 1
    else:
        found = _file_depth(parts, root)
        if found is None:
            depth = next((i for i, p in enumerate(parts) if p[:1].isupper()), len(parts))
            file = "/".join(parts[:depth]) + ".py" if depth else ""
        else:
            depth, file = found
        classes = parts[depth:]
        if file.endswith(".py"):
            line = _find_line(str(root / file), tuple(classes), name)
        elif file.endswith((".yaml", ".yml")) and not classes:
            line = _yaml_entry_line(str(root / file), name)
    nodeid = "::".join([file, *classes, name]) if file else name
    return nodeid, file, line


def _file_depth(parts: Sequence[str], root: Path) -> tuple[int, str] | None:
    """How many leading parts of a classname name an existing file (``a.b`` -> ``a/b.py``, or
    ``a/b.yaml`` for an item collected from a non-Python file), and that file."""
    for depth in range(len(parts), 0, -1):
        candidates = ["/".join(parts[:depth]) + ".py"]
        if depth >= 2:
            candidates.append("/".join(parts[: depth - 1]) + "." + parts[depth - 1])
        for candidate in candidates:
            if (root / candidate).is_file():
                return depth, candidate
    return None


@functools.lru_cache(maxsize=256)
def _yaml_entry_line(path: str, name: str) -> int | None:
    """The 1-based line of the suite entry ``name:`` (an indented key, quoted or not) in a
    YAML suite file, or None."""
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            text = file.read(_MAX_YAML_BYTES)
    except OSError:
        return None
    key = re.escape(name)
    pattern = re.compile(rf"^[ \t]+(?:{key}|'{key}'|\"{key}\")[ \t]*:(?:[ \t]|$)")
    for number, line in enumerate(text.splitlines(), 1):
        if pattern.match(line):
            return number
    return None


_MAX_YAML_BYTES = 1 << 20
"""How much of a suite file :func:`_yaml_entry_line` reads."""


@functools.lru_cache(maxsize=256)
def _functions(path: str) -> dict[tuple[str, ...], int]:
    """``(class, ..., function)`` -> 1-based line of its first decorator, else of its ``def``
    (the line pytest reports), for every function of a Python file."""
    try:
        tree = ast.parse(Path(path).read_bytes())
    except (OSError, SyntaxError, ValueError):
        return {}
    lines: dict[tuple[str, ...], int] = {}

    def visit(node: ast.AST, scope: tuple[str, ...]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, (*scope, child.name))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([d.lineno for d in child.decorator_list] + [child.lineno])
                lines.setdefault((*scope, child.name), first)

    visit(tree, ())
    return lines


def _find_line(path: str, classes: tuple[str, ...], name: str) -> int | None:
    return _functions(path).get((*classes, name.split("[", 1)[0]))


def read_results(paths: Iterable[Path], root: Path = Path()) -> Results:
    """Every check in the JUnit files at ``paths`` (either junit family)."""
    results = Results()
    for path in paths:
        for suite in _load(path):
            for junit_case in suite:
                case = _Case.fromelem(junit_case)  # type: ignore[no-untyped-call]
                outcome = _outcome(case)
                results.outcomes[outcome] = results.outcomes.get(outcome, 0) + 1
                nodeid, file, line = _locate(case, root)
                message = _failure_message(case)
                for recorded in properties.read(_properties(case)):
                    if recorded.verdict not in _VERDICTS:
                        raise UsageError(
                            f"{path}: test {stdout_line(nodeid)!r} has the verdict "
                            f"{excerpt(recorded.verdict)}, which pytest-gradcheck does not write "
                            f"(one of {', '.join(_VERDICTS)}); pass the JUnit file pytest wrote"
                        )
                    results.checks.append(
                        Check(
                            nodeid=nodeid,
                            index=recorded.number,
                            path=file,
                            line=line,
                            outcome=outcome,
                            verdict=recorded.verdict,
                            problems=recorded.problems,
                            worst_layer=recorded.worst_layer,
                            min_grad_norm=recorded.min_grad_norm,
                            max_grad_norm=recorded.max_grad_norm,
                            baseline=recorded.baseline,
                            profile=recorded.profile,
                            message=message,
                            setup=recorded.setup_text(),
                        )
                    )
    return results


# -- summary ----------------------------------------------------------------------------------

_COLUMNS = ("verdict", "test", "problems", "layer", "min grad norm", "max grad norm", "setup")


def _row(check: Check) -> tuple[str, ...]:
    return (
        check.status,
        check.name if check.status != "expected" else f"{check.name} (test {check.outcome})",
        check.kinds_text() or "-",
        check.layer_text,
        check.min_grad_norm or "-",
        check.max_grad_norm or "-",
        check.setup or "-",
    )


def _headline(results: Results) -> str:
    checks = len(results.checks)
    unhealthy, expected = results.count("unhealthy"), results.count("expected")
    tests = ", ".join(
        f"{results.outcomes[o]} {o}"
        for o in ("passed", "failed", "error", "skipped")
        if results.outcomes.get(o)
    )
    if not checks:
        return f"no gradient checks found (tests: {tests or 'none'})"
    healthy = results.count("healthy")
    if unhealthy:
        verdict = f"{unhealthy} of {checks} check(s) unhealthy"
    elif expected:
        verdict = f"no check fails the gate ({healthy} of {checks} healthy)"
    else:
        verdict = f"all {checks} check(s) healthy"
    if expected:
        verdict += f"; {expected} expected unhealthy (in tests that passed or were skipped)"
    return f"{verdict}; tests: {tests}"


def text_summary(results: Results) -> str:
    """The plain-text summary: a headline and one aligned row per check, problems first."""
    lines = [f"gradcheck: {_headline(results)}"]
    rows = [_COLUMNS, *(_row(check) for check in results.ordered())]
    if len(rows) > 1:
        widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
        for row in rows:
            lines.append(
                "  ".join(
                    cell.ljust(width) for cell, width in zip(row, widths, strict=True)
                ).rstrip()
            )
    baseline = _baseline_lines(results)
    if baseline:
        lines.append("gradient baseline:")
        lines.extend(f"  {line}" for line in baseline)
    if results.count("expected"):
        lines.append(
            "expected: unhealthy in a test that passed or was skipped (pytest.raises, xfail); "
            "it does not fail the gate"
        )
    return "\n".join(map(stdout_line, lines)) + "\n"


def _baseline_lines(results: Results) -> list[str]:
    lines = []
    for check in results.ordered():
        if check.baseline and check.baseline != "unchanged":
            lines.append(f"{check.name}: {check.baseline}")
    return lines


def _md(text: str) -> str:
    """Untrusted text in a Markdown table cell: it stays in its cell and cannot be HTML."""
    return markdown_code(text) if text else "-"


def _code(text: str) -> str:
    return markdown_code(text) if text else "-"


_ICONS = {
    "unhealthy": "\N{CROSS MARK}",
    "expected": "\N{WARNING SIGN}\N{VARIATION SELECTOR-16}",
    "healthy": "\u2705",
}


def markdown_summary(results: Results) -> str:
    """The Markdown summary for ``$GITHUB_STEP_SUMMARY``: problems in a table, healthy checks
    folded in a ``<details>`` block. GitHub's JUnit viewers ignore ``<property>`` values,
    so the gradient numbers are shown here."""
    unhealthy = results.count("unhealthy")
    icon = _ICONS["unhealthy"] if unhealthy else _ICONS["healthy"]
    lines = [f"### {icon} Gradient health: {_headline(results)}", ""]
    ordered = results.ordered()
    problems = [c for c in ordered if c.status != "healthy"]
    healthy = [c for c in ordered if c.status == "healthy"]

    def header(layer: str) -> list[str]:
        return [
            f"| | test | problems | {layer} | min grad norm | max grad norm | setup |",
            "|:-:|---|---|---|--:|--:|---|",
        ]

    if problems:
        lines.extend(header("worst layer"))
        for check in problems:
            test = _code(check.name)
            if check.status == "expected":
                test += f" (test {check.outcome}: expected)"
            lines.append(
                f"| {_ICONS[check.status]} | {test} | {_md(check.kinds_text())} | "
                f"{_code(check.worst_layer)} | {_md(check.min_grad_norm)} | "
                f"{_md(check.max_grad_norm)} | {_md(check.setup)} |"
            )
        lines.append("")
    if healthy:
        lines.extend([f"<details><summary>{len(healthy)} healthy check(s)</summary>", ""])
        lines.extend(header("smallest gradient"))
        rows = [
            f"| {_ICONS['healthy']} | {_code(c.name)} | - | {_code(c.worst_layer)} | "
            f"{_md(c.min_grad_norm)} | {_md(c.max_grad_norm)} | {_md(c.setup)} |"
            for c in healthy
        ]
        budget = STEP_SUMMARY_LIMIT - sum(len(line.encode()) + 1 for line in lines) - 4096
        kept = _within(rows, budget)
        lines.extend(rows[:kept])
        if kept < len(rows):
            lines.extend(
                [
                    "",
                    f"{len(rows) - kept} more healthy check(s) not shown: GitHub limits a step "
                    "summary to 1 MiB; the JUnit report (the workflow's artifact) lists them all",
                ]
            )
        lines.extend(["", "</details>", ""])
    baseline = _baseline_lines(results)
    if baseline:
        lines.append("**Gradient baseline**")
        lines.append("")
        lines.extend(f"- {_md(line)}" for line in baseline)
        lines.append("")
    if results.count("expected"):
        lines.append(
            f"{_ICONS['expected']} expected: unhealthy in a test that passed or was skipped "
            "(`pytest.raises`, xfail); it does not fail the gate."
        )
        lines.append("")
    return "\n".join(lines) + "\n"


STEP_SUMMARY_LIMIT = 1024 * 1024
"""GitHub's documented limit of one step summary, in bytes."""


def _within(rows: Sequence[str], budget: int) -> int:
    """How many of ``rows`` (lines) fit in ``budget`` bytes."""
    used = 0
    for count, row in enumerate(rows):
        used += len(row.encode()) + 1
        if used > budget:
            return count
    return len(rows)


def actionable_first(message: str) -> list[str]:
    """The lines of a failure text with what to do before the evidence: the headline, then
    the origin, hints and notes, then the table of layers (the indented lines right under
    the headline), so that an annotation cut short keeps the lines a reader acts on."""
    lines = message.strip().splitlines()
    if not lines:
        return []
    rest = lines[1:]
    table = next((i for i, line in enumerate(rest) if not line.startswith(" ")), len(rest))
    return [lines[0], *rest[table:], *rest[:table]]


def github_annotations(results: Results, limit: int = GITHUB_ANNOTATION_LIMIT) -> list[str]:
    """``::error`` workflow commands for the checks that fail the gate, worst first; past
    ``limit``, one ``::notice`` says how many were left out."""
    failing = [c for c in results.ordered() if c.status == "unhealthy"]
    commands = []
    for check in failing[:limit]:
        where = []
        if check.path:
            where.append(f"file={annotation_property(check.path)}")
            if check.line is not None:
                where.append(f"line={check.line}")
        short = check.name.rsplit("::", 1)[-1]
        where.append(f"title={annotation_property(f'gradcheck: {check.kinds_text()} in {short}')}")
        shown = ", ".join(check.problems[:6])
        more = len(check.problems) - 6
        lines = [
            f"{check.name}: unhealthy gradients ({check.kinds_text()})",
            f"worst layer: {check.worst_layer or '-'}; layer gradient norms from "
            f"{check.min_grad_norm or '-'} to {check.max_grad_norm or '-'}"
            + (f"; {check.setup}" if check.setup else ""),
            f"problems: {shown}" + (f" (+{more} more)" if more > 0 else ""),
        ]
        if check.baseline and check.baseline != "unchanged":
            lines.append(f"baseline: {check.baseline}")
        if check.message:
            quoted = actionable_first(check.message)
            lines.extend(["", *quoted[:_MAX_MESSAGE_LINES]])
            if len(quoted) > _MAX_MESSAGE_LINES:
                lines.append(f"... ({len(quoted) - _MAX_MESSAGE_LINES} more lines in the log)")
        commands.append(f"::error {','.join(where)}::{annotation_data(chr(10).join(lines))}")
    left_out = len(failing) - limit
    if left_out > 0:
        commands.append(
            "::notice title=gradcheck::"
            + annotation_data(
                f"{left_out} more unhealthy check(s) not annotated: GitHub shows at most "
                f"{GITHUB_ANNOTATION_LIMIT} error annotations per step; the step summary and "
                "the log list them all"
            )
        )
    return commands


# -- commands ---------------------------------------------------------------------------------


def _paths(values: Sequence[str]) -> list[Path]:
    return [Path(value) for value in values]


def _is_json(path: Path) -> bool:
    return path.suffix.lower() == ".json"


def _cmd_merge(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    paths = _paths(args.files)
    kinds = {_is_json(path) for path in paths}
    if len(kinds) > 1:
        raise UsageError(
            "merge takes JUnit XML files or baseline .json files, not both; "
            "merge each kind separately"
        )
    output = Path(args.output)
    if output.is_dir():
        raise UsageError(f"-o {stdout_line(str(output))}: is a directory; name the file to write")
    if kinds == {True}:
        baselines = [_load_baseline(path) for path in paths]
        merged, twice = merge(baselines)
        for key in twice:
            print(
                stdout_line(f"gradcheck-report: {key} is in more than one file; kept the last"),
                file=err,
            )
        merged.save(output)
        print(
            f"merged {len(paths)} baseline file(s), {len(merged.checks)} checks -> {output}",
            file=out,
        )
        return 0
    result = JUnitXml()
    for path in paths:
        result += _load(path)
    result.update_statistics()  # type: ignore[no-untyped-call]
    result.write(str(output))
    print(
        f"merged {len(paths)} JUnit file(s), {result.tests} tests -> {output}",
        file=out,
    )
    return 0


def _load_baseline(path: Path) -> Baseline:
    try:
        return Baseline.load(path)
    except BaselineError as exc:
        raise UsageError(str(exc)) from None


def _in_github() -> bool:
    return os.environ.get("GITHUB_ACTIONS") == "true"


def _cmd_summary(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    results = read_results(_paths(args.files), Path(args.root))
    out.write(text_summary(results))
    if args.github:
        if not _in_github():
            print(
                "gradcheck-report: --github: not running in GitHub Actions (GITHUB_ACTIONS is "
                "not 'true'): printed plain text only",
                file=err,
            )
        else:
            target = os.environ.get("GITHUB_STEP_SUMMARY", "")
            if target:
                with open(target, "a", encoding="utf-8") as summary:
                    summary.write(markdown_summary(results))
            else:
                print("gradcheck-report: GITHUB_STEP_SUMMARY is not set: no step summary", file=err)
            for command in github_annotations(results, args.max_annotations):
                print(command, file=out)
    return 1 if results.count("unhealthy") else 0


def _profiles(path: Path, root: Path) -> Baseline:
    """A baseline file, or the ``gradcheck.profile`` properties of a JUnit file."""
    if _is_json(path):
        return _load_baseline(path)
    baseline = Baseline()
    for check in read_results([path], root).checks:
        if check.profile:
            try:
                baseline.checks[check.name] = decode_profile(check.profile, f"{path}: {check.name}")
            except BaselineError as exc:
                raise UsageError(str(exc)) from None
    if not baseline.checks:
        raise UsageError(
            f"{path}: no gradient profiles in this JUnit file; run pytest with "
            "--gradcheck-save-baseline or --gradcheck-baseline to record them"
        )
    return baseline


def _cmd_diff(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    root = Path(args.root)
    old, new = _profiles(Path(args.old), root), _profiles(Path(args.new), root)
    result = diff(old, new, args.factor)
    print(
        f"gradient baseline: {args.old} -> {args.new} (factor {args.factor:g}): "
        f"{len(result.moved)} moved, {len(result.comparisons) - len(result.moved)} unchanged, "
        f"{len(result.new_checks)} new, {len(result.removed_checks)} removed",
        file=out,
    )
    for line in result.lines():
        print(stdout_line(line), file=out)
    return 1 if result.moved else 0


def _cmd_schema(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Print the JSON Schema of a suite or policy file, as the package ships it."""
    from importlib.resources import files

    out.write(files("pytest_gradcheck").joinpath(f"schema/{args.kind}.schema.json").read_text())
    return 0


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _factor(text: str) -> float:
    try:
        return parse_factor(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradcheck-report",
        description="Merge, summarise and compare pytest-gradcheck results (JUnit XML and "
        "gradient baselines). Exit status: 0 healthy, 1 unhealthy, 2 usage error.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    merge_cmd = commands.add_parser(
        "merge",
        help="merge the JUnit XML files of shards or xdist runs (or baseline .json files)",
        description="Merge the JUnit XML files of several shards or runs into one; given "
        "baseline .json files, merge those into one baseline.",
    )
    merge_cmd.add_argument("files", nargs="+", metavar="FILE")
    merge_cmd.add_argument("-o", "--output", required=True, metavar="OUT")
    merge_cmd.set_defaults(run=_cmd_merge)

    summary = commands.add_parser(
        "summary",
        help="print each check's verdict, problem kinds, worst layer and gradient norms",
        description="Per check: verdict, problem kinds, worst layer and min/max layer "
        "gradient norm, problems first. Exit status 1 when a check is unhealthy in a test "
        "that failed.",
    )
    summary.add_argument("files", nargs="+", metavar="JUNIT_XML")
    summary.add_argument(
        "--github",
        action="store_true",
        help="in GitHub Actions, also append Markdown to $GITHUB_STEP_SUMMARY and print "
        "::error annotations for the failing checks",
    )
    summary.add_argument(
        "--max-annotations",
        type=_non_negative_int,
        default=GITHUB_ANNOTATION_LIMIT,
        metavar="N",
        help=f"error annotations to print, the worst first (default: "
        f"{GITHUB_ANNOTATION_LIMIT}, GitHub's limit per step)",
    )
    summary.add_argument(
        "--root",
        default=".",
        metavar="DIR",
        help="pytest's rootdir, to find a test's file and line when the JUnit file does not "
        "name them (junit_family xunit2, pytest's default); default: the current directory",
    )
    summary.set_defaults(run=_cmd_summary)

    diff_cmd = commands.add_parser(
        "diff",
        help="compare two gradient baselines (or JUnit files with gradient profiles)",
        description="Compare the per-layer gradient norms of two runs, check by check, as "
        "--gradcheck-baseline does. Exit status 1 when a layer moved more than the factor.",
    )
    diff_cmd.add_argument("old", metavar="OLD", help="baseline .json or JUnit XML")
    diff_cmd.add_argument("new", metavar="NEW", help="baseline .json or JUnit XML")
    diff_cmd.add_argument(
        "--factor",
        type=_factor,
        default=DEFAULT_FACTOR,
        help=f"how far a layer's norm may move, either way (default: {DEFAULT_FACTOR:g})",
    )
    diff_cmd.add_argument("--root", default=".", metavar="DIR", help=argparse.SUPPRESS)
    diff_cmd.set_defaults(run=_cmd_diff)

    schema = commands.add_parser(
        "schema",
        help="print the JSON Schema of a YAML suite or policy file",
        description="Print the JSON Schema of a YAML suite (gradcheck*.yaml) or policy file, "
        "for an editor's YAML language server: gradcheck-report schema suite > "
        "suite.schema.json, then '# yaml-language-server: $schema=suite.schema.json' in the "
        "file.",
    )
    schema.add_argument("kind", choices=("suite", "policy"))
    schema.set_defaults(run=_cmd_schema)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help, --version (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        status: int = args.run(args, sys.stdout, sys.stderr)
    except UsageError as exc:
        print(f"gradcheck-report: error: {exc}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    raise SystemExit(main())
