"""The pytest plugin: the ``--gradcheck-*`` options and ``gradcheck_*`` ini keys, the
``gradient_health`` marker, the ``gradcheck`` fixture, the automatic check of a marked test,
and the wiring of pytest's hooks to :mod:`.session`.

How a check flows through pytest:

``pytest_configure``
    registers the marker; :func:`.session.configure` resolves the run-level settings
    (policy < ini < command line) once and registers the reporters the options ask for.
``_gradcheck_item`` (autouse fixture)
    for a marked test, applies the marker keywords (module, class, then function marker)
    over the run-level settings and keeps them, with the fixture request, in
    ``item.stash``. A typo in a keyword fails the test at setup.
``gradcheck`` (fixture)
    ``gradcheck(model, batch, **overrides)`` runs the check (:func:`.session.check`), which
    appends the report's ``gradcheck.*`` properties to ``item.user_properties``, and fails
    the test when the gradients are unhealthy.
``pytest_runtest_call`` (wrapper)
    after the body of a marked test that ran no check passes, checks the test's ``model``
    and ``batch`` fixtures.
``pytest_collect_file``
    collects ``gradcheck*.yaml`` files as suites (:mod:`.suite`, imported for the first one).

Loading the plugin costs nothing: it imports :mod:`.settings`, :mod:`.results`,
:mod:`.session` (light when it loads) and :mod:`.hookspecs`; the policy, the suites, the
baselines, the charts and the engine (torch) load when a check, a suite file, a policy or a
report option asks for them. Nothing imports this module.
"""

from __future__ import annotations

import argparse
import fnmatch
from collections.abc import Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from . import session
from .results import GradcheckError, Report
from .session import CONFIGURABLE, PLOTS_FOR, flag, parse_factor, parse_threads
from .settings import SETTING_NAMES, Settings, override, resolve

if TYPE_CHECKING:
    from .suite import SuiteFile

MARKER = "gradient_health"
_GROUP = "gradient health checks (pytest-gradcheck)"
_SUITE_PATTERNS = ["gradcheck*.yaml", "gradcheck*.yml"]

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
    "timeout": "seconds one check may take (its passes, steps and diagnosis) before it stops "
    "and fails; looked at between passes, so pytest-timeout guards a hung forward",
}
_THREADS_HELP = (
    "torch threads during checks: auto (under pytest-xdist, cpu_count // workers, set once "
    "per worker), an integer (set for each check, restored after it) or off"
)


# -- options --------------------------------------------------------------------------------


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
    option = flag(name)

    def parse(text: str) -> str:
        try:
            resolve([(option, {name: text})])
        except GradcheckError as exc:
            raise argparse.ArgumentTypeError(str(exc).split(f" from {option}: ", 1)[-1]) from None
        return text

    parse.__name__ = name
    return parse


_ADVISORY_HELP = (
    "advisory mode, for rolling the gate out: record every verdict, property and summary as "
    "usual, but fail no test for an unhealthy check"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gradcheck", _GROUP)
    _add_suite_options(group, parser)
    defaults = Settings()
    for name in CONFIGURABLE:
        default = getattr(defaults, name)
        text = _HELP.get(name, f"the {name} setting")
        metavar = "on|off" if isinstance(default, bool) else name.upper()
        group.addoption(
            flag(name),
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
        type=parse_threads,
        default=None,
        metavar="auto|off|N",
        help=f"{_THREADS_HELP} (default: auto)",
    )
    parser.addini("gradcheck_threads", f"{_THREADS_HELP} (default: auto)", default="auto")
    group.addoption(
        "--gradcheck-advisory",
        dest="gradcheck_advisory",
        action="store_true",
        default=None,
        help=_ADVISORY_HELP,
    )
    parser.addini("gradcheck_advisory", f"{_ADVISORY_HELP} (default: false)", type="bool")
    _add_baseline_options(group, parser)
    _add_plot_options(group, parser)


def _add_suite_options(group: pytest.OptionGroup, parser: pytest.Parser) -> None:
    group.addoption(
        "--gradcheck-policy",
        dest="gradcheck_policy",
        default=None,
        metavar="FILE",
        help="policy file (YAML): default settings, per-layer rules and conventions for "
        "every gradient check of the run",
    )
    parser.addini(
        "gradcheck_policy",
        "policy file (YAML) for every gradient check, relative to the ini file",
        type="string",
        default=None,
    )
    parser.addini(
        "gradcheck_suite_pattern",
        "glob(s) of YAML files collected as gradient-check suites (default: "
        + " ".join(_SUITE_PATTERNS)
        + ")",
        type="args",
        default=_SUITE_PATTERNS,
    )
    parser.addini(
        "gradcheck_suite_imports",
        "modules (and their submodules) that a suite's model: and loss: may import from, "
        "e.g. mypkg.models; checked before anything is imported or called (default: any "
        "module but the standard library: a suite file runs code like a test module)",
        type="args",
        default=[],
    )


_BASELINE_HELP = {
    "save": "save each check's per-layer gradient norms to FILE (written once, by the "
    "xdist controller); run it on the main branch",
    "compare": "fail a check whose layer gradient norms moved more than the baseline factor "
    "from FILE (saved with --gradcheck-save-baseline); new or removed checks and layers "
    "are reported, not failed",
    "factor": "how far (x or 1/x) a layer's gradient norm may move from the baseline",
}


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
        type=parse_factor,
        default=None,
        metavar="FACTOR",
        help=f"{_BASELINE_HELP['factor']} (default: 10)",
    )
    parser.addini(
        "gradcheck_baseline_factor", f"{_BASELINE_HELP['factor']} (default: 10)", default="10"
    )


_PLOTS_HELP = (
    "write the gradient-flow chart of checks (PNG, one per check, needs "
    "pytest-gradcheck[plot]) into DIR; with pytest-html, attach it to the test's report"
)
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
        choices=PLOTS_FOR,
        default=None,
        help=f"{_PLOTS_FOR_HELP} (default: failures)",
    )
    parser.addini("gradcheck_plots", f"{_PLOTS_HELP} (relative to the ini file)", default=None)
    parser.addini("gradcheck_plots_for", f"{_PLOTS_FOR_HELP} (default: failures)", default=None)


def _marker_line() -> str:
    defaults = Settings()
    signature = ", ".join(f"{name}={getattr(defaults, name)!r}" for name in SETTING_NAMES)
    return (
        f"{MARKER}({signature}): check the gradients of the test's model: the gradcheck "
        "fixture's calls, or else the test's `model` and `batch` fixtures after the test "
        "passes; keywords override the --gradcheck-* options and gradcheck_* ini keys"
    )


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    """Add the ``pytest_gradcheck_*`` hooks (:mod:`.hookspecs`). The built-in checks and
    conventions, ordinary implementations of them, are registered by the first check, policy
    or suite that calls them (:func:`.session.use_builtins`)."""
    from . import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", _marker_line())
    if config.getoption("help", False):
        return  # --help must work even with a broken configuration
    session.configure(config)


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> SuiteFile | None:
    """Collect a ``gradcheck*.yaml`` file (``gradcheck_suite_pattern``) as a suite."""
    if file_path.suffix not in (".yaml", ".yml"):
        return None
    patterns: list[str] = parent.config.getini("gradcheck_suite_pattern")
    if not any(fnmatch.fnmatch(file_path.name, pattern) for pattern in patterns):
        return None
    from .suite import SuiteFile

    suite: SuiteFile = SuiteFile.from_parent(parent, path=file_path)
    return suite


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


@pytest.fixture(autouse=True)
def _gradcheck_item(request: pytest.FixtureRequest) -> None:
    """Start the test's gradcheck state; for a marked test, bind the marker's keywords."""
    __tracebackhide__ = True
    item = request.node
    run = session.run_state(request.config)
    if item.get_closest_marker(MARKER) is None:
        item.stash[session.ITEM] = session.ItemState(
            settings=run.settings, request=request, marked=False
        )
        return
    try:
        settings = _item_settings(item, run.settings)
    except GradcheckError as exc:
        error = str(exc)
    else:
        item.stash[session.ITEM] = session.ItemState(
            settings=settings, request=request, marked=True
        )
        return
    _fail(error)  # outside the except: no chained traceback


class Gradcheck:
    """The ``gradcheck`` fixture's value: ``gradcheck(model, batch, **overrides) -> Report``."""

    def __init__(self, item: pytest.Item, state: session.ItemState) -> None:
        self._item = item
        self._state = state

    def __call__(self, model: Any, batch: Any, *, target: Any = None, **overrides: Any) -> Report:
        """Check ``model`` on ``batch``; fail the test with the diagnosis when unhealthy.

        ``target`` goes to the loss as ``loss_fn(output, target)`` (moved to the device like
        the batch). ``overrides`` are settings that win over the marker, the command line
        and the ini file. Returns the :class:`~pytest_gradcheck.results.Report` when healthy.
        """
        __tracebackhide__ = True
        settings = override(
            self._state.settings, f"the gradcheck() call in {self._item.name}", overrides
        )
        report = session.check(self._item, self._state, model, batch, settings, target)
        if session.advisory(self._item.config):
            return report  # recorded as unhealthy; the test does not fail for it
        return report.raise_if_unhealthy(None if self._item.config.get_verbosity() > 0 else 12)


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
    return Gradcheck(item, item.stash[session.ITEM])


# -- the automatic check of marked tests ----------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    __tracebackhide__ = True
    yield  # re-raises when the body failed: only a passing body is checked
    state = item.stash.get(session.ITEM, None)
    if state is not None and state.marked and not state.checks:
        error = _auto_check(item, state)
        if error is not None:
            _fail(error)


def _auto_check(item: pytest.Item, state: session.ItemState) -> str | None:
    """Check the test's ``model`` and ``batch`` fixtures (and its ``target`` fixture, when it
    has one, for ``loss_fn(output, target)``); return why the test fails, if it does."""
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
        target = state.request.getfixturevalue("target")
    except pytest.FixtureLookupError as exc:
        if exc.argname != "target":
            raise
        target = None
    try:
        report = session.check(item, state, model, batch, state.settings, target)
    except GradcheckError as exc:
        return f"the gradient check of the `model` and `batch` fixtures could not run: {exc}"
    if report.ok or session.advisory(item.config):
        return None
    return (
        f"{report.format_failure(None if item.config.get_verbosity() > 0 else 12)}\n"
        "(checked the `model` and `batch` fixtures after the "
        f"test passed, as the {MARKER} marker asks)"
    )
