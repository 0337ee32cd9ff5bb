"""The ``gradcheck.*`` JUnit properties: the one place that writes and reads them.

A check is recorded as ``(name, value)`` pairs in the test's ``user_properties`` (so
``--junitxml`` writes them, and pytest-xdist carries them from a worker to the controller):
``gradcheck.<key>`` for the test's first check and ``gradcheck.<key>.<n>`` for its n-th.
The keys, in the order written:

``verdict``, ``problems`` (``kind:layer`` pairs, most severe first), ``min_grad_norm``,
``max_grad_norm``, ``worst_layer`` (the smallest gradient's layer when healthy), ``device``,
``precision``, ``steps``, ``loss_source``, ``frozen_params``, ``seconds``, ``step`` (only for a
check of several optimizer steps), then what the run's options add: ``profile`` and ``baseline``
(a gradient baseline option), ``plot`` (``--gradcheck-plots``).

:func:`write` turns a report into the pairs; :func:`read` turns pairs (from a test report,
or from a JUnit file) back into one :class:`RecordedCheck` per check. The session records
and summarises with them, the baselines compare with them, ``gradcheck-report`` reads JUnit
files with them.

Plain Python: imports only :mod:`.results`; never pytest, never torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from .escape import decode_list
from .results import Report, fmt

PREFIX = "gradcheck."
"""Prefix of the property names (``gradcheck.verdict``, ...)."""

Value = str | int | float
"""A property value: plain data that JUnit XML and pytest-xdist carry as they are."""


def write(
    report: Report, number: int = 1, extra: Sequence[tuple[str, Value]] = ()
) -> list[tuple[str, Value]]:
    """The properties of a test's ``number``-th check (from 1): the report's, then ``extra``
    (``(key, value)`` pairs such as ``("profile", ...)``), each named ``gradcheck.<key>``
    with ``.<number>`` after it from the second check on."""
    values: list[tuple[str, Value]] = [
        ("verdict", report.verdict),
        ("problems", report.problem_summary()),
        ("min_grad_norm", fmt(report.min_grad_norm)),
        ("max_grad_norm", fmt(report.max_grad_norm)),
        ("worst_layer", report.worst_layer),
        ("device", report.device),
        ("precision", report.precision),
        ("steps", report.steps),
        ("loss_source", report.loss_source),
        ("frozen_params", report.frozen_params),
        ("seconds", round(report.seconds, 4)),
    ]
    if report.steps > 1:
        values.append(("step", report.step))
    suffix = "" if number == 1 else f".{number}"
    return [(f"{PREFIX}{key}{suffix}", value) for key, value in [*values, *extra]]


class RecordedCheck(NamedTuple):
    """One check, as its properties recorded it: every value as text (``""`` when absent).

    An immutable record (a named tuple: cheap to define when the plugin loads)."""

    number: int
    """The check's number in its test, from 1."""
    verdict: str
    problems: tuple[str, ...] = ()
    """``kind:layer`` pairs, most severe first."""
    worst_layer: str = ""
    min_grad_norm: str = ""
    max_grad_norm: str = ""
    device: str = ""
    precision: str = ""
    steps: str = ""
    loss_source: str = ""
    """``loss_fn``, ``output.loss``, ``default projection``, ... (:attr:`Report.loss_source`)."""
    frozen_params: str = ""
    """How many parameters do not require grad (not checked)."""
    seconds: str = ""
    step: str = ""
    profile: str = ""
    """The per-layer gradient norms as compact JSON (with a gradient baseline option)."""
    baseline: str = ""
    """``unchanged``, ``moved: ...`` or ``new`` (with ``--gradcheck-baseline``)."""
    plot: str = ""
    """The path of the check's gradient-flow chart (with ``--gradcheck-plots``)."""

    def setup_text(self) -> str:
        """What the check ran with, for a reader of a summary: ``cpu, bf16, 5 steps, loss:
        loss_fn, 3 frozen`` (the step count from 2 on, the frozen count when not 0; a record
        of an older version gives what it holds)."""
        parts = [self.device, self.precision]
        if self.steps not in ("", "1"):
            parts.append(f"{self.steps} steps")
        if self.loss_source:
            parts.append(f"loss: {self.loss_source}")
        if self.frozen_params not in ("", "0"):
            parts.append(f"{self.frozen_params} frozen")
        return ", ".join(part for part in parts if part)


def read(pairs: Iterable[Sequence[object]]) -> list[RecordedCheck]:
    """One :class:`RecordedCheck` per check in ``pairs`` (a test's user properties, or the
    properties of a JUnit test case), by check number. Other properties are ignored, and so
    is a group of ``gradcheck.*`` properties without a verdict (not a check of ours)."""
    checks: dict[int, dict[str, str]] = {}
    for pair in pairs:
        if len(pair) != 2 or not str(pair[0]).startswith(PREFIX):
            continue
        key, _, index = str(pair[0])[len(PREFIX) :].partition(".")
        # ASCII digits only: str.isdigit() is also true of '²', which int() refuses
        number = int(index) if index.isascii() and index.isdigit() else 1
        checks.setdefault(number, {})[key] = str(pair[1])
    return [
        _recorded(number, values)
        for number, values in sorted(checks.items())
        if "verdict" in values
    ]


def _recorded(number: int, values: dict[str, str]) -> RecordedCheck:
    text = {key: value for key, value in values.items() if key in _TEXT_FIELDS}
    problems = _decode_problems(values.get("problems", ""))
    return RecordedCheck(number=number, problems=problems, **text)


_TEXT_FIELDS = frozenset(RecordedCheck._fields) - {"number", "problems"}
"""The keys read as they were written (``verdict`` among them: :func:`read` requires it)."""


def _decode_problems(text: str) -> tuple[str, ...]:
    """The ``kind:layer`` pairs of a ``problems`` value, names as they were."""
    try:
        return tuple(f"{kind}:{layer}" for kind, layer in decode_list(text))
    except ValueError:  # written by a version without escaping: read it as it is
        return tuple(item for item in text.split(",") if item)
