"""Architecture conventions: the :class:`Convention` type and the built-in conventions.

A convention is a named rule on a model's structure that a policy switches on by name
(``conventions: {saturating_chain: {max: 3}}``); :mod:`pytest_gradcheck.verdict` runs the
switched-on ones, and :mod:`pytest_gradcheck.hooks` offers the built-in ones through the
``pytest_gradcheck_conventions`` hook. Plain statistics in, findings out.

Imports only :mod:`pytest_gradcheck.results`; no torch, no pytest.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .results import NORMALIZATION, SATURATING, LayerStats, ModuleInfo, Problem, Structure

__all__ = ["BUILTIN_CONVENTIONS", "Convention", "ConventionCheck", "Finding"]

Finding = Problem | tuple[str, str]
ConventionCheck = Callable[[Structure, Sequence[LayerStats], Mapping[str, Any]], Iterable[Finding]]


@dataclass(frozen=True)
class Convention:
    """A named architecture rule that a policy can switch on, with parameters.

    ``check(structure, layers, params)`` returns findings: ``(layer, message)`` pairs or
    :class:`~pytest_gradcheck.results.Problem` objects; each becomes a problem of kind
    ``convention``. ``defaults`` names every parameter and its default (its type is the
    type a policy must give); ``validate(params)`` may return an error text.
    """

    name: str
    check: ConventionCheck
    defaults: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    validate: Callable[[Mapping[str, Any]], str | None] | None = None


_WEIGHT_TYPES = frozenset({"Linear", "Bilinear", "LazyLinear", "Conv1D"})
_RNN_TYPES = frozenset({"RNN", "RNNCell"})


_CONV = re.compile(r"(Lazy)?Conv(Transpose)?[123]d")  # with fullmatch: `$` passes "\n"


def _is_weight_layer(kind: str) -> bool:
    return kind in _WEIGHT_TYPES or _CONV.fullmatch(kind) is not None


def _in_forward_order(structure: Structure) -> tuple[list[ModuleInfo], str]:
    """The modules in forward order when it was recorded, else in registration order."""
    if structure.forward_order:
        by_name = {m.name: m for m in structure.modules}
        return [by_name[n] for n in structure.forward_order if n in by_name], "in forward order"
    return list(structure.modules), "in registration order"


def _is_norm(kind: str) -> bool:
    return kind in NORMALIZATION or "Norm" in kind


def _module_name(name: str) -> str:
    return name or "<root>"


def _saturating_chain(
    structure: Structure, layers: Sequence[LayerStats], params: Mapping[str, Any]
) -> list[Finding]:
    limit = int(params["max"])
    chain = dict(structure.saturating_chain)
    how = "on every path from it to the loss"
    if not chain:  # not measured from the autograd graph: count modules in a row
        modules, how = _in_forward_order(structure)
        run = 0
        for module in modules:
            if module.type in SATURATING:
                run += 1
            elif _is_norm(module.type):
                run = 0
            elif module.params:
                chain[module.name] = run
    over = {name: count for name, count in chain.items() if count > limit}
    if not over:
        return []
    worst = max(over, key=lambda name: over[name])
    return [
        Problem(
            kind="convention",
            layer=_module_name(worst),
            param=None,
            value=float(over[worst]),
            limit=float(limit),
            message=(
                f"{over[worst]} Sigmoid/Tanh-like activations follow each other {how}, with no "
                f"normalization or skip path between them (at most {limit}; "
                f"{len(over)} layer(s) over)"
            ),
            hint="use ReLU/SiLU/GELU, or add LayerNorm/BatchNorm or residual connections",
        )
    ]


def _normalized_stacks(
    structure: Structure, layers: Sequence[LayerStats], params: Mapping[str, Any]
) -> list[Finding]:
    limit = int(params["max_depth"])
    findings: list[Finding] = []
    run: list[str] = []

    def close() -> None:
        if len(run) > limit:
            findings.append(
                Problem(
                    kind="convention",
                    layer=_module_name(run[0]),
                    param=None,
                    value=float(len(run)),
                    limit=float(limit),
                    message=(
                        f"{len(run)} Linear/Conv layers from {_module_name(run[0])} to "
                        f"{_module_name(run[-1])} with no normalization layer between them "
                        f"(at most {limit})"
                    ),
                    hint="add LayerNorm/BatchNorm/GroupNorm inside the stack",
                )
            )
        run.clear()

    modules, how = _in_forward_order(structure)
    for module in modules:
        if _is_norm(module.type):
            close()
        elif _is_weight_layer(module.type) and module.params:
            run.append(module.name)
    close()
    return [
        dataclasses.replace(f, message=f"{f.message}, {how}") if isinstance(f, Problem) else f
        for f in findings
    ]


def _gated_recurrence(
    structure: Structure, layers: Sequence[LayerStats], params: Mapping[str, Any]
) -> list[Finding]:
    limit = int(params["max_sequence_length"])
    findings: list[Finding] = []
    for module in structure.modules:
        length = module.extra.get("sequence_length")
        if module.type in _RNN_TYPES and length is not None and length > limit:
            findings.append(
                Problem(
                    kind="convention",
                    layer=_module_name(module.name),
                    param=None,
                    value=float(length),
                    limit=float(limit),
                    message=(
                        f"a vanilla {module.type} runs over {int(length)} steps (a vanilla "
                        f"RNN is allowed up to {limit})"
                    ),
                    hint="use nn.LSTM or nn.GRU: their gates keep gradients alive over long "
                    "sequences",
                )
            )
    return findings


_LIBRARY_STD = 0.02
"""The std most libraries initialise with (truncated normal 0.02: BERT, GPT-2, ViT, timm)."""


def _init_scale(
    structure: Structure, layers: Sequence[LayerStats], params: Mapping[str, Any]
) -> list[Finding]:
    """Weights within ``factor`` of an init std a model plausibly meant: He, Xavier, the
    model's own ``config.initializer_range`` (transformers) or the common 0.02."""
    factor = float(params["factor"])
    root = structure.modules[0].extra if structure.modules else {}
    library = float(root.get("initializer_range", _LIBRARY_STD))
    findings: list[Finding] = []
    for layer in layers:
        if not _is_weight_layer(layer.type):
            continue
        for p in layer.params:
            if len(p.shape) < 2 or not p.numel or p.weight_norm == 0.0:
                continue  # vectors, and deliberate zero init (zero-gamma, LoRA B)
            receptive = math.prod(p.shape[2:]) if len(p.shape) > 2 else 1
            fan_in, fan_out = p.shape[1] * receptive, p.shape[0] * receptive
            std = p.weight_norm / math.sqrt(p.numel)
            he = math.sqrt(2.0 / fan_in)
            xavier = math.sqrt(2.0 / (fan_in + fan_out))
            references = {"He": he, "Xavier": xavier, f"the init std {library:g}": library}
            ratios = {name: std / value for name, value in references.items()}
            if any(1 / factor <= r <= factor for r in ratios.values()):
                continue
            name, nearest = min(ratios.items(), key=lambda item: abs(math.log(item[1])))
            relation = (
                f"{1 / nearest:.2g}x below {name}"
                if nearest < 1
                else f"{nearest:.2g}x above {name}"
            )
            findings.append(
                Problem(
                    kind="convention",
                    layer=layer.display_name,
                    param=p.name,
                    value=nearest,
                    limit=factor,
                    message=(
                        f"weight std {std:.3g} is {relation} for fan-in {fan_in} (He {he:.3g}, "
                        f"Xavier {xavier:.3g}, library {library:g}; allowed {factor:g}x)"
                    ),
                    hint="initialise with nn.init.kaiming_normal_ or nn.init.xavier_normal_",
                )
            )
    return findings


def _no_unused_parameters(
    structure: Structure, layers: Sequence[LayerStats], params: Mapping[str, Any]
) -> list[Finding]:
    findings: list[Finding] = []
    for layer in layers:
        unused = [p.name for p in layer.params if not p.has_grad]
        if unused:
            findings.append(
                Problem(
                    kind="convention",
                    layer=layer.display_name,
                    param=None,
                    value=float(len(unused)),
                    limit=0.0,
                    message=f"{len(unused)} parameter(s) never receive a gradient: "
                    + ", ".join(unused[:4])
                    + (" ..." if len(unused) > 4 else ""),
                    hint="remove parameters the forward never uses, or freeze them "
                    "(requires_grad=False)",
                )
            )
    return findings


def _max_parameters(
    structure: Structure, layers: Sequence[LayerStats], params: Mapping[str, Any]
) -> list[Finding]:
    limit = int(params["max"])
    total = sum(module.params for module in structure.modules)
    if total <= limit:
        return []
    return [
        Problem(
            kind="convention",
            layer="<root>",
            param=None,
            value=float(total),
            limit=float(limit),
            message=f"the model has {total:,} parameters (at most {limit:,})",
            hint="shrink the model, or raise the limit in the team's policy",
        )
    ]


def _must_train(
    structure: Structure, layers: Sequence[LayerStats], params: Mapping[str, Any]
) -> list[Finding]:
    """Frozen parameters (``requires_grad=False``) under the modules that must train."""
    patterns = [str(pattern) for pattern in params["modules"]]
    by_module: dict[str, list[str]] = {}
    for name in structure.frozen:
        module = name.rpartition(".")[0]
        if any(fnmatch.fnmatchcase(module, p) or fnmatch.fnmatchcase(name, p) for p in patterns):
            by_module.setdefault(module, []).append(name)
    return [
        Problem(
            kind="convention",
            layer=_module_name(module),
            param=None,
            value=float(len(names)),
            limit=0.0,
            message=(
                f"{len(names)} parameter(s) are frozen (requires_grad=False) in a module that "
                f"must train: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
            ),
            hint="unfreeze them (requires_grad_(True)), or, if the freeze is meant, take the "
            "module out of must_train.modules in the policy",
        )
        for module, names in by_module.items()
    ]


def _some_modules(params: Mapping[str, Any]) -> str | None:
    return None if params["modules"] else "modules must name at least one module (a glob)"


def _at_least_one(params: Mapping[str, Any]) -> str | None:
    return "factor must be at least 1" if float(params["factor"]) < 1 else None


BUILTIN_CONVENTIONS: tuple[Convention, ...] = (
    Convention(
        "saturating_chain",
        _saturating_chain,
        {"max": 3},
        "no more than `max` Sigmoid/Tanh-like activations in a row without a normalization "
        "or skip path (measured on the autograd graph)",
    ),
    Convention(
        "normalized_stacks",
        _normalized_stacks,
        {"max_depth": 4},
        "a stack of more than `max_depth` Linear/Conv layers has a normalization layer",
    ),
    Convention(
        "gated_recurrence",
        _gated_recurrence,
        {"max_sequence_length": 16},
        "recurrent layers over more than `max_sequence_length` steps are LSTM/GRU, not a "
        "vanilla RNN",
    ),
    Convention(
        "init_scale",
        _init_scale,
        {"factor": 4.0},
        "Linear/Conv weights start within a factor `factor` of the He or Xavier std for "
        "their fan-in, or of the model's own init (config.initializer_range, else 0.02); "
        "all-zero weights are deliberate and skipped",
        _at_least_one,
    ),
    Convention(
        "no_unused_parameters",
        _no_unused_parameters,
        {},
        "every trainable parameter receives a gradient",
    ),
    Convention(
        "must_train",
        _must_train,
        {"modules": ()},
        "no parameter is frozen (requires_grad=False) in the modules that must train: "
        "`modules`, globs of module paths (encoder.*)",
        _some_modules,
    ),
    Convention(
        "max_parameters",
        _max_parameters,
        {"max": 100_000_000},
        "the model has at most `max` parameters (trainable and frozen)",
    ),
)
