"""Declarative model suites: ``gradcheck*.yaml`` files collected as tests.

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
The batches are described, checked and built by :mod:`.batches`.

The plugin imports this module when it collects the first suite file. It imports
:mod:`.session` (each item checks like the ``gradcheck`` fixture), :mod:`.batches`, the
YAML helpers of :mod:`.policy`, :mod:`.settings` and :mod:`.results`; torch only when a
suite is collected or run. Never the plugin module.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import pkgutil
import re
import sys
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from . import session
from .batches import Batch, build_batch, build_target, parse_batch, parse_target
from .escape import excerpt
from .hooks import conventions
from .policy import (
    ConfigError,
    Map,
    Seq,
    check_keys,
    did_you_mean,
    home,
    is_file,
    load_policy,
    load_yaml,
    merge,
    outside_message,
    path_problem,
    type_name,
    within,
)
from .results import GradcheckError, GradientHealthError
from .settings import SETTING_NAMES, Policy, Settings, override, resolve

if TYPE_CHECKING:
    from _pytest._code.code import ExceptionInfo, TerminalRepr, TracebackStyle

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
    "target",
    "loss",
    "marks",
    *ENTRY_SETTINGS,
)
DEFAULTS_KEYS: tuple[str, ...] = tuple(k for k in ENTRY_KEYS if k not in ("model", "description"))
# Used with fullmatch: `$` would also match before a trailing newline.
_ENTRY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
_MODULE_PREFIX = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
_MAX_NAME = 200
"""The longest entry name (it becomes the test id)."""
_MAX_IMPORT_PATH = 200


# -- plain data of a suite ---------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One model of a suite, validated."""

    name: str
    line: int
    model: str
    factory: Callable[..., Any]
    args: Mapping[str, Any]
    batch: Batch
    target: Batch | None = None
    """The second argument of ``loss_fn(output, target)``, when ``target:`` gives one."""
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


def load_suite(
    path: Path,
    rootdir: Path | None = None,
    registry: Any = None,
    imports: Sequence[str] = (),
) -> Suite:
    """Read and check a suite file; raise :class:`SuiteError` listing every mistake.

    ``imports``: the modules (and their submodules) that ``model:`` and ``loss:`` may import
    from, the ini key ``gradcheck_suite_imports``; empty: any but the standard library.
    """
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
        elif path_problem(given):
            errors.append(ConfigError(file, where, f"policy: {path_problem(given)}"))
        else:
            target = path.parent / given  # an absolute path replaces the directory
            root = None if rootdir is None else home(path, rootdir)
            if root is not None and not os.path.isabs(given) and not within(target, root):
                errors.append(ConfigError(file, where, outside_message("policy", given, root)))
            elif not is_file(target):
                errors.append(
                    ConfigError(
                        file,
                        where,
                        f"policy: {excerpt(given)} not found (looked for "
                        f"{excerpt(str(target), 160)}); the path is relative to the suite file",
                    )
                )
            else:
                try:
                    below = None if root is None else home(target, root)
                    policy = load_policy(target, registry, root=below)
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
                    _entry(str(name), raw, models.line_of(name), defaults, path, rootdir, imports)
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
    name: str,
    raw: object,
    line: int,
    defaults: Map,
    path: Path,
    rootdir: Path | None,
    imports: Sequence[str],
) -> Entry:
    file = str(path)

    def error(where: int, message: str) -> ConfigError:
        return ConfigError(file, where, message, name)

    if len(name) > _MAX_NAME or not _ENTRY_NAME.fullmatch(name):
        raise error(
            line,
            "an entry name becomes the test id: use letters, digits, '_', '.' and '-' (no "
            f"spaces, no line break), at most {_MAX_NAME} characters",
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
    factory = _resolve(model, "model", model_line, file, name, imports)
    args: dict[str, Any] = {}
    for source in (defaults, raw):
        if "args" in source:
            given = source["args"]
            if not isinstance(given, Map):
                raise error(
                    source.line_of("args"),
                    f"args must be a mapping of keyword arguments, got {type_name(given)}",
                )
            for key in given:
                if not isinstance(key, str):
                    raise error(
                        given.line_of(key),
                        f"args: a keyword argument's name must be text, got {type_name(key)}",
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
    batch = parse_batch(batch_raw, batch_line, path, rootdir, name)

    target_raw, target_line = get("target")
    target = None
    if target_raw is not None:
        target = parse_target(target_raw, target_line, path, rootdir, name, batch)

    loss, loss_line = get("loss")
    loss_fn = None
    if loss is not None:
        loss_fn = _resolve(loss, "loss", loss_line, file, name, imports)
    elif target is not None:
        raise error(
            target_line,
            "target: needs a loss: that takes (output, target), e.g. "
            "loss: torch.nn.functional:cross_entropy",
        )

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
        target=target,
        loss=loss,
        loss_fn=loss_fn,
        marks=tuple(marks),
        settings=tuple(settings),
        description=description,
    )


def _resolve(
    text: object, key: str, line: int, file: str, entry: str, imports: Sequence[str] = ()
) -> Callable[..., Any]:
    """Import ``module:attribute`` (the only code a suite runs); errors name both parts.

    Every module the path names or walks through, and the module that defines the callable,
    must pass :func:`_refusal` (checked before the import, and before anything is called);
    a ``model:`` must pass :func:`_factory_refusal` too.
    """
    if (
        not isinstance(text, str)
        or len(text) > _MAX_IMPORT_PATH
        or not _IMPORT_PATH.fullmatch(text)
    ):
        raise ConfigError(
            file,
            line,
            f"{key} must be an import path 'package.module:callable' (e.g. "
            f"mypkg.models:build_model) of at most {_MAX_IMPORT_PATH} characters, got "
            f"{type_name(text)}",
            entry,
        )

    def refuse(module: object) -> None:
        why = _refusal(module, imports)
        if why:
            raise ConfigError(file, line, f"{key}: {text}: {why}", entry)

    module_name, _, attribute = text.partition(":")
    refuse(module_name)
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
        if inspect.ismodule(target):
            refuse(target.__name__)  # mypkg.models:os.system walks into os
    if not callable(target):
        raise ConfigError(
            file,
            line,
            f"{key}: {text} is a {type(target).__name__}, not a callable (a function or a class)",
            entry,
        )
    if inspect.isroutine(target) or inspect.isclass(target):
        refuse(getattr(target, "__module__", None))  # where it is defined: a re-export
    if key == "model":
        why = _factory_refusal(target, imports)
        if why:
            raise ConfigError(file, line, f"{key}: {text}: {why}", entry)
    return target  # type: ignore[no-any-return]


def _refusal(module: object, imports: Sequence[str]) -> str:
    """Why a suite may not import from ``module`` (a dotted name), or ``""``.

    With ``imports`` (the ini key ``gradcheck_suite_imports``), only those modules and
    their submodules; without it, any module but Python's standard library, which holds no
    model factory and a good deal that runs commands or writes files.
    """
    if not isinstance(module, str):
        return ""  # a builtin of no module: _factory_refusal decides for a model
    if imports:
        if any(module == prefix or module.startswith(prefix + ".") for prefix in imports):
            return ""
        return (
            f"module {excerpt(module)} is not under gradcheck_suite_imports "
            f"({' '.join(imports)}), the modules a suite may import from; add it to that ini "
            "key if suites may run its code"
        )
    if module.partition(".")[0] in sys.stdlib_module_names:
        return (
            f"module {excerpt(module)} is part of Python's standard library, which builds no "
            "model; a suite calls what it names with the args it gives, so it may name only "
            "your own factories (list the module in the ini key gradcheck_suite_imports to "
            "allow it)"
        )
    return ""


def _factory_refusal(target: Any, imports: Sequence[str]) -> str:
    """Why ``target`` cannot be a ``model:``, found without calling it; ``""`` when only
    the call can tell (its result is checked then).

    A class must be a ``torch.nn.Module`` subclass; a function annotated to return
    something else is refused; a builtin (C) function cannot be inspected, and builds no
    Module, so it is refused unless ``gradcheck_suite_imports`` allows its module.
    """
    import torch

    if inspect.isclass(target):
        if issubclass(target, torch.nn.Module):
            return ""
        return (
            f"the class {target.__module__}.{target.__qualname__} is not a torch.nn.Module; "
            "point model: at a Module class or a function that builds one"
        )
    builtin = inspect.isbuiltin(target) or inspect.ismethoddescriptor(target)
    if builtin and not imports:
        return (
            "a builtin (C) function does not build a torch.nn.Module and cannot be checked "
            "before it runs; point model: at a Module class or a Python function that builds "
            "one"
        )
    if inspect.isfunction(target) or inspect.ismethod(target):
        try:
            returns = typing.get_type_hints(target).get("return")
        except Exception:  # an annotation that does not resolve here: the call will tell
            return ""
        if returns is type(None) or (
            isinstance(returns, type) and not issubclass(returns, torch.nn.Module)
        ):
            shown = "None" if returns is type(None) else returns.__qualname__
            return (
                f"it is annotated to return {shown}, not a torch.nn.Module; point model: at a "
                "Module class or a function that builds one"
            )
    return ""


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
                    file, line, f"args: {model} has no parameter {excerpt(key)}{hint}", entry
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
                    f"marks: {excerpt(name)}: give a reason (text) or keyword arguments (a "
                    "mapping), "
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
        if not isinstance(name, str) or not name.isidentifier() or len(name) > _MAX_NAME:
            raise ConfigError(file, where, f"marks: {excerpt(name)} is not a marker name", entry)
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
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", pytest.PytestUnknownMarkWarning)
                mark = getattr(pytest.mark, name)(**kwargs)
        except (Exception, pytest.fail.Exception) as exc:
            # pytest.fail's exception (an unregistered marker under --strict-markers) is a
            # BaseException, which `except Exception` does not catch
            raise ConfigError(
                file, where, f"marks: {name}: {exc} (register it under `markers` in the ini)", entry
            ) from None
        if any(issubclass(w.category, pytest.PytestUnknownMarkWarning) for w in caught):
            _unknown_mark(name, file, where, entry)
        marks.append(mark)
    return marks


def _unknown_mark(name: str, file: str, line: int, entry: str) -> None:
    """Warn about a mark that is not registered where the suite names it (not inside the
    plugin, where pytest's own warning would point); a warning turned into an error is the
    suite's collection error."""
    message = (
        f"entry {excerpt(entry)}: unknown mark {name!r}; is it a typo? Register it under "
        "`markers` in the ini (https://docs.pytest.org/en/stable/how-to/mark.html)"
    )
    try:
        warnings.warn_explicit(message, pytest.PytestUnknownMarkWarning, file, line)
    except pytest.PytestUnknownMarkWarning:
        raise ConfigError(
            file,
            line,
            f"marks: unknown mark {name!r}: register it under `markers` in the ini, or remove it",
            entry,
        ) from None


# -- pytest nodes ------------------------------------------------------------------------------


class SuiteFile(pytest.File):
    """A ``gradcheck*.yaml`` file: one :class:`SuiteItem` per entry of ``models:``."""

    def collect(self) -> Iterator[SuiteItem]:
        session.use_builtins(self.config)
        registry = conventions(self.ihook)
        imports = suite_imports(self.config)
        suite = load_suite(self.path, self.config.rootpath, registry, imports)
        for entry in suite.entries:
            item: SuiteItem = SuiteItem.from_parent(self, name=entry.name, entry=entry, suite=suite)
            yield item

    def repr_failure(
        self, excinfo: ExceptionInfo[BaseException], style: TracebackStyle | None = None
    ) -> str | TerminalRepr:
        if isinstance(excinfo.value, GradcheckError):  # a ConfigError, or a hook's error
            return _relative(str(excinfo.value), self.config.rootpath)
        return super().repr_failure(excinfo)


def suite_imports(config: pytest.Config) -> tuple[str, ...]:
    """The ini key ``gradcheck_suite_imports``: module prefixes (``mypkg``,
    ``mypkg.models``) that a suite's ``model:`` and ``loss:`` may import from."""
    prefixes: list[str] = []
    for given in config.getini("gradcheck_suite_imports") or ():
        prefix = given.removesuffix(".*").removesuffix(".")
        if len(prefix) > _MAX_IMPORT_PATH or not _MODULE_PREFIX.fullmatch(prefix):
            raise GradcheckError(
                f"{excerpt(given)} from {session.ini_origin(config, 'gradcheck_suite_imports')} "
                "is not a module name; list packages or modules (mypkg mypkg.models), "
                "separated by spaces"
            )
        prefixes.append(prefix)
    return tuple(prefixes)


def _relative(text: str, root: Path) -> str:
    return text.replace(str(root) + os.sep, "")


class SuiteItem(pytest.Item):
    """One model of a suite: build it, make its batch, check it like the gradcheck fixture."""

    def __init__(self, *, entry: Entry, suite: Suite, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.entry = entry
        self.suite = suite
        self.add_marker(pytest.mark.gradient_health)  # -m gradient_health selects every gate
        for mark in entry.marks:
            self.add_marker(mark)

    def settings(self) -> Settings:
        """Run settings, then the suite's policy, then ``defaults:``, then the entry."""
        settings = session.run_state(self.config).settings
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
        run = session.run_state(self.config)
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
        target = None
        if self.entry.target is not None:
            target = build_target(self.entry.target, batch, settings.seed)
        report = session.run_check(self, run, model, batch, settings, target)
        report = session.record(self, 1, report)
        if not report.ok and not session.advisory(self.config):
            raise GradientHealthError(report, None if self.config.get_verbosity() > 0 else 12)

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
