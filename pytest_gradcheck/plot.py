"""Gradient-flow charts of a check (the optional ``plot`` extra: ``pytest-gradcheck[plot]``).

:func:`plot_gradient_flow` draws one report: every layer's gradient L2 norm on a log scale in
depth order, the threshold band, the failing layers highlighted, and, when the check ran with
``activations=True``, the norm of the gradient that flowed into each layer's output (and
along time, for recurrent modules). :func:`plot_comparison` puts the same layers of several
reports side by side (Post-LN against Pre-LN, before and after a fix).

Plotting reads only the plain :class:`~pytest_gradcheck.results.Report` (it imports
:mod:`.results` and :mod:`.settings`): no torch, no model, no pytest. matplotlib is
imported when a chart is drawn, never when the plugin loads; figures are drawn with
matplotlib's object API on its Agg renderer, so no GUI backend and no global pyplot state
are touched.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .results import Report
from .settings import Settings

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_comparison", "plot_file_name", "plot_gradient_flow", "threshold_band"]

_INSTALL = "pip install 'pytest-gradcheck[plot]'"
_MAX_TICKS = 60
"""Above this many layers only every n-th layer name is written under the axis."""
_MAX_SERIES = 6
"""Recurrent series drawn in the along-time panel."""
_KIND_STYLE: dict[str, tuple[str, str]] = {
    "nonfinite": ("X", "#b2182b"),
    "vanishing": ("v", "#d6604d"),
    "exploding": ("^", "#b2182b"),
    "dead": ("s", "#762a83"),
    "unused": ("D", "#7f7f7f"),
}
_OTHER_KIND = ("P", "#e08214")
_GRAD = "#2166ac"
_ACTIVATION = "#e08214"
_BAND = "#1b7837"


def plot_gradient_flow(
    report: Report, path: str | os.PathLike[str], title: str | None = None
) -> Path:
    """Draw the gradient-flow chart of ``report`` into the PNG file ``path``; return its path.

    The chart shows each layer's gradient L2 norm (log scale, depth order), the threshold
    band (see :func:`threshold_band`), the layers with a problem marked by kind, layers with
    no, zero or non-finite gradient at the bottom or top edge, and the activation-gradient
    norms of a check run with ``activations=True``. ``title`` (e.g. the test's node id) is
    written above the summary line (verdict, problems, layers, loss, device). Raises
    :class:`ModuleNotFoundError` naming the ``plot`` extra when matplotlib is not installed.
    """
    figure_class = _figure_class()
    layers = report.layers
    names = [layer.display_name for layer in layers]
    steps = [(name, values) for name, values in report.activation_steps if values]
    width = min(18.0, max(7.0, 0.22 * len(layers) + 3.0))
    fig = figure_class(figsize=(width, 7.5 if steps else 5.0), dpi=100, layout="constrained")
    if steps:
        ax, time_ax = fig.subplots(2, 1, height_ratios=(3, 2))
    else:
        ax, time_ax = fig.subplots(1, 1), None

    grads = [layer.grad_norm if layer.has_grad else 0.0 for layer in layers]
    finite_grads = [
        layer.grad_norm if layer.nan_count == 0 and layer.inf_count == 0 else math.nan
        for layer in layers
    ]
    activation = dict(report.activation_grads)
    act_x = [i for i, layer in enumerate(layers) if layer.name in activation]
    act_y = [activation[layers[i].name] for i in act_x]
    lower, upper = threshold_band(report)
    bottom, top = _limits([*finite_grads, *act_y], lower, upper)

    if lower is not None and upper is not None:
        ax.axhspan(lower, upper, color=_BAND, alpha=0.08, lw=0, label=_band_label(report))
    for edge in (lower, upper):
        if edge is not None:
            ax.axhline(edge, color=_BAND, lw=0.8, ls="--")
    if lower is not None and upper is None:
        ax.plot([], [], color=_BAND, ls="--", label=f"{_band_label(report)} (lower edge)")
    if upper is not None and lower is None:
        ax.plot([], [], color=_BAND, ls="--", label=f"{_band_label(report)} (upper edge)")

    xs = list(range(len(layers)))
    shown = [(x, y) for x, y in zip(xs, finite_grads, strict=True) if _positive(y)]
    ax.plot(
        [x for x, _ in shown],
        [y for _, y in shown],
        marker="o",
        ms=3.5,
        lw=1.2,
        color=_GRAD,
        label="parameter gradient norm",
    )
    if act_x:
        act_shown = [(x, y) for x, y in zip(act_x, act_y, strict=True) if _positive(y)]
        ax.plot(
            [x for x, _ in act_shown],
            [y for _, y in act_shown],
            marker="s",
            ms=3,
            lw=1.0,
            ls="--",
            color=_ACTIVATION,
            label="activation-gradient norm (into the layer's output)",
        )

    kinds = _problem_kinds(report)
    labelled: set[str] = set()
    for x, name in enumerate(names):
        for kind in kinds.get(name, ()):
            marker, color = _KIND_STYLE.get(kind, _OTHER_KIND)
            ax.axvspan(x - 0.45, x + 0.45, color=color, alpha=0.10, lw=0)
            y = finite_grads[x]
            if not math.isfinite(y):
                y = top
            elif y <= 0:
                y = bottom
            ax.scatter(
                [x],
                [y],
                marker=marker,
                s=60,
                color=color,
                zorder=5,
                clip_on=False,
                label=kind if kind not in labelled else None,
            )
            labelled.add(kind)
        if not kinds.get(name):  # no problem, but nothing to draw on a log axis
            if not math.isfinite(finite_grads[x]):
                ax.scatter([x], [top], marker="X", s=40, color="#b2182b", clip_on=False)
            elif grads[x] <= 0:
                ax.scatter([x], [bottom], marker="_", s=60, color="#7f7f7f", clip_on=False)

    ax.set_yscale("log")
    ax.set_ylim(bottom, top)
    ax.set_xlim(-0.6, max(0, len(layers) - 1) + 0.6)
    _name_ticks(ax, names)
    ax.set_ylabel("gradient L2 norm")
    ax.grid(True, which="major", axis="y", alpha=0.3)
    summary = _default_title(report)
    ax.set_title(f"{title}\n{summary}" if title else summary, fontsize=10)
    ax.legend(fontsize=7, loc="best", framealpha=0.85)

    if time_ax is not None:
        for name, values in steps[:_MAX_SERIES]:
            points = [(i, v) for i, v in enumerate(values) if _positive(v)]
            time_ax.plot(
                [i for i, _ in points],
                [v for _, v in points],
                marker=".",
                ms=3,
                lw=1.0,
                label=name or "<root>",
            )
        time_ax.set_yscale("log")
        time_ax.set_xlabel(
            "time step (RNN/LSTM/GRU input sequence) or call (a module called again)"
        )
        time_ax.set_ylabel("gradient L2 norm")
        time_ax.set_title("gradient along time: how much reaches each step", fontsize=9)
        time_ax.grid(True, which="major", axis="y", alpha=0.3)
        time_ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def plot_comparison(
    reports: Mapping[str, Report],
    path: str | os.PathLike[str],
    *,
    match: str | None = None,
    title: str | None = None,
) -> Path:
    """Draw the per-layer gradient norms of several reports on shared axes; return the path.

    ``reports`` maps a legend label to a report. ``match`` is a regular expression searched
    in each layer's module path: only matching layers are drawn, and when it has a group, one
    panel per distinct value of its first group (``r"(encoder|decoder)\\.layers\\.\\d+\\.linear2"``
    gives an encoder panel and a decoder panel). Layers are numbered 1, 2, ... in depth order
    within each panel.
    """
    figure_class = _figure_class()
    pattern = re.compile(match) if match is not None else None
    panels: dict[str, dict[str, list[tuple[str, float]]]] = {}
    for label, report in reports.items():
        for layer in report.layers:
            name = layer.display_name
            panel = ""
            if pattern is not None:
                found = pattern.search(name)
                if found is None:
                    continue
                panel = (found.group(1) or "") if pattern.groups else ""
            value = layer.grad_norm if layer.has_grad else math.nan
            panels.setdefault(panel, {}).setdefault(label, []).append((name, value))
    if not panels:
        raise ValueError(
            f"no layer matches {match!r} in any report; layer names look like "
            f"{_example_names(reports)}"
        )
    fig = figure_class(figsize=(4.2 * len(panels) + 1.0, 4.2), dpi=100, layout="constrained")
    axes: Sequence[Axes] = list(fig.subplots(1, len(panels), sharey=True, squeeze=False)[0])
    markers = ("o", "s", "^", "D", "v", "P")
    values: list[float] = []
    for ax, (panel, series) in zip(axes, panels.items(), strict=True):
        for k, (label, points) in enumerate(series.items()):
            shown = [(i + 1, v) for i, (_, v) in enumerate(points) if _positive(v)]
            values.extend(v for _, v in shown)
            ax.plot(
                [i for i, _ in shown],
                [v for _, v in shown],
                marker=markers[k % len(markers)],
                ms=5,
                lw=1.5,
                label=label,
            )
        count = max(len(points) for points in series.values())
        ax.set_xticks(range(1, count + 1))
        ax.set_xlabel(f"{panel} layer (depth order)" if panel else "layer (depth order)")
        ax.set_yscale("log")
        ax.grid(True, which="both", axis="y", alpha=0.3)
        if panel:
            ax.set_title(panel, fontsize=10)
    axes[0].set_ylabel("gradient L2 norm")
    axes[0].legend(fontsize=8, loc="best")
    if values:
        low, high = min(values), max(values)
        span = max(high / low, 10.0)
        axes[0].set_ylim(low / span**0.15, high * span**0.15)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def threshold_band(report: Report) -> tuple[float | None, float | None]:
    """The gradient-norm band a chart shades, as ``(lower, upper)``; None for an open edge.

    An absolute bound (``min_norm``/``max_norm``) is the edge when set. Otherwise, with the
    relative rule on, the edges are ``vanishing_ratio`` and ``exploding_ratio`` times the
    median norm of the third of the layers nearest the loss: the rule's reference level. The
    rule itself compares layers of the same role by RMS and needs a steady trend with depth,
    so the band shows the scale of the limits, not an exact per-layer verdict (the markers
    of failing layers are exact). ``ceiling_norm`` caps the upper edge.
    """
    settings = {**Settings().to_dict(), **report.settings}
    lower = _number(settings.get("min_norm"))
    upper = _number(settings.get("max_norm"))
    norms = [
        layer.grad_norm
        for layer in report.measured_layers
        if layer.grad_norm > 0 and math.isfinite(layer.grad_norm)
    ]
    if norms and settings.get("relative", True):
        reference = statistics.median(norms[-max(1, len(norms) // 3) :])
        if lower is None:
            lower = _number(settings.get("vanishing_ratio"), reference)
        if upper is None:
            upper = _number(settings.get("exploding_ratio"), reference)
    ceiling = _number(settings.get("ceiling_norm"))
    if settings.get("max_norm") is None and ceiling is not None:
        upper = ceiling if upper is None else min(upper, ceiling)
    return lower, upper


def plot_file_name(nodeid: str, index: int = 1) -> str:
    """A safe, unique PNG file name for the ``index``-th check of the test ``nodeid``."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid).strip("._-")[:100] or "test"
    digest = hashlib.sha1(nodeid.encode("utf-8")).hexdigest()[:8]
    return f"{safe}-{digest}{'' if index == 1 else f'-{index}'}.png"


# -- helpers --------------------------------------------------------------------------------


def _figure_class() -> type[Figure]:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ModuleNotFoundError(
            f"gradient-flow charts need matplotlib, which is not installed: {_INSTALL}",
            name="matplotlib",
        ) from exc
    return Figure


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, format="png", metadata={"Software": None})
    return target


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def _number(value: Any, scale: float = 1.0) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value) * scale
    return None


def _limits(
    values: Sequence[float], lower: float | None, upper: float | None
) -> tuple[float, float]:
    """Log-axis limits that show every positive value and the band edges, with a margin."""
    shown = [v for v in values if _positive(v)]
    if not shown:
        shown = [1e-3, 1.0]
    low, high = min(shown), max(shown)
    if lower is not None:
        low = min(low, lower)
    if upper is not None:
        high = max(high, upper)
    if high <= low:
        low, high = low / 10, high * 10
    margin = (high / low) ** 0.06
    return low / margin, high * margin


def _problem_kinds(report: Report) -> dict[str, list[str]]:
    kinds: dict[str, list[str]] = {}
    for problem in report.problems:
        found = kinds.setdefault(problem.layer, [])
        if problem.kind not in found:
            found.append(problem.kind)
    return kinds


def _band_label(report: Report) -> str:
    settings = {**Settings().to_dict(), **report.settings}
    if settings.get("min_norm") is not None or settings.get("max_norm") is not None:
        low = settings.get("min_norm")
        high = settings.get("max_norm")
        return f"threshold band (min_norm {low or '-'}, max_norm {high or '-'})"
    if settings.get("relative", True):
        return (
            f"threshold band ({settings.get('vanishing_ratio'):g}x to "
            f"{settings.get('exploding_ratio'):g}x the layers nearest the loss)"
        )
    return "threshold band"


def _name_ticks(ax: Axes, names: Sequence[str]) -> None:
    every = max(1, math.ceil(len(names) / _MAX_TICKS))
    ticks = list(range(0, len(names), every))
    ax.set_xticks(ticks)
    ax.set_xticklabels([names[i] for i in ticks], rotation=90, fontsize=7)
    if every > 1:
        ax.set_xlabel(f"layer in depth order (1 name in {every} shown)")
    else:
        ax.set_xlabel("layer in depth order")


def _default_title(report: Report) -> str:
    count = len(report.problems)
    verdict = report.verdict if not count else f"{report.verdict}: {count} problem(s)"
    kinds = sorted({p.kind for p in report.problems})
    what = f" ({', '.join(kinds)})" if kinds else ""
    return (
        f"gradient flow: {verdict}{what}; {len(report.layers)} layers, loss {report.loss:.3g}, "
        f"{report.device}"
    )


def _example_names(reports: Mapping[str, Report]) -> str:
    for report in reports.values():
        if report.layers:
            return ", ".join(layer.display_name for layer in report.layers[:3])
    return "(no layers)"
