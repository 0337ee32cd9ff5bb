"""Plain result types shared by the engine, the checks, the pytest plugin and reporting:
per-parameter and per-layer statistics, problems, the report, the model's structure as
plain data, and the errors and warnings a check raises.

The bottom of the package: imports nothing of it but the escaping functions and the module
path helpers, and neither torch nor pytest. A
:class:`Report` is plain data that crosses process boundaries (pytest-xdist) and can be
rendered without the model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from types import MappingProxyType
from typing import Any, NamedTuple

from .escape import encode_list, stdout_line
from .paths import policy_rule, subtrees

#: The fixed vocabulary of problem kinds. Later versions may add kinds, never rename these.
KINDS: tuple[str, ...] = (
    "nonfinite",
    "vanishing",
    "exploding",
    "dead",
    "unused",
    "underflow",
    "stalled",
    "rank_mismatch",
    "convention",
)

_KIND_ORDER = {kind: index for index, kind in enumerate(KINDS)}

ONE_HOT_SOFTMAX = "softmax with one element per row"
"""A softmax (attention, routing) whose every row had a single element, or a single one not
masked out: its output is exactly 0 or 1 whatever its input, so what computed its input gets
an exact-zero gradient (one key, one expert, the other experts masked)."""
SAME_VALUES = "attention over identical values"
"""An attention whose values are the same at every key position: its weights change
nothing, so the query and key projections get an exact-zero gradient (DETR's first decoder
layer, whose queries start at zero)."""
NOTHING_TO_MIX = frozenset({ONE_HOT_SOFTMAX, SAME_VALUES})
"""The ops named in :attr:`Structure.zeroed` whose weights had nothing to mix."""


class ParamStats(NamedTuple):
    """Gradient statistics of one trainable parameter.

    An immutable record (a named tuple: a check makes one per parameter, and tuples of plain
    values cost the garbage collector nothing once it has seen them).
    """

    name: str
    """Full parameter name, as in ``model.named_parameters()``."""
    layer: str
    """Module path of the layer that owns the parameter."""
    shape: tuple[int, ...]
    dtype: str
    numel: int
    has_grad: bool
    """False when the parameter requires grad but received none (unused)."""
    grad_norm: float
    """L2 norm of the gradient, computed without under- or overflow."""
    grad_max_abs: float
    zero_fraction: float
    """Fraction of gradient entries that are exactly zero."""
    nan_count: int
    inf_count: int
    weight_norm: float

    @property
    def grad_rms(self) -> float:
        return self.grad_norm / math.sqrt(self.numel) if self.numel else 0.0

    @property
    def finite(self) -> bool:
        return self.nan_count == 0 and self.inf_count == 0


class _LayerFields(NamedTuple):
    name: str
    """Module path (``""`` for parameters owned by the root module, shown as ``<root>``)."""
    type: str
    """Module class name, e.g. ``Linear``."""
    depth: int
    """Position among the layers in registration order (``model.named_modules()``), which is
    the forward order of almost every model; depth-aware rules count along it."""
    params: tuple[ParamStats, ...]
    numel: int
    has_grad: bool
    """True when at least one parameter received a gradient."""
    grad_norm: float
    """L2 norm over every parameter of the layer that received a gradient."""
    grad_rms: float
    grad_max_abs: float
    zero_fraction: float
    nan_count: int
    inf_count: int
    weight_norm: float


class LayerStats(_LayerFields):
    """Gradient statistics of one layer: a module that directly owns trainable parameters.

    ``LayerStats(name, type, depth, params)``; the fields after ``params`` are computed from
    ``params``. An immutable record, like :class:`ParamStats`.
    """

    __slots__ = ()

    def __new__(
        cls, name: str, type: str, depth: int, params: tuple[ParamStats, ...]
    ) -> LayerStats:
        return tuple.__new__(cls, (name, type, depth, params, *_aggregate(params)))

    def __reduce__(self) -> tuple[Any, ...]:
        return _layer_from_fields, (tuple(self),)

    @property
    def display_name(self) -> str:
        return self.name or "<root>"

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain data, the parameters' too."""
        data = self._asdict()
        data["params"] = [p._asdict() for p in self.params]
        return data


def _layer_from_fields(values: Iterable[Any]) -> LayerStats:
    """A :class:`LayerStats` from all its fields, computed ones included (no recomputing)."""
    return tuple.__new__(LayerStats, values)


def _aggregate(params: tuple[ParamStats, ...]) -> tuple[Any, ...]:
    """A layer's computed fields from its parameters, in field order, in one pass."""
    numel = measured_numel = nan = inf = 0
    square = weight_square = zeros = 0.0
    max_abs = 0.0
    has_grad = False
    for p in params:
        numel += p.numel
        nan += p.nan_count
        inf += p.inf_count
        weight_square += p.weight_norm * p.weight_norm
        if p.has_grad:
            has_grad = True
            measured_numel += p.numel
            square += p.grad_norm * p.grad_norm
            zeros += p.zero_fraction * p.numel
            if p.grad_max_abs > max_abs or p.grad_max_abs != p.grad_max_abs:
                max_abs = p.grad_max_abs
    norm = math.sqrt(square)
    return (
        numel,
        has_grad,
        norm,
        norm / math.sqrt(measured_numel) if measured_numel else 0.0,
        max_abs,
        zeros / measured_numel if measured_numel else 1.0,
        nan,
        inf,
        math.sqrt(weight_square),
    )


@dataclass(frozen=True)
class Problem:
    """One finding that makes a check unhealthy."""

    kind: str
    """One of :data:`KINDS` (or a kind added by an extension)."""
    layer: str
    """Module path of the offending layer (``<loss>`` for the loss itself)."""
    param: str | None
    """Parameter name when the problem is about one parameter, else None."""
    value: float
    """The measured value (a gradient norm, a ratio, a count: ``message`` says which)."""
    limit: float | None
    """The threshold it crossed, when there is one."""
    message: str
    hint: str = ""
    step: int | None = None
    """In a check of several optimizer steps (``steps=N``): the step, from 1, whose pass
    showed the problem (the check stops there). None for a single-pass check."""
    rule: str = ""
    """The policy rule behind the problem: for kind ``convention`` the convention's name; else
    the per-layer rule (``file:line 'pattern'``) whose limits applied, or ``""``."""

    def sort_key(self) -> int:
        """Severity order of the kind (stable sorts keep depth order within a kind)."""
        return _KIND_ORDER.get(self.kind, len(KINDS))


@dataclass(frozen=True)
class Report:
    """The verdict of one gradient check. Plain data: safe to pickle, serialise and render."""

    layers: tuple[LayerStats, ...]
    problems: tuple[Problem, ...]
    notes: tuple[str, ...] = ()
    """Explanations that did not fail the check (ambiguous signatures, warnings)."""
    loss: float = 0.0
    device: str = "cpu"
    seconds: float = 0.0
    frozen_params: int = 0
    """How many parameters were skipped because they do not require grad."""
    loss_source: str = ""
    """Where the loss came from: ``loss_fn``, ``loss_fn(output, target)``, ``scalar output``,
    ``output.loss``, ``output['loss']``, ``pytest_gradcheck_default_loss hook`` or
    ``default projection``."""
    settings: dict[str, Any] = field(default_factory=dict)
    """The settings the check ran with, as plain data."""
    diagnosis: tuple[str, ...] = ()
    """Extra lines from the diagnostic re-run (e.g. where a NaN was born)."""
    activation_grads: tuple[tuple[str, float], ...] = ()
    """With ``activations=True``: ``(module path, norm)`` for each module that owns parameters
    (not the root, unless it is the only module) and returned an output that requires grad,
    in the order of its first forward call. The norm is the L2 norm of the gradient that
    flowed into the module's outputs during backward (over every call of a module called
    more than once; 0 when none reached them). Empty when not measured."""
    activation_steps: tuple[tuple[str, tuple[float, ...]], ...] = ()
    """With ``activations=True``: for an RNN/LSTM/GRU module, the norm of the gradient that
    reaches each time step of its input sequence (back through the recurrence); for another
    module called more than once (e.g. a cell stepped in a loop), the norm per call, in forward
    order. Shows how the gradient decays along time. Empty otherwise."""

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def verdict(self) -> str:
        return "healthy" if self.ok else "unhealthy"

    def __iter__(self) -> Iterator[LayerStats]:
        return iter(self.layers)

    def layer(self, name: str) -> LayerStats:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    @property
    def measured_layers(self) -> tuple[LayerStats, ...]:
        """Layers that received a finite gradient."""
        return tuple(
            layer
            for layer in self.layers
            if layer.has_grad and layer.nan_count == 0 and layer.inf_count == 0
        )

    @property
    def min_grad_norm(self) -> float:
        return min((layer.grad_norm for layer in self.measured_layers), default=math.nan)

    @property
    def max_grad_norm(self) -> float:
        return max((layer.grad_norm for layer in self.measured_layers), default=math.nan)

    @property
    def worst_layer(self) -> str:
        """The layer of the most severe problem, else the layer with the smallest gradient."""
        if self.problems:
            ranked = sorted(self.problems, key=Problem.sort_key)
            in_layers = [p.layer for p in ranked if p.layer != "<loss>"]
            return in_layers[0] if in_layers else ranked[0].layer
        measured = self.measured_layers
        if not measured:
            return ""
        return min(measured, key=lambda layer: layer.grad_norm).display_name

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable data (non-finite floats become strings)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["layers"] = [layer.to_dict() for layer in self.layers]
        data["problems"] = [asdict(problem) for problem in self.problems]
        data["ok"] = self.ok
        data["verdict"] = self.verdict
        return _json_safe(data)  # type: ignore[no-any-return]

    def problem_summary(self) -> str:
        """``kind:layer`` pairs, comma-separated, most severe first, each once: the
        ``gradcheck.problems`` value. A ``,``, ``:``, ``%`` or control character in a name is
        percent-escaped (:func:`~pytest_gradcheck.escape.encode_list`; plain names as they
        are), so :mod:`pytest_gradcheck.properties` reads it back unambiguously."""
        pairs = dict.fromkeys(
            (p.kind, p.layer) for p in sorted(self.problems, key=Problem.sort_key)
        )
        return encode_list(pairs)

    def format_failure(self, max_rows: int | None = 12) -> str:
        """The failure text: a compact table of offending layers, then the remedies.

        At most ``max_rows`` rows (None: all), but never fewer than one row per kind: a
        long list of one kind cannot hide another. ``unused`` parameters take one row per
        subtree and cause (``pooler (2 parameters)``), and each such row a policy rule,
        ready to paste, that accepts it as the architecture's design."""
        problems = sorted(self.problems, key=Problem.sort_key)
        kinds: list[str] = []
        for problem in problems:
            if problem.kind not in kinds:
                kinds.append(problem.kind)
        layers = {p.layer for p in problems if p.layer != "<loss>"}
        frozen = f"; {self.frozen_params} frozen parameter(s)" if self.frozen_params else ""
        lines = [
            f"gradient check failed: {len(problems)} problem(s) ({', '.join(kinds)}) "
            f"in {len(layers)} of {len(self.layers)} layers on {self.device}"
            f"{self._step_text()}{frozen}"
        ]
        grouped = _grouped(problems, self.layers)
        shown = _rows_to_show(grouped, kinds, max_rows)
        rows = [("layer", "kind", "value", "limit", "what")]
        for row in shown:
            rows.append(
                (
                    row.label,
                    row.kind,
                    fmt(row.value),
                    "-" if row.limit is None else fmt(row.limit),
                    row.message,
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        for cells in rows:
            padded = [cells[i].ljust(widths[i]) for i in range(4)]
            lines.append("  " + "  ".join(padded) + "  " + cells[4])
        if len(shown) < len(grouped):
            lines.append(f"  ... and {len(grouped) - len(shown)} more (all of them with -v)")
        if self.diagnosis:
            lines.append(f"origin: {self.diagnosis[0]}")
            lines.extend(f"  {line}" for line in self.diagnosis[1:])
        for kind in kinds:
            mixed = self.settings.get("precision", "fp32") != "fp32"
            if kind == "nonfinite" and self.diagnosis and not mixed:
                continue  # the origin search already says what to change (not the precision)
            hints = dict.fromkeys(p.hint for p in problems if p.kind == kind and p.hint)
            for hint in list(hints)[: None if kind == "unused" else 1]:
                lines.append(f"hint ({kind}): {hint}")
            if kind == "unused":
                lines += _unused_rules(
                    [row for row in shown if row.kind == kind],
                    sum(1 for row in grouped if row.kind == kind),
                )
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(map(stdout_line, lines))  # names are the model's: one line each

    def raise_if_unhealthy(self, max_rows: int | None = 12) -> Report:
        """Raise :class:`GradientHealthError` listing the problems (at most ``max_rows`` rows,
        one per kind at least; None: all); return self when healthy."""
        __tracebackhide__ = True
        if self.problems:
            raise GradientHealthError(self, max_rows)
        return self

    @property
    def precision(self) -> str:
        """The precision the check ran in: ``fp32``, ``fp16`` or ``bf16``."""
        return str(self.settings.get("precision", "fp32"))

    @property
    def steps(self) -> int:
        """How many optimizer steps the check was asked to run (``steps``; 1: one pass)."""
        steps = self.settings.get("steps", 1)
        return steps if isinstance(steps, int) else 1

    @property
    def step(self) -> int:
        """The step the verdict and the statistics describe: where the first problem
        appeared, or the last step when every step was healthy."""
        found = [p.step for p in self.problems if p.step is not None]
        return min(found) if found else self.steps

    def _step_text(self) -> str:
        return f", first at step {self.step} of {self.steps}" if self.steps > 1 else ""


# -- the model's structure, as plain data ------------------------------------------------

SATURATING = frozenset({"Sigmoid", "Tanh", "Softsign", "Hardtanh", "Hardsigmoid", "LogSigmoid"})
NORMALIZATION = frozenset(
    {
        "BatchNorm1d",
        "BatchNorm2d",
        "BatchNorm3d",
        "SyncBatchNorm",
        "LayerNorm",
        "GroupNorm",
        "InstanceNorm1d",
        "InstanceNorm2d",
        "InstanceNorm3d",
        "RMSNorm",
        "LazyBatchNorm1d",
        "LazyBatchNorm2d",
    }
)
_NORM_NAME = re.compile(r"(norm|ln_?\d*$|^ln|layernorm|batchnorm|rmsnorm)", re.IGNORECASE)


NO_EXTRA: Mapping[str, float] = MappingProxyType({})
"""The ``extra`` of a module with no measurements (shared, read-only)."""


class ModuleInfo(NamedTuple):
    """One module of the checked model, as plain data (an immutable record)."""

    name: str
    type: str
    registration: int
    """Index in ``model.named_modules()``."""
    extra: Mapping[str, float] = NO_EXTRA
    """Measurements made for hints, e.g. ``spectral_radius`` of a vanilla RNN (and, with a
    policy's conventions, ``sequence_length``: the steps it ran over)."""
    params: int = 0
    """Elements of the parameters the module owns directly (trainable and frozen; a tied
    parameter counts once, at its first owner)."""


@dataclass(frozen=True)
class Structure:
    """The model's modules, in registration order."""

    modules: tuple[ModuleInfo, ...]
    saturating_ops: Mapping[str, int] = field(default_factory=dict)
    """Per layer, the most Sigmoid/Tanh-like ops on a path to the loss (functional ones
    included). Measured only when a check is unhealthy; empty otherwise."""
    fewest_saturating_ops: Mapping[str, int] = field(default_factory=dict)
    """Per layer, the fewest Sigmoid/Tanh-like ops on any path to the loss: below
    :attr:`saturating_ops` when a skip connection goes around them. Measured when a hint asks."""
    score_ops: Mapping[str, int] = field(default_factory=dict)
    """Per layer, the fewest softmax ops on any path to the loss: 1 or more for a layer that
    only computes attention or routing weights. Measured when a check asks."""
    constant_weights: Mapping[str, float] = field(default_factory=dict)
    """Per layer whose weight holds one non-zero value repeated (a constant init): that
    value. Every unit of such a layer computes the same thing. Measured when a hint asks."""
    input_rms: Mapping[str, float] = field(default_factory=dict)
    """``{"batch": RMS}`` of the sample batch's floating-point tensors. Measured when a hint
    asks (an unhealthy check)."""
    saturating_chain: Mapping[str, int] = field(default_factory=dict)
    """Per layer, the fewest Sigmoid/Tanh-like ops since the last normalization op on any
    path from it to the loss (a skip path counts as such a path). Measured only when a
    policy switches conventions on; empty otherwise."""
    forward_order: tuple[str, ...] = ()
    """Module names in the order of their first call in the forward pass (registration
    order is not always forward order). Recorded only when a policy switches conventions
    on; empty otherwise."""
    missing_inputs: tuple[str, ...] = ()
    """Tensor inputs the model's forward accepts that the sample batch did not give.
    Like the three below, looked at only when some parameter got no gradient or a layer an
    all-zero one."""
    not_exercised: frozenset[str] = frozenset()
    """Parameters (names) whose module never ran, or that no op read, in the forward."""
    never_ran: frozenset[str] = frozenset()
    """Modules (names) that own parameters and did not run in the forward."""
    cuts: Mapping[str, str] = field(default_factory=dict)
    """Per parameter without a gradient that an op read: where its path to the loss was
    cut (``.detach() at model.py:12``)."""
    through_indices: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    """Per parameter without a gradient: the op (name, ``file:line``) whose integer or
    boolean output carried values computed from it to the loss (a top-k selector's indices,
    an argmax): it steers which values the loss uses, with no gradient to learn from."""
    zeroed: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    """Per parameter with an all-zero gradient: the op (name, ``file:line``) whose output,
    computed from it, was all zeros in the forward (a ReLU that never fires, dropout p=1,
    a multiplication by 0), or, named by one of :data:`NOTHING_TO_MIX`, the softmax or
    attention whose weights it computed had nothing to choose between."""
    zero_past: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    """Per parameter with an all-zero gradient that no forward op zeroed: the op (name,
    ``file:line``) nearest the loss whose output got a non-zero gradient while what it took
    from the parameter got none. The loss reads none of the positions the parameter feeds
    (a head that reads only the CLS token slices the rest away)."""
    reach_looked: bool = False
    """Whether the facts above were gathered (the failure path)."""
    other_seeds: frozenset[str] = frozenset()
    """Parameters and layers (names) that got a non-zero gradient in a pass under another
    seed: LayerDrop, stochastic depth or MoE routing skipped them under the check's seed."""
    frozen: tuple[str, ...] = ()
    """Parameters (names) that do not require grad: the check does not measure them."""

    @cached_property
    def by_name(self) -> dict[str, ModuleInfo]:
        """The modules by module path."""
        return {m.name: m for m in self.modules}

    @cached_property
    def saturating(self) -> int:
        return sum(1 for m in self.modules if m.type in SATURATING)

    @cached_property
    def has_normalization(self) -> bool:
        return any(
            m.type in NORMALIZATION or (m.name and _NORM_NAME.search(m.name.rpartition(".")[2]))
            for m in self.modules
        )

    @cached_property
    def activations(self) -> int:
        return sum(1 for m in self.modules if m.type in SATURATING or m.type in _NONSATURATING)


_NONSATURATING = frozenset(
    {"ReLU", "LeakyReLU", "GELU", "SiLU", "ELU", "SELU", "Mish", "PReLU", "ReLU6", "CELU"}
)


class GradientHealthError(AssertionError):
    """Raised by :meth:`Report.raise_if_unhealthy`; carries the report."""

    def __init__(self, report: Report, max_rows: int | None = 12) -> None:
        super().__init__(report.format_failure(max_rows))
        self.report = report


class GradcheckError(ValueError):
    """Bad input to a gradient check: the message says what is wrong and how to fix it."""


class GradcheckTimeout(GradcheckError):
    """A check ran past its time limit (``timeout``; for the processes of a distributed
    check, ``distributed_timeout`` too) and was stopped: the message names the limit, where
    it came from, the time taken, what was running and how to raise it."""


class GradcheckWarning(UserWarning):
    """A check ran, but something about its input makes the numbers less trustworthy."""


class _Row(NamedTuple):
    """One row of the failure table: a problem, or the ``unused`` parameters of one subtree
    that share a cause."""

    label: str
    kind: str
    value: float
    limit: float | None
    message: str
    problems: tuple[Problem, ...]
    subtree: str
    """The module path the row stands for (``layers.#.indexer``), or the parameter's name."""


_NO_GRADIENT = "trainable parameter received no gradient"


def _grouped(problems: Sequence[Problem], layers: Sequence[LayerStats]) -> list[_Row]:
    """One row per problem, except ``unused`` parameters: one row per subtree and cause
    (``pooler (2 parameters)``), where the first of them stood."""
    unused = [p for p in problems if p.kind == "unused" and p.param is not None]
    everything = [p.name for layer in layers for p in layer.params]
    groups: dict[int, _Row] = {}  # by the id of the group's first problem
    member: set[int] = set()
    if unused and everything:
        by_cause: dict[str, dict[str, Problem]] = {}
        for problem in unused:
            by_cause.setdefault(problem.message, {})[problem.param or ""] = problem
        for message, found in by_cause.items():
            for label, names in subtrees(list(found), everything):
                if len(names) < 2:
                    continue
                members = tuple(found[name] for name in names)
                groups[id(members[0])] = _Row(
                    f"{label} ({len(names)} parameters)",
                    "unused",
                    sum(p.value for p in members),
                    None,
                    message.replace(_NO_GRADIENT, "received no gradient", 1),
                    members,
                    label,
                )
                member.update(id(p) for p in members)
    rows: list[_Row] = []
    for problem in problems:
        if id(problem) in groups:
            rows.append(groups[id(problem)])
        elif id(problem) not in member:
            label = problem.layer if problem.param is None else problem.param
            rows.append(
                _Row(
                    label,
                    problem.kind,
                    problem.value,
                    problem.limit,
                    problem.message,
                    (problem,),
                    label,
                )
            )
    return rows


def _unused_rules(rows: Sequence[_Row], total: int) -> list[str]:
    """The policy rules that accept the ``unused`` rows shown (of ``total``) as the
    architecture's design, one per row, ready to paste under ``rules:``."""
    if not rows:
        return []
    lines = [
        "hint (unused): if this is by design (such parameters never train, and DDP without "
        "find_unused_parameters=True fails on them), accept it in your policy file "
        "(--gradcheck-policy FILE), under `rules:`"
    ]
    for row in rows:
        reason = row.message.partition("no gradient")[2].lstrip(": ") or row.message
        layers = [p.layer for p in row.problems]
        lines.append("  " + policy_rule(row.subtree, layers, reason))
    if total > len(rows):
        lines.append(f"  ... and {total - len(rows)} more (all of them with -v)")
    return lines


def _rows_to_show(rows: Sequence[_Row], kinds: Sequence[str], max_rows: int | None) -> list[_Row]:
    """The first ``max_rows`` rows, with the first of every kind they leave out."""
    if max_rows is None or len(rows) <= max_rows:
        return list(rows)
    shown = list(rows[:max_rows])
    missing = [k for k in kinds if all(row.kind != k for row in shown)]
    extra = [next(row for row in rows if row.kind == k) for k in missing]
    keep = max(0, max_rows - len(extra))
    return sorted([*shown[:keep], *extra], key=rows.index)


def finite_float(value: object) -> float | None:
    """``value`` as a float when it is a number (an ``int`` or ``float``, not a ``bool``) that
    a float holds finitely, else None: the one test of a number read from a file (YAML and
    JSON give integers of any size, which ``float()`` and ``math.isfinite`` refuse with an
    ``OverflowError``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond 1.8e308
        return None
    return number if math.isfinite(number) else None


def fmt(value: float) -> str:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    if value == 0:
        return "0"
    if isinstance(value, int) or (1e-3 <= abs(value) < 1e4 and float(value).is_integer()):
        return str(int(value))
    return f"{value:.3g}"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)
