"""Hooks that extend pytest-gradcheck, and the small plugin manager that runs them.

In a pytest run the specs below are added to pytest's own plugin manager (in
``pytest_addhooks``), so a ``conftest.py`` or an installed plugin implements them like any
pytest hook, and a check made by the ``gradcheck`` fixture, a marked test or a YAML suite
calls the implementations that apply to the test's directory. Outside pytest
(``check_gradients`` in a script) :func:`plugin_manager` holds the built-in
implementations; register your own with ``plugin_manager().register(obj)``.

The built-in checks (:class:`pytest_gradcheck.checks.BuiltinChecks`) and conventions
(:class:`pytest_gradcheck.policy.BuiltinConventions`) are ordinary implementations of these
hooks, marked ``trylast`` so that a user's implementation runs first.

No torch and no pytest import here: the markers are pluggy's, under pytest's project name,
so ``@pytest.hookimpl`` and :data:`hookimpl` are interchangeable.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch

    from .checks import Structure
    from .policy import Convention
    from .results import LayerStats, Problem, Report
    from .settings import Settings

__all__ = [
    "current_hook",
    "hookimpl",
    "hookspec",
    "plugin_manager",
    "post_process",
    "using_hook",
]

hookspec = pluggy.HookspecMarker("pytest")
#: The same marker as ``pytest.hookimpl`` (usable without importing pytest).
hookimpl = pluggy.HookimplMarker("pytest")


@hookspec
def pytest_gradcheck_check(
    layers: Sequence[LayerStats],
    structure: Structure,
    loss: float,
    settings: Settings,
    notes: list[str],
) -> Iterable[Problem] | None:
    """Add a check: turn a model's gradient statistics into problems.

    :param layers: per-layer statistics in registration (forward) order.
    :param structure: the model's modules as plain data (names, types, parameter counts).
    :param loss: the loss value of the pass.
    :param settings: the settings in effect. With a policy whose per-layer rules override
        thresholds, the hook is called once more per such rule, and the problems it returns
        are kept for the layers that rule governs.
    :param notes: append explanations that do not fail the check (shown under the failure).
    :return: problems (any ``kind`` string; ``message`` says what was measured), or None.

    Called once per check or more (see ``settings``); keep implementations free of side
    effects. Every implementation's problems count; a problem fails the check unless a
    policy rule ignores it. Example ``conftest.py``::

        import pytest
        from pytest_gradcheck import Problem

        @pytest.hookimpl
        def pytest_gradcheck_check(layers, structure, loss, settings, notes):
            # fail when a layer's gradient is large next to its weights (an update of more
            # than 10x the weights at learning rate 1)
            return [
                Problem(
                    kind="update_ratio",
                    layer=layer.display_name,
                    param=None,
                    value=layer.grad_norm / layer.weight_norm,
                    limit=10.0,
                    message="gradient norm > 10x weight norm",
                    hint="lower the init gain or the loss scale",
                )
                for layer in layers
                if layer.weight_norm > 0 and layer.grad_norm > 10 * layer.weight_norm
            ]
    """


@hookspec
def pytest_gradcheck_conventions() -> Iterable[Convention] | None:
    """Add architecture conventions that a policy can switch on by name.

    :return: :class:`~pytest_gradcheck.policy.Convention` objects. A convention's ``check``
        receives the model's :class:`~pytest_gradcheck.checks.Structure`, its layer
        statistics and the parameters the policy gives (over ``defaults``), and returns
        ``(layer, message)`` findings; each becomes a problem of kind ``convention``.

    A name that two implementations define is taken from the one that runs first (a
    user's implementation before the built-in ones). Define conventions in the rootdir's
    ``conftest.py`` (or a plugin) so that the policy, loaded at startup, can name them.
    Example ``conftest.py``::

        import pytest
        from pytest_gradcheck.policy import Convention

        def no_dropout_before_norm(structure, layers, params):
            types = [m.type for m in structure.modules]
            return [
                (structure.modules[i].name, "Dropout right before a normalization layer")
                for i in range(len(types) - 1)
                if types[i] == "Dropout" and "Norm" in types[i + 1]
            ]

        @pytest.hookimpl
        def pytest_gradcheck_conventions():
            return [Convention("no_dropout_before_norm", no_dropout_before_norm)]

    and in the policy file: ``conventions: {no_dropout_before_norm: true}``.
    """


@hookspec(firstresult=True)
def pytest_gradcheck_default_loss(
    model: torch.nn.Module, output: Any, settings: Settings
) -> torch.Tensor | None:
    """Supply the loss for a model family when the check has no ``loss_fn``.

    Consulted after an explicit ``loss_fn`` and the model's own loss (a scalar output,
    ``output.loss`` or ``output["loss"]``), before the built-in default (a seeded random
    projection of the outputs). The first implementation that returns a tensor wins.

    :return: a scalar tensor that depends on the model's parameters, or None to pass.

    Example ``conftest.py``::

        import pytest

        @pytest.hookimpl
        def pytest_gradcheck_default_loss(model, output, settings):
            # Hugging Face base models return hidden states: regress them toward zero
            hidden = getattr(output, "last_hidden_state", None)
            if hidden is None:
                return None
            return hidden.float().pow(2).mean()
    """


@hookspec
def pytest_gradcheck_report(report: Report) -> Report | None:
    """Post-process a report before it is rendered (failure text, JUnit, summary).

    Implementations run one after the other, each on the previous one's result: return a
    new :class:`~pytest_gradcheck.results.Report` (``dataclasses.replace``) or None to keep
    it. Dropping problems makes a failing check pass: prefer a policy rule for that, since
    the report then says which rule applied. Example ``conftest.py``::

        import dataclasses
        import pytest

        @pytest.hookimpl
        def pytest_gradcheck_report(report):
            if report.ok:
                return None
            owner = "questions: #ml-platform on chat, or the model owner in CODEOWNERS"
            return dataclasses.replace(report, notes=(*report.notes, owner))
    """


# -- running the hooks -------------------------------------------------------------------------


class _Manager(pluggy.PluginManager):
    """Like pytest's manager: plain ``pytest_gradcheck_*`` functions count as implementations."""

    def parse_hookimpl_opts(self, plugin: object, name: str) -> pluggy.HookimplOpts | None:
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None and name.startswith("pytest_gradcheck_"):
            return pluggy.HookimplOpts(
                wrapper=False,
                hookwrapper=False,
                optionalhook=False,
                tryfirst=False,
                trylast=False,
                specname=None,
            )
        return opts


@functools.cache
def plugin_manager() -> pluggy.PluginManager:
    """The plugin manager used outside pytest, with the built-in implementations registered."""
    from .checks import BuiltinChecks
    from .policy import BuiltinConventions

    manager = _Manager("pytest")
    manager.add_hookspecs(sys.modules[__name__])
    manager.register(BuiltinChecks(), BuiltinChecks.name)
    manager.register(BuiltinConventions(), BuiltinConventions.name)
    return manager


_CURRENT: ContextVar[pluggy.HookRelay | None] = ContextVar("pytest_gradcheck_hook", default=None)


def current_hook() -> pluggy.HookRelay:
    """The hooks a check calls: the running test's (set by the plugin), else our own."""
    relay = _CURRENT.get()
    return relay if relay is not None else plugin_manager().hook


@contextmanager
def using_hook(relay: pluggy.HookRelay) -> Iterator[None]:
    """Run checks inside the block with ``relay`` (a pytest item's ``ihook``)."""
    token = _CURRENT.set(relay)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def post_process(report: Report) -> Report:
    """Run every ``pytest_gradcheck_report`` implementation in call order, chained."""
    from .results import GradcheckError, Report

    caller = current_hook().pytest_gradcheck_report
    # pluggy calls implementations last-registered first (tryfirst/trylast respected).
    for impl in reversed(caller.get_hookimpls()):
        if impl.hookwrapper or impl.wrapper:
            continue
        kwargs = {"report": report}
        result = impl.function(*(kwargs[name] for name in impl.argnames))
        if result is None:
            continue
        if not isinstance(result, Report):
            raise GradcheckError(
                f"pytest_gradcheck_report in {impl.plugin_name} returned "
                f"{type(result).__name__}; return a Report (dataclasses.replace(report, ...)) "
                "or None"
            )
        report = result
    return report
