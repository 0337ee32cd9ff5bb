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
import base64
import importlib
import importlib.util
import os
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
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
    "activations": "on/off: also record the gradient flowing into each layer's output "
    "(shown in --gradcheck-plots charts; costs a hook per layer output)",
    "steps": "optimizer steps on the sample batch, gradients checked at each (1: one pass)",
    "optimizer": "optimizer of a multi-step check: sgd, adam or adamw",
    "lr": "learning rate of a multi-step check (off: 1e-3 for adam/adamw, 1e-2 for sgd)",
    "expect_loss_decrease": "on/off: fail unless the loss falls over the steps (overfit one batch)",
    "precision": "fp32, or fp16/bf16: autocast passes checked for underflow and overflow",
    "grad_scaler": "on/off or an initial loss scale: GradScaler for precision fp16",
    "distributed": "local processes of a distributed check (1: this process only)",
    "distributed_strategy": "how a distributed check runs the model: ddp or fsdp (FSDP2 sharding)",
    "distributed_timeout": "seconds before a distributed check is stopped and fails",
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
    _add_baseline_options(group, parser)
    _add_plot_options(group, parser)


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
    """Resolve the policy's defaults, ini values, then command-line values, over the defaults."""
    from .suite import run_policy

    policy = run_policy(config)  # --gradcheck-policy / gradcheck_policy; UsageError when bad
    sources: list[tuple[str, Mapping[str, object]]] = policy.sources() if policy else []
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
    if policy is not None:
        settings = replace(settings, policy=policy)
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


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    """Add the ``pytest_gradcheck_*`` hooks (:mod:`.hookspecs`), register the built-in
    checks and conventions as ordinary implementations of them, and the YAML suites."""
    from . import hookspecs, suite
    from .hooks import BuiltinChecks, BuiltinConventions

    pluginmanager.add_hookspecs(hookspecs)
    pluginmanager.register(BuiltinChecks(), BuiltinChecks.name)
    pluginmanager.register(BuiltinConventions(), BuiltinConventions.name)
    pluginmanager.register(suite, suite.PLUGIN_NAME)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", _marker_line())
    if config.getoption("help", False):
        return  # --help must work even with a broken configuration
    config.stash[_RUN] = _run_settings(config)
    _Baselines.configure(config)
    _Plots.configure(config)
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
    report = _run_check(item, run, model, batch, settings)
    state.checks += 1
    return _record(item, state.checks, report)


def _run_check(item: pytest.Item, run: _Run, model: Any, batch: Any, settings: Settings) -> Report:
    """Run one check with the run's thread setting and the hooks of the item's directory."""
    __tracebackhide__ = True
    from .api import check_gradients
    from .hooks import using_hook

    restore = _apply_threads(run)
    try:
        with using_hook(item.ihook):
            return check_gradients(model, batch, settings=settings)
    finally:
        if restore is not None:
            _set_threads(restore)


def _record(item: pytest.Item, number: int, report: Report) -> Report:
    """Record the ``number``-th check of ``item``: its properties, and the baseline's verdict."""
    suffix = "" if number == 1 else f".{number}"
    extra: list[tuple[str, str]] = []
    baselines = item.config.stash.get(_BASELINES, None)
    if baselines is not None:  # --gradcheck-baseline / --gradcheck-save-baseline
        report, extra = baselines.check(item.nodeid, number, report)
    plots = item.config.stash.get(_PLOTS, None)
    if plots is not None:  # --gradcheck-plots
        extra += plots.write(item, number, report)
    item.user_properties.extend(
        (name + suffix, value) for name, value in [*report.junit_properties(), *extra]
    )
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


# -- gradient baselines ---------------------------------------------------------------------

_BASELINE_HELP = {
    "save": "save each check's per-layer gradient norms to FILE (written once, by the "
    "xdist controller); run it on the main branch",
    "compare": "fail a check whose layer gradient norms moved more than the baseline factor "
    "from FILE (saved with --gradcheck-save-baseline); new or removed checks and layers "
    "are reported, not failed",
    "factor": "how far (x or 1/x) a layer's gradient norm may move from the baseline",
}


def _factor(text: str) -> float:
    from .baseline import parse_factor

    try:
        return parse_factor(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_baseline_options(group: pytest.OptionGroup, parser: pytest.Parser) -> None:
    group.addoption(
        "--gradcheck-save-baseline",
        dest="gradcheck_save_baseline",
        default=None,
        metavar="FILE",
        help=_BASELINE_HELP["save"],
    )
    group.addoption(
        "--gradcheck-baseline",
        dest="gradcheck_baseline",
        default=None,
        metavar="FILE",
        help=_BASELINE_HELP["compare"],
    )
    group.addoption(
        "--gradcheck-baseline-factor",
        dest="gradcheck_baseline_factor",
        type=_factor,
        default=None,
        metavar="FACTOR",
        help=f"{_BASELINE_HELP['factor']} (default: 10)",
    )
    parser.addini(
        "gradcheck_baseline_factor", f"{_BASELINE_HELP['factor']} (default: 10)", default="10"
    )


class _Baselines:
    """``--gradcheck-baseline`` and ``--gradcheck-save-baseline``.

    In the process that runs a check (an xdist worker, or the only process), :meth:`check`
    compares the report's per-layer norms with the baseline, which every process reads, and
    records two more properties: ``gradcheck.profile`` (the norms, compact JSON: it crosses
    the process boundary like the others and lets ``gradcheck-report diff`` read a JUnit
    file) and, when comparing, ``gradcheck.baseline`` (one line: ``unchanged``, ``moved:
    ...`` or ``new``). The controller collects the profiles from the reports and writes the
    baseline file once, at the end of the session.
    """

    name = "gradcheck-baselines"

    def __init__(
        self, config: pytest.Config, compare: str | None, save: str | None, factor: float
    ) -> None:
        from .baseline import Baseline, BaselineError

        self._config = config
        self.compare_path = compare
        self.save_path = save
        self.factor = factor
        self.baseline: Baseline | None = None
        if compare is not None:
            try:
                self.baseline = Baseline.load(compare)
            except BaselineError as exc:
                raise pytest.UsageError(
                    f"--gradcheck-baseline: {exc}\nSave a baseline on the main branch with "
                    f"--gradcheck-save-baseline={compare}, or drop --gradcheck-baseline."
                ) from None
        self.profiles: dict[str, dict[str, float | None]] = {}
        self.statuses: dict[str, str] = {}

    @classmethod
    def configure(cls, config: pytest.Config) -> None:
        compare = config.getoption("gradcheck_baseline", None)
        save = config.getoption("gradcheck_save_baseline", None)
        if compare is None and save is None:
            return
        factor = config.getoption("gradcheck_baseline_factor", None)
        if factor is None:
            raw = config.getini("gradcheck_baseline_factor")
            try:
                factor = _factor(raw)
            except argparse.ArgumentTypeError as exc:
                origin = _ini_origin(config, "gradcheck_baseline_factor")
                raise pytest.UsageError(f"{exc} (from {origin})") from None
        plugin = cls(config, compare, save, factor)
        config.stash[_BASELINES] = plugin
        config.pluginmanager.register(plugin, cls.name)

    def check(
        self, nodeid: str, index: int, report: Report
    ) -> tuple[Report, list[tuple[str, str]]]:
        """Compare one check with the baseline; return the report (with ``regression``
        problems when layers moved) and the properties to record."""
        from .baseline import (
            check_key,
            compare_profiles,
            encode_profile,
            profile_of,
            regression_report,
        )

        profile = profile_of(report)
        properties = [("gradcheck.profile", encode_profile(profile))]
        if self.baseline is not None:
            key = check_key(nodeid, index)
            old = self.baseline.checks.get(key)
            if old is None:
                status = "new"
            else:
                comparison = compare_profiles(key, old, profile, self.factor)
                report = regression_report(report, comparison, str(self.compare_path))
                status = comparison.status()
            properties.append(("gradcheck.baseline", status))
        return report, properties

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "teardown":  # the teardown report carries every property
            return
        from .baseline import BaselineError, check_key, decode_profile

        for prop in report.user_properties:
            name = str(prop[0])
            for key in ("profile", "baseline"):
                stem = f"{PREFIX}{key}"
                if name != stem and not name.startswith(stem + "."):
                    continue
                index = name[len(stem) + 1 :]
                check = check_key(report.nodeid, int(index) if index.isdigit() else 1)
                if key == "baseline":
                    self.statuses[check] = str(prop[1])
                    continue
                try:
                    self.profiles[check] = decode_profile(str(prop[1]), check)
                except BaselineError:  # not ours: a test recorded a property of that name
                    continue

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.save_path is None or hasattr(self._config, "workerinput"):
            return  # the controller (or the only process) writes the file, once
        from .baseline import Baseline

        Baseline(dict(self.profiles)).save(self.save_path)

    def pytest_terminal_summary(self, terminalreporter: TerminalReporter) -> None:
        lines = self.summary_lines()
        if lines:
            terminalreporter.write_sep("=", "gradcheck baseline")
            for line in lines:
                terminalreporter.write_line(line)

    def summary_lines(self) -> list[str]:
        lines: list[str] = []
        if self.baseline is not None:
            moved = {
                key: status.partition("; ")[0][len("moved: ") :]
                for key, status in sorted(self.statuses.items())
                if status.startswith("moved")
            }
            new = sorted(k for k, s in self.statuses.items() if s == "new")
            lines.append(
                f"compared {len(self.statuses) - len(new)} check(s) with {self.compare_path} "
                f"(factor {self.factor:g}): {len(moved)} moved, {len(new)} new"
            )
            lines.extend(f"moved      {key}: {shifts}" for key, shifts in moved.items())
            lines.extend(f"new        {key} (not in the baseline: not compared)" for key in new)
            for key, status in sorted(self.statuses.items()):
                _, _, changes = status.partition("; ")
                if changes:
                    lines.append(f"layers     {key}: {changes}")
            gone = sorted(key for key in self.baseline.checks if key not in self.statuses)
            if gone:
                shown = ", ".join(gone[:3]) + (f" (+{len(gone) - 3} more)" if len(gone) > 3 else "")
                lines.append(
                    f"not run    {len(gone)} baseline check(s) (removed, deselected, failed "
                    f"before the check or run in another shard): {shown}"
                )
        if self.save_path is not None:
            lines.append(
                f"saved the gradient profiles of {len(self.profiles)} check(s) to {self.save_path}"
            )
        return lines


_BASELINES = pytest.StashKey[_Baselines]()


# -- gradient-flow charts -------------------------------------------------------------------

_PLOTS_HELP = (
    "write the gradient-flow chart of checks (PNG, one per check, needs "
    "pytest-gradcheck[plot]) into DIR; with pytest-html, attach it to the test's report"
)
_PLOTS_FOR = ("failures", "all")
_PLOTS_FOR_HELP = "which checks --gradcheck-plots draws: failures (unhealthy checks) or all"


def _add_plot_options(group: pytest.OptionGroup, parser: pytest.Parser) -> None:
    group.addoption(
        "--gradcheck-plots",
        dest="gradcheck_plots",
        default=None,
        metavar="DIR",
        help=_PLOTS_HELP,
    )
    group.addoption(
        "--gradcheck-plots-for",
        dest="gradcheck_plots_for",
        choices=_PLOTS_FOR,
        default=None,
        help=f"{_PLOTS_FOR_HELP} (default: failures)",
    )
    parser.addini("gradcheck_plots", f"{_PLOTS_HELP} (relative to the ini file)", default=None)
    parser.addini("gradcheck_plots_for", f"{_PLOTS_FOR_HELP} (default: failures)", default=None)


class _Plots:
    """``--gradcheck-plots=DIR``: draw each (failing, or every) check's gradient-flow chart.

    The process that runs a check (an xdist worker, or the only process) writes the PNG: it
    is an output for the user, not data the controller reads back. Its path travels as the
    ``gradcheck.plot`` property; with pytest-html (``--html``) the image is also attached to
    the test's report as an extra. Neither matplotlib nor pytest-html is imported unless a
    chart is drawn or attached.
    """

    name = "gradcheck-plots"

    def __init__(self, directory: Path, every: bool, html: bool) -> None:
        self.directory = directory
        self.every = every
        self.html = html
        self.written = 0

    @classmethod
    def configure(cls, config: pytest.Config) -> None:
        raw: str | None = config.getoption("gradcheck_plots", None)
        origin, base = "--gradcheck-plots", config.invocation_params.dir
        if raw is None:
            raw = config.getini("gradcheck_plots") or None
            if raw is None:
                return
            origin = _ini_origin(config, "gradcheck_plots")
            base = config.inipath.parent if config.inipath is not None else config.rootpath
        which = config.getoption("gradcheck_plots_for", None)
        if which is None:
            which = (config.getini("gradcheck_plots_for") or "failures").strip().lower()
            if which not in _PLOTS_FOR:
                raise pytest.UsageError(
                    f"gradcheck_plots_for={which!r} from "
                    f"{_ini_origin(config, 'gradcheck_plots_for')}: choose failures or all"
                )
        if importlib.util.find_spec("matplotlib") is None:
            raise pytest.UsageError(
                f"{origin} needs matplotlib to draw gradient-flow charts, and it is not "
                "installed: pip install 'pytest-gradcheck[plot]' (or drop the option)"
            )
        html = config.pluginmanager.hasplugin("html") and bool(config.getoption("htmlpath", None))
        plugin = cls((base / raw).resolve(), which == "all", html)
        config.stash[_PLOTS] = plugin
        config.pluginmanager.register(plugin, cls.name)

    def write(self, item: pytest.Item, number: int, report: Report) -> list[tuple[str, str]]:
        """Draw the chart of one check when it is wanted; return the property to record."""
        if report.ok and not self.every:
            return []
        from .plot import plot_file_name, plot_gradient_flow

        title = item.nodeid if number == 1 else f"{item.nodeid} (check {number})"
        try:
            path = plot_gradient_flow(
                report, self.directory / plot_file_name(item.nodeid, number), title=title
            )
        except Exception as exc:  # a chart must never change a test's outcome
            item.warn(
                pytest.PytestWarning(
                    f"--gradcheck-plots could not draw the chart of {title}: "
                    f"{type(exc).__name__}: {exc}"
                )
            )
            return []
        item.stash.setdefault(_PLOT_FILES, []).append(path)
        suffix = "" if number == 1 else f".{number}"
        return [(f"{PREFIX}plot{suffix}", str(path))]

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        paths = item.stash.get(_PLOT_FILES, None)
        if self.html and paths:
            extras = importlib.import_module("pytest_html.extras")  # pytest-html is active

            attached = list(getattr(report, "extras", []))
            for path in paths:
                content = base64.b64encode(path.read_bytes()).decode("ascii")
                attached.append(extras.png(content, name=f"gradient flow: {path.name}"))
            report.extras = attached  # type: ignore[attr-defined]
            paths.clear()
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "teardown":
            self.written += sum(
                1 for prop in report.user_properties if str(prop[0]).startswith(f"{PREFIX}plot")
            )

    def pytest_terminal_summary(self, terminalreporter: TerminalReporter) -> None:
        if self.written:
            terminalreporter.write_line(
                f"gradcheck: wrote {self.written} gradient-flow chart(s) to {self.directory}"
            )


_PLOTS = pytest.StashKey[_Plots]()
_PLOT_FILES = pytest.StashKey[list[Path]]()
