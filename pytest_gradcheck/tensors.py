"""The one walker over nested tensors: batches, model outputs and hook arguments.

A batch or an output is a tensor or any nesting of mappings (a ``dict``, Hugging Face's
``BatchEncoding``), named tuples, tuples, lists and dataclasses around tensors. Every
feature that looks into one goes through :func:`leaves` (read) or :func:`map_tensors`
(rebuild), so moving to the device, the fp32 upcast, DDP sharding, the default loss, the
activation recorder and the NaN/Inf origin search all see the same tensors.

Imports torch; nothing of the package.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

__all__ = ["describe", "leaves", "map_tensors", "tensors", "to_device", "upcast"]

MAX_DEPTH = 32
"""How deep the walker looks into nested containers (deeper ones are left as they are)."""

_LOW = (torch.float16, torch.bfloat16)


def _fields(item: Any) -> list[str] | None:
    """The fields of a dataclass instance, or None for anything else."""
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        return [f.name for f in dataclasses.fields(item)]
    return None


def leaves(obj: object, label: str = "", depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in ``obj`` with its place in it (``[0]['input_ids']``), in order."""
    if isinstance(obj, torch.Tensor):
        yield label, obj
    elif depth >= MAX_DEPTH:
        return
    elif isinstance(obj, Mapping):
        for key, item in obj.items():
            yield from leaves(item, f"{label}[{key!r}]", depth + 1)
    elif isinstance(obj, (list, tuple)):
        for index, item in enumerate(obj):
            yield from leaves(item, f"{label}[{index}]", depth + 1)
    elif (names := _fields(obj)) is not None:
        for name in names:
            yield from leaves(getattr(obj, name), f"{label}.{name}", depth + 1)


def tensors(obj: object) -> Iterator[torch.Tensor]:
    """Every distinct tensor in ``obj`` (a tensor reached twice is yielded once)."""
    seen: set[int] = set()
    for _, tensor in leaves(obj):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            yield tensor


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any], depth: int = 0) -> Any:
    """``obj`` with ``fn`` applied to every tensor in it.

    Mappings come back as dicts (``model(**batch)`` takes any), named tuples, tuples and
    lists as their own type, dataclasses as a copy with their fields mapped; anything else
    stays as it is."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if depth >= MAX_DEPTH:
        return obj
    if isinstance(obj, Mapping):
        return {key: map_tensors(value, fn, depth + 1) for key, value in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(map_tensors(value, fn, depth + 1) for value in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(value, fn, depth + 1) for value in obj)
    if (names := _fields(obj)) is not None:
        init = {f.name for f in dataclasses.fields(obj) if f.init}
        changes = {name: map_tensors(getattr(obj, name), fn, depth + 1) for name in names}
        return dataclasses.replace(obj, **{k: v for k, v in changes.items() if k in init})
    return obj


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor on ``device``."""
    return map_tensors(obj, lambda t: t.to(device))


def upcast(obj: Any) -> Any:
    """``obj`` with its fp16/bf16 tensors in fp32."""
    return map_tensors(obj, lambda t: t.float() if t.dtype in _LOW else t)


def describe(value: Any) -> str:
    """A short description of a batch or an output for error messages: types and shapes."""
    if isinstance(value, torch.Tensor):
        shape = "x".join(str(s) for s in value.shape) or "scalar"
        return f"Tensor[{shape}, {str(value.dtype).removeprefix('torch.')}]"
    if isinstance(value, Mapping):
        inner = ", ".join(f"{k}={describe(v)}" for k, v in list(value.items())[:6])
        return f"{type(value).__name__}({inner})"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(describe(v) for v in list(value)[:6])
        return f"{type(value).__name__}({inner})"
    return type(value).__name__
