"""The verdict: the one stage that turns a pass's statistics into the problems that fail a
check, and the notes that explain without failing.

:func:`evaluate` runs the ``pytest_gradcheck_check`` hooks (the built-in checks among them)
under the settings that govern each layer, runs the policy's conventions, drops what the
policy's rules ignore, and sorts once. The engine asks it once per pass and adds nothing of
its own. Beyond one pass, :func:`beyond_one_pass` adds what mixed precision, loss scaling
and training steps explain, :func:`after_steps` decides ``expect_loss_decrease``, and
:func:`small_batch_first` leads the hints with a batch too small for BatchNorm. (A baseline
comparison's ``regression`` problems are added by :mod:`pytest_gradcheck.baseline`.)

Imports the hooks and the checks below it; no torch, no pytest.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from .checks import collapsed_scale, precision_problems, stalled
from .conventions import Finding
from .hooks import conventions, current_hook
from .results import GradcheckError, LayerStats, Problem, Structure
from .settings import ConventionSetting, LayerRule, Settings, did_you_mean

__all__ = ["after_steps", "beyond_one_pass", "evaluate", "small_batch_first"]

_MIN_DECREASE = 1e-6
"""``expect_loss_decrease``: the last loss must be below the first by this fraction of it."""


def _run_checks(
    hook: Any,
    layers: Sequence[LayerStats],
    structure: Structure,
    loss: float,
    settings: Settings,
) -> tuple[list[Problem], list[str]]:
    notes: list[str] = []
    problems: list[Problem] = []
    for found in hook.pytest_gradcheck_check(
        layers=tuple(layers), structure=structure, loss=loss, settings=settings, notes=notes
    ):
        for problem in found or ():
            if not isinstance(problem, Problem):
                raise GradcheckError(
                    "a pytest_gradcheck_check implementation returned "
                    f"{type(problem).__name__}; return Problem objects (or None)"
                )
            problems.append(problem)
    return problems, notes


def _names(names: Sequence[str], most: int = 4) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def evaluate(
    layers: Sequence[LayerStats],
    structure: Structure,
    loss: float,
    settings: Settings,
    hook: Any = None,
) -> tuple[list[Problem], list[str]]:
    """Statistics in, problems and notes out: the check hooks, conventions and rules."""
    relay = hook if hook is not None else current_hook()
    policy = settings.policy
    if policy is None:
        problems, notes = _run_checks(relay, layers, structure, loss, settings)
        return _sorted(problems, layers), notes

    cache: dict[str, LayerRule | None] = {}

    def rule_for(layer: str) -> LayerRule | None:
        if layer not in cache:
            cache[layer] = policy.rule_for(layer)
        return cache[layer]

    base, notes = _run_checks(relay, layers, structure, loss, settings)
    problems = [p for p in base if not _overrides(rule_for(p.layer))]
    governing: dict[LayerRule, list[str]] = {}
    for layer in layers:
        rule = rule_for(layer.display_name)
        if rule is not None:
            governing.setdefault(rule, []).append(layer.display_name)
    for rule, governed in governing.items():
        if not rule.settings:
            continue
        variant = policy.settings_for(rule, settings)
        found, found_notes = _run_checks(relay, layers, structure, loss, variant)
        for problem in found:
            if rule_for(problem.layer) is rule:
                problems.append(
                    dataclasses.replace(
                        problem, message=f"{problem.message} [rule {rule.label}]", rule=rule.label
                    )
                )
        notes += [note for note in found_notes if note not in notes]
        notes.append(f"policy rule {rule.describe()} set the limits of {_names(governed)}")

    if policy.enabled:
        registry = conventions(relay)
        for setting in policy.enabled:
            convention = registry.get(setting.name)
            if convention is None:
                raise GradcheckError(
                    f"the policy {setting.origin} switches on the convention {setting.name!r}, "
                    f"which no pytest_gradcheck_conventions hook defines here"
                    + did_you_mean(setting.name, registry)
                )
            params = {**convention.defaults, **setting.params}
            for finding in convention.check(structure, layers, params):
                problems.append(_convention_problem(finding, setting))

    kept: list[Problem] = []
    ignored: dict[LayerRule, list[str]] = {}
    for problem in problems:
        rule = rule_for(problem.layer)
        if rule is not None and (
            rule.ignore
            or problem.kind in rule.ignore_kinds
            or (problem.kind == "convention" and f"convention:{problem.rule}" in rule.ignore_kinds)
        ):
            ignored.setdefault(rule, []).append(f"{problem.kind}:{problem.layer}")
            continue
        kept.append(problem)
    for rule, what in ignored.items():
        unique = list(dict.fromkeys(what))
        notes.append(
            f"policy rule {rule.describe()} ignored {len(what)} problem(s): {_names(unique)}"
        )
    return _sorted(kept, layers), notes


def _overrides(rule: LayerRule | None) -> bool:
    return rule is not None and bool(rule.settings)


def _convention_problem(finding: Finding, setting: ConventionSetting) -> Problem:
    source = f"(convention {setting.name}, {setting.origin})"
    if isinstance(finding, Problem):
        return dataclasses.replace(
            finding, kind="convention", message=f"{finding.message} {source}", rule=setting.name
        )
    layer, message = finding
    return Problem(
        kind="convention",
        layer=layer or "<root>",
        param=None,
        value=math.nan,
        limit=None,
        message=f"{message} {source}",
        rule=setting.name,
    )


def _sorted(problems: list[Problem], layers: Sequence[LayerStats]) -> list[Problem]:
    if not problems:
        return problems
    depth = {layer.display_name: layer.depth for layer in layers}
    return sorted(problems, key=lambda p: (p.sort_key(), depth.get(p.layer, -1)))


# -- beyond one pass: precision, loss scaling, steps ----------------------------------------------


def beyond_one_pass(
    problems: Sequence[Problem],
    layers: Sequence[LayerStats],
    *,
    step: int,
    steps: int,
    precision: str,
    reference: tuple[Sequence[LayerStats], float] | None,
    loss_scale: float | None,
    collapsed: tuple[float, float, int] | None,
) -> list[Problem]:
    """A pass's problems with what mixed precision, loss scaling and steps explain.

    ``reference`` is the same pass in fp32 (its layers and loss) when the low-precision pass
    looked suspicious; ``collapsed`` is (initial scale, final scale, overflowing passes) when
    the GradScaler's scale collapsed. With ``steps > 1`` each problem names its step.
    """
    found = list(problems)
    if reference is not None:
        found = precision_problems(found, layers, reference[0], reference[1], precision, loss_scale)
    if collapsed is not None:
        found.insert(0, collapsed_scale(*collapsed))
    found.sort(key=Problem.sort_key)
    if steps > 1:
        found = [dataclasses.replace(p, step=step) if p.step is None else p for p in found]
    return found


def after_steps(
    first: float, final: float, steps: int, optimizer: str, covered: int, trainable: int
) -> list[Problem]:
    """``expect_loss_decrease``: ``stalled`` unless the loss after the last step is below the
    first loss by a clear margin."""
    if math.isfinite(final) and first - final > _MIN_DECREASE * abs(first):
        return []
    return [stalled(first, final, steps, optimizer, covered, trainable)]


_ENOUGH_PER_CHANNEL = 16
"""Values per channel a train-mode BatchNorm needs for statistics worth trusting."""


def small_batch_first(
    problems: Sequence[Problem], small_batchnorm: Sequence[tuple[str, int]]
) -> list[Problem]:
    """When a train-mode BatchNorm saw one or two values per channel, its statistics inflate
    every gradient upstream: those gradients are real for this batch, so the problems stay,
    but each vanishing or exploding one leads with that cause and the way to a verdict that
    can be trusted."""
    if not small_batchnorm:
        return list(problems)
    name, count = small_batchnorm[0]
    more = f" (and {len(small_batchnorm) - 1} more)" if len(small_batchnorm) > 1 else ""
    lead = (
        f"first make the sample batch big enough: train-mode BatchNorm {name}{more} sees "
        f"{count} value(s) per channel, which makes the gradients upstream unreliable; use a "
        f"batch (or inputs) giving it at least {_ENOUGH_PER_CHANNEL} values per channel, or "
        "mode='eval'"
    )
    return [
        dataclasses.replace(p, hint=f"{lead}; then: {p.hint}" if p.hint else lead)
        if p.kind in ("vanishing", "exploding")
        else p
        for p in problems
    ]
