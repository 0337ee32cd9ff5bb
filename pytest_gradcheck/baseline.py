"""Gradient baselines: each check's per-layer gradient norms, saved on the main branch and
compared on a pull request.

A *profile* maps a check's layers (module paths, in forward order) to their gradient L2
norms, rounded to four significant digits; ``None`` marks a non-finite norm, which is not
compared (the ``nonfinite`` check reports it). A *baseline* maps check keys (the test's node
id, with `` (check N)`` for its N-th check) to profiles. The file is small JSON, one check
per line, so that a committed baseline diffs well::

    {
      "format": "pytest-gradcheck baseline",
      "version": 1,
      "checks": {
        "tests/test_models.py::test_mlp": {"0":0.0123,"2":0.457,"4":1.02}
      }
    }

A layer *moved* when its norm changed by more than ``factor`` in either direction (from 0 to
anything is an infinite change). Moved layers are ``regression`` problems; layers and checks
that are new or gone are reported, never failed.

Plain data only: imports :mod:`.results` and :mod:`.escape`; no torch, no pytest. The
session (the pytest run) and the ``gradcheck-report`` command share it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from .escape import excerpt
from .results import Problem, Report, finite_float, fmt

FORMAT = "pytest-gradcheck baseline"
VERSION = 1
DEFAULT_FACTOR = 10.0
REGRESSION = "regression"
"""The problem kind of a layer whose gradient norm moved beyond the factor."""

Profile = dict[str, float | None]
"""Layer (module path, ``<root>`` for the root module) -> gradient L2 norm (None: non-finite)."""

_MAX_LISTED = 4
"""Layers named in a one-line status before ``(+N more)``."""


class BaselineError(ValueError):
    """A baseline file or profile that cannot be read: the message names the file and line."""


# -- profiles ---------------------------------------------------------------------------------


def check_key(nodeid: str, index: int) -> str:
    """The key of a test's ``index``-th check (1-based), as in the terminal summary."""
    return nodeid if index == 1 else f"{nodeid} (check {index})"


def _round(value: float) -> float:
    return float(f"{value:.4g}")


def profile_of(report: Report) -> Profile:
    """Per-layer gradient norms of a report; a layer without any gradient has norm 0."""
    profile: Profile = {}
    for layer in report.layers:
        finite = layer.nan_count == 0 and layer.inf_count == 0 and math.isfinite(layer.grad_norm)
        profile[layer.display_name] = _round(layer.grad_norm) if finite else None
    return profile


def encode_profile(profile: Mapping[str, float | None]) -> str:
    """Compact JSON (no spaces): the value of the ``gradcheck.profile`` JUnit property."""
    return json.dumps(dict(profile), separators=(",", ":"), allow_nan=False)


def decode_profile(text: str, where: str) -> Profile:
    """Parse :func:`encode_profile`'s output; ``where`` names the source in errors."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise BaselineError(f"{where}: the gradient profile is not valid JSON: {exc}") from None
    return _profile(data, where)


def _profile(data: object, where: str) -> Profile:
    if not isinstance(data, dict):
        raise BaselineError(f"{where}: a gradient profile must be an object of layer: norm")
    profile: Profile = {}
    for layer, norm in data.items():
        number = finite_float(norm)
        if norm is not None and (number is None or number < 0):
            raise BaselineError(
                f"{where}: layer {excerpt(layer)} has norm {excerpt(norm)}; expected a finite "
                "number >= 0 or null (save the baseline again)"
            )
        profile[str(layer)] = number
    return profile


# -- baseline files ---------------------------------------------------------------------------


@dataclass
class Baseline:
    """Check key -> profile, as saved by ``--gradcheck-save-baseline``."""

    checks: dict[str, Profile] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Baseline:
        """Read a baseline file; :class:`BaselineError` names the file (and line) when it
        is missing or malformed."""
        where = os.fspath(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise BaselineError(f"{where}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise BaselineError(f"{where}: cannot read the file: {exc}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BaselineError(
                f"{where}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}"
            ) from None
        except RecursionError:
            raise BaselineError(
                f"{where}: not a gradient baseline: its JSON is nested too deeply to read"
            ) from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise BaselineError(
                f"{where}: not a gradient baseline (expected a JSON object with "
                f'"format": "{FORMAT}", as written by --gradcheck-save-baseline)'
            )
        if data.get("version") != VERSION:
            raise BaselineError(
                f"{where}: baseline version {data.get('version')!r} is not supported "
                f"(this pytest-gradcheck reads version {VERSION}); save the baseline again"
            )
        checks = data.get("checks")
        if not isinstance(checks, dict):
            raise BaselineError(f'{where}: "checks" must be an object of check: profile')
        return cls({str(key): _profile(value, f"{where}: {key}") for key, value in checks.items()})

    def dumps(self) -> str:
        """The file's text: one check per line, checks sorted, layers in forward order."""
        rows = [
            f"    {json.dumps(key)}: {encode_profile(self.checks[key])}"
            for key in sorted(self.checks)
        ]
        body = "{\n" + ",\n".join(rows) + "\n  }" if rows else "{}"
        return f'{{\n  "format": "{FORMAT}",\n  "version": {VERSION},\n  "checks": {body}\n}}\n'

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically (a reader never sees half a file)."""
        target = Path(path)
        if target.parent != Path():
            target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        partial.write_text(self.dumps(), encoding="utf-8")
        os.replace(partial, target)


def merge(baselines: Iterable[Baseline]) -> tuple[Baseline, list[str]]:
    """Union of shard baselines; returns the merged baseline and the keys found twice (the
    later one wins)."""
    merged = Baseline()
    twice: list[str] = []
    for baseline in baselines:
        for key, profile in baseline.checks.items():
            if key in merged.checks:
                twice.append(key)
            merged.checks[key] = profile
    return merged, twice


# -- comparison -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shift:
    """How one layer's gradient norm changed from the baseline."""

    layer: str
    old: float
    new: float

    @property
    def fold(self) -> float:
        """The change as a factor >= 1, whichever the direction (inf from or to 0)."""
        if self.old == self.new:
            return 1.0
        if self.old == 0 or self.new == 0:
            return math.inf
        return max(self.new / self.old, self.old / self.new)

    @property
    def direction(self) -> str:
        return "larger" if self.new > self.old else "smaller"

    def describe(self) -> str:
        """``2 20x larger (4.1 vs 0.205)``."""
        return (
            f"{self.layer} {fmt(self.fold)}x {self.direction} ({fmt(self.new)} vs {fmt(self.old)})"
        )


def _listed(items: list[str]) -> str:
    more = len(items) - _MAX_LISTED
    return ", ".join(items[:_MAX_LISTED]) + (f" (+{more} more)" if more > 0 else "")


@dataclass(frozen=True)
class Comparison:
    """One check against its baseline profile."""

    key: str
    factor: float
    moved: tuple[Shift, ...]
    """Layers whose norm changed by more than ``factor``, the largest change first."""
    largest: Shift | None
    """The largest change among the compared layers, moved or not."""
    compared: int
    new_layers: tuple[str, ...]
    removed_layers: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.moved

    def layer_changes(self) -> str:
        """``new layers: a, b; removed layers: c`` (empty when the layers are the same)."""
        parts = []
        if self.new_layers:
            parts.append(f"new layers: {_listed(list(self.new_layers))}")
        if self.removed_layers:
            parts.append(f"removed layers: {_listed(list(self.removed_layers))}")
        return "; ".join(parts)

    def status(self) -> str:
        """One line: ``unchanged`` or ``moved: ...``, then the layer changes if any. The value
        of the ``gradcheck.baseline`` JUnit property."""
        if self.moved:
            text = "moved: " + _listed([shift.describe() for shift in self.moved])
        else:
            text = "unchanged"
        changes = self.layer_changes()
        return f"{text}; {changes}" if changes else text


def compare_profiles(key: str, old: Profile, new: Profile, factor: float) -> Comparison:
    """Compare two profiles of one check, layer by layer."""
    shifts = [
        Shift(layer, old_norm, new_norm)
        for layer, new_norm in new.items()
        if layer in old
        and (old_norm := old[layer]) is not None
        and new_norm is not None
        and math.isfinite(old_norm)
        and math.isfinite(new_norm)
    ]
    by_fold = sorted(shifts, key=lambda shift: -shift.fold)  # stable: forward order in ties
    return Comparison(
        key=key,
        factor=factor,
        moved=tuple(shift for shift in by_fold if shift.fold > factor),
        largest=by_fold[0] if by_fold else None,
        compared=len(shifts),
        new_layers=tuple(layer for layer in new if layer not in old),
        removed_layers=tuple(layer for layer in old if layer not in new),
    )


def regression_report(report: Report, comparison: Comparison, source: str) -> Report:
    """``report`` with a ``regression`` problem per moved layer and a note on new or removed
    layers; ``source`` names the baseline file in the hint."""
    problems = tuple(
        Problem(
            kind=REGRESSION,
            layer=shift.layer,
            param=None,
            value=shift.fold,
            limit=comparison.factor,
            message=(
                f"gradient norm {fmt(shift.new)} vs {fmt(shift.old)} in the baseline: "
                f"{fmt(shift.fold)}x {shift.direction}"
            ),
            hint=(
                f"the layer gradient norms moved more than {fmt(comparison.factor)}x from "
                f"the baseline {source}: a changed init, an added or removed normalization "
                "layer or a changed loss scale changes how the model trains. If the change "
                "is intended, save the baseline again on the main branch "
                "(--gradcheck-save-baseline); --gradcheck-baseline-factor sets the factor"
            ),
        )
        for shift in comparison.moved
    )
    notes = report.notes
    changes = comparison.layer_changes()
    if changes:
        notes = (*notes, f"baseline {source}: {changes} (reported, not compared)")
    if not problems and notes == report.notes:
        return report
    return replace(report, problems=report.problems + problems, notes=notes)


@dataclass(frozen=True)
class Diff:
    """Two baselines compared check by check."""

    factor: float
    comparisons: tuple[Comparison, ...]
    """Checks found in both, by key."""
    new_checks: tuple[str, ...]
    removed_checks: tuple[str, ...]

    @property
    def moved(self) -> tuple[Comparison, ...]:
        return tuple(c for c in self.comparisons if c.moved)

    def lines(self) -> list[str]:
        """The comparison as text: moved checks first, then new, removed and changed layers."""
        lines = []
        for comparison in self.moved:
            shifts = _listed([shift.describe() for shift in comparison.moved])
            lines.append(f"moved      {comparison.key}: {shifts}")
        lines.extend(
            f"new        {key} (not in the baseline: not compared)" for key in self.new_checks
        )
        lines.extend(f"removed    {key} (in the baseline only)" for key in self.removed_checks)
        for comparison in self.comparisons:
            changes = comparison.layer_changes()
            if changes:
                lines.append(f"layers     {comparison.key}: {changes}")
        unchanged = [c for c in self.comparisons if not c.moved]
        if unchanged:
            largest = max((c.largest.fold for c in unchanged if c.largest is not None), default=1.0)
            lines.append(
                f"unchanged  {len(unchanged)} check(s) within {fmt(self.factor)}x "
                f"(largest change {fmt(largest)}x)"
            )
        return lines


def diff(old: Baseline, new: Baseline, factor: float) -> Diff:
    """Compare every check of ``new`` with ``old``."""
    return Diff(
        factor=factor,
        comparisons=tuple(
            compare_profiles(key, old.checks[key], new.checks[key], factor)
            for key in sorted(new.checks)
            if key in old.checks
        ),
        new_checks=tuple(key for key in sorted(new.checks) if key not in old.checks),
        removed_checks=tuple(key for key in sorted(old.checks) if key not in new.checks),
    )


def parse_factor(text: str) -> float:
    """A factor > 1 (``10``, ``1e2``); ValueError says what is expected."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not (value > 1 and math.isfinite(value)):
        raise ValueError(f"the baseline factor must be a finite number > 1, got {text!r}")
    return value
