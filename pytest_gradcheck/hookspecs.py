"""The hooks that extend pytest-gradcheck: their specs, and nothing else.

In a pytest run these specs are added to pytest's own plugin manager (in
``pytest_addhooks``), so a ``conftest.py`` or an installed plugin implements them like any
pytest hook. The built-in implementations, the plugin manager used outside pytest and the
relay a check calls live in :mod:`pytest_gradcheck.hooks`.

Imports nothing of the package at run time (types only); no torch, no pytest: the markers
are pluggy's, under pytest's project name, so ``@pytest.hookimpl`` and :data:`hookimpl` are
interchangeable.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch

    from .conventions import Convention
    from .results import LayerStats, Problem, Report, Structure
    from .settings import Settings

__all__ = [
    "hookimpl",
    "hookspec",
    "pytest_gradcheck_check",
    "pytest_gradcheck_conventions",
    "pytest_gradcheck_default_loss",
    "pytest_gradcheck_report",
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

    :return: :class:`~pytest_gradcheck.conventions.Convention` objects. A convention's ``check``
        receives the model's :class:`~pytest_gradcheck.results.Structure`, its layer
        statistics and the parameters the policy gives (over ``defaults``), and returns
        ``(layer, message)`` findings; each becomes a problem of kind ``convention``.

    A name that two implementations define is taken from the one that runs first (a
    user's implementation before the built-in ones). Define conventions in the rootdir's
    ``conftest.py`` (or a plugin) so that the policy, loaded at startup, can name them.
    Example ``conftest.py``::

        import pytest
        from pytest_gradcheck.conventions import Convention

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
