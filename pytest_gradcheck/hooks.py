"""The built-in hook implementations, the plugin manager used outside pytest, and the relay
a check calls.

Inside pytest a check calls the running test's hooks (:func:`using_hook`, set by the
plugin), so a ``conftest.py`` implementation applies to the tests under it. Outside pytest
(``check_gradients`` in a script) :func:`plugin_manager` holds the built-in
implementations; register your own with ``plugin_manager().register(obj)``.

The built-in checks (:class:`BuiltinChecks`) and conventions (:class:`BuiltinConventions`)
are ordinary implementations of the specs in :mod:`pytest_gradcheck.hookspecs`, marked
``trylast`` so that a user's implementation runs first.

Imports the specs, the checks and the conventions below it; no torch, no pytest.
"""

from __future__ import annotations

import functools
import os
import traceback
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import pluggy

from . import hookspecs
from .checks import builtin_problems
from .conventions import BUILTIN_CONVENTIONS, Convention
from .hookspecs import hookimpl
from .results import GradcheckError, LayerStats, Problem, Report, Structure
from .settings import Settings

__all__ = [
    "BuiltinChecks",
    "BuiltinConventions",
    "conventions",
    "current_hook",
    "plugin_manager",
    "post_process",
    "using_hook",
]


class BuiltinChecks:
    """:func:`builtin_problems` as an ordinary ``pytest_gradcheck_check`` implementation.

    ``trylast``: the problems of a user's check come first (and can be ignored by a policy
    rule like any other).
    """

    name = "gradcheck-checks"

    @hookimpl(trylast=True)
    def pytest_gradcheck_check(
        self,
        layers: Sequence[LayerStats],
        structure: Structure,
        loss: float,
        settings: Settings,
        notes: list[str],
    ) -> list[Problem]:
        problems, found_notes = builtin_problems(layers, structure, loss, settings)
        notes.extend(found_notes)
        return problems


class BuiltinConventions:
    """The built-in conventions, registered like a user's (``trylast``: a user's wins)."""

    name = "gradcheck-conventions"

    @hookimpl(trylast=True)
    def pytest_gradcheck_conventions(self) -> Iterable[Convention]:
        return BUILTIN_CONVENTIONS


def conventions(hook: Any = None) -> dict[str, Convention]:
    """Every convention the hooks define, by name (a user's before a built-in one).

    A hook that raises, or returns something that is not a list of conventions, is a
    :class:`GradcheckError` that says so (a usage error when a policy is loaded).
    """
    relay = hook if hook is not None else current_hook()
    found: dict[str, Convention] = {}
    try:
        batches = relay.pytest_gradcheck_conventions()
    except Exception as exc:
        raise GradcheckError(
            f"a pytest_gradcheck_conventions hook raised {_raised(exc)}; fix the hook (in a "
            "conftest.py or a plugin): it returns the Convention objects it adds"
        ) from None
    for batch in batches:
        if batch is not None and not isinstance(batch, Iterable):
            raise GradcheckError(
                "a pytest_gradcheck_conventions hook returned "
                f"{type(batch).__name__}; return a list of Convention objects"
            )
        for convention in batch or ():
            if not isinstance(convention, Convention):
                raise GradcheckError(
                    "pytest_gradcheck_conventions must return Convention objects "
                    f"(from pytest_gradcheck.conventions), got {type(convention).__name__}"
                )
            found.setdefault(convention.name, convention)
    return found


def _raised(exc: BaseException) -> str:
    """``Type at file.py:LINE: message`` (where it was raised; the message's first line)."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}{where}" + (f": {lines[0]}" if lines else "")


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
    manager = _Manager("pytest")
    manager.add_hookspecs(hookspecs)
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
