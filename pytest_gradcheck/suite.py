"""Declarative model suites: ``gradcheck*.yaml`` files collected as tests, and the run's policy.

A suite file names models by import path and describes their sample batches::

    policy: policies/team.yaml          # optional: on top of the run's --gradcheck-policy
    defaults:                           # optional: keys shared by every entry
      mode: train
    models:
      bert:                             # the test id: gradcheck_suite.yaml::bert
        model: zoo_factories:bert       # module:callable (a function or a class)
        args: {hidden_size: 32}         # keyword arguments of the call
        batch:                          # keyword inputs: model(**batch)
          input_ids: {shape: [2, 16], vocab: 128}
          attention_mask: {shape: [2, 16], fill: 1, dtype: int64}
          labels: {same_as: input_ids}
        marks: [slow]
        max_norm: 1.0e4                 # any engine setting

Each entry is one :class:`SuiteItem`. Everything is checked when the file is collected
(YAML syntax, keys, types, import paths, batch files): a mistake is a collection error that
names the file, the entry and the line and says how to fix it. YAML is read with a safe
loader; no value is executed, and the only code that runs is what the import paths name.

torch is imported only when a suite is collected or run.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import inspect
import math
import os
import pkgutil
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from . import plugin
from .hooks import conventions
from .policy import (
    ConfigError,
    Map,
    Policy,
    Seq,
    check_keys,
    did_you_mean,
    load_policy,
    load_yaml,
    merge,
    type_name,
)
from .results import GradcheckError, GradientHealthError
from .settings import SETTING_NAMES, Settings, override, resolve

if TYPE_CHECKING:
    from _pytest._code.code import ExceptionInfo, TerminalRepr, TracebackStyle

PLUGIN_NAME = "gradcheck-suite"

#: Top-level keys of a suite file.
SUITE_KEYS: tuple[str, ...] = ("policy", "description", "defaults", "models")
#: Settings an entry may give (``loss_fn`` is ``loss:``, an import path).
ENTRY_SETTINGS: tuple[str, ...] = tuple(name for name in SETTING_NAMES if name != "loss_fn")
#: Keys of one entry (and of ``defaults:``, less ``model`` and ``description``).
ENTRY_KEYS: tuple[str, ...] = (
    "model",
    "description",
    "args",
    "batch",
    "loss",
    "marks",
    *ENTRY_SETTINGS,
)
DEFAULTS_KEYS: tuple[str, ...] = tuple(k for k in ENTRY_KEYS if k not in ("model", "description"))
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
_INTEGER = ("int64", "int32", "int16", "int8", "uint8")
_ENTRY_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_FILE_SUFFIXES = (".pt", ".pth", ".npy", ".npz")
_GROUP = "gradient health checks (pytest-gradcheck)"
_PATTERN_DEFAULT = ["gradcheck*.yaml", "gradcheck*.yml"]


# -- options and the run's policy --------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gradcheck", _GROUP)
    group.addoption(
        "--gradcheck-policy",
        dest="gradcheck_policy",
        default=None,
        metavar="FILE",
        help="policy file (YAML): default settings, per-layer rules and conventions for "
        "every gradient check of the run",
    )
    parser.addini(
        "gradcheck_policy",
        "policy file (YAML) for every gradient check, relative to the ini file",
        type="string",
        default=None,
    )
    parser.addini(
        "gradcheck_suite_pattern",
        "glob(s) of YAML files collected as gradient-check suites (default: "
        + " ".join(_PATTERN_DEFAULT)
        + ")",
        type="args",
        default=_PATTERN_DEFAULT,
    )


def run_policy(config: pytest.Config) -> Policy | None:
    """Load the policy that ``--gradcheck-policy`` or the ``gradcheck_policy`` ini key names."""
    given = config.getoption("gradcheck_policy", None)
    if given:
        path = config.invocation_params.dir / given
        origin = f"--gradcheck-policy={given}"
    else:
        given = config.getini("gradcheck_policy")
        if not given:
            return None
        base = config.inipath.parent if config.inipath is not None else config.rootpath
        path = base / given
        origin = plugin._ini_origin(config, "gradcheck_policy")
    try:
        return load_policy(path, conventions(config.hook))
    except GradcheckError as exc:
        raise pytest.UsageError(f"{exc}\n(the policy file named by {origin})") from None


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> SuiteFile | None:
    if file_path.suffix not in (".yaml", ".yml"):
        return None
    patterns: list[str] = parent.config.getini("gradcheck_suite_pattern")
    if not any(fnmatch.fnmatch(file_path.name, pattern) for pattern in patterns):
        return None
    suite: SuiteFile = SuiteFile.from_parent(parent, path=file_path)
    return suite


# -- plain data of a suite ---------------------------------------------------------------------


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


@dataclass(frozen=True)
class Entry:
    """One model of a suite, validated."""

    name: str
    line: int
    model: str
    factory: Callable[..., Any]
    args: Mapping[str, Any]
    batch: Batch
    loss: str | None = None
    loss_fn: Callable[..., Any] | None = None
    marks: tuple[pytest.MarkDecorator, ...] = ()
    settings: tuple[tuple[str, Any, int], ...] = ()
    """(setting, value, line), in the file's order; entry values after the defaults."""
    description: str = ""


@dataclass(frozen=True)
class Suite:
    path: Path
    entries: tuple[Entry, ...]
    policy: Policy | None = None


class SuiteError(ConfigError):
    """Every mistake found in one suite file, each with its file, entry and line."""

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        self.errors = tuple(errors)
        first = errors[0]
        GradcheckError.__init__(self, "\n".join(str(e) for e in errors))
        self.path, self.line, self.entry, self.detail = (
            first.path,
            first.line,
            first.entry,
            first.detail,
        )


# -- loading a suite ---------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """YAML data as plain dicts and lists (the loader's line-aware ones are subclasses)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def load_suite(path: Path, rootdir: Path | None = None, registry: Any = None) -> Suite:
    """Read and check a suite file; raise :class:`SuiteError` listing every mistake."""
    data = load_yaml(path, "suite file")
    file = str(path)
    if not isinstance(data, Map):
        raise SuiteError(
            [
                ConfigError(
                    file,
                    1,
                    "a suite file must be a mapping with `models:` (name: entry), got "
                    + type_name(data),
                )
            ]
        )
    errors: list[ConfigError] = []
    try:
        check_keys(data, SUITE_KEYS, file, "the suite")
    except ConfigError as exc:
        errors.append(exc)
    policy = None
    if data.get("policy") is not None:
        where = data.line_of("policy")
        given = data["policy"]
        if not isinstance(given, str):
            errors.append(
                ConfigError(
                    file, where, f"policy must be a path to a policy file, got {type_name(given)}"
                )
            )
        else:
            target = path.parent / given
            if not target.is_file():
                errors.append(
                    ConfigError(
                        file,
                        where,
                        f"policy: {given!r} not found (looked for {target}); the path is "
                        "relative to the suite file",
                    )
                )
            else:
                try:
                    policy = load_policy(target, registry)
                except ConfigError as exc:
                    errors.append(exc)
    defaults = data.get("defaults", Map())
    if not isinstance(defaults, Map):
        errors.append(
            ConfigError(
                file,
                data.line_of("defaults"),
                f"defaults must be a mapping of entry keys, got {type_name(defaults)}",
            )
        )
        defaults = Map()
    else:
        try:
            check_keys(defaults, DEFAULTS_KEYS, file, "defaults")
        except ConfigError as exc:
            errors.append(exc)
    models = data.get("models")
    entries: list[Entry] = []
    if not isinstance(models, Map) or not models:
        errors.append(
            ConfigError(
                file,
                data.line_of("models"),
                "a suite needs `models:`, a mapping of test name to entry "
                "(model: module:factory, batch: ...); got " + type_name(models),
            )
        )
    else:
        _importable(path.parent)
        for name, raw in models.items():
            try:
                entries.append(
                    _entry(str(name), raw, models.line_of(name), defaults, path, rootdir)
                )
            except ConfigError as exc:
                errors.append(exc)
    if errors:
        raise SuiteError(errors)
    return Suite(path=path, entries=tuple(entries), policy=policy)


def _importable(directory: Path) -> None:
    """Import paths resolve like test modules' imports: the suite's directory is on sys.path."""
    text = str(directory)
    if text not in sys.path:
        sys.path.insert(0, text)


def _entry(
    name: str, raw: object, line: int, defaults: Map, path: Path, rootdir: Path | None
) -> Entry:
    file = str(path)

    def error(where: int, message: str) -> ConfigError:
        return ConfigError(file, where, message, name)

    if not _ENTRY_NAME.match(name):
        raise error(
            line,
            "an entry name becomes the test id: use letters, digits, '_', '.' and '-' (no spaces)",
        )
    if not isinstance(raw, Map):
        raise error(
            line, f"an entry must be a mapping (model: ..., batch: ...), got {type_name(raw)}"
        )
    check_keys(raw, ENTRY_KEYS, file, "the entry", name)

    def get(key: str) -> tuple[Any, int]:
        if key in raw:
            return raw[key], raw.line_of(key)
        if key in defaults:
            return defaults[key], defaults.line_of(key)
        return None, raw.line

    model, model_line = get("model")
    if model is None:
        raise error(raw.line, "missing `model:` (an import path module:factory)")
    factory = _resolve(model, "model", model_line, file, name)
    args: dict[str, Any] = {}
    for source in (defaults, raw):
        if "args" in source:
            given = source["args"]
            if not isinstance(given, Map):
                raise error(
                    source.line_of("args"),
                    f"args must be a mapping of keyword arguments, got {type_name(given)}",
                )
            args.update(plain(given))
    args_line = raw.line_of("args") if "args" in raw else defaults.line_of("args")
    _check_signature(factory, model, args, args_line, file, name)

    batch_raw, batch_line = get("batch")
    if batch_raw is None:
        raise error(
            raw.line,
            "missing `batch:` (a tensor spec such as {shape: [8, 16]}, a list of them, a "
            "mapping of keyword inputs, or {file: fixtures/x.pt})",
        )
    batch = _batch(batch_raw, batch_line, path, rootdir, name)

    loss, loss_line = get("loss")
    loss_fn = None
    if loss is not None:
        loss_fn = _resolve(loss, "loss", loss_line, file, name)

    marks: list[pytest.MarkDecorator] = []
    for source in (defaults, raw):
        if "marks" in source:
            marks += _marks(source["marks"], source.line_of("marks"), file, name)

    settings: list[tuple[str, Any, int]] = []
    for source in (defaults, raw):
        for key in ENTRY_SETTINGS:
            if key in source:
                value, where = plain(source[key]), source.line_of(key)
                try:
                    resolve([("here", {key: value})])
                except GradcheckError as exc:
                    raise error(where, f"{key}: {str(exc).split(' from here: ', 1)[-1]}") from None
                settings.append((key, value, where))
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise error(
            raw.line_of("description"), f"description must be text, got {type_name(description)}"
        )
    return Entry(
        name=name,
        line=line,
        model=model,
        factory=factory,
        args=args,
        batch=batch,
        loss=loss,
        loss_fn=loss_fn,
        marks=tuple(marks),
        settings=tuple(settings),
        description=description,
    )


def _resolve(text: object, key: str, line: int, file: str, entry: str) -> Callable[..., Any]:
    """Import ``module:attribute`` (the only code a suite runs); errors name both parts."""
    if not isinstance(text, str) or not _IMPORT_PATH.match(text):
        raise ConfigError(
            file,
            line,
            f"{key} must be an import path 'package.module:callable' (e.g. "
            f"mypkg.models:build_model), got {type_name(text)}",
            entry,
        )
    module_name, _, attribute = text.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            missing = exc.name
            parent = missing.rpartition(".")[0]
            options = _submodules(parent) if parent else [m.name for m in pkgutil.iter_modules()]
            hint = did_you_mean(missing.rpartition(".")[2], options)
            raise ConfigError(
                file,
                line,
                f"{key}: {text}: cannot import module {module_name!r}: no module named "
                f"{missing!r}{hint} (the suite's directory and sys.path are searched; "
                "check the spelling or install the package)",
                entry,
            ) from None
        raise ConfigError(
            file, line, f"{key}: {text}: importing {module_name!r} failed: {_why(exc)}", entry
        ) from None
    except Exception as exc:
        raise ConfigError(
            file, line, f"{key}: {text}: importing {module_name!r} failed: {_why(exc)}", entry
        ) from None
    target: Any = module
    walked = module_name
    for part in attribute.split("."):
        if not hasattr(target, part):
            names = [n for n in dir(target) if not n.startswith("_")]
            raise ConfigError(
                file,
                line,
                f"{key}: {text}: {walked!r} has no attribute {part!r}"
                + (did_you_mean(part, names) or f"; it has: {', '.join(names[:12])}"),
                entry,
            )
        target = getattr(target, part)
        walked = f"{walked}.{part}" if walked != module_name else f"{module_name}:{part}"
    if not callable(target):
        raise ConfigError(
            file,
            line,
            f"{key}: {text} is a {type(target).__name__}, not a callable (a function or a class)",
            entry,
        )
    return target  # type: ignore[no-any-return]


def _submodules(package: str) -> list[str]:
    try:
        found = importlib.import_module(package)
    except Exception:
        return []
    return [m.name for m in pkgutil.iter_modules(getattr(found, "__path__", []))]


def _why(exc: BaseException) -> str:
    """``Type at file.py:line: message`` of the user's frame where ``exc`` was raised."""
    frames = inspect.getinnerframes(exc.__traceback__) if exc.__traceback__ else []
    where = ""
    for frame in reversed(frames):
        filename = frame.filename
        if "importlib" not in filename and not filename.startswith("<frozen"):
            where = f" at {os.path.basename(filename)}:{frame.lineno}"
            break
    return f"{type(exc).__name__}{where}: {exc}"


def _check_signature(
    factory: Callable[..., Any],
    model: str,
    args: Mapping[str, Any],
    line: int,
    file: str,
    entry: str,
) -> None:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return  # a builtin without a signature: the call will say
    params = signature.parameters
    kinds = {p.kind for p in params.values()}
    if inspect.Parameter.VAR_KEYWORD not in kinds:
        accepted = [
            n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        for key in args:
            if key not in accepted:
                hint = did_you_mean(key, accepted) or (
                    f"; it takes: {', '.join(accepted) or 'no keyword arguments'}"
                )
                raise ConfigError(
                    file, line, f"args: {model} has no parameter {key!r}{hint}", entry
                )
    missing = [
        n
        for n, p in params.items()
        if p.default is p.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY, p.POSITIONAL_ONLY)
        and n not in args
    ]
    if missing:
        raise ConfigError(
            file,
            line,
            f"args: {model} needs {', '.join(repr(m) for m in missing)}; add "
            + ("them" if len(missing) > 1 else "it")
            + " under `args:`",
            entry,
        )


def _marks(raw: object, line: int, file: str, entry: str) -> list[pytest.MarkDecorator]:
    """``[slow, {xfail: {reason: ..., strict: true}}, {skip: reason}]``: plain values only."""
    if not isinstance(raw, list):
        raise ConfigError(
            file, line, f"marks must be a list (e.g. [slow]), got {type_name(raw)}", entry
        )
    marks: list[pytest.MarkDecorator] = []
    for index, item in enumerate(raw):
        where = raw.line_of(index) if isinstance(raw, Seq) else line
        if isinstance(item, str):
            name, kwargs = item, {}
        elif isinstance(item, dict) and len(item) == 1:
            name, value = next(iter(item.items()))
            if isinstance(value, str):
                kwargs = {"reason": value}
            elif isinstance(value, dict):
                kwargs = plain(value)
            elif value is None:
                kwargs = {}
            else:
                raise ConfigError(
                    file,
                    where,
                    f"marks: {name}: give a reason (text) or keyword arguments (a mapping), "
                    f"got {type_name(value)}",
                    entry,
                )
        else:
            raise ConfigError(
                file,
                where,
                f"marks: each mark is a name or a one-key mapping, got {type_name(item)}",
                entry,
            )
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(file, where, f"marks: {name!r} is not a marker name", entry)
        if name in ("skipif", "parametrize", "usefixtures") or "condition" in kwargs:
            raise ConfigError(
                file,
                where,
                f"marks: {name}{' with a condition' if 'condition' in kwargs else ''} is not "
                "supported in a suite (a condition is Python code, and a suite runs none); "
                "use skip or xfail with a reason, or a -m/-k selection",
                entry,
            )
        try:
            mark = getattr(pytest.mark, name)(**kwargs)
        except Exception as exc:  # an unregistered marker under --strict-markers
            raise ConfigError(
                file, where, f"marks: {name}: {exc} (register it under `markers` in the ini)", entry
            ) from None
        marks.append(mark)
    return marks


# -- batches -----------------------------------------------------------------------------------


def _batch(raw: object, line: int, path: Path, rootdir: Path | None, entry: str) -> Batch:
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
        inputs[str(key)] = _value(item, raw.line_of(key), path, rootdir, entry, f"batch.{key}")
    for key, item in inputs.items():
        if isinstance(item, TensorSpec) and item.same_as is not None:
            target = inputs.get(item.same_as)
            if item.same_as == key or not isinstance(target, TensorSpec):
                options = [k for k, v in inputs.items() if isinstance(v, TensorSpec) and k != key]
                raise ConfigError(
                    file,
                    item.line,
                    f"batch.{key}: same_as: {item.same_as!r} is not another tensor input of "
                    "this batch" + (did_you_mean(item.same_as, options) or ""),
                    entry,
                )
            if target.same_as is not None:
                raise ConfigError(
                    file,
                    item.line,
                    f"batch.{key}: same_as: {item.same_as!r} is itself a same_as; point at the "
                    "original input",
                    entry,
                )
    return inputs


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
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(
            file, line, f"{where}.{key} must be a finite number, got {type_name(value)}", entry
        )
    return float(value)


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
    dtype = raw.get("dtype", "int64" if "vocab" in raw else "float32")
    if dtype not in DTYPES:
        raise error(
            "dtype",
            f"unknown dtype {dtype!r}"
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
    candidates = [path.parent / given]
    if rootdir is not None and rootdir.resolve() != path.parent.resolve():
        candidates.append(rootdir / given)
    target = next((c for c in candidates if c.is_file()), None)
    if target is None:
        tried = " or ".join(str(c) for c in candidates)
        raise ConfigError(
            file,
            line,
            f"{where}.file: {given!r} not found (looked for {tried}); the path is relative to "
            "the suite file or the rootdir",
            entry,
        )
    if target.suffix not in _FILE_SUFFIXES:
        raise ConfigError(
            file,
            line,
            f"{where}.file: {given!r} is not a tensor file: use .pt/.pth (torch.save) or "
            ".npy/.npz (numpy.save/savez)",
            entry,
        )
    try:
        loaded = _read_tensor_file(target)
    except ConfigError as exc:
        raise ConfigError(file, line, f"{where}.file: {given!r} {exc.detail}", entry) from None
    key = raw.get("key")
    if key is not None:
        if not isinstance(loaded, dict):
            raise ConfigError(
                file,
                raw.line_of("key"),
                f"{where}.key: {given!r} holds {type(loaded).__name__}, not a mapping of named "
                "tensors; drop key",
                entry,
            )
        if key not in loaded:
            raise ConfigError(
                file,
                raw.line_of("key"),
                f"{where}.key: {given!r} has no entry {key!r}"
                + (did_you_mean(str(key), loaded) or f"; it has: {', '.join(map(str, loaded))}"),
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
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(
                target,
                0,
                "is not a tensor file that torch.load(weights_only=True) can read "
                f"({type(exc).__name__}: {first}); save tensors with torch.save",
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
            f"({type(exc).__name__}: {exc}); save arrays with numpy.save or numpy.savez",
        ) from None


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


def _is_alias(item: Any) -> bool:
    return isinstance(item, TensorSpec) and item.same_as is not None


# -- pytest nodes ------------------------------------------------------------------------------


class SuiteFile(pytest.File):
    """A ``gradcheck*.yaml`` file: one :class:`SuiteItem` per entry of ``models:``."""

    def collect(self) -> Iterator[SuiteItem]:
        registry = conventions(self.ihook)
        suite = load_suite(self.path, self.config.rootpath, registry)
        for entry in suite.entries:
            item: SuiteItem = SuiteItem.from_parent(self, name=entry.name, entry=entry, suite=suite)
            yield item

    def repr_failure(
        self, excinfo: ExceptionInfo[BaseException], style: TracebackStyle | None = None
    ) -> str | TerminalRepr:
        if isinstance(excinfo.value, ConfigError):
            return _relative(str(excinfo.value), self.config.rootpath)
        return super().repr_failure(excinfo)


def _relative(text: str, root: Path) -> str:
    return text.replace(str(root) + os.sep, "")


class SuiteItem(pytest.Item):
    """One model of a suite: build it, make its batch, check it like the gradcheck fixture."""

    def __init__(self, *, entry: Entry, suite: Suite, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.entry = entry
        self.suite = suite
        for mark in entry.marks:
            self.add_marker(mark)

    def settings(self) -> Settings:
        """Run settings, then the suite's policy, then ``defaults:``, then the entry."""
        settings = plugin._run_state(self.config).settings
        policy = self.suite.policy
        if policy is not None:
            explicit = {n for n, o in settings.origins.items() if not o.startswith("the policy")}
            for origin, values in policy.sources():
                chosen = {k: v for k, v in values.items() if k not in explicit}
                settings = override(settings, origin, chosen)
            merged = policy if settings.policy is None else merge(settings.policy, policy)
            settings = dataclasses.replace(settings, policy=merged)
        name = os.path.basename(self.path)
        for key, value, line in self.entry.settings:
            settings = override(settings, f"{name}:{line} (entry {self.name!r})", {key: value})
        if self.entry.loss_fn is not None:
            settings = override(
                settings, f"loss: {self.entry.loss}", {"loss_fn": self.entry.loss_fn}
            )
        return settings

    def runtest(self) -> None:
        __tracebackhide__ = True
        import torch

        settings = self.settings()
        run = plugin._run_state(self.config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            try:
                model = self.entry.factory(**self.entry.args)
            except Exception as exc:
                raise GradcheckError(f"{self.entry.model}(**args) raised {_why(exc)}") from None
        if not isinstance(model, torch.nn.Module):
            raise GradcheckError(
                f"{self.entry.model}(**args) returned {type(model).__name__}, not a "
                "torch.nn.Module; point model: at a function or class that builds the module"
            )
        batch = build_batch(self.entry.batch, settings.seed)
        report = plugin._run_check(self, run, model, batch, settings)
        report = plugin._record(self, 1, report)
        if not report.ok:
            raise GradientHealthError(report)

    def repr_failure(
        self, excinfo: ExceptionInfo[BaseException], style: TracebackStyle | None = None
    ) -> str | TerminalRepr:
        if isinstance(excinfo.value, (GradientHealthError, GradcheckError)):
            where = f"{os.path.basename(self.path)}:{self.entry.line}"
            what = (
                ""
                if isinstance(excinfo.value, GradientHealthError)
                else "the gradient check could not run: "
            )
            return (
                f"{what}{excinfo.value}\n(entry {self.name!r} at {where}: model {self.entry.model})"
            )
        return super().repr_failure(excinfo, style)

    def reportinfo(self) -> tuple[Path, int, str]:
        return self.path, self.entry.line - 1, self.name
