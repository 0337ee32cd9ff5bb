"""Settings of a gradient check: one frozen dataclass, resolved once, with provenance.

Precedence, highest first: the ``gradient_health`` marker (or keyword arguments of a
call), the command line, the ini file / ``[tool.pytest.ini_options]``, built-in defaults.
Every value is validated where it enters, and an invalid one names where it came from.
No torch import here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .results import GradcheckError

_MODES = ("train", "eval")


def _float_or_none(name: str, value: object) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "off")):
        return None
    number = _float(name, value)
    if number <= 0:
        raise ValueError(f"{name} must be a positive number or None, got {value!r}")
    return number


def _float(name: str, value: object) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if math.isnan(number):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return number


def _positive(name: str, value: object) -> float:
    number = _float(name, value)
    if not number > 0 or math.isinf(number):
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return number


def _fraction(name: str, value: object) -> float:
    number = _float(name, value)
    if not 0 < number <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return number


def _int(name: str, value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip(), 0)
        except ValueError:
            pass
    raise ValueError(f"{name} must be an integer, got {value!r}")


def _bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
    raise ValueError(f"{name} must be true or false, got {value!r}")


def _mode(name: str, value: object) -> str:
    if isinstance(value, str) and value.strip().lower() in _MODES:
        return value.strip().lower()
    raise ValueError(f"{name} must be one of {', '.join(_MODES)}, got {value!r}")


def _device(name: str, value: object) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    if text.lower() in ("", "auto", "none"):
        return None
    kind = text.split(":", 1)[0].lower()
    if kind not in ("cpu", "cuda", "mps", "xpu", "meta") or (
        ":" in text and not text.split(":", 1)[1].isdigit()
    ):
        raise ValueError(f"{name} must be auto, cpu, cuda, cuda:N or mps, got {value!r}")
    return text


def _callable_or_none(name: str, value: object) -> Callable[..., Any] | None:
    if value is None or callable(value):
        return value
    raise ValueError(
        f"{name} must be a callable taking the model output and returning a scalar, got {value!r}"
    )


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
    origins: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    """Where each non-default value came from (for error messages)."""

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "origins":
                continue
            value = getattr(self, f.name)
            if callable(value):
                value = getattr(value, "__qualname__", repr(value))
            data[f.name] = value
        return data


_PARSERS: dict[str, Callable[[str, object], Any]] = {
    "min_norm": _float_or_none,
    "max_norm": _float_or_none,
    "device": _device,
    "seed": _int,
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
                    f"unknown gradcheck setting {name!r} from {origin}; "
                    f"valid settings: {', '.join(SETTING_NAMES)}"
                )
            try:
                values[name] = parser(name, raw)
            except ValueError as exc:
                raise GradcheckError(f"{name}={raw!r} from {origin}: {exc}") from None
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
    lo, hi = settings.min_norm, settings.max_norm
    if lo is not None and hi is not None and lo >= hi:
        raise GradcheckError(
            f"min_norm={lo:g} (from {settings.origins.get('min_norm', 'the defaults')}) must be "
            f"below max_norm={hi:g} (from {settings.origins.get('max_norm', 'the defaults')})"
        )
