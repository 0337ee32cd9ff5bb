"""Built-in checks: plain gradient statistics in, problems (with hints) out.

Pure functions of statistics and settings; :mod:`pytest_gradcheck.hooks` offers them as an
ordinary ``pytest_gradcheck_check`` implementation. Imports only hints, paths, results and
settings; no torch, no pytest.

The rules, in the order they run:

``nonfinite``
    A NaN or Inf in the loss or in any gradient. A finite loss can hide NaN gradients,
    so every gradient is looked at.
``unused``
    A trainable parameter that received no gradient at all (never called, cut off by
    ``.detach()`` or ``torch.no_grad()``, run without its output reaching the loss, or
    reaching it only through integer indices such as a top-k selector's). Frozen parameters
    are never flagged.
``dead``
    A layer that received a gradient that is exactly zero everywhere. When the model holds
    an all-zero gate (a zero-initialised residual branch, ReZero's alpha, LoRA's B, a
    BatchNorm gamma of 0) whose own gradient is not zero, zero gradients upstream of it are
    expected at step 0: the report explains instead of failing.
``vanishing`` / ``exploding``
    Absolute bounds (``min_norm`` / ``max_norm``, off by default) on each layer's gradient
    L2 norm; a uniform floor (every layer's gradient RMS below ``floor_rms``) and ceiling
    (a layer's norm above ``ceiling_norm``); and the relative, depth-aware rule below.

The relative rule compares layers that play the same role at different depths. Layers
are grouped by their module path with the numbers taken out (``blocks.3.mlp.fc1`` and
``blocks.7.mlp.fc1`` share ``blocks.#.mlp.fc1``) and, as a second grouping, by module
type. Within a group of at least three layers in forward order, the reference is the
median gradient RMS of the third nearest the loss. A layer is ``vanishing`` when its RMS
is below ``vanishing_ratio`` times the reference *and* the group's gradients fall
steadily with distance from the loss (rank correlation of log-RMS with depth of at least
0.8); ``exploding`` likewise with ``exploding_ratio`` and a steady rise. Requiring a trend
is what keeps healthy networks green: attention query/key projections at initialisation,
LayerScale branches and embeddings sit decades below other layers at *every* depth, which
is a level, not a decay.
"""

from __future__ import annotations

import functools
import math
import operator
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from .expected import explained_dead
from .hints import (
    CUT_HINT,
    DROPPED_HINT,
    INDICES_HINT,
    NEVER_RAN_HINT,
    UNREAD_HINT,
    UNUSED_HINT,
    dead_hint,
    exploding_hint,
    init_scale,
    through,
    vanishing_hint,
    zero_start_hint,
)
from .paths import role, subtrees
from .results import LayerStats, Problem, Structure
from .settings import Settings
from .trend import depth_correlation

_RECURRENT = frozenset({"RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell"})
_TREND = 0.8
_MIN_GROUP = 3


def builtin_problems(
    layers: Sequence[LayerStats], structure: Structure, loss: float, settings: Settings
) -> tuple[list[Problem], list[str]]:
    """The built-in checks (see the module docstring): problems and notes."""
    problems: list[Problem] = []
    notes: list[str] = []
    problems += _nonfinite(layers, loss)
    broken = {p.layer for p in problems}
    if settings.unused:
        unused, unused_notes = _unused(layers, structure)
        problems += unused
        notes += unused_notes
    if settings.dead:
        dead, dead_notes = _dead(layers, structure)
        problems += dead
        notes += dead_notes
    healthy = [
        layer
        for layer in layers
        if layer.has_grad
        and layer.grad_norm > 0
        and (not broken or layer.display_name not in broken)
    ]
    # The loss's own scale is evidence only for a loss the user chose (the default loss
    # follows the output's scale).
    scale = loss if settings.loss_fn is not None else 1.0
    relative, relative_notes = _relative(healthy, structure, settings, scale)
    notes += relative_notes
    lone, lone_notes = _lone(healthy, structure, settings)
    notes += lone_notes
    growth = _forward_growth(layers, structure, settings)
    flagged: set[tuple[str, str]] = set()
    for problem in _absolute(healthy, structure, settings, scale) + relative + lone + growth:
        if (problem.kind, problem.layer) not in flagged:
            flagged.add((problem.kind, problem.layer))
            problems.append(problem)
    if problems:
        depth = {layer.display_name: layer.depth for layer in layers}
        problems.sort(key=lambda p: (p.sort_key(), depth.get(p.layer, -1)))
    return problems, notes


# -- nonfinite, unused, dead -----------------------------------------------------------------


def _nonfinite(layers: Sequence[LayerStats], loss: float) -> list[Problem]:
    problems: list[Problem] = []
    if not math.isfinite(loss):
        problems.append(
            Problem(
                kind="nonfinite",
                layer="<loss>",
                param=None,
                value=loss,
                limit=None,
                message=f"the loss is {loss}",
                hint=_NONFINITE_HINT,
            )
        )
    for layer in layers:
        if not (layer.nan_count or layer.inf_count):  # the sums of its parameters' counts
            continue
        for p in layer.params:
            if p.nan_count or p.inf_count:
                what = []
                if p.nan_count:
                    what.append(f"{p.nan_count} NaN")
                if p.inf_count:
                    what.append(f"{p.inf_count} Inf")
                problems.append(
                    Problem(
                        kind="nonfinite",
                        layer=layer.display_name,
                        param=p.name,
                        value=float(p.nan_count + p.inf_count),
                        limit=0.0,
                        message=f"{' and '.join(what)} of {p.numel} gradient values",
                        hint=_NONFINITE_HINT,
                    )
                )
    return problems


_NONFINITE_HINT = (
    "guard log/sqrt/division/acos against 0 and +-1 (add an epsilon or clamp), mask with a "
    "finite large negative instead of -inf, and use GradScaler or bf16 for fp16 overflow"
)


_HAS_GRAD = operator.attrgetter("has_grad")


def _unused(layers: Sequence[LayerStats], structure: Structure) -> tuple[list[Problem], list[str]]:
    problems: list[Problem] = []
    stochastic: list[str] = []
    unexercised: list[str] = []
    for layer in layers:
        if all(map(_HAS_GRAD, layer.params)):
            continue
        for p in layer.params:
            if p.has_grad:
                continue
            if p.name in structure.other_seeds:
                stochastic.append(p.name)
                continue
            if structure.missing_inputs and p.name in structure.not_exercised:
                unexercised.append(p.name)
                continue
            cause = "received no gradient"
            hint = UNUSED_HINT
            cut = structure.cuts.get(p.name)
            selector = structure.through_indices.get(p.name)
            if layer.name in structure.never_ran:
                cause += ": its module never ran in the forward"
                hint = NEVER_RAN_HINT
            elif selector is not None:
                cause += f": reaches the loss only through {through(*selector)}"
                hint = INDICES_HINT
            elif cut is not None:
                cause += f": its path to the loss is cut by {cut}"
                hint = CUT_HINT
            elif structure.reach_looked and p.name not in structure.not_exercised:
                cause += ": ran, but its output does not reach the loss"
                hint = DROPPED_HINT
            elif structure.reach_looked:
                cause += ": its module ran, but no op in the forward read it"
                hint = UNREAD_HINT
            problems.append(
                Problem(
                    kind="unused",
                    layer=layer.display_name,
                    param=p.name,
                    value=float(p.numel),
                    limit=None,
                    message=f"trainable parameter {cause}",
                    hint=hint,
                )
            )
    notes: list[str] = []
    if not unexercised and not stochastic:
        return problems, notes
    everything = [p.name for layer in layers for p in layer.params]
    if unexercised:
        given = ", ".join(structure.missing_inputs[:4])
        more = len(structure.missing_inputs) - 4
        inputs = given + (f" and {more} more" if more > 0 else "")
        parts = [f"{root} ({len(names)})" for root, names in subtrees(unexercised, everything)]
        notes.append(
            f"not exercised by this batch: {_names(parts, 6)}: {len(unexercised)} "
            "parameter(s) without a gradient whose modules never ran or that no op read, while "
            f"the forward's inputs {inputs} were not given; pass those inputs to check them"
        )
    for root, names in subtrees(stochastic, everything):
        notes.append(
            f"{root} ({len(names)} parameter(s)) got no gradient under the check's seed but one "
            "under another (LayerDrop, stochastic depth or MoE routing skipped it): not unused"
        )
    return problems, notes


def _dead(layers: Sequence[LayerStats], structure: Structure) -> tuple[list[Problem], list[str]]:
    dead = [
        layer
        for layer in layers
        if layer.has_grad
        and layer.nan_count == 0
        and layer.inf_count == 0
        and layer.grad_max_abs == 0.0
        and layer.numel > 0
    ]
    if not dead:
        return [], []
    stochastic = [
        layer.display_name
        for layer in dead
        if any(p.name in structure.other_seeds for p in layer.params)
    ]
    notes: list[str] = []
    if stochastic:
        dead = [layer for layer in dead if layer.display_name not in stochastic]
        notes.append(
            f"{_names(stochastic)} got an all-zero gradient under the check's seed but not under "
            "another (stochastic depth or LayerDrop dropped it): not dead"
        )
        if not dead:
            return [], notes
    dead, explained = explained_dead(dead, layers, structure)
    notes += explained
    if not dead:
        return [], notes
    gates = [
        p.name
        for layer in layers
        for p in layer.params
        if p.weight_norm == 0.0
        and p.has_grad
        and p.grad_max_abs > 0
        and not p.name.rpartition(".")[2].startswith("bias")
    ]
    names = ", ".join(layer.display_name for layer in dead[:6])
    if len(dead) > 6:
        names += f" and {len(dead) - 6} more"
    if gates:
        gate_names = ", ".join(gates[:4]) + (
            f" and {len(gates) - 4} more" if len(gates) > 4 else ""
        )
        return [], [
            *notes,
            f"{len(dead)} layer(s) have exactly zero gradients ({names}), consistent with the "
            f"zero-initialised gate(s) {gate_names} (zero-init residual, ReZero, LoRA): expected "
            "at step 0, so not a failure",
        ]
    problems = []
    hint = dead_hint(dead, structure)
    for layer in dead:
        problems.append(
            Problem(
                kind="dead",
                layer=layer.display_name,
                param=None,
                value=0.0,
                limit=None,
                message=(
                    f"gradient is exactly zero in all {layer.numel} values ({len(dead)} of "
                    f"{len(layers)} layers)"
                ),
                hint=hint,
            )
        )
    return problems, notes


# -- vanishing and exploding -----------------------------------------------------------------


def _absolute(
    layers: Sequence[LayerStats], structure: Structure, settings: Settings, loss: float
) -> list[Problem]:
    problems: list[Problem] = []
    if layers and max(layer.grad_rms for layer in layers) < settings.floor_rms:
        top = max(layer.grad_rms for layer in layers)
        floor_hint = vanishing_hint(layers, structure)
        for layer in layers:
            problems.append(
                Problem(
                    kind="vanishing",
                    layer=layer.display_name,
                    param=None,
                    value=layer.grad_rms,
                    limit=settings.floor_rms,
                    message=(
                        f"every layer's gradient RMS is below {settings.floor_rms:.0e} "
                        f"(largest {top:.2g})"
                    ),
                    hint=floor_hint,
                )
            )
    hints: dict[str, str] = {}  # made on the first problem that needs one: most checks pass

    def hint_for(kind: str) -> str:
        if kind not in hints:
            hints[kind] = (
                vanishing_hint(layers, structure)
                if kind == "vanishing"
                else exploding_hint(layers, structure, uniform=True, loss=loss)
            )
        return hints[kind]

    for layer in layers:
        norm = layer.grad_norm
        if settings.min_norm is not None and norm < settings.min_norm:
            problems.append(
                Problem(
                    kind="vanishing",
                    layer=layer.display_name,
                    param=None,
                    value=norm,
                    limit=settings.min_norm,
                    message=f"gradient norm {norm:.3g} < min_norm {settings.min_norm:g}",
                    hint=hint_for("vanishing"),
                )
            )
        ceiling = settings.max_norm if settings.max_norm is not None else settings.ceiling_norm
        if norm > ceiling:
            source = "max_norm" if settings.max_norm is not None else "ceiling_norm"
            problems.append(
                Problem(
                    kind="exploding",
                    layer=layer.display_name,
                    param=None,
                    value=norm,
                    limit=ceiling,
                    message=f"gradient norm {norm:.3g} > {source} {ceiling:g}",
                    hint=(
                        zero_start_hint(layer)
                        if layer.weight_norm == 0.0
                        else hint_for("exploding")
                    ),
                )
            )
    return problems


def _role_of(layer: LayerStats) -> str:
    return _cached_role(layer.name)


_cached_role = functools.lru_cache(maxsize=65536)(role)


def _groups(layers: Sequence[LayerStats]) -> list[list[LayerStats]]:
    """Layers that play the same role at different depths: same role and parameter shapes
    (``blocks.#.fc1``), and, for layers that no such group holds (models that name layers one
    by one: ``fc1``, ``fc2``), same module type (RMS makes layers of different sizes
    comparable). A stem or a head beside role-named blocks is compared with nothing: its
    input resolution or width differs from theirs by design. Nor, in a model of role-named
    blocks, are layers of one type but different shapes: they sit in different stages of a
    pyramid (a CNN's depthwise convolutions at 32x32 and at 2x2), where the gradient per
    weight differs with the resolution, not with a decay."""
    by_role: dict[tuple[Any, ...], list[LayerStats]] = {}
    shape = operator.attrgetter("shape")
    for layer in layers:
        shapes = tuple(map(shape, layer.params))
        by_role.setdefault((_role_of(layer), layer.type, shapes), []).append(layer)
    groups = [g for g in by_role.values() if len(g) >= _MIN_GROUP]
    grouped = {id(layer) for g in groups for layer in g}
    role_named = any("#" in _role_of(layer) for layer in layers if id(layer) in grouped)
    by_type: dict[tuple[Any, ...], list[LayerStats]] = {}
    for layer in layers:
        if id(layer) in grouped:
            continue
        if role_named and "#" not in _role_of(layer):
            continue  # a stem or a head beside blocks named by role
        stage = tuple(map(shape, layer.params)) if role_named else ()
        by_type.setdefault((layer.type, stage), []).append(layer)
    groups += [g for g in by_type.values() if len(g) >= _MIN_GROUP]
    return [sorted(g, key=_DEPTH) for g in groups]


_DEPTH = operator.attrgetter("depth")


def _relative(
    layers: Sequence[LayerStats], structure: Structure, settings: Settings, loss: float = 1.0
) -> tuple[list[Problem], list[str]]:
    """The depth-aware rule (see the module docstring). Returns problems and notes.

    Every layer at a given depth receives the same back-propagated signal, so a real
    vanishing (or exploding) gradient shows in every role at once. When some roles shrink
    toward the input while others grow over the same layers, the pattern belongs to those
    roles' own Jacobians (attention keys at initialisation are the common case): the
    report explains it instead of failing.
    """
    if not settings.relative:
        return [], []
    problems: list[Problem] = []
    for group in _groups(layers):
        logs = [math.log10(layer.grad_rms) for layer in group]
        trend = depth_correlation(logs)
        if abs(trend) < _TREND:
            continue
        tail = logs[-max(1, len(group) // 3) :]
        reference = statistics.median(tail)
        vanishing = trend > 0
        if not vanishing and 10**reference < settings.floor_rms:
            continue  # the layers nearest the loss have next to no gradient: no reference
        limit = settings.vanishing_ratio if vanishing else settings.exploding_ratio
        bound = reference + math.log10(limit)
        if (min(logs) >= bound) if vanishing else (max(logs) <= bound):
            continue  # a trend, but no layer beyond the limit
        if _a_step(logs, vanishing):
            continue  # one layer apart from a flat rest: a level, not a trend
        group_role = _role_of(group[0]) if len({_role_of(x) for x in group}) == 1 else None
        if group_role and group_role.strip("#."):
            label = f"{group_role!r} layers"
        else:  # an nn.Sequential's bare numbers, or layers of one type: name them
            nearest = [repr(x.display_name) for x in group[-max(1, len(group) // 3) :]]
            label = f"{group[0].type} layers {_names(nearest)}"
        hint = (
            vanishing_hint(group, structure)
            if vanishing
            else exploding_hint(group, structure, loss=loss)
        )
        for layer, value in zip(group, logs, strict=True):
            if (vanishing and value < bound) or (not vanishing and value > bound):
                ratio = 10 ** (value - reference)
                relation = f"{ratio:.1e} of" if vanishing else f"{ratio:.1e}x"
                trend_text = "shrinking" if vanishing else "growing"
                problems.append(
                    Problem(
                        kind="vanishing" if vanishing else "exploding",
                        layer=layer.display_name,
                        param=None,
                        value=ratio,
                        limit=limit,
                        message=(
                            f"gradient RMS {layer.grad_rms:.2g} is {relation} the {label} "
                            f"nearest the loss ({10**reference:.2g}), {trend_text} with depth"
                        ),
                        hint=hint,
                    )
                )
    kinds = {p.kind for p in problems}
    if len(kinds) > 1:
        shrinking = sorted({p.layer for p in problems if p.kind == "vanishing"})
        growing = sorted({p.layer for p in problems if p.kind == "exploding"})
        return [], [
            f"gradients of {_names(shrinking)} shrink toward the input while those of "
            f"{_names(growing)} grow over the same layers: a pattern of those layers' own "
            "Jacobians (e.g. attention keys at initialisation), not a depth-wise vanishing or "
            "exploding gradient, so not a failure"
        ]
    return problems, []


def _lone(
    layers: Sequence[LayerStats], structure: Structure, settings: Settings
) -> tuple[list[Problem], list[str]]:
    """A layer (or a whole same-role group) that sits decades below the rest of the model
    with nothing of its role above it to compare: the gradient that reaches it has died on
    its way (a long recurrence behind it, a normalization that cancels its input).

    Two patterns are healthy and explained instead: a layer whose sibling of the same shape
    (same parent module) is normal lives on a branch of its own (attention keys behind a
    saturated softmax), and a small or zero gate (LayerScale, ReZero) scales a branch
    down on purpose while its own gradient is normal.
    """
    if not settings.relative or len(layers) < 2:
        return [], []
    by_depth = sorted(layers, key=_DEPTH)
    nearest = by_depth[-max(1, len(by_depth) // 3) :]  # the layers nearest the loss
    reference = statistics.median(layer.grad_rms for layer in nearest)
    low = reference * settings.vanishing_ratio
    candidates = [x for x in layers if x.grad_rms < low]
    if not candidates:
        return [], []
    # A group with a layer above the limit is the relative rule's to judge.
    judged = {
        id(layer)
        for group in _groups(layers)
        if any(member.grad_rms >= low for member in group)
        for layer in group
    }
    candidates = [x for x in candidates if id(x) not in judged]
    if not candidates:
        return [], []
    shapes = operator.attrgetter("shape")
    siblings: dict[tuple[Any, ...], list[LayerStats]] = {}
    for layer in layers:
        key = (layer.name.rpartition(".")[0], tuple(map(shapes, layer.params)))
        siblings.setdefault(key, []).append(layer)
    lone = [
        x
        for x in candidates
        if all(
            s.grad_rms < low
            for s in siblings[(x.name.rpartition(".")[0], tuple(map(shapes, x.params)))]
        )
    ]
    if not lone:
        return [], []
    notes: list[str] = []
    scores = structure.score_ops
    # A softmax at the output is on every path: then it tells nothing.
    weights = [x.display_name for x in lone if scores.get(x.name, 0) >= 1]
    if weights and any(scores.get(x.name, 1) == 0 for x in layers):
        lone = [x for x in lone if scores.get(x.name, 0) < 1]
        notes.append(
            f"gradients of {_names(weights)} are below {settings.vanishing_ratio:g} of the "
            f"layers nearest the loss ({reference:.2g}), but they only compute attention or "
            "routing weights (every path from them to the loss goes through a softmax), "
            "which sit low at initialisation while the things they weigh are alike: a "
            "level, not a decay, so not a failure"
        )
        if not lone:
            return [], notes
    gates = [
        p.name
        for layer in layers
        for p in layer.params
        if p.has_grad
        and p.numel
        and p.weight_norm / math.sqrt(p.numel) < _GATE
        and p.grad_norm / math.sqrt(p.numel) >= low
        and not p.name.rpartition(".")[2].startswith("bias")
    ]
    names = [x.display_name for x in lone]
    if gates:
        return [], [
            *notes,
            f"gradients of {_names(names)} are below {settings.vanishing_ratio:g} of the "
            f"layers nearest the loss ({reference:.2g}), consistent with the small gate(s) "
            f"{_names(gates)} (LayerScale, ReZero, zero-init residual), so not a failure",
        ]
    problems = []
    for layer in lone:
        ratio = layer.grad_rms / reference
        problems.append(
            Problem(
                kind="vanishing",
                layer=layer.display_name,
                param=None,
                value=ratio,
                limit=settings.vanishing_ratio,
                message=(
                    f"gradient RMS {layer.grad_rms:.2g} is {ratio:.1e} of the layers nearest the "
                    f"loss ({reference:.2g}), and no layer of its role is above the limit: the "
                    "signal died on its way to it"
                ),
                hint=vanishing_hint([layer], structure),
            )
        )
    return problems, notes


_GATE = 1e-3
"""A parameter whose values are below this RMS, with a normal gradient, is a gate that scales
its branch down on purpose (LayerScale's 1e-5, ReZero's 0)."""

OUTPUT_RMS = "output_rms"
"""Key of a module's forward output RMS in :attr:`ModuleInfo.extra` (measured when the
gradients are large: see ``needs_forward_scale``)."""
FORWARD_LOOK = 1.0
"""A layer gradient RMS above this (a unit-scale loss gives far less) asks for the forward
signal's scale, to tell an init that grows the signal from a large loss."""


def needs_forward_scale(layers: Sequence[LayerStats]) -> bool:
    """Whether the gradients are large enough that the forward signal's growth is worth a
    look (a forward pass with a hook per layer): only then :func:`_forward_growth` runs."""
    return any(layer.grad_rms > FORWARD_LOOK for layer in layers)


def _forward_growth(
    layers: Sequence[LayerStats], structure: Structure, settings: Settings
) -> list[Problem]:
    """The forward signal grows steadily layer after layer (too large an init accumulating
    over residual blocks without normalization): the gradients stay flat, carried by the
    skip connections, so the relative rule cannot see it, yet training diverges."""
    if not settings.relative or not needs_forward_scale(layers):
        return []  # the output scales were not measured
    by_name = structure.by_name
    order = structure.forward_order or tuple(m.name for m in structure.modules)
    scales = [
        (name, by_name[name].extra[OUTPUT_RMS])
        for name in order
        if name in by_name and by_name[name].extra.get(OUTPUT_RMS, 0.0) > 0.0
    ]
    if len(scales) < _MIN_GROUP:
        return []
    logs = [math.log10(value) for _, value in scales]
    head = logs[: max(1, len(logs) // 3)]
    reference = statistics.median(head)
    top = max(range(len(logs)), key=logs.__getitem__)
    ratio = 10 ** (logs[top] - reference)
    if ratio <= settings.exploding_ratio or depth_correlation(logs) < _TREND:
        return []
    name, value = scales[top]
    per_layer = ratio ** (1 / max(1, top))
    fix = "scale each residual branch down (by 1/sqrt(number of blocks), or zero-init its "
    fix += "last layer) or start from a smaller init"
    if not structure.has_normalization:
        fix += ", or add normalization (LayerNorm/BatchNorm, Pre-LN)"
    parts = [f"{fix}: residual branches add up with nothing to keep their scale"]
    init = init_scale(layers)
    if init:
        parts.append(f"{init[0]} start at {init[1]:.2g}x the {init[2]} std")
    parts.append(f"(the forward signal grows about {per_layer:.2g}x per layer)")
    return [
        Problem(
            kind="exploding",
            layer=name or "<root>",
            param=None,
            value=ratio,
            limit=settings.exploding_ratio,
            message=(
                f"output RMS {value:.3g} is {ratio:.1e}x that of the first layers in forward "
                f"order ({10**reference:.2g}), growing layer after layer; the gradients look "
                "flat because skip connections carry them"
            ),
            hint="; ".join(parts),
        )
    ]


_FLAT = math.log10(2.0)
"""Layers within a factor 2 of each other are flat."""


def _a_step(logs: Sequence[float], vanishing: bool) -> bool:
    """Whether the extreme layer stands alone while the others are flat: a group of four
    whose first layer is 70x the other three (flat within 1.3x) has a rank trend, but its
    gradient does not change with depth. The rest counts as flat within a factor 2, or,
    when they show no trend of their own, within a quarter of the extreme's gap to them (in
    decades): a first layer 1000x above three that differ by 2x is built differently
    (Conditional DETR's first decoder layer), while a steady trend's gap is never more than
    the spread of the layers behind it."""
    extreme = logs.index(min(logs) if vanishing else max(logs))
    rest = [value for i, value in enumerate(logs) if i != extreme]
    if max(rest) - min(rest) <= _FLAT:
        return True
    gap = (min(rest) - logs[extreme]) if vanishing else (logs[extreme] - max(rest))
    steady = len(rest) >= _MIN_GROUP and abs(depth_correlation(rest)) >= _TREND
    return not steady and max(rest) - min(rest) <= gap / 4


def _names(names: Sequence[str], most: int = 3) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


# -- beyond one pass: mixed precision and training steps --------------------------------------

UNDERFLOW_FRACTION = 0.5
"""A layer underflows when at least this fraction of the gradient values that are non-zero in
fp32 are exact zeros in low precision."""

_PRECISION_NAMES = {"fp16": "fp16 autocast", "bf16": "bf16 autocast"}


def precision_problems(
    problems: Sequence[Problem],
    layers: Sequence[LayerStats],
    reference: Sequence[LayerStats],
    reference_loss: float,
    precision: str,
    loss_scale: float | None,
) -> list[Problem]:
    """Compare a low-precision pass with the fp32 pass on the same parameters and batch.

    Adds ``underflow`` for layers whose gradients turned into exact zeros, drops the
    ``dead`` and ``vanishing`` findings those zeros caused, and says which ``nonfinite``
    findings are overflows of ``precision`` (finite in fp32). ``loss_scale`` is the
    GradScaler's scale of the pass, None without one.
    """
    where = _PRECISION_NAMES.get(precision, precision)
    fp32 = {layer.display_name: layer for layer in reference}
    found: list[Problem] = []
    for layer in layers:
        ref = fp32.get(layer.display_name)
        if ref is None or not layer.has_grad or not ref.has_grad or ref.zero_fraction >= 1.0:
            continue
        new = (layer.zero_fraction - ref.zero_fraction) / (1.0 - ref.zero_fraction)
        if new >= UNDERFLOW_FRACTION and layer.nan_count == 0 and layer.inf_count == 0:
            found.append(
                Problem(
                    kind="underflow",
                    layer=layer.display_name,
                    param=None,
                    value=layer.zero_fraction,
                    limit=UNDERFLOW_FRACTION,
                    message=(
                        f"{layer.zero_fraction:.0%} of the gradient values are exact zeros in "
                        f"{where}, {ref.zero_fraction:.0%} in fp32 (RMS {ref.grad_rms:.2g})"
                    ),
                    hint=_underflow_hint(precision, loss_scale),
                )
            )
    flushed = {p.layer for p in found}
    result: list[Problem] = []
    for problem in problems:
        if problem.kind in ("dead", "vanishing") and problem.layer in flushed:
            continue  # the zeros are the precision's, reported as underflow
        if problem.kind == "nonfinite":
            problem = _overflow(problem, fp32, reference_loss, where, precision)
        result.append(problem)
    return result + found


def _overflow(
    problem: Problem,
    fp32: Mapping[str, LayerStats],
    reference_loss: float,
    where: str,
    precision: str,
) -> Problem:
    """Name a non-finite value that is finite in fp32 as an overflow of ``precision``."""
    if problem.layer == "<loss>":
        if not math.isfinite(reference_loss):
            return problem
        message = (
            f"{problem.message} in {where} (fp32: {reference_loss:.4g}): the forward overflows"
        )
    else:
        ref = fp32.get(problem.layer)
        if ref is None or ref.nan_count or ref.inf_count or not ref.has_grad:
            return problem
        message = f"{problem.message} in {where}, all finite in fp32 (max {ref.grad_max_abs:.2g})"
    return Problem(
        kind=problem.kind,
        layer=problem.layer,
        param=problem.param,
        value=problem.value,
        limit=problem.limit,
        message=message,
        hint=_overflow_hint(precision),
        step=problem.step,
    )


def _underflow_hint(precision: str, loss_scale: float | None) -> str:
    if precision == "bf16":
        return (
            "these gradients are below bf16's smallest value (about 1e-38): the loss is tiny; "
            "multiply it by a constant loss scale or keep these layers in fp32"
        )
    if loss_scale is None:
        return (
            "fp16 flushes values below 6e-8 to zero: scale the loss with torch.amp.GradScaler "
            "(grad_scaler=True here), or use bf16, which has fp32's range"
        )
    return (
        f"the loss scale {loss_scale:g} is too small for these gradients: start GradScaler "
        f"higher (init_scale={loss_scale * 2**8:g}, grad_scaler={loss_scale * 2**8:g} here) "
        "or use bf16, which has fp32's range"
    )


def _overflow_hint(precision: str) -> str:
    if precision == "bf16":
        return (
            "bf16 overflows only near fp32's limit (3e38): look for an unbounded value (exp, "
            "a huge loss scale or multiplier) or keep that op in fp32"
        )
    return (
        "fp16 overflows above 65504: use bf16 (fp32's range), keep the overflowing op in fp32 "
        "(torch.autocast(..., enabled=False) around it), or lower the loss scale"
    )


def collapsed_scale(initial: float, final: float, overflows: int) -> Problem:
    """GradScaler backed off below 1: the gradients overflow fp16 whatever the scale."""
    return Problem(
        kind="nonfinite",
        layer="<loss scale>",
        param=None,
        value=final,
        limit=1.0,
        message=(
            f"GradScaler's loss scale collapsed from {initial:g} to {final:g} after "
            f"{overflows} overflowing passes: the gradients overflow fp16 even at scale 1"
        ),
        hint=(
            "the overflow is not caused by loss scaling: use bf16 (fp32's range), keep the "
            "overflowing op in fp32, or make the loss smaller (a mean instead of a sum)"
        ),
    )


def stalled(
    first: float, last: float, steps: int, optimizer: str, covered: int, trainable: int
) -> Problem:
    """``expect_loss_decrease``: the loss after the last step is not below the first."""
    parts = []
    if covered == 0:
        parts.append(f"the optimizer holds none of the model's {trainable} trainable parameters")
    elif covered < trainable:
        parts.append(
            f"the optimizer holds only {covered} of the model's {trainable} trainable parameters"
        )
    if math.isfinite(last) and last > first:
        parts.append("the loss rises: lower the learning rate")
    parts.append(
        "check the learning rate (raise it if the loss stays flat), the loss's sign and "
        "reduction, and that no layer is frozen or detached by mistake"
    )
    return Problem(
        kind="stalled",
        layer="<loss>",
        param=None,
        value=last,
        limit=first,
        message=(
            f"the loss went from {first:.6g} to {last:.6g} after {steps} {optimizer} step(s) "
            "on one batch: expected a decrease (expect_loss_decrease)"
        ),
        hint="; ".join(parts),
        step=steps,
    )
