"""The pytest run of gradient checks: its settings, its checks and what it reports.

``plugin.py`` wires pytest's hooks to what is here, as pytest-benchmark's ``plugin.py`` does
to its ``session.py``:

:func:`configure`
    resolves the run-level settings once (the policy's defaults < ini < command line) into
    :class:`Run`, in ``config.stash[RUN]``; registers the baselines and the charts when their
    options ask for them and, on the controller, the summary collector. A bad value is a
    :class:`pytest.UsageError` that names where it came from.
:func:`check`, :func:`run_check`, :func:`record`
    run one check with the run's threads and the hooks of the item's directory, then record
    its ``gradcheck.*`` properties (:mod:`.properties`), with the baseline's verdict and the
    chart's path. The ``gradcheck`` fixture, the automatic check of a marked test and a YAML
    suite's items all check through them.
``_Summary``, ``_Baselines``, ``_Plots``
    read the checks back from the test reports (on the controller under pytest-xdist) and
    print the ``gradcheck`` sections; the baselines file is written once, at the end.

The names and parsers that the options and the resolution share (:func:`flag`,
:data:`CONFIGURABLE`, :func:`parse_threads`, :func:`parse_factor`, :data:`PLOTS_FOR`) live
here too, so that the plugin declares the options with them and nothing reaches back.

Imports pytest, :mod:`.settings`, :mod:`.results` and :mod:`.properties` when it loads;
the policy (YAML), the baselines, the charts, the built-in checks, the hook specs' runner
and the engine (torch) only when a run asks for them. Never imports the plugin module.
"""

from __future__ import annotations

import argparse
import base64
import importlib
import importlib.util
import os
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from . import properties
from .escape import stdout_line
from .results import GradcheckError, Report
from .settings import PYTHON_ONLY, SETTING_NAMES, Settings, resolve

if TYPE_CHECKING:
    from _pytest.terminal import TerminalReporter

    from .baseline import Baseline
    from .settings import Policy

#: Settings that can be given on the command line and in the ini file.
CONFIGURABLE: tuple[str, ...] = tuple(name for name in SETTING_NAMES if name not in PYTHON_ONLY)
#: Values of ``--gradcheck-plots-for``: which checks get a chart.
PLOTS_FOR: tuple[str, ...] = ("failures", "all")

_MAX_HEALTHY = 30
"""Above this many healthy checks the summary shows their count only (unless -v)."""
_MAX_PROBLEMS = 4
"""Problems shown per summary line."""


def flag(name: str) -> str:
    """The command-line flag of a setting: ``max_norm`` -> ``--gradcheck-max-norm``."""
    return "--gradcheck-" + name.replace("_", "-")


def parse_threads(text: str) -> int | str:
    """``auto``, ``off`` or a positive integer (an argparse ``type=``)."""
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


def parse_factor(text: str) -> float:
    """A baseline factor > 1 (an argparse ``type=``)."""
    from .baseline import parse_factor as parse

    try:
        return parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def ini_origin(config: pytest.Config, key: str) -> str:
    """Where an ini value came from: ``-o key=value`` or ``the ini option key in tox.ini``."""
    for entry in config.getoption("override_ini", None) or ():
        if entry.split("=", 1)[0].strip() == key:
            return f"-o {entry}"
    where = f" in {config.inipath.name}" if config.inipath is not None else ""
    return f"the ini option {key}{where}"


# -- the run's state ------------------------------------------------------------------------


@dataclass
class Run:
    """Per-run state, in ``config.stash[RUN]``."""

    settings: Settings
    threads: int | str
    """An integer, ``"auto"`` or ``"off"``."""
    threads_applied: bool = False


@dataclass
class ItemState:
    """Per-test state, in ``item.stash[ITEM]``: the settings after the markers, the fixture
    request (for the automatic check's fixtures) and how many checks the test ran."""

    settings: Settings
    request: pytest.FixtureRequest
    marked: bool
    checks: int = 0


RUN = pytest.StashKey[Run]()
ITEM = pytest.StashKey[ItemState]()


def configure(config: pytest.Config) -> None:
    """Resolve the run's settings; register the reporters that the options ask for."""
    config.stash[RUN] = _resolve_run(config)
    _Baselines.configure(config)
    _Plots.configure(config)
    if not hasattr(config, "workerinput"):  # an xdist worker sends its reports to the controller
        summary = _Summary(config)
        config.pluginmanager.register(summary, _Summary.name)
        config.add_cleanup(lambda: config.pluginmanager.unregister(summary))


def run_state(config: pytest.Config) -> Run:
    """The run's state (resolved now when :func:`configure` did not run: under ``--help``,
    or for a caller that skipped ``pytest_configure``)."""
    run = config.stash.get(RUN, None)
    if run is None:
        run = config.stash[RUN] = _resolve_run(config)
    return run


def run_policy(config: pytest.Config) -> Policy | None:
    """Load the policy that ``--gradcheck-policy`` or the ``gradcheck_policy`` ini key names."""
    given = config.getoption("gradcheck_policy", None)
    if given:
        path = config.invocation_params.dir / given
        origin = f"--gradcheck-policy={given}"
    else:
        given = config.getini("gradcheck_policy")
        if not given:
            return None
        base = config.inipath.parent if config.inipath is not None else config.rootpath
        path = base / given
        origin = ini_origin(config, "gradcheck_policy")
    from .hooks import conventions
    from .policy import home, load_policy

    use_builtins(config)
    try:
        return load_policy(path, conventions(config.hook), root=home(path, config.rootpath))
    except GradcheckError as exc:
        raise pytest.UsageError(f"{exc}\n(the policy file named by {origin})") from None


def _resolve_run(config: pytest.Config) -> Run:
    """Resolve the policy's defaults, ini values, then command-line values, over the defaults."""
    policy = run_policy(config)  # --gradcheck-policy / gradcheck_policy; UsageError when bad
    sources: list[tuple[str, Mapping[str, object]]] = policy.sources() if policy else []
    for name in CONFIGURABLE:
        value = config.getini(f"gradcheck_{name}")
        if value is not None:
            sources.append((ini_origin(config, f"gradcheck_{name}"), {name: value}))
    cli: dict[str, str] = {}
    for name in CONFIGURABLE:
        value = config.getoption(f"gradcheck_{name}")
        if value is not None:
            cli[name] = value
            sources.append((flag(name), {name: value}))
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
                    f"{flag(name)} has no effect with --gradcheck-relative {cli['relative']}: "
                    f"the ratio belongs to the relative rule; drop {flag(name)} or turn the "
                    "rule on"
                )

    threads: int | str | None = config.getoption("gradcheck_threads")
    if threads is None:
        raw = config.getini("gradcheck_threads")
        try:
            threads = parse_threads(raw)
        except argparse.ArgumentTypeError as exc:
            raise pytest.UsageError(
                f"gradcheck_threads={raw!r} from {ini_origin(config, 'gradcheck_threads')}: {exc}"
            ) from None
    return Run(settings=settings, threads=threads)


def use_builtins(config: pytest.Config) -> None:
    """Register the built-in checks and conventions with pytest, the first time a check, a
    policy or a suite calls the hooks. They are ordinary ``trylast`` implementations of the
    hooks; a conftest can block them by name (``pluginmanager.set_blocked``)."""
    from .hooks import BuiltinChecks, BuiltinConventions

    manager = config.pluginmanager
    for builtin in (BuiltinChecks, BuiltinConventions):
        if manager.get_plugin(builtin.name) is None and not manager.is_blocked(builtin.name):
            manager.register(builtin(), builtin.name)


# -- running and recording a check ----------------------------------------------------------


def check(
    item: pytest.Item,
    state: ItemState,
    model: Any,
    batch: Any,
    settings: Settings,
    target: Any = None,
) -> Report:
    """Run one check of a test and record it; the caller decides what a verdict means."""
    __tracebackhide__ = True
    report = run_check(item, run_state(item.config), model, batch, settings, target)
    state.checks += 1
    return record(item, state.checks, report)


def run_check(
    item: pytest.Item, run: Run, model: Any, batch: Any, settings: Settings, target: Any = None
) -> Report:
    """Run one check with the run's thread setting and the hooks of the item's directory."""
    __tracebackhide__ = True
    from .api import check_gradients
    from .hooks import using_hook

    use_builtins(item.config)
    restore = _apply_threads(run)
    try:
        with using_hook(item.ihook):
            return check_gradients(model, batch, target=target, settings=settings)
    finally:
        if restore is not None:
            _set_threads(restore)


def record(item: pytest.Item, number: int, report: Report) -> Report:
    """Record the ``number``-th check of ``item``: its properties, and the baseline's verdict."""
    extra: list[tuple[str, properties.Value]] = []
    baselines = item.config.stash.get(_BASELINES, None)
    if baselines is not None:  # --gradcheck-baseline / --gradcheck-save-baseline
        report, extra = baselines.check(item.nodeid, number, report)
    plots = item.config.stash.get(_PLOTS, None)
    if plots is not None:  # --gradcheck-plots
        extra += plots.write(item, number, report)
    item.user_properties.extend(properties.write(report, number, extra))
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


def _apply_threads(run: Run) -> int | None:
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


# -- the terminal summary -------------------------------------------------------------------


class _Summary:
    """Collects the checks from test reports and prints the ``gradcheck`` terminal section.

    Registered on the controller only: under pytest-xdist the reports it reads are the
    workers' reports, so the section is the same with and without ``-n``.
    """

    name = "gradcheck-summary"

    def __init__(self, config: pytest.Config) -> None:
        self._config = config
        self.entries: list[tuple[str, properties.RecordedCheck]] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # The teardown report always comes, last, and carries every property of the test
        # (also of checks run in a fixture, or in a setup that failed).
        if report.when == "teardown" and report.user_properties:
            self.entries.extend(
                (report.nodeid, check) for check in properties.read(report.user_properties)
            )

    def pytest_terminal_summary(self, terminalreporter: TerminalReporter) -> None:
        if not self.entries:
            return
        terminalreporter.write_sep("=", "gradcheck")
        for line in summary_lines(self.entries, verbose=self._config.getoption("verbose") > 0):
            terminalreporter.write_line(stdout_line(line))
        if advisory(self._config):
            unhealthy = sum(1 for _, check in self.entries if check.verdict != "healthy")
            terminalreporter.write_line(
                f"advisory mode (--gradcheck-advisory): {unhealthy} unhealthy check(s) reported "
                "above, no test failed for them"
            )


def summary_lines(
    entries: Sequence[tuple[str, properties.RecordedCheck]], verbose: bool
) -> list[str]:
    """One line per ``(node id, check)``, unhealthy first, then by node id (the order xdist
    cannot change)."""
    ordered = sorted(entries, key=lambda e: (e[1].verdict == "healthy", e[0], e[1].number))
    healthy = [e for e in ordered if e[1].verdict == "healthy"]
    collapse = len(healthy) > _MAX_HEALTHY and not verbose
    width = max(len(check.verdict) for _, check in ordered)
    lines: list[str] = []
    for nodeid, check in ordered:
        if collapse and check.verdict == "healthy":
            continue
        name = nodeid if check.number == 1 else f"{nodeid} (check {check.number})"
        line = f"{check.verdict.ljust(width)}  {name}"
        if check.worst_layer:
            which = "smallest gradient" if check.verdict == "healthy" else "worst layer"
            line += f"  {which}: {check.worst_layer}"
        if check.problems:
            shown = ",".join(check.problems[:_MAX_PROBLEMS])
            more = len(check.problems) - _MAX_PROBLEMS
            line += f"  problems: {shown}" + (f" (+{more} more)" if more > 0 else "")
        setup = check.setup_text()
        lines.append(f"{line}  ({setup})" if setup else line)
    if collapse:
        lines.append(f"{'healthy'.ljust(width)}  {len(healthy)} checks (-v lists them)")
    return lines


# -- gradient baselines ---------------------------------------------------------------------


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
        if save is not None and Path(save).is_dir():
            raise pytest.UsageError(
                f"--gradcheck-save-baseline={stdout_line(str(save))}: is a directory; name the "
                "JSON file to write, e.g. --gradcheck-save-baseline=gradient-baseline.json"
            )
        factor = config.getoption("gradcheck_baseline_factor", None)
        if factor is None:
            raw = config.getini("gradcheck_baseline_factor")
            try:
                factor = parse_factor(raw)
            except argparse.ArgumentTypeError as exc:
                origin = ini_origin(config, "gradcheck_baseline_factor")
                raise pytest.UsageError(f"{exc} (from {origin})") from None
        plugin = cls(config, compare, save, factor)
        config.stash[_BASELINES] = plugin
        config.pluginmanager.register(plugin, cls.name)

    def check(
        self, nodeid: str, index: int, report: Report
    ) -> tuple[Report, list[tuple[str, properties.Value]]]:
        """Compare one check with the baseline; return the report (with ``regression``
        problems when layers moved) and the properties to record, by key."""
        from .baseline import (
            check_key,
            compare_profiles,
            encode_profile,
            profile_of,
            regression_report,
        )

        profile = profile_of(report)
        extra: list[tuple[str, properties.Value]] = [("profile", encode_profile(profile))]
        if self.baseline is not None:
            key = check_key(nodeid, index)
            old = self.baseline.checks.get(key)
            if old is None:
                status = "new"
            else:
                comparison = compare_profiles(key, old, profile, self.factor)
                report = regression_report(report, comparison, str(self.compare_path))
                status = comparison.status()
            extra.append(("baseline", status))
        return report, extra

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "teardown":  # the teardown report carries every property
            return
        from .baseline import BaselineError, check_key, decode_profile

        for recorded in properties.read(report.user_properties):
            key = check_key(report.nodeid, recorded.number)
            if recorded.baseline:
                self.statuses[key] = recorded.baseline
            if recorded.profile:
                try:
                    self.profiles[key] = decode_profile(recorded.profile, key)
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
                terminalreporter.write_line(stdout_line(line))

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
            origin = ini_origin(config, "gradcheck_plots")
            base = config.inipath.parent if config.inipath is not None else config.rootpath
        which = config.getoption("gradcheck_plots_for", None)
        if which is None:
            which = (config.getini("gradcheck_plots_for") or "failures").strip().lower()
            if which not in PLOTS_FOR:
                raise pytest.UsageError(
                    f"gradcheck_plots_for={which!r} from "
                    f"{ini_origin(config, 'gradcheck_plots_for')}: choose failures or all"
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

    def write(
        self, item: pytest.Item, number: int, report: Report
    ) -> list[tuple[str, properties.Value]]:
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
        return [("plot", str(path))]

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
                1 for recorded in properties.read(report.user_properties) if recorded.plot
            )

    def pytest_terminal_summary(self, terminalreporter: TerminalReporter) -> None:
        if self.written:
            terminalreporter.write_line(
                f"gradcheck: wrote {self.written} gradient-flow chart(s) to {self.directory}"
            )


_PLOTS = pytest.StashKey[_Plots]()
_PLOT_FILES = pytest.StashKey[list[Path]]()


def advisory(config: pytest.Config) -> bool:
    """``--gradcheck-advisory`` / ``gradcheck_advisory``: report unhealthy checks, fail no
    test for them."""
    given = config.getoption("gradcheck_advisory", None)
    return bool(given) if given is not None else bool(config.getini("gradcheck_advisory"))
