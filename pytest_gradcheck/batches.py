"""Sample batches of a YAML suite: the tensor specs, their checks, and :func:`build_batch`.

An entry's ``batch:`` is a tensor spec (``model(x)``), a list of specs and plain values
(``model(*batch)``) or a mapping of keyword inputs (``model(**batch)``)::

    batch:
      input_ids: {shape: [2, 16], vocab: 128}            # token ids, seeded
      attention_mask: {shape: [2, 16], fill: 1, dtype: int64}
      pixel_values: {shape: [2, 3, 8, 8], low: -1, high: 1}
      labels: {same_as: input_ids}                       # the same tensor again
      features: {file: fixtures/x.pt, key: features}     # torch.save / numpy.save(z)

:func:`parse_batch` checks a batch when its suite is collected, tensor files included
(read with ``torch.load(weights_only=True)`` or ``numpy.load(allow_pickle=False)``: no
pickled code runs); a mistake is a :class:`~pytest_gradcheck.policy.ConfigError` naming the
file, the entry and the line. :func:`build_batch` makes the tensors, seeded, when the item
runs.

Imports the YAML helpers of :mod:`.policy` and :func:`.results.finite_float`; torch (and numpy) only to read a tensor file or
build a batch. No pytest.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .escape import excerpt
from .policy import (
    ConfigError,
    Map,
    Seq,
    check_keys,
    clip,
    did_you_mean,
    home,
    is_file,
    outside_message,
    path_problem,
    type_name,
    within,
)
from .results import finite_float

#: Keys of a tensor spec.
TENSOR_KEYS: tuple[str, ...] = (
    "shape",
    "dtype",
    "low",
    "high",
    "vocab",
    "fill",
    "file",
    "key",
    "same_as",
)
DTYPES: tuple[str, ...] = (
    "float32",
    "float64",
    "float16",
    "bfloat16",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "bool",
)
#: The most elements of one tensor a spec may ask for (2**31: 8 GiB as float32).
MAX_ELEMENTS = 2**31
_INTEGER = ("int64", "int32", "int16", "int8", "uint8")
_FILE_SUFFIXES = (".pt", ".pth", ".npy", ".npz")


@dataclass(frozen=True)
class TensorSpec:
    """How to make one tensor of a sample batch."""

    line: int
    shape: tuple[int, ...] = ()
    dtype: str = "float32"
    low: float | None = None
    high: float | None = None
    vocab: int | None = None
    fill: float | None = None
    file: Path | None = None
    key: str | None = None
    same_as: str | None = None
    loaded: Any = field(default=None, compare=False, repr=False)
    """The file's content (read at collection, to report a bad file there)."""


Batch = TensorSpec | tuple[Any, ...] | dict[str, Any]
"""A tensor spec (``model(x)``), a tuple of specs and values (``model(*batch)``) or a
mapping of keyword inputs to specs and values (``model(**batch)``)."""


# -- reading a batch from YAML ----------------------------------------------------------------


def parse_batch(raw: object, line: int, path: Path, rootdir: Path | None, entry: str) -> Batch:
    file = str(path)
    if isinstance(raw, Seq):
        return tuple(
            _value(item, raw.line_of(i), path, rootdir, entry, f"batch[{i}]")
            for i, item in enumerate(raw)
        )
    if not isinstance(raw, Map) or not raw:
        raise ConfigError(
            file,
            line,
            "batch must be a tensor spec ({shape: [8, 16]}), a list of them, a mapping of "
            f"keyword inputs, or {{file: fixtures/x.pt}}; got {type_name(raw)}",
            entry,
        )
    if any(key in TENSOR_KEYS for key in raw):
        return _spec(raw, path, rootdir, entry, "batch", top=True)
    inputs: dict[str, Any] = {}
    for key, item in raw.items():
        inputs[str(key)] = _value(item, raw.line_of(key), path, rootdir, entry, _input(key))
    for key, item in inputs.items():
        if isinstance(item, TensorSpec) and item.same_as is not None:
            target = inputs.get(item.same_as)
            if item.same_as == key or not isinstance(target, TensorSpec):
                options = [k for k, v in inputs.items() if isinstance(v, TensorSpec) and k != key]
                raise ConfigError(
                    file,
                    item.line,
                    f"{_input(key)}: same_as: {excerpt(item.same_as)} is not another tensor "
                    "input of "
                    "this batch" + (did_you_mean(item.same_as, options) or ""),
                    entry,
                )
            if target.same_as is not None:
                raise ConfigError(
                    file,
                    item.line,
                    f"{_input(key)}: same_as: {excerpt(item.same_as)} is itself a same_as; "
                    "point at the "
                    "original input",
                    entry,
                )
    return inputs


def parse_target(
    raw: object, line: int, path: Path, rootdir: Path | None, entry: str, batch: Batch
) -> Batch:
    """An entry's ``target:``, the second argument of ``loss_fn(output, target)``: the specs of
    a batch (a tensor spec, a list, a mapping), or ``{same_as: INPUT}``, the tensor that the
    batch's keyword input ``INPUT`` is (a language model's labels are its input ids)."""
    if isinstance(raw, Map) and "same_as" in raw and len(raw) == 1:
        name = raw["same_as"]
        inputs = batch if isinstance(batch, dict) else {}
        options = [k for k, v in inputs.items() if isinstance(v, TensorSpec) and not _is_alias(v)]
        if not isinstance(name, str) or name not in options:
            raise ConfigError(
                str(path),
                raw.line,
                f"target: same_as: {excerpt(name)} is not a tensor input of this entry's batch"
                + (
                    did_you_mean(str(name), options)
                    or f" (its tensor inputs: {', '.join(options)})"
                    if options
                    else " (same_as needs a batch of keyword inputs: batch: {input_ids: ...})"
                ),
                entry,
            )
        return TensorSpec(line=raw.line, same_as=name)
    try:
        return parse_batch(raw, line, path, rootdir, entry)
    except ConfigError as exc:
        detail = exc.detail.removeprefix("batch")  # "batch.x must ..." -> "target.x must ..."
        raise ConfigError(str(path), exc.line, f"target{detail}", entry) from None


def _value(
    item: object, line: int, path: Path, rootdir: Path | None, entry: str, where: str
) -> Any:
    if isinstance(item, Map):
        return _spec(item, path, rootdir, entry, where)
    if item is None or isinstance(item, (bool, int, float, str)):
        return item  # passed to the model as it is (e.g. return_dict: true)
    keys = list(TENSOR_KEYS)
    hint = did_you_mean(where.rpartition(".")[2], keys)
    raise ConfigError(
        str(path),
        line,
        f"{where} must be a tensor spec (a mapping with shape: or file:) or a plain value, got "
        f"{type_name(item)}{hint}",
        entry,
    )


def _number(value: object, key: str, where: str, line: int, file: str, entry: str) -> float:
    number = finite_float(value)
    if number is None:
        raise ConfigError(
            file, line, f"{where}.{key} must be a finite number, got {type_name(value)}", entry
        )
    return number


def _spec(
    raw: Map, path: Path, rootdir: Path | None, entry: str, where: str, top: bool = False
) -> TensorSpec:
    file = str(path)
    check_keys(raw, TENSOR_KEYS, file, f"the tensor spec {where}", entry)

    def error(key: str | None, message: str) -> ConfigError:
        return ConfigError(
            file, raw.line_of(key) if key else raw.line, f"{where}: {message}", entry
        )

    if "same_as" in raw:
        if top or len(raw) != 1:
            raise error(
                "same_as",
                "same_as stands alone and only among keyword inputs (labels: {same_as: input_ids})",
            )
        if not isinstance(raw["same_as"], str):
            raise error(
                "same_as", f"same_as must name another input, got {type_name(raw['same_as'])}"
            )
        return TensorSpec(line=raw.line, same_as=raw["same_as"])
    if "file" in raw:
        extra = [k for k in raw if k not in ("file", "key")]
        if extra:
            raise error(extra[0], f"a file input takes only `key:`, not {extra[0]!r}")
        return _file_spec(raw, path, rootdir, entry, where)
    if "key" in raw:
        raise error("key", "key selects an entry of a `file:`; add file: or drop key")
    shape = raw.get("shape")
    if shape is None:
        raise error(None, "a tensor spec needs `shape:` (a list of sizes, e.g. [8, 16]) or `file:`")
    if not isinstance(shape, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape
    ):
        raise error("shape", f"shape must be a list of positive integers, got {type_name(shape)}")
    elements = math.prod(shape)
    if elements > MAX_ELEMENTS:
        raise error(
            "shape",
            f"shape {excerpt(shape)} has {elements:.3g} elements; a tensor of a sample batch "
            f"has at most {MAX_ELEMENTS:,} (2**31): a gradient check needs a few samples, so "
            "make it smaller",
        )
    dtype = raw.get("dtype", "int64" if "vocab" in raw else "float32")
    if dtype not in DTYPES:
        raise error(
            "dtype",
            f"unknown dtype {excerpt(dtype)}"
            + (did_you_mean(str(dtype), DTYPES) or f"; use one of {', '.join(DTYPES)}"),
        )
    kinds = [k for k in ("vocab", "fill") if k in raw] + (
        ["low/high"] if "low" in raw or "high" in raw else []
    )
    if len(kinds) > 1:
        raise error(
            kinds[1].split("/")[0],
            f"give one of vocab, fill or low/high, not {' and '.join(kinds)}",
        )
    vocab = raw.get("vocab")
    if vocab is not None:
        if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
            raise error("vocab", f"vocab must be a positive integer, got {type_name(vocab)}")
        if dtype not in _INTEGER:
            raise error("dtype", f"token ids (vocab) need an integer dtype, not {dtype}")
    fill = (
        _number(raw["fill"], "fill", where, raw.line_of("fill"), file, entry)
        if "fill" in raw
        else None
    )
    low = (
        _number(raw["low"], "low", where, raw.line_of("low"), file, entry) if "low" in raw else None
    )
    high = (
        _number(raw["high"], "high", where, raw.line_of("high"), file, entry)
        if "high" in raw
        else None
    )
    if dtype in _INTEGER and not kinds:
        raise error(None, f"an {dtype} tensor needs vocab (token ids), fill or low/high")
    if dtype in _INTEGER and (low is None) != (high is None):
        raise error("low" if low is None else "high", "integers need both low and high")
    if low is not None and high is not None and not low < high:
        raise error("high", f"low ({low:g}) must be below high ({high:g})")
    return TensorSpec(
        line=raw.line,
        shape=tuple(shape),
        dtype=dtype,
        low=low,
        high=high,
        vocab=vocab,
        fill=fill,
    )


def _file_spec(raw: Map, path: Path, rootdir: Path | None, entry: str, where: str) -> TensorSpec:
    file = str(path)
    given = raw["file"]
    line = raw.line_of("file")
    if not isinstance(given, str) or not given:
        raise ConfigError(file, line, f"{where}.file must be a path, got {type_name(given)}", entry)
    why = path_problem(given)
    if why is not None:
        raise ConfigError(file, line, f"{where}.file: {why}", entry)
    candidates = [path.parent / given]
    if rootdir is not None and rootdir.resolve() != path.parent.resolve():
        candidates.append(rootdir / given)
    if rootdir is not None and not os.path.isabs(given):
        root = home(path, rootdir)
        candidates = [c for c in candidates if within(c, root)]
        if not candidates:
            raise ConfigError(file, line, outside_message(f"{where}.file", given, root), entry)
    target = next((c for c in candidates if is_file(c)), None)
    if target is None:
        tried = " or ".join(excerpt(str(c), 160) for c in candidates)
        raise ConfigError(
            file,
            line,
            f"{where}.file: {excerpt(given)} not found (looked for {tried}); the path is "
            "relative to the suite file or the rootdir",
            entry,
        )
    if target.suffix not in _FILE_SUFFIXES:
        raise ConfigError(
            file,
            line,
            f"{where}.file: {excerpt(given)} is not a tensor file: use .pt/.pth (torch.save) or "
            ".npy/.npz (numpy.save/savez)",
            entry,
        )
    try:
        loaded = _read_tensor_file(target)
    except ConfigError as exc:
        raise ConfigError(
            file, line, f"{where}.file: {excerpt(given)} {exc.detail}", entry
        ) from None
    key = raw.get("key")
    if key is not None:
        if not isinstance(loaded, dict):
            raise ConfigError(
                file,
                raw.line_of("key"),
                f"{where}.key: {excerpt(given)} holds {type(loaded).__name__}, not a mapping "
                "of named "
                "tensors; drop key",
                entry,
            )
        if key not in loaded:
            names = [str(name) for name in loaded]
            raise ConfigError(
                file,
                raw.line_of("key"),
                f"{where}.key: {excerpt(given)} has no entry {excerpt(key)}"
                + (did_you_mean(str(key), names) or f"; it has: {excerpt(', '.join(names), 200)}"),
                entry,
            )
        loaded = loaded[key]
    return TensorSpec(line=raw.line, file=target, key=key, loaded=loaded)


def _read_tensor_file(target: Path) -> Any:
    """A .pt with ``torch.load(weights_only=True)``, .npy/.npz with ``numpy.load`` (no pickle)."""
    if target.suffix in (".pt", ".pth"):
        import torch

        try:
            loaded = torch.load(target, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ConfigError(
                target,
                0,
                "is not a tensor file that torch.load(weights_only=True) can read "
                f"({_reason(exc)}); save tensors with torch.save",
            ) from None
        bad = _non_tensor(loaded)
        if bad:
            raise ConfigError(
                target,
                0,
                f"holds {bad}, not tensors; save a tensor, a tuple/list of tensors or a dict "
                "of them",
            )
        return loaded
    try:
        import numpy
    except ImportError:
        raise ConfigError(target, 0, "needs numpy to be read: pip install numpy") from None
    import torch

    try:
        loaded = numpy.load(target, allow_pickle=False)
        if isinstance(loaded, numpy.lib.npyio.NpzFile):
            with loaded:
                return {k: torch.from_numpy(numpy.array(loaded[k])) for k in loaded.files}
        return torch.from_numpy(numpy.array(loaded))
    except Exception as exc:
        raise ConfigError(
            target,
            0,
            f"is not a numeric array file that numpy.load(allow_pickle=False) can read "
            f"({_reason(exc)}); save arrays with numpy.save or numpy.savez",
        ) from None


def _input(key: object) -> str:
    """``batch.name`` for a keyword input; an odd or long name as a short excerpt."""
    text = str(key)
    return f"batch.{text}" if text.isidentifier() and len(text) <= 60 else f"batch[{excerpt(key)}]"


def _reason(exc: BaseException) -> str:
    """``Type: first line`` of a reader's error, which may quote the file: cut short."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {clip(lines[0])}" if lines else type(exc).__name__


def _non_tensor(value: Any) -> str:
    import torch

    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (bool, int, float)):
        return ""
    if isinstance(value, (list, tuple)):
        return next((bad for bad in map(_non_tensor, value) if bad), "")
    if isinstance(value, dict):
        return next((bad for bad in map(_non_tensor, value.values()) if bad), "")
    return f"a {type(value).__name__}"


def build_batch(batch: Batch, seed: int) -> Any:
    """Make the sample batch: seeded, so the same suite gives the same tensors everywhere."""
    import torch

    generator = torch.Generator().manual_seed(seed)

    def make(spec: Any) -> Any:
        if not isinstance(spec, TensorSpec):
            return spec
        if spec.file is not None:
            return spec.loaded
        dtype = getattr(torch, spec.dtype)
        if spec.fill is not None:
            return torch.full(spec.shape, spec.fill, dtype=dtype)
        if spec.vocab is not None:
            return torch.randint(0, spec.vocab, spec.shape, generator=generator, dtype=dtype)
        if spec.dtype in _INTEGER:
            assert spec.low is not None
            assert spec.high is not None
            low, high = math.ceil(spec.low), math.floor(spec.high)
            return torch.randint(
                low, max(high, low + 1), spec.shape, generator=generator, dtype=dtype
            )
        if spec.dtype == "bool":
            return torch.rand(spec.shape, generator=generator) < 0.5
        if spec.low is not None or spec.high is not None:
            start = 0.0 if spec.low is None else spec.low
            stop = start + 1.0 if spec.high is None else spec.high
            values = torch.rand(spec.shape, generator=generator) * (stop - start) + start
        else:
            values = torch.randn(spec.shape, generator=generator)
        return values.to(dtype)

    if isinstance(batch, TensorSpec):
        return make(batch)
    if isinstance(batch, tuple):
        return tuple(make(item) for item in batch)
    made = {key: make(item) for key, item in batch.items() if not _is_alias(item)}
    for key, item in batch.items():
        if _is_alias(item):
            made[key] = made[item.same_as]
    return {key: made[key] for key in batch}


def build_target(target: Batch, batch: Any, seed: int) -> Any:
    """Make the target: the batch's own input for ``{same_as: INPUT}``, else seeded like the
    batch, from a generator of its own (so the target does not repeat the batch's values)."""
    if isinstance(target, TensorSpec) and target.same_as is not None:
        return batch[target.same_as]
    return build_batch(target, (seed + 1) % 2**63)


def _is_alias(item: Any) -> bool:
    return isinstance(item, TensorSpec) and item.same_as is not None
