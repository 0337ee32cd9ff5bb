"""Settings of a gradient check: one frozen dataclass, resolved once, with provenance.

Precedence, highest first: the ``gradient_health`` marker (or keyword arguments of a
call), the command line, the ini file / ``[tool.pytest.ini_options]``, built-in defaults.
Every value is validated where it enters, and an invalid one names where it came from.

Also the plain data of a policy (:class:`Policy`, :class:`LayerRule`,
:class:`ConventionSetting`): :mod:`pytest_gradcheck.policy` reads YAML files into them.
Imports only :mod:`pytest_gradcheck.results`; no torch, no pytest, no YAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .results import GradcheckError, finite_float


def _shown(value: object, limit: int = 60) -> str:
    """A short excerpt of a value for an error message (:func:`.escape.excerpt`, imported
    when an error needs it: loading the plugin stays light)."""
    from .escape import excerpt

    return excerpt(value, limit)


def did_you_mean(word: object, options: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest option, else ``""`` (also when ``word`` is
    not text: a YAML key may be a number, a boolean or null)."""
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


_MODES = ("train", "eval")


def _float_or_none(name: str, value: object) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "off")):
        return None
    number = _float(name, value)
    if number <= 0:
        raise ValueError(f"{name} must be a positive number or None, got {_shown(value)}")
    return number


def _float(name: str, value: object) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {_shown(value)}")
    if isinstance(value, int):
        number = finite_float(value)
        if number is None:  # beyond 1.8e308: float() would raise OverflowError
            raise ValueError(f"{name} must be a number of size below 1.8e308, got {_shown(value)}")
        return number
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {_shown(value)}") from None
    if math.isnan(number):
        raise ValueError(f"{name} must be a number, got {_shown(value)}")
    return number


def _positive(name: str, value: object) -> float:
    number = _float(name, value)
    if not number > 0 or math.isinf(number):
        raise ValueError(f"{name} must be a finite positive number, got {_shown(value)}")
    return number


def _fraction(name: str, value: object) -> float:
    number = _float(name, value)
    if not 0 < number <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {_shown(value)}")
    return number


def _int(name: str, value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {_shown(value)}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip(), 0)
        except ValueError:
            pass
    raise ValueError(f"{name} must be an integer, got {_shown(value)}")


def _bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
    raise ValueError(f"{name} must be true or false, got {_shown(value)}")


def _mode(name: str, value: object) -> str:
    if isinstance(value, str) and value.strip().lower() in _MODES:
        return value.strip().lower()
    raise ValueError(f"{name} must be one of {', '.join(_MODES)}, got {_shown(value)}")


def _device(name: str, value: object) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    if text.lower() in ("", "auto", "none"):
        return None
    kind = text.split(":", 1)[0].lower()
    if kind == "meta":
        raise ValueError(
            "meta tensors hold no data, so there are no gradients to check and the model's "
            "weights would be lost; use auto, cpu, cuda or mps"
        )
    if kind not in ("cpu", "cuda", "mps", "xpu") or (
        ":" in text and not text.split(":", 1)[1].isdigit()
    ):
        raise ValueError(f"{name} must be auto, cpu, cuda, cuda:N or mps, got {_shown(value)}")
    return text


_SEED_RANGE = (-(2**63), 2**64 - 1)
"""What ``torch.manual_seed`` accepts."""


def _seed(name: str, value: object) -> int:
    number = _int(name, value)
    low, high = _SEED_RANGE
    if not low <= number <= high:
        raise ValueError(f"{name} must be an integer from -2**63 to 2**64 - 1, got {_shown(value)}")
    return number


MAX_STEPS = 10_000
"""``steps`` above this is a training run, not a check (a bound, so a typo cannot hang CI)."""
MAX_PROCESSES = 64
"""``distributed`` above this many local processes is refused (each is a copy of the model)."""


def _steps(name: str, value: object) -> int:
    number = _count(name, value)
    if number > MAX_STEPS:
        raise ValueError(
            f"{name} must be at most {MAX_STEPS} (a check takes a few optimizer steps on one "
            f"batch), got {_shown(value)}; for longer runs, train with your own loop"
        )
    return number


def _processes(name: str, value: object) -> int:
    number = _count(name, value)
    if number > MAX_PROCESSES:
        raise ValueError(f"{name} must be at most {MAX_PROCESSES} processes, got {_shown(value)}")
    return number


STRATEGIES = ("ddp", "fsdp")
"""How ``distributed`` spreads the model over its processes."""


def _strategy(name: str, value: object) -> str:
    if isinstance(value, str) and value.strip().lower() in STRATEGIES:
        return value.strip().lower()
    text = value.strip().lower() if isinstance(value, str) else ""
    raise ValueError(
        f"{name} must be one of {', '.join(STRATEGIES)}, got {value!r}"
        + did_you_mean(text, STRATEGIES)
    )


def _finite_or_none(name: str, value: object) -> float | None:
    number = _float_or_none(name, value)
    if number is not None and math.isinf(number):
        raise ValueError(f"{name} must be a finite positive number or None, got {_shown(value)}")
    return number


def _callable_or_none(name: str, value: object) -> Callable[..., Any] | None:
    if value is None or callable(value):
        return value
    raise ValueError(
        f"{name} must be a callable taking the model output and returning a scalar, got "
        f"{_shown(value)}"
    )


_OPTIMIZERS = ("sgd", "adam", "adamw")
_PRECISIONS = {
    "fp32": "fp32",
    "float32": "fp32",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "bf16": "bf16",
    "bfloat16": "bf16",
}


def _count(name: str, value: object) -> int:
    number = _int(name, value)
    if number < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {_shown(value)}")
    return number


def _optimizer(name: str, value: object) -> str | Callable[..., Any]:
    if isinstance(value, str) and value.strip().lower() in _OPTIMIZERS:
        return value.strip().lower()
    if callable(value) and not isinstance(value, str):
        return value
    raise ValueError(
        f"{name} must be one of {', '.join(_OPTIMIZERS)} or a callable taking the list of "
        f"parameters and returning a torch.optim.Optimizer, got {_shown(value)}"
    )


def _precision(name: str, value: object) -> str:
    if isinstance(value, str) and value.strip().lower() in _PRECISIONS:
        return _PRECISIONS[value.strip().lower()]
    raise ValueError(f"{name} must be fp32, fp16 or bf16, got {_shown(value)}")


def _scaler(name: str, value: object) -> bool | float:
    if isinstance(value, bool):
        return value
    try:
        return _bool(name, value) if isinstance(value, str) else _positive(name, value)
    except ValueError:
        pass
    try:
        return _positive(name, value)
    except ValueError:
        raise ValueError(
            f"{name} must be true, false or an initial loss scale (a positive number, "
            f"e.g. 65536), got {_shown(value)}"
        ) from None


@dataclass(frozen=True)
class Settings:
    """Everything a gradient check needs to know. Built by :func:`resolve`."""

    min_norm: float | None = None
    """Absolute floor: a layer whose gradient L2 norm is below it is ``vanishing``."""
    max_norm: float | None = None
    """Absolute ceiling: a layer whose gradient L2 norm is above it is ``exploding``."""
    device: str | None = None
    """``None``/``auto`` picks CUDA, then MPS, then CPU."""
    seed: int = 0
    """Seeds dropout and the default loss; the caller's RNG state is restored afterwards."""
    mode: str = "train"
    """``train`` (dropout and BatchNorm as in training) or ``eval``."""
    loss_fn: Callable[..., Any] | None = None
    """``loss_fn(output) -> scalar``; None uses the output's loss or the default loss."""
    relative: bool = True
    """Apply the relative, depth-aware vanishing/exploding rules."""
    vanishing_ratio: float = 1e-4
    """Relative rule: a layer this many times smaller than the same role nearest the loss."""
    exploding_ratio: float = 1e3
    """Relative rule: a layer this many times larger than the same role nearest the loss."""
    floor_rms: float = 1e-9
    """Uniform-vanishing rule: every layer's gradient RMS is below this."""
    ceiling_norm: float = 1e6
    """Uniform-exploding rule: a layer's gradient norm is above this (loss scale is wrong)."""
    dead: bool = True
    """Report layers whose gradient is exactly zero everywhere."""
    unused: bool = True
    """Report trainable parameters that received no gradient."""
    diagnose: bool = True
    """On a non-finite gradient, re-run the pass to find where the NaN/Inf was born."""
    activations: bool = False
    """Also record the norm of the gradient that flows into each layer's output during
    backward (``Report.activation_grads``; along time, per step of an RNN/LSTM/GRU's input
    sequence and per call of a module called more than once, ``Report.activation_steps``).
    Costs a global forward hook and a hook per layer output: about 1.2-1.35x the check's time
    on models with hundreds of small layers, about 1.0x on GPT-2-sized ones."""
    steps: int = 1
    """Optimizer steps to take on the sample batch, checking the gradients of every step
    with the same rules; the check stops at the first unhealthy step and reports it. The
    model is restored afterwards (parameters, buffers, ``.grad``). 1: one pass, no step."""
    optimizer: str | Callable[..., Any] = "adam"
    """``sgd``, ``adam``, ``adamw``, or (from Python) a factory ``params -> Optimizer``
    called with the list of trainable parameters. Used when ``steps > 1``,
    ``expect_loss_decrease`` or ``grad_scaler`` is set."""
    lr: float | None = None
    """Learning rate of a named optimizer; None: 1e-3 for adam and adamw, 1e-2 for sgd.
    A factory sets its own."""
    expect_loss_decrease: bool = False
    """Fail (kind ``stalled``) unless the loss after the last of the ``steps`` optimizer
    steps is below the loss before the first: the "overfit one batch" sanity test."""
    precision: str = "fp32"
    """``fp32``; or ``fp16``/``bf16``: run the passes under ``torch.autocast`` and report
    gradients that underflow to zero (``underflow``) or overflow (``nonfinite``) where fp32
    does not."""
    grad_scaler: bool | float = False
    """With ``precision='fp16'``: scale the loss with ``torch.amp.GradScaler`` (a number is
    its initial scale; True: 65536), back off on overflow, and report a collapsed scale."""
    distributed: int = 1
    """Run the check in this many local processes, each on its own shard of the batch, under
    DistributedDataParallel (gloo, CPU; the ranks are compared) or sharded with FSDP2 (see
    ``distributed_strategy``). 1: this process only."""
    distributed_strategy: str = "ddp"
    """How ``distributed`` runs the model: ``ddp`` (DistributedDataParallel, gloo on CPU) or
    ``fsdp`` (each child block holding parameters, then the root, sharded with FSDP2's
    ``fully_shard``; gloo on CPU, NCCL with one GPU per process where there are enough).
    Either way each process gets its shard of the batch, and the report has the module
    paths of the bare model."""
    distributed_timeout: float = 120.0
    """Seconds a distributed check may run before its processes are stopped and it fails."""
    timeout: float | None = None
    """Seconds one check may take, all its passes, steps and failure-path diagnosis included;
    past it the check stops, gives the model back and fails (:class:`.GradcheckTimeout`).
    Looked at between passes, so a single forward that never returns is not interrupted
    (pytest-timeout's ``--timeout`` is the guard for that). With ``distributed`` the parent
    stops the processes at ``timeout`` or ``distributed_timeout``, whichever is shorter.
    None: no limit."""
    policy: Policy | None = field(default=None, compare=False, repr=False)
    """Per-layer rules and conventions (``--gradcheck-policy``); its defaults are resolved
    into the fields above, below the ini file. Not a keyword: see :mod:`.policy`."""
    origins: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    """Where each non-default value came from (for error messages)."""

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "origins":
                continue
            value = getattr(self, f.name)
            if f.name == "policy":
                value = None if value is None else value.name
            if callable(value):
                value = getattr(value, "__qualname__", repr(value))
            data[f.name] = value
        return data


_PARSERS: dict[str, Callable[[str, object], Any]] = {
    "min_norm": _float_or_none,
    "max_norm": _float_or_none,
    "device": _device,
    "seed": _seed,
    "mode": _mode,
    "loss_fn": _callable_or_none,
    "relative": _bool,
    "vanishing_ratio": _fraction,
    "exploding_ratio": _positive,
    "floor_rms": _positive,
    "ceiling_norm": _positive,
    "dead": _bool,
    "unused": _bool,
    "diagnose": _bool,
    "activations": _bool,
    "steps": _steps,
    "optimizer": _optimizer,
    "lr": _finite_or_none,
    "expect_loss_decrease": _bool,
    "precision": _precision,
    "grad_scaler": _scaler,
    "distributed": _processes,
    "distributed_strategy": _strategy,
    "distributed_timeout": _positive,
    "timeout": _finite_or_none,
}

#: Names a caller may set (marker keywords, ``check_gradients`` keywords, ini keys without prefix).
SETTING_NAMES: tuple[str, ...] = tuple(_PARSERS)

#: Settings that only make sense from Python (not from an ini file or the command line).
PYTHON_ONLY: frozenset[str] = frozenset({"loss_fn"})


def resolve(sources: Iterable[tuple[str, Mapping[str, object]]]) -> Settings:
    """Build :class:`Settings` from ``(origin, values)`` pairs, lowest precedence first.

    ``origin`` is a phrase such as ``"the gradient_health marker on test_x"``; it is
    quoted in the error when a value is invalid. Raises :class:`GradcheckError`.
    """
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for origin, mapping in sources:
        for name, raw in mapping.items():
            parser = _PARSERS.get(name)
            if parser is None:
                raise GradcheckError(
                    f"unknown gradcheck setting {_shown(name)} from {origin}; "
                    f"valid settings: {', '.join(SETTING_NAMES)}"
                )
            try:
                values[name] = parser(name, raw)
            except ValueError as exc:
                raise GradcheckError(f"{name}={_shown(raw)} from {origin}: {exc}") from None
            origins[name] = origin
    settings = Settings(**values, origins=origins)
    _check_consistent(settings)
    return settings


def override(settings: Settings, origin: str, values: Mapping[str, object]) -> Settings:
    """Return ``settings`` with ``values`` (from ``origin``) applied on top."""
    if not values:
        return settings
    updated = resolve([(origin, values)])
    changed = {name: getattr(updated, name) for name in values}
    origins = {**settings.origins, **dict.fromkeys(values, origin)}
    result = replace(settings, **changed, origins=origins)
    _check_consistent(result)
    return result


def _check_consistent(settings: Settings) -> None:
    def origin(name: str) -> str:
        return settings.origins.get(name, "the defaults")

    if settings.lr is not None and callable(settings.optimizer):
        raise GradcheckError(
            f"lr={settings.lr:g} (from {origin('lr')}) has no effect with an optimizer factory "
            f"(from {origin('optimizer')}): set the learning rate inside the factory, or name "
            "the optimizer (sgd, adam, adamw)"
        )
    if settings.grad_scaler is not False and settings.precision != "fp16":
        raise GradcheckError(
            f"grad_scaler={settings.grad_scaler!r} (from {origin('grad_scaler')}) needs "
            f"precision='fp16', got precision={settings.precision!r} (from "
            f"{origin('precision')}): loss scaling guards fp16's narrow range; bf16 and fp32 "
            "need none"
        )
    lo, hi = settings.min_norm, settings.max_norm
    if lo is not None and hi is not None and lo >= hi:
        raise GradcheckError(
            f"min_norm={lo:g} (from {settings.origins.get('min_norm', 'the defaults')}) must be "
            f"below max_norm={hi:g} (from {settings.origins.get('max_norm', 'the defaults')})"
        )


# -- a policy's data (read from YAML by pytest_gradcheck.policy) ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LayerRule:
    """One per-layer rule. ``origin`` is ``file:line``. Compared (and hashed) by identity."""

    pattern: str
    """A glob over module paths (``*`` matches dots too; a leading ``*.`` also matches at the
    root) or, with the ``re:`` prefix, a regular expression that must match the whole path."""
    origin: str
    ignore: bool = False
    ignore_kinds: tuple[str, ...] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)
    reason: str = ""

    @property
    def label(self) -> str:
        return f"{self.origin} {_shown(self.pattern, 80)}"

    def matches(self, layer: str) -> bool:
        return _matches(self.pattern, layer)

    def describe(self) -> str:
        if self.ignore:
            what = "ignore"
        else:
            parts = [f"{k}={v}" for k, v in self.settings.items()]
            if self.ignore_kinds:
                parts.append(f"ignore {', '.join(self.ignore_kinds)}")
            what = ", ".join(parts)
        reason = f"; {self.reason}" if self.reason else ""
        return f"{self.label} ({what}{reason})"


@functools.lru_cache(maxsize=2**16)
def _matches(pattern: str, layer: str) -> bool:
    """Each layer name is matched once per pattern, however many checks and problems ask
    (a ``re:`` pattern that backtracks is refused when its policy is loaded)."""
    return _matcher(pattern)(layer)


@functools.cache
def _matcher(pattern: str) -> Callable[[str], bool]:
    if pattern.startswith("re:"):
        regex = re.compile(pattern[3:])
        return lambda name: regex.fullmatch(name) is not None
    return lambda name: (
        fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase("." + name, pattern)
    )


@dataclass(frozen=True)
class ConventionSetting:
    """A convention as a policy switches it: on or off, with parameters."""

    name: str
    enabled: bool
    params: Mapping[str, Any]
    origin: str


@dataclass(frozen=True)
class Policy:
    """A loaded, merged, validated policy. Plain data."""

    path: str
    """The file that was loaded (the most specific one)."""
    files: tuple[str, ...]
    """That file and the files it extends, most specific first."""
    settings: Mapping[str, tuple[Any, str]] = field(default_factory=dict)
    """Default settings: name -> (value as written, ``file:line``)."""
    rules: tuple[LayerRule, ...] = ()
    conventions: Mapping[str, ConventionSetting] = field(default_factory=dict)

    @property
    def name(self) -> str:
        names = [os.path.basename(f) for f in self.files]
        return names[0] + (f" (extends {', '.join(names[1:])})" if len(names) > 1 else "")

    def sources(self) -> list[tuple[str, Mapping[str, object]]]:
        """The default settings as ``resolve`` sources, one per value, with its origin."""
        return [
            (f"the policy {origin}", {name: value})
            for name, (value, origin) in self.settings.items()
        ]

    @property
    def enabled(self) -> tuple[ConventionSetting, ...]:
        return tuple(c for c in self.conventions.values() if c.enabled)

    def rule_for(self, layer: str) -> LayerRule | None:
        """The first rule that matches ``layer`` (a module path, ``<root>`` or ``<loss>``)."""
        if layer == "<loss>":
            return None
        if layer == "<root>":  # a pattern may name it either way
            return next((r for r in self.rules if r.matches("") or r.matches(layer)), None)
        return next((rule for rule in self.rules if rule.matches(layer)), None)

    def to_settings(self, **overrides: Any) -> Settings:
        """Settings for ``check_gradients(model, batch, settings=...)`` from Python: the
        policy's defaults, then ``overrides``, with the policy's rules and conventions."""
        resolved = resolve([*self.sources(), ("the to_settings() arguments", overrides)])
        return dataclasses.replace(resolved, policy=self)

    def settings_for(self, rule: LayerRule, base: Settings) -> Settings:
        return override(base, f"the policy rule {rule.label}", rule.settings)
