"""The pytest plugin: the ``gradient_health`` marker, the ``gradcheck`` fixture, the
``--gradcheck-*`` options and ``gradcheck_*`` ini keys, JUnit properties and the terminal
summary.

How a check flows through pytest:

``pytest_configure``
    registers the marker, resolves the run-level settings (defaults < ini < command line)
    once into ``config.stash``, and on the controller registers the summary collector. An
    invalid value is a :class:`pytest.UsageError` that names where it came from.
``_gradcheck_item`` (autouse fixture)
    for a marked test, applies the marker keywords (module, class, then function marker)
    over the run-level settings and keeps them, with the fixture request, in
    ``item.stash``. A typo in a keyword fails the test at setup.
``gradcheck`` (fixture)
    ``gradcheck(model, batch, **overrides)`` runs the check, appends the report's
    ``gradcheck.*`` properties to ``item.user_properties`` and fails the test when the
    gradients are unhealthy.
``pytest_runtest_call`` (wrapper)
    after the body of a marked test that ran no check passes, checks the test's ``model``
    and ``batch`` fixtures.
``_Summary`` (``pytest_runtest_logreport``, ``pytest_terminal_summary``)
    rebuilds one entry per check from the reports' ``user_properties`` (under pytest-xdist,
    the workers' reports as the controller receives them) and prints the ``gradcheck``
    section.

torch is never imported when the plugin loads: the engine is imported by the first check.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from .results import GradcheckError, Report
from .settings import PYTHON_ONLY, SETTING_NAMES, Settings, override, resolve

if TYPE_CHECKING:
    from _pytest.terminal import TerminalReporter

MARKER = "gradient_health"
PREFIX = "gradcheck."
"""Prefix of the JUnit property names (``gradcheck.verdict``, ...)."""

#: Settings that can be given on the command line and in the ini file.
CONFIGURABLE: tuple[str, ...] = tuple(name for name in SETTING_NAMES if name not in PYTHON_ONLY)

_HELP: dict[str, str] = {
    "min_norm": "vanishing when a layer's gradient L2 norm is below this (off: no floor)",
    "max_norm": "exploding when a layer's gradient L2 norm is above this (off: no ceiling)",
    "device": "device the check runs on: auto, cpu, cuda, cuda:N or mps",
    "seed": "seed of dropout and of the default loss",
    "mode": "module mode during the check: train or eval",
    "relative": "on/off: the relative, depth-aware vanishing/exploding rule",
    "vanishing_ratio": "relative rule: vanishing below this fraction of the layers nearest the loss",
    "exploding_ratio": "relative rule: exploding above this multiple of the layers nearest the loss",
    "floor_rms": "vanishing when every layer's gradient RMS is below this",
    "ceiling_norm": "exploding when a layer's gradient norm is above this",
    "dead": "on/off: report layers whose gradient is exactly zero",
    "unused": "on/off: report trainable parameters that get no gradient",
    "diagnose": "on/off: on a NaN/Inf gradient, re-run the pass to find where it was born",
}
_THREADS_HELP = (
    "torch threads during checks: auto (under pytest-xdist, cpu_count // workers, set once "
    "per worker), an integer (set for each check, restored after it) or off"
)
_MAX_HEALTHY = 30
"""Above this many healthy checks the summary shows their count only (unless -v)."""
_MAX_PROBLEMS = 4
"""Problems shown per summary line."""


@dataclass
class _Run:
    """Per-run state, in ``config.stash``."""

    settings: Settings
    threads: int | str
    """An integer, ``"auto"`` or ``"off"``."""
    threads_applied: bool = False


@dataclass
class _ItemState:
    """Per-test state, in ``item.stash``."""

    settings: Settings
    request: pytest.FixtureRequest
    marked: bool
    checks: int = 0


@dataclass(frozen=True)
class _Entry:
    nodeid: str
    index: int
    verdict: str
    worst_layer: str
    problems: str


_RUN = pytest.StashKey[_Run]()
_ITEM = pytest.StashKey[_ItemState]()


# -- options --------------------------------------------------------------------------------


def _flag(name: str) -> str:
    return "--gradcheck-" + name.replace("_", "-")


def _show(name: str, value: object) -> str:
    if name == "device" and value is None:
        return "auto"
    if value is None:
        return "off"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _cli_type(name: str) -> Callable[[str], str]:
    """An argparse ``type=`` that validates ``name`` and keeps the text as given."""
    flag = _flag(name)

    def parse(text: str) -> str:
        try:
            resolve([(flag, {name: text})])
        except GradcheckError as exc:
            raise argparse.ArgumentTypeError(str(exc).split(f" from {flag}: ", 1)[-1]) from None
        return text

    parse.__name__ = name
    return parse


def _parse_threads(text: str) -> int | str:
    value = text.strip().lower()
    if value in ("auto", "off"):
        return value
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(
            f"threads must be auto, off or a positive integer, got {text!r}"
        )
    return number


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gradcheck", "gradient health checks (pytest-gradcheck)")
    defaults = Settings()
    for name in CONFIGURABLE:
        default = getattr(defaults, name)
        text = _HELP.get(name, f"the {name} setting")
        metavar = "on|off" if isinstance(default, bool) else name.upper()
        group.addoption(
            _flag(name),
            dest=f"gradcheck_{name}",
            type=_cli_type(name),
            default=None,
            metavar=metavar,
            help=f"{text} (default: {_show(name, default)})",
        )
        parser.addini(
            f"gradcheck_{name}",
            f"{text} (default: {_show(name, default)})",
            type="string",
            default=None,
        )
    group.addoption(
        "--gradcheck-threads",
        dest="gradcheck_threads",
        type=_parse_threads,
        default=None,
        metavar="auto|off|N",
        help=f"{_THREADS_HELP} (default: auto)",
    )
    parser.addini("gradcheck_threads", f"{_THREADS_HELP} (default: auto)", default="auto")


def _marker_line() -> str:
    defaults = Settings()
    signature = ", ".join(f"{name}={getattr(defaults, name)!r}" for name in SETTING_NAMES)
    return (
        f"{MARKER}({signature}): check the gradients of the test's model: the gradcheck "
        "fixture's calls, or else the test's `model` and `batch` fixtures after the test "
        "passes; keywords override the --gradcheck-* options and gradcheck_* ini keys"
    )


def _ini_origin(config: pytest.Config, key: str) -> str:
    for entry in config.getoption("override_ini", None) or ():
        if entry.split("=", 1)[0].strip() == key:
            return f"-o {entry}"
    where = f" in {config.inipath.name}" if config.inipath is not None else ""
    return f"the ini option {key}{where}"


def _run_settings(config: pytest.Config) -> _Run:
    """Resolve ini values, then command-line values, over the defaults."""
    sources: list[tuple[str, Mapping[str, object]]] = []
    for name in CONFIGURABLE:
        value = config.getini(f"gradcheck_{name}")
        if value is not None:
            sources.append((_ini_origin(config, f"gradcheck_{name}"), {name: value}))
    cli: dict[str, str] = {}
    for name in CONFIGURABLE:
        value = config.getoption(f"gradcheck_{name}")
        if value is not None:
            cli[name] = value
            sources.append((_flag(name), {name: value}))
    try:
        settings = resolve(sources)
    except GradcheckError as exc:
        raise pytest.UsageError(
            f"{exc}\nFix or remove that value (pytest --help lists the gradcheck options)."
        ) from None
    if "relative" in cli and not settings.relative:
        for name in ("vanishing_ratio", "exploding_ratio"):
            if name in cli:
                raise pytest.UsageError(
                    f"{_flag(name)} has no effect with --gradcheck-relative {cli['relative']}: "
                    f"the ratio belongs to the relative rule; drop {_flag(name)} or turn the "
                    "rule on"
                )

    threads: int | str | None = config.getoption("gradcheck_threads")
    if threads is None:
        raw = config.getini("gradcheck_threads")
        try:
            threads = _parse_threads(raw)
        except argparse.ArgumentTypeError as exc:
            raise pytest.UsageError(
                f"gradcheck_threads={raw!r} from {_ini_origin(config, 'gradcheck_threads')}: {exc}"
            ) from None
    return _Run(settings=settings, threads=threads)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", _marker_line())
    if config.getoption("help", False):
        return  # --help must work even with a broken configuration
    config.stash[_RUN] = _run_settings(config)
    if not hasattr(config, "workerinput"):  # an xdist worker sends its reports to the controller
        config.pluginmanager.register(_Summary(config), _Summary.name)


def _fail(message: str) -> NoReturn:
    """Fail the test with ``message`` alone (no traceback: the message says it all).

    Not hidden with ``__tracebackhide__``: pytest prints a "traceback entries are hidden"
    line under a failure whose every frame is hidden, even when it shows none of them.
    """
    pytest.fail(message, pytrace=False)


# -- per-test settings and the fixture ------------------------------------------------------


def _item_settings(item: pytest.Item, base: Settings) -> Settings:
    """Apply every ``gradient_health`` marker, the farthest first (module, class, function)."""
    settings = base
    for node, mark in reversed(list(item.iter_markers_with_node(MARKER))):
        origin = f"the {MARKER} marker on {node.name}"
        if mark.args:
            raise GradcheckError(
                f"{origin} got positional arguments {mark.args!r}; it takes keywords only, "
                f"e.g. @pytest.mark.{MARKER}(max_norm=1e3); valid keywords: "
                f"{', '.join(SETTING_NAMES)}"
            )
        settings = override(settings, origin, mark.kwargs)
    return settings


def _run_state(config: pytest.Config) -> _Run:
    run = config.stash.get(_RUN, None)
    if run is None:  # configured under --help, or by a caller that skipped pytest_configure
        run = config.stash[_RUN] = _run_settings(config)
    return run


@pytest.fixture(autouse=True)
def _gradcheck_item(request: pytest.FixtureRequest) -> None:
    """Start the test's gradcheck state; for a marked test, bind the marker's keywords."""
    __tracebackhide__ = True
    item = request.node
    run = _run_state(request.config)
    if item.get_closest_marker(MARKER) is None:
        item.stash[_ITEM] = _ItemState(settings=run.settings, request=request, marked=False)
        return
    try:
        settings = _item_settings(item, run.settings)
    except GradcheckError as exc:
        error = str(exc)
    else:
        item.stash[_ITEM] = _ItemState(settings=settings, request=request, marked=True)
        return
    _fail(error)  # outside the except: no chained traceback


class Gradcheck:
    """The ``gradcheck`` fixture's value: ``gradcheck(model, batch, **overrides) -> Report``."""

    def __init__(self, item: pytest.Item, state: _ItemState, run: _Run) -> None:
        self._item = item
        self._state = state
        self._run = run

    def __call__(self, model: Any, batch: Any, **overrides: Any) -> Report:
        """Check ``model`` on ``batch``; fail the test with the diagnosis when unhealthy.

        ``overrides`` are settings that win over the marker, the command line and the ini
        file. Returns the :class:`~pytest_gradcheck.results.Report` when healthy.
        """
        __tracebackhide__ = True
        settings = override(
            self._state.settings, f"the gradcheck() call in {self._item.name}", overrides
        )
        report = _check(self._item, self._state, self._run, model, batch, settings)
        return report.raise_if_unhealthy()


@pytest.fixture
def gradcheck(request: pytest.FixtureRequest, _gradcheck_item: None) -> Gradcheck:
    """Check a model's gradients: ``report = gradcheck(model, batch, **overrides)``.

    Settings come from, highest first: keyword overrides of the call, the
    ``gradient_health`` marker, ``--gradcheck-*`` options, ``gradcheck_*`` ini keys, the
    defaults. An unhealthy report fails the test with a table of the offending layers and
    hints; a healthy one is returned.

    Each call appends its report's ``gradcheck.*`` properties to the test's
    ``user_properties`` (and so to ``--junitxml``): the first call under the plain names
    (``gradcheck.verdict``, ...), the n-th call with a ``.n`` suffix
    (``gradcheck.verdict.2``, ...).
    """
    item = request.node
    return Gradcheck(item, item.stash[_ITEM], _run_state(request.config))


def _check(
    item: pytest.Item, state: _ItemState, run: _Run, model: Any, batch: Any, settings: Settings
) -> Report:
    """Run one check and record its properties; the caller decides what a verdict means."""
    __tracebackhide__ = True
    from .engine import check_gradients

    restore = _apply_threads(run)
    try:
        report = check_gradients(model, batch, settings=settings)
    finally:
        if restore is not None:
            _set_threads(restore)
    state.checks += 1
    suffix = "" if state.checks == 1 else f".{state.checks}"
    item.user_properties.extend((name + suffix, value) for name, value in report.junit_properties())
    return report


def _xdist_workers() -> int:
    """The number of pytest-xdist workers when running in one, else 0."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return 0
    try:
        return max(0, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")))
    except ValueError:
        return 0


def _set_threads(count: int) -> None:
    import torch

    torch.set_num_threads(count)


def _apply_threads(run: _Run) -> int | None:
    """Set torch's thread count for a check; return the count to restore afterwards, if any."""
    if isinstance(run.threads, int):
        import torch

        previous = torch.get_num_threads()
        torch.set_num_threads(run.threads)
        return previous
    if run.threads == "auto" and not run.threads_applied:
        run.threads_applied = True
        workers = _xdist_workers()
        if workers:
            _set_threads(max(1, (os.cpu_count() or 1) // workers))
    return None


# -- the automatic check of marked tests ----------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    __tracebackhide__ = True
    yield  # re-raises when the body failed: only a passing body is checked
    state = item.stash.get(_ITEM, None)
    if state is not None and state.marked and not state.checks:
        error = _auto_check(item, state)
        if error is not None:
            _fail(error)


def _auto_check(item: pytest.Item, state: _ItemState) -> str | None:
    """Check the test's ``model`` and ``batch`` fixtures; return why the test fails, if it does."""
    __tracebackhide__ = True
    try:
        model = state.request.getfixturevalue("model")
        batch = state.request.getfixturevalue("batch")
    except pytest.FixtureLookupError as exc:
        if exc.argname not in ("model", "batch"):
            raise  # a dependency of the user's fixture is missing: pytest explains that
        return (
            f"{item.name} is marked {MARKER} but ran no gradient check, and no "
            f"{exc.argname!r} fixture is available. Either call the gradcheck fixture in the "
            "test (report = gradcheck(model, batch)), or provide `model` and `batch` fixtures "
            "(in the test module, its class or a conftest.py) and the plugin checks them "
            "after the test passes."
        )
    try:
        report = _check(item, state, _run_state(item.config), model, batch, state.settings)
    except GradcheckError as exc:
        return f"the gradient check of the `model` and `batch` fixtures could not run: {exc}"
    if report.ok:
        return None
    return (
        f"{report.format_failure()}\n(checked the `model` and `batch` fixtures after the "
        f"test passed, as the {MARKER} marker asks)"
    )


# -- reporting ------------------------------------------------------------------------------


def _entries(nodeid: str, properties: Sequence[Sequence[object]]) -> list[_Entry]:
    """Rebuild one entry per check from a report's ``gradcheck.*`` user properties."""
    checks: dict[int, dict[str, str]] = {}
    for prop in properties:
        if len(prop) != 2 or not str(prop[0]).startswith(PREFIX):
            continue
        key, _, index = str(prop[0])[len(PREFIX) :].partition(".")
        number = int(index) if index.isdigit() else 1
        checks.setdefault(number, {})[key] = str(prop[1])
    return [
        _Entry(
            nodeid=nodeid,
            index=number,
            verdict=values["verdict"],
            worst_layer=values.get("worst_layer", ""),
            problems=values.get("problems", ""),
        )
        for number, values in sorted(checks.items())
        if "verdict" in values
    ]


class _Summary:
    """Collects the checks from test reports and prints the ``gradcheck`` terminal section.

    Registered on the controller only: under pytest-xdist the reports it reads are the
    workers' reports, so the section is the same with and without ``-n``.
    """

    name = "gradcheck-summary"

    def __init__(self, config: pytest.Config) -> None:
        self._config = config
        self.entries: list[_Entry] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # The teardown report always comes, last, and carries every property of the test
        # (also of checks run in a fixture, or in a setup that failed).
        if report.when == "teardown" and report.user_properties:
            self.entries.extend(_entries(report.nodeid, report.user_properties))

    def pytest_terminal_summary(self, terminalreporter: TerminalReporter) -> None:
        if not self.entries:
            return
        terminalreporter.write_sep("=", "gradcheck")
        for line in _summary_lines(self.entries, verbose=self._config.getoption("verbose") > 0):
            terminalreporter.write_line(line)


def _summary_lines(entries: Sequence[_Entry], verbose: bool) -> list[str]:
    """One line per check, unhealthy first, then by node id (the order xdist cannot change)."""
    ordered = sorted(entries, key=lambda e: (e.verdict == "healthy", e.nodeid, e.index))
    healthy = [e for e in ordered if e.verdict == "healthy"]
    collapse = len(healthy) > _MAX_HEALTHY and not verbose
    width = max(len(e.verdict) for e in ordered)
    lines: list[str] = []
    for entry in ordered:
        if collapse and entry.verdict == "healthy":
            continue
        name = entry.nodeid if entry.index == 1 else f"{entry.nodeid} (check {entry.index})"
        line = f"{entry.verdict.ljust(width)}  {name}"
        if entry.worst_layer:
            line += f"  worst layer: {entry.worst_layer}"
        if entry.problems:
            problems = entry.problems.split(",")
            shown = ",".join(problems[:_MAX_PROBLEMS])
            more = len(problems) - _MAX_PROBLEMS
            line += f"  problems: {shown}" + (f" (+{more} more)" if more > 0 else "")
        lines.append(line)
    if collapse:
        lines.append(f"{'healthy'.ljust(width)}  {len(healthy)} checks (-v lists them)")
    return lines


def pytest_unconfigure(config: pytest.Config) -> None:
    summary = config.pluginmanager.get_plugin(_Summary.name)
    if summary is not None:
        config.pluginmanager.unregister(summary)
