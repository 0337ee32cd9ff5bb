"""Hints: what to try first when a check fails, from the model's own evidence.

Each function turns the statistics and the structure of an unhealthy check into a remedy
line for a problem of one kind. Plain data in, text out; :mod:`pytest_gradcheck.checks`
attaches them to the problems it finds.

Imports only results; no torch, no pytest.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

from .results import ONE_HOT_SOFTMAX, SAME_VALUES, LayerStats, Structure

__all__ = [
    "CUT_HINT",
    "DROPPED_HINT",
    "INDICES_HINT",
    "NEVER_RAN_HINT",
    "UNREAD_HINT",
    "UNUSED_HINT",
    "dead_hint",
    "exploding_hint",
    "init_scale",
    "per_step",
    "quoted",
    "through",
    "vanishing_hint",
    "zero_start_hint",
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
DROPPED_HINT = (
    "by design when this head does not use that module (a pooler under a token-level loss, a "
    "final norm before a head that reads other features): accept it with a policy rule that "
    "ignores `unused` there; else add its output to the loss if it is meant to train"
)
INDICES_HINT = (
    "by design for a selector (a top-k indexer of sparse attention, a router's choice): "
    "indices carry no gradient, so it trains only on a loss of its own (an auxiliary or "
    "distillation loss); accept it with a policy rule that ignores `unused` there, or give "
    "it such a loss"
)
UNREAD_HINT = (
    "use the parameter in the forward if it is meant to train (a mask token is read only "
    "with the input that asks for it: give that input in the batch); else remove it or set "
    "requires_grad=False"
)

NEVER_RAN_HINT = (
    "call the module in the forward and add its output to the loss if it is meant to train "
    "(an auxiliary head); else remove it or set requires_grad=False on its parameters"
)


def vanishing_hint(group: Sequence[LayerStats], structure: Structure) -> str:
    """Remedies for a vanishing gradient, the one the evidence points at first: a recurrence
    that shrinks (spectral radius < 1), a normalization that cancels its input, an init far
    below He/Xavier, a saturating chain with no path around it, then generic ones."""
    rnn = [m for m in structure.modules if 0.0 < m.extra.get("spectral_radius", 1.0) < 1.0]
    if rnn:
        m = rnn[0]
        return (
            f"use LSTM/GRU (forget/update-gate bias near 1-3) or a shorter sequence: "
            f"{m.name or '<root>'} is a vanilla {m.type} with recurrent spectral radius "
            f"{m.extra['spectral_radius']:.2f} < 1, so gradients through time shrink at every step"
        )
    parts = []
    constant = [x for x in group if x.name in structure.constant_weights]
    if constant:
        names = ", ".join(quoted(x.display_name) for x in constant[:3])
        more = f" and {len(constant) - 3} more" if len(constant) > 3 else ""
        parts.append(
            f"initialise randomly (Xavier/He): {names}{more} start with every weight equal to "
            f"{structure.constant_weights[constant[0].name]:.3g}, so all their units compute "
            "the same thing and their sums saturate what follows"
        )
    single = [m for m in structure.modules if m.extra.get("channels_per_group") == 1.0]
    if single:
        parts.append(
            f"use fewer groups in {single[0].name or '<root>'} (a {single[0].type} with one "
            "channel per group normalizes a single value on small feature maps and cancels "
            "its input), or LayerNorm over the channels"
        )
    init = init_scale(group)
    if init and init[1] < 1 / 3:
        parts.append(
            f"initialise with Xavier/He: {init[0]} start at {init[1]:.2g}x the {init[2]} std"
        )
    first = group[0].name
    most = structure.saturating_ops.get(first, 0)
    fewest = structure.fewest_saturating_ops.get(first, most)
    if most >= 3 and fewest == most:
        parts.append(
            f"add skip connections: every path from {quoted(group[0].display_name)} to the loss "
            f"passes {most} Sigmoid/Tanh ops"
        )
    if most:
        parts.append(
            f"use ReLU/SiLU/GELU: {most} Sigmoid/Tanh ops lie between {quoted(group[0].display_name)} "
            "and the loss"
        )
    elif structure.saturating:
        parts.append(
            f"use ReLU/SiLU/GELU: {structure.saturating} of {structure.activations} activation "
            "modules are Sigmoid/Tanh-like"
        )
    if not structure.has_normalization:
        parts.append("add BatchNorm or LayerNorm (the model has no normalization layer)")
    if not parts:
        parts.append(
            "no specific cause found in the model's structure: look for a long path without "
            "skip connections, an init far below He/Xavier, or an op that damps the signal"
        )
    decay = per_step(group)
    if decay > 1.5:
        parts.append(f"(gradients shrink {decay:.1f}x per layer toward the input)")
    return "; ".join(parts)


_LARGE_LOSS = 1e3
"""A loss above this is not unit-scale: a sum where a mean is meant, or a multiplier."""
_LARGE_INPUT = 1e2
"""A sample batch with an RMS above this is not normalized."""


def exploding_hint(
    group: Sequence[LayerStats], structure: Structure, uniform: bool = False, loss: float = 1.0
) -> str:
    """Remedies for an exploding gradient, the one the evidence points at first: a recurrence
    that grows, a loss or inputs far from unit scale, an init above He, a deep stack with
    no skip connection, then generic ones (normalization only where there is none)."""
    rnn = [m for m in structure.modules if m.extra.get("spectral_radius", 0.0) > 1.0]
    if rnn:
        m = rnn[0]
        return (
            f"use LSTM/GRU, an orthogonal recurrent init scaled below 1, or clip_grad_norm_: "
            f"{m.name or '<root>'} is a vanilla {m.type} with recurrent spectral radius "
            f"{m.extra['spectral_radius']:.2f} > 1"
        )
    parts = []
    if abs(loss) > _LARGE_LOSS:
        parts.append(
            f"check the loss scale: the loss is {loss:.3g} (a sum where a mean is meant, "
            "a multiplier)"
        )
    scale = structure.input_rms.get("batch", 1.0) if uniform else 1.0
    if scale > _LARGE_INPUT:
        parts.append(f"normalize the inputs: the sample batch has an RMS of {scale:.3g}")
    init = init_scale(group, linear=not structure.activations)
    if init and init[1] > 1.5:
        parts.append(f"lower the init gain: {init[0]} start at {init[1]:.2g}x the {init[2]} std")
    growth = per_step(group, inverse=True)
    if len(group) >= 20 and structure.has_normalization and (growth > 1.05 or uniform):
        parts.append(
            f"add skip connections: {len(group)} layers in a row grow the gradient although "
            "the model has normalization"
        )
    if uniform and not parts:
        parts.append(
            "every layer is large alike with a unit-scale loss and inputs: look for an op "
            "that scales the signal (a division by a tiny norm, a large constant)"
        )
    generic = "use clip_grad_norm_ or a lower learning rate"
    if not structure.has_normalization:
        generic += ", or add normalization"
    parts.append(generic)
    if growth > 1.5 and not uniform:
        parts.append(f"(gradients grow {growth:.1f}x per layer toward the input)")
    return "; ".join(parts)


def zero_start_hint(layer: LayerStats) -> str:
    """Remedy for a huge gradient on parameters that are all zero at initialisation (YOLOS's
    detection tokens and position embeddings): a normalization right after them divides a
    constant input by sqrt(eps)."""
    return (
        f"initialise {quoted(layer.display_name)} with small random values (trunc_normal_, "
        "std 0.02): its parameters are all zero, and a normalization right after a constant "
        "input divides by sqrt(eps) (LayerNorm eps=1e-12 multiplies the gradient by 1e6); or "
        "raise that eps"
    )


def _first_fact(
    layers: Sequence[LayerStats], facts: Mapping[str, tuple[str, str]]
) -> tuple[str, str] | None:
    """The fact about the first parameter of ``layers`` that ``facts`` knows, if any."""
    return next((facts[p.name] for layer in layers for p in layer.params if p.name in facts), None)


def dead_hint(dead: Sequence[LayerStats], structure: Structure) -> str:
    """Remedies for exact-zero gradients: the forward op that made the layers' outputs all
    zeros when one did (a ReLU that never fires, dropout p=1, a multiplication by 0), fp16
    underflow, or else what makes zeros in backward."""
    found = _first_fact(dead, structure.zeroed)
    if found is not None:
        op, where = found
        at = f" at {where}" if where else ""
        name = op.lower()
        if op == ONE_HOT_SOFTMAX:
            return (
                f"make the softmax{at} run over more than one element: a softmax over a single "
                "output (or a single one not masked) always outputs 1, so nothing before it "
                "gets a gradient (use a sigmoid or two outputs, or softmax over the right dim)"
            )
        if op == SAME_VALUES:
            return (
                f"the attention{at} mixes values that are the same at every key, so its "
                "weights change nothing: feed its values something that varies"
            )
        if "relu" in name:
            return (
                f"make the ReLU{at} fire: initialise biases at zero or positive, normalize its "
                "input, or use LeakyReLU (it outputs zero for every sample of this batch)"
            )
        if "dropout" in name:
            return f"use a dropout probability below 1: the dropout{at} zeroes its whole input"
        if name.strip("_").removeprefix("r") in ("mul", "mul_"):
            return (
                f"remove the multiplication by zero{at} (a zeroed gate or mask), or start the "
                "gate non-zero"
            )
        return f"{op}{at} outputs all zeros for this batch: check its input and parameters"
    past = _first_fact(dead, structure.zero_past)
    if past is not None:
        op, where = past
        at = f" at {where}" if where else ""
        return (
            f"by design when the head reads only some positions (a CLS-token head, a sliced "
            f"output): the gradient reaches {op}{at} but is zero for all that these layers "
            "feed into it, so the loss uses none of their positions; accept it with a policy "
            "rule that ignores `dead` there, else feed those positions to the loss"
        )
    if any(p.dtype == "float16" for layer in dead for p in layer.params):
        return (
            "scale the loss (torch.amp.GradScaler) or run the backward in bf16/fp32: float16 "
            "gradients below 6e-8 flush to zero"
        )
    dropout = [m for m in structure.modules if m.extra.get("p", 0.0) >= 1.0]
    if dropout:
        return (
            f"use a dropout probability below 1: {dropout[0].name} has p={dropout[0].extra['p']:g}"
        )
    if not structure.reach_looked:  # the forward was not searched for the op
        return (
            "look for ReLUs that never fire (a large negative bias or input shift: use "
            "LeakyReLU or zero/positive bias init), dropout with p=1, or a branch multiplied by 0"
        )
    return (
        "no forward op made these outputs zero, so the zeros come from backward: a softmax "
        "over a single output (use a sigmoid or two outputs), round() or an integer cast "
        "without a straight-through estimator, a loss whose every target is ignored "
        "(ignore_index), or outputs that are sliced away before the loss (only a class token "
        "reaches the head: then nothing these layers compute is used, so remove them or set "
        "requires_grad=False)"
    )


_INDEX_OPS = frozenset(
    {
        "topk",
        "sort",
        "argsort",
        "argmax",
        "argmin",
        "max",
        "min",
        "kthvalue",
        "mode",
        "multinomial",
        "nonzero",
        "searchsorted",
        "bucketize",
    }
)


def through(op: str, where: str) -> str:
    """The integer output that carried a parameter's values to the loss, in words:
    ``topk indices (model.py:12)``, ``the gt mask (model.py:14)``."""
    name = op.strip("_")
    what = f"{name} indices" if name in _INDEX_OPS else f"the {name} mask"
    return f"{what} ({where})" if where else what


def quoted(name: str) -> str:
    """A layer name inside a sentence: quoted when it is a bare number (``'16'`` of an
    ``nn.Sequential``), which would read as a count."""
    return repr(name) if name.isdigit() else name


def init_scale(layers: Sequence[LayerStats], linear: bool = False) -> tuple[str, float, str] | None:
    """The typical weight std over the init std for their fan-in: He's ``sqrt(2 / fan_in)``,
    or with ``linear`` (no activation between the layers) ``sqrt(1 / fan_in)``.

    Returns ``(which layers, geometric-mean ratio, the init's name)``; None when no layer
    has a matrix.
    """
    gain = 1.0 if linear else 2.0
    ratios: list[tuple[str, float]] = []
    for layer in layers:
        for p in layer.params:
            if len(p.shape) >= 2 and p.numel and p.weight_norm > 0:
                fan_in = p.numel // p.shape[0]
                std = p.weight_norm / math.sqrt(p.numel)
                ratios.append((layer.display_name, std / math.sqrt(gain / max(1, fan_in))))
    if not ratios:
        return None
    mean = math.exp(statistics.fmean(math.log(r) for _, r in ratios))
    names = [name for name, _ in ratios]
    where = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]} ({len(names)} layers)"
    return where, mean, "linear-init" if linear else "He-init"


def per_step(group: Sequence[LayerStats], inverse: bool = False) -> float:
    if len(group) < 2:
        return 1.0
    first, last = group[0].grad_rms, group[-1].grad_rms
    if first <= 0 or last <= 0:
        return 1.0
    ratio = (last / first) if not inverse else (first / last)
    return float(ratio ** (1 / (len(group) - 1)))
