"""Hints: what to try first when a check fails, from the model's own evidence.

Each function turns the statistics and the structure of an unhealthy check into a remedy
line for a problem of one kind. Plain data in, text out; :mod:`pytest_gradcheck.checks`
attaches them to the problems it finds.

Imports only results; no torch, no pytest.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from .results import LayerStats, Structure

__all__ = [
    "CUT_HINT",
    "NEVER_RAN_HINT",
    "UNUSED_HINT",
    "exploding_hint",
    "init_scale",
    "per_step",
    "vanishing_hint",
]

UNUSED_HINT = (
    "the forward never reaches these parameters (an unused head, a .detach() or "
    "torch.no_grad() on their path): wire their output into the loss if they are meant to "
    "train; else remove them, set requires_grad=False, or pass find_unused_parameters=True "
    "to DDP"
)
CUT_HINT = (
    "if this branch is meant to train, remove the cut (the .detach(), torch.no_grad() or "
    ".item() named above, or use a differentiable op); if it is not, set requires_grad=False "
    "on its parameters"
)
NEVER_RAN_HINT = (
    "call the module in the forward and add its output to the loss if it is meant to train "
    "(an auxiliary head); else remove it or set requires_grad=False on its parameters"
)


def vanishing_hint(group: Sequence[LayerStats], structure: Structure) -> str:
    rnn = [m for m in structure.modules if 0.0 < m.extra.get("spectral_radius", 1.0) < 1.0]
    if rnn:
        m = rnn[0]
        return (
            f"{m.name or '<root>'} is a vanilla {m.type} with recurrent spectral radius "
            f"{m.extra['spectral_radius']:.2f} < 1, so gradients through time shrink at every "
            "step: use LSTM/GRU (forget/update-gate bias near 1-3) or a shorter sequence"
        )
    parts = []
    decay = per_step(group)
    if decay > 1.5:
        parts.append(f"gradients shrink {decay:.1f}x per layer toward the input")
    between = structure.saturating_ops.get(group[0].name, 0)
    if between:
        parts.append(
            f"{between} Sigmoid/Tanh ops lie between {group[0].display_name} and the loss: "
            "try ReLU/SiLU/GELU"
        )
    elif structure.saturating:
        parts.append(
            f"{structure.saturating} of {structure.activations} activation modules are "
            "Sigmoid/Tanh-like: try ReLU/SiLU/GELU"
        )
    init = init_scale(group)
    if init and init[1] < 1 / 3:
        parts.append(f"{init[0]}: weights are {init[1]:.2g}x the He-init std: use He/Xavier init")
    if not structure.has_normalization:
        parts.append("no normalization layer: add BatchNorm or LayerNorm")
    if not init or init[1] >= 1 / 3:
        parts.append("use He/Xavier init and skip connections")
    return "; ".join(parts)


def exploding_hint(group: Sequence[LayerStats], structure: Structure, uniform: bool = False) -> str:
    rnn = [m for m in structure.modules if m.extra.get("spectral_radius", 0.0) > 1.0]
    if rnn:
        m = rnn[0]
        return (
            f"{m.name or '<root>'} is a vanilla {m.type} with recurrent spectral radius "
            f"{m.extra['spectral_radius']:.2f} > 1: use LSTM/GRU, clip_grad_norm_, or an "
            "orthogonal recurrent init scaled below 1"
        )
    parts = []
    growth = per_step(group, inverse=True)
    if growth > 1.5 and not uniform:
        parts.append(f"gradients grow {growth:.1f}x per layer toward the input")
    init = init_scale(group)
    if init and init[1] > 1.5:
        parts.append(f"{init[0]}: weights are {init[1]:.2g}x the He-init std: lower the init gain")
    elif uniform:
        parts.append(
            "every layer is large alike: check the loss scale (a sum where a mean is meant, a multiplier)"
        )
    parts.append("use clip_grad_norm_, a lower learning rate, or normalization")
    return "; ".join(parts)


def init_scale(layers: Sequence[LayerStats]) -> tuple[str, float] | None:
    """The typical weight std over He init's ``sqrt(2 / fan_in)``, for layers with matrices.

    Returns ``(which layers, geometric-mean ratio)``; None when no layer has a matrix.
    """
    ratios: list[tuple[str, float]] = []
    for layer in layers:
        for p in layer.params:
            if len(p.shape) >= 2 and p.numel and p.weight_norm > 0:
                fan_in = p.numel // p.shape[0]
                std = p.weight_norm / math.sqrt(p.numel)
                ratios.append((layer.display_name, std / math.sqrt(2 / max(1, fan_in))))
    if not ratios:
        return None
    mean = math.exp(statistics.fmean(math.log(r) for _, r in ratios))
    names = [name for name, _ in ratios]
    where = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]} ({len(names)} layers)"
    return where, mean


def per_step(group: Sequence[LayerStats], inverse: bool = False) -> float:
    if len(group) < 2:
        return 1.0
    first, last = group[0].grad_rms, group[-1].grad_rms
    if first <= 0 or last <= 0:
        return 1.0
    ratio = (last / first) if not inverse else (first / last)
    return float(ratio ** (1 / (len(group) - 1)))
