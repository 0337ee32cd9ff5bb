"""Policies: defaults, per-layer rules and architecture conventions shared across teams.

A policy is a YAML file, plain data once loaded::

    extends: ../org-policy.yaml        # optional; relative to this file
    settings:                          # defaults for every check (below ini and flags)
      max_norm: 1.0e4
    rules:                             # per-layer rules: the first match wins
      - match: "*.embeddings.*"        # a glob ...
        ignore_kinds: [dead]
      - match: 're:encoder\\.layer\\.\\d+\\.attention\\..*'   # ... or a regex
        settings: {vanishing_ratio: 1.0e-6}
      - match: "*.pooler.*"
        ignore: true
        reason: the pooler is not trained by the masked-LM loss
    conventions:                       # named rules on the model's structure
      saturating_chain: {max: 3}
      max_parameters: false            # switch off one the base policy turned on

:func:`load_policy` reads a file and the files it extends, checks every value (the error
names the file and line and says how to fix it), and merges: the base first, then each
extending file on top (its rules come first, its settings and convention parameters win).

This module only reads and validates: the loaded policy is plain data
(:class:`~pytest_gradcheck.settings.Policy`), and :mod:`pytest_gradcheck.verdict` applies
it. Imports settings, conventions and results below it, and PyYAML (safe loading only); no
torch, no pytest.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .conventions import BUILTIN_CONVENTIONS, Convention
from .escape import excerpt
from .results import KINDS, GradcheckError, finite_float
from .settings import (
    SETTING_NAMES,
    ConventionSetting,
    LayerRule,
    Policy,
    did_you_mean,
    resolve,
)

__all__ = [
    "POLICY_KEYS",
    "RULE_KEYS",
    "RULE_SETTINGS",
    "ConfigError",
    "Convention",
    "LayerRule",
    "Policy",
    "clip",
    "did_you_mean",
    "home",
    "is_file",
    "load_policy",
    "load_yaml",
    "merge",
    "nested_repeat",
    "outside_message",
    "path_problem",
    "within",
]

#: Keys of a policy file.
POLICY_KEYS: tuple[str, ...] = ("extends", "description", "settings", "rules", "conventions")
#: Keys of one per-layer rule.
RULE_KEYS: tuple[str, ...] = ("match", "ignore", "ignore_kinds", "settings", "reason")
#: Settings a per-layer rule may override (the rest apply to the whole pass).
RULE_SETTINGS: tuple[str, ...] = (
    "min_norm",
    "max_norm",
    "relative",
    "vanishing_ratio",
    "exploding_ratio",
    "floor_rms",
    "ceiling_norm",
    "dead",
    "unused",
)
#: Settings a policy may set as defaults (a loss is Python, not YAML).
POLICY_SETTINGS: tuple[str, ...] = tuple(name for name in SETTING_NAMES if name != "loss_fn")
#: The most text :func:`load_yaml` reads from one file.
MAX_YAML_BYTES = 16 * 2**20
#: The deepest nesting of mappings and lists :func:`load_yaml` accepts.
MAX_YAML_DEPTH = 100
#: The most values (mappings, lists and scalars, each alias use counted) in one file.
MAX_YAML_NODES = 100_000


# -- errors and YAML with line numbers -------------------------------------------------------


class ConfigError(GradcheckError):
    """A bad suite or policy file: names the file, the line and (in a suite) the entry."""

    def __init__(
        self, path: str | os.PathLike[str], line: int, message: str, entry: str = ""
    ) -> None:
        self.path = str(path)
        self.line = line
        self.entry = entry
        self.detail = message
        where = f"{self.path}:{line}" if line else self.path
        prefix = f"{where}: entry {excerpt(entry)}: " if entry else f"{where}: "
        super().__init__(prefix + message)


class Map(dict[Any, Any]):
    """A YAML mapping that knows its line and each key's line (1-based)."""

    def __init__(self) -> None:
        super().__init__()
        self.line = 0
        self.lines: dict[Any, int] = {}

    def line_of(self, key: Any) -> int:
        return self.lines.get(key, self.line)


class Seq(list[Any]):
    """A YAML sequence that knows its line and each item's line (1-based)."""

    def __init__(self) -> None:
        super().__init__()
        self.line = 0
        self.lines: list[int] = []

    def line_of(self, index: int) -> int:
        return self.lines[index] if 0 <= index < len(self.lines) else self.line


class _LineLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (plain data only) that records lines and rejects duplicate keys.

    It also reads ``1e-4`` as a float, as YAML 1.2 and editors do (PyYAML's YAML 1.1
    would read a string), so the file means the same to the JSON Schema and to us. It
    refuses mappings and lists nested deeper than :data:`MAX_YAML_DEPTH` before it recurses
    into them (PyYAML's composer recurses once per level). A value that PyYAML's own
    constructors cannot build (``2001-13-45`` read as a date, ``!!timestamp x``, ``!!binary``
    of bad base64) is a :class:`ConfigError` with its line, whatever PyYAML raised.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise ConfigError(
                    self.name,
                    mark.line + 1,
                    f"mappings and lists are nested more than {MAX_YAML_DEPTH} levels deep "
                    "here; a suite or policy needs a few levels: flatten the data",
                )
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ConfigError, yaml.YAMLError):
            raise  # said already, with its line (a tag the safe loader refuses, a bound)
        except Exception as exc:  # PyYAML's constructors raise anything
            raise ConfigError(
                self.name,
                node.start_mark.line + 1,
                f"a value cannot be read ({type(exc).__name__}: {clip(str(exc))}); quote it "
                "to keep it as text",
            ) from None


def _construct_map(loader: _LineLoader, node: yaml.MappingNode) -> Iterable[Map]:
    loader.flatten_mapping(node)
    data = Map()
    data.line = node.start_mark.line + 1
    yield data
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, (str, int, float, bool)) and key is not None:
            raise ConfigError(loader.name, line, "a mapping key must be a plain string; quote it")
        if key in data:
            raise ConfigError(
                loader.name,
                line,
                f"key {excerpt(key)} appears twice (lines {data.lines[key]} and {line}); keep "
                "one of them",
            )
        data[key] = loader.construct_object(value_node, deep=True)
        data.lines[key] = line


def _construct_seq(loader: _LineLoader, node: yaml.SequenceNode) -> Iterable[Seq]:
    data = Seq()
    data.line = node.start_mark.line + 1
    data.lines = [item.start_mark.line + 1 for item in node.value]
    yield data
    data.extend(loader.construct_object(item, deep=True) for item in node.value)


_LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_LineLoader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)
_LineLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+\Z"),
    list("-+0123456789"),
)


def load_yaml(path: str | os.PathLike[str], what: str = "file") -> Any:
    """Read ``path`` with a safe loader that records line numbers; errors are ConfigError.

    The one reader of suite and policy files, so its bounds hold for both: at most
    :data:`MAX_YAML_BYTES` of text, printable characters only, mappings and lists nested at
    most :data:`MAX_YAML_DEPTH` deep, and at most :data:`MAX_YAML_NODES` values once YAML
    aliases are expanded (an alias repeats a node: a file of 1 KB can stand for 10**9
    values, and a caller that copies the data would expand them). No error quotes more
    than a short excerpt of the file.
    """
    text = _read_text(path, what)
    try:
        loader = _LineLoader(text)
    except yaml.reader.ReaderError as exc:  # the reader checks the whole text up front
        raise ConfigError(path, _line_at(text, exc.position), _unprintable(exc)) from None
    loader.name = str(path)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_size(node, str(path))
        return loader.construct_document(node)
    except ConfigError:
        raise  # a duplicate key, too deep, too many values: said already
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise ConfigError(
            path,
            mark.line + 1 if mark is not None else 0,
            f"YAML tag not allowed ({clip(exc.problem or '')}): the file holds plain data "
            "only (mappings, lists, strings, numbers, booleans); remove the tag",
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        problem = " ".join(p for p in (exc.context, exc.problem) if p)
        raise ConfigError(
            path,
            line,
            f"YAML syntax error: {clip(problem)}; check the indentation and quoting",
        ) from None
    except yaml.YAMLError as exc:  # e.g. a tag that the safe loader refuses
        raise ConfigError(path, 0, f"YAML error: {clip(str(exc))}") from None
    finally:
        loader.dispose()


def _read_text(path: str | os.PathLike[str], what: str) -> str:
    try:
        with open(path, "rb") as stream:
            data = stream.read(MAX_YAML_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(path, 0, f"{what} not found; check the path") from None
    except OSError as exc:
        raise ConfigError(path, 0, f"cannot read the {what}: {exc}") from None
    if len(data) > MAX_YAML_BYTES:
        raise ConfigError(
            path,
            0,
            f"the {what} is larger than {MAX_YAML_BYTES // 2**20} MiB; a suite or policy is "
            "a short text file: keep tensors in batch files (file: x.pt)",
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, 0, f"cannot read the {what}: {exc}") from None


def _line_at(text: str, position: int) -> int:
    return text.count("\n", 0, max(position, 0)) + 1


def _unprintable(exc: yaml.reader.ReaderError) -> str:
    character = exc.character
    code = character if isinstance(character, int) else ord(str(character)[:1] or "\0")
    return (
        f"the file holds the control character U+{code:04X}, which YAML does not allow; "
        "remove it, or write it as an escape (such as \\x1b) inside a double-quoted string"
    )


def clip(text: str, limit: int = 120) -> str:
    """A reader's own wording of a problem, which may quote the file (a YAML tag or anchor,
    a tensor file's header): as it is when short and printable, else a short excerpt."""
    return text if len(text) <= limit and text.isprintable() else excerpt(text, limit)


def _check_size(root: yaml.Node, path: str) -> None:
    """Count the nodes of ``root`` as a copy would see them (each alias expanded), once
    per distinct node; refuse more than :data:`MAX_YAML_NODES` or a node that holds itself."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def count(node: yaml.Node) -> int:
        key = id(node)
        known = sizes.get(key)
        if known is not None:
            return known
        if key in active:
            raise ConfigError(
                path,
                node.start_mark.line + 1,
                "an alias (*name) refers to a mapping or list that holds it: the data would "
                "never end; a suite or policy holds plain, finite data",
            )
        active.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            children: list[yaml.Node] = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        for child in children:
            total += count(child)
            if total > MAX_YAML_NODES:
                raise ConfigError(
                    path,
                    node.start_mark.line + 1,
                    f"this value holds more than {MAX_YAML_NODES:,} values once its YAML "
                    "aliases (*name) are expanded, each use counted; a suite or policy needs "
                    "far fewer: write the values out, or use fewer aliases",
                )
        active.discard(key)
        sizes[key] = total
        return total

    count(root)


def check_keys(mapping: Map, allowed: Sequence[str], path: str, what: str, entry: str = "") -> None:
    """Raise ConfigError for the first key of ``mapping`` not in ``allowed``."""
    for key in mapping:
        if key not in allowed:
            hint = did_you_mean(str(key), allowed) or f"; valid keys: {', '.join(allowed)}"
            raise ConfigError(
                path, mapping.line_of(key), f"unknown key {excerpt(key)} in {what}{hint}", entry
            )


def type_name(value: object) -> str:
    """What ``value`` is, for an error message: its type and a short excerpt of it."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {excerpt(value)}"


# -- loading ---------------------------------------------------------------------------------


def _where(path: str, line: int) -> str:
    return f"{os.path.basename(path)}:{line}"


def _settings_block(
    block: object, allowed: Sequence[str], path: str, line: int, what: str
) -> dict[str, tuple[Any, int]]:
    """Validate a ``settings:`` mapping; return name -> (value, line)."""
    if not isinstance(block, Map):
        raise ConfigError(
            path, line, f"{what} must be a mapping of setting: value, got {type_name(block)}"
        )
    values: dict[str, tuple[Any, int]] = {}
    for name, value in block.items():
        key_line = block.line_of(name)
        if name not in allowed:
            if name in SETTING_NAMES:
                reason = (
                    "loss_fn is Python, not YAML; a suite entry names one with `loss:`"
                    if name == "loss_fn"
                    else f"{name} applies to the whole pass, not to some layers; set it in "
                    "the policy's top-level settings"
                )
                raise ConfigError(path, key_line, f"{name!r} cannot be set in {what}: {reason}")
            hint = did_you_mean(str(name), allowed) or f"; valid settings: {', '.join(allowed)}"
            raise ConfigError(path, key_line, f"unknown setting {excerpt(name)} in {what}{hint}")
        try:
            resolve([("here", {name: value})])
        except GradcheckError as exc:
            detail = str(exc).split(" from here: ", 1)[-1]
            raise ConfigError(path, key_line, f"{name}: {detail}") from None
        values[name] = (value, key_line)
    return values


def _known_kinds(registry: Mapping[str, Convention]) -> list[str]:
    return [*KINDS, *(f"convention:{name}" for name in registry)]


_QUANTIFIER = re.compile(r"[*+?]|\{(\d*)(,?)(\d*)\}")


def nested_repeat(regex: str) -> str:
    """The first group of ``regex`` (valid) that may repeat while it holds a repeat of
    variable length (``(a+)+``, ``(?:\\w*\\.)*``, ``(x|y?){2,}``), as written, or ``""``.

    Such a nested repeat is what makes a backtracking engine take exponential time on a
    string that almost matches. Escapes, character classes and comments are skipped; a
    pattern in verbose mode (``(?x)``) is read as if it were not.
    """
    # For each open group: where it starts, and whether the group around it held a
    # variable repeat before it opened.
    stack: list[tuple[int, bool]] = []
    variable = False  # whether the group being read holds a variable repeat so far
    i = 0
    while i < len(regex):
        start, inner = i, False
        if regex[i] == "\\":
            i += 2
        elif regex[i] == "[":
            i = _class_end(regex, i)
        elif regex.startswith("(?#", i):
            i = regex.index(")", i) + 1
            continue
        elif regex[i] == "(":
            stack.append((i, variable))
            variable = False
            i += 1
            continue
        elif regex[i] == ")":
            (start, outer), inner = stack.pop(), variable
            variable = outer
            i += 1
        else:
            i += 1
        found = _QUANTIFIER.match(regex, i)
        low, comma, high = found.groups() if found else ("", "", "")
        if found is None or (found.group().startswith("{") and not (low or comma)):
            variable = variable or inner  # no quantifier ({} is a literal)
            continue
        if found.group() in ("*", "+", "?"):
            least, most = (1 if found.group() == "+" else 0), None if found.group() != "?" else 1
        else:
            least = int(low or "0")
            most = int(high) if high else (None if comma else least)
        if inner and (most is None or most > 1):
            return regex[start : found.end()]
        variable = variable or inner or most != least
        i = found.end()
        if regex.startswith(("?", "+"), i):
            i += 1  # lazy or possessive
    return ""


def _class_end(regex: str, i: int) -> int:
    """The index after the character class that starts at ``regex[i] == "["``."""
    j = i + 1
    if regex.startswith("^", j):
        j += 1
    if regex.startswith("]", j):
        j += 1  # a "]" first is a literal
    while j < len(regex) and regex[j] != "]":
        j += 2 if regex[j] == "\\" else 1
    return j + 1


def _parse_rule(raw: object, path: str, line: int, registry: Mapping[str, Convention]) -> LayerRule:
    if not isinstance(raw, Map):
        raise ConfigError(
            path, line, f"a rule must be a mapping with `match:`, got {type_name(raw)}"
        )
    check_keys(raw, RULE_KEYS, path, "a rule")
    if "match" not in raw:
        raise ConfigError(path, raw.line, "a rule needs `match:` (a glob, or re:REGEX)")
    pattern = raw["match"]
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(
            path,
            raw.line_of("match"),
            f"match must be a non-empty string, got {type_name(pattern)}",
        )
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as exc:
            raise ConfigError(
                path,
                raw.line_of("match"),
                f"invalid regular expression {excerpt(pattern[3:])}: {exc}",
            ) from None
        nested = nested_repeat(pattern[3:])
        if nested:
            raise ConfigError(
                path,
                raw.line_of("match"),
                f"the regular expression {excerpt(pattern[3:])} repeats {excerpt(nested)}, a "
                "group with a repeat of variable length inside: on a layer name that does not "
                "match, the regex engine tries exponentially many ways to split it; write it "
                "without the nested repeat (e.g. [\\w.]* for (\\w+\\.)*), or use a glob",
            )
    ignore = raw.get("ignore", False)
    if not isinstance(ignore, bool):
        raise ConfigError(
            path, raw.line_of("ignore"), f"ignore must be true or false, got {type_name(ignore)}"
        )
    kinds_raw = raw.get("ignore_kinds", [])
    if not isinstance(kinds_raw, list) or not all(isinstance(k, str) for k in kinds_raw):
        raise ConfigError(
            path,
            raw.line_of("ignore_kinds"),
            f"ignore_kinds must be a list of problem kinds, got {type_name(kinds_raw)}",
        )
    known = _known_kinds(registry)
    for kind in kinds_raw:
        if kind in known or kind == "convention":
            continue
        suggestion = did_you_mean(kind, known)
        if suggestion or kind.startswith("convention:") or not kind.isidentifier():
            raise ConfigError(
                path,
                raw.line_of("ignore_kinds"),
                f"unknown problem kind {excerpt(kind)} in ignore_kinds"
                + (suggestion or f"; known kinds: {', '.join(known)}"),
            )
        # any other identifier: a kind that a pytest_gradcheck_check hook may report
    settings = (
        {
            name: value
            for name, (value, _) in _settings_block(
                raw.get("settings", Map()),
                RULE_SETTINGS,
                path,
                raw.line_of("settings"),
                "a rule's settings",
            ).items()
        }
        if "settings" in raw
        else {}
    )
    reason = raw.get("reason", "")
    if not isinstance(reason, str):
        raise ConfigError(
            path, raw.line_of("reason"), f"reason must be text, got {type_name(reason)}"
        )
    origin = _where(path, raw.line)
    if ignore and (kinds_raw or settings):
        raise ConfigError(
            path,
            raw.line,
            f"the rule for {excerpt(pattern)} says `ignore: true` and also "
            + ("ignore_kinds" if kinds_raw else "settings")
            + ": ignoring the layer makes the rest meaningless; keep one of them",
        )
    for kind in ("dead", "unused"):
        if settings.get(kind) is True and kind in kinds_raw:
            raise ConfigError(
                path,
                raw.line,
                f"the rule for {excerpt(pattern)} both requires the {kind!r} check "
                f"(settings: {kind}: true) and ignores it (ignore_kinds: [{kind}]); keep one",
            )
    return LayerRule(
        pattern=pattern,
        origin=origin,
        ignore=ignore,
        ignore_kinds=tuple(kinds_raw),
        settings=settings,
        reason=reason,
    )


def _parse_conventions(
    raw: object, path: str, line: int, registry: Mapping[str, Convention]
) -> dict[str, ConventionSetting]:
    if not isinstance(raw, Map):
        raise ConfigError(
            path,
            line,
            f"conventions must be a mapping of name: true/false/{{params}}, got {type_name(raw)}",
        )
    parsed: dict[str, ConventionSetting] = {}
    for name, value in raw.items():
        key_line = raw.line_of(name)
        if name not in registry:
            hint = did_you_mean(str(name), registry) or (
                f"; known conventions: {', '.join(registry)} (a pytest_gradcheck_conventions "
                "hook in the rootdir's conftest.py adds more)"
            )
            raise ConfigError(path, key_line, f"unknown convention {excerpt(name)}{hint}")
        convention = registry[name]
        if isinstance(value, bool):
            error = (
                convention.validate(convention.defaults) if value and convention.validate else None
            )
            if error:
                raise ConfigError(path, key_line, f"convention {name!r}: {error}")
            parsed[name] = ConventionSetting(name, value, {}, _where(path, key_line))
            continue
        if not isinstance(value, Map):
            raise ConfigError(
                path,
                key_line,
                f"convention {name!r} must be true, false or a mapping of parameters "
                f"({', '.join(convention.defaults) or 'none'}), got {type_name(value)}",
            )
        params: dict[str, Any] = {}
        for param, given in value.items():
            param_line = value.line_of(param)
            if param not in convention.defaults:
                hint = did_you_mean(str(param), convention.defaults) or (
                    f"; its parameters: {', '.join(convention.defaults) or 'none'}"
                )
                raise ConfigError(
                    path,
                    param_line,
                    f"unknown parameter {excerpt(param)} of convention {name!r}{hint}",
                )
            error = _param_error(given, convention.defaults[param])
            if error:
                raise ConfigError(path, param_line, f"{name}.{param}: {error}")
            params[param] = given
        if convention.validate is not None:
            error = convention.validate({**convention.defaults, **params})
            if error:
                raise ConfigError(path, value.line, f"convention {name!r}: {error}")
        parsed[name] = ConventionSetting(name, True, params, _where(path, key_line))
    return parsed


def _param_error(value: object, default: object) -> str | None:
    if isinstance(default, bool):
        return None if isinstance(value, bool) else f"must be true or false, got {type_name(value)}"
    if isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number, got {type_name(value)}"
        number = finite_float(value)
        if number is None or number < 0:
            return f"must be a finite number >= 0, got {type_name(value)}"
        if isinstance(default, int) and not number.is_integer():
            return f"must be a whole number, got {value!r}"
        return None
    if isinstance(default, str) and not isinstance(value, str):
        return f"must be text, got {type_name(value)}"
    if isinstance(default, tuple) and (
        not isinstance(value, list) or not all(isinstance(item, str) for item in value)
    ):
        return f"must be a list of names or globs (e.g. [encoder.*]), got {type_name(value)}"
    return None


def _parse_file(path: Path, registry: Mapping[str, Convention]) -> tuple[Policy, str | None, int]:
    """One file, not merged: the policy, its ``extends`` value and that key's line."""
    data = load_yaml(path, "policy file")
    name = str(path)
    if data is None:
        data = Map()
    if not isinstance(data, Map):
        raise ConfigError(
            name,
            1,
            f"a policy file must be a mapping with keys {', '.join(POLICY_KEYS)}, "
            f"got {type_name(data)}",
        )
    check_keys(data, POLICY_KEYS, name, "the policy")
    extends = data.get("extends")
    if extends is not None and (not isinstance(extends, str) or not extends):
        raise ConfigError(
            name,
            data.line_of("extends"),
            f"extends must be a path to a policy file, got {type_name(extends)}",
        )
    why = None if extends is None else path_problem(extends)
    if why is not None:
        raise ConfigError(name, data.line_of("extends"), f"extends: {why}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise ConfigError(
            name,
            data.line_of("description"),
            f"description must be text, got {type_name(description)}",
        )
    settings = (
        {
            key: (value, _where(name, line))
            for key, (value, line) in _settings_block(
                data.get("settings", Map()),
                POLICY_SETTINGS,
                name,
                data.line_of("settings"),
                "the policy's settings",
            ).items()
        }
        if "settings" in data
        else {}
    )
    rules_raw = data.get("rules", [])
    if not isinstance(rules_raw, Seq) and rules_raw != []:
        raise ConfigError(
            name,
            data.line_of("rules"),
            f"rules must be a list of rules (- match: ...), got {type_name(rules_raw)}",
        )
    rules: list[LayerRule] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(rules_raw):
        line = rules_raw.line_of(index) if isinstance(rules_raw, Seq) else 0
        rule = _parse_rule(raw, name, line, registry)
        if rule.pattern in seen:
            raise ConfigError(
                name,
                line,
                f"the rule for {excerpt(rule.pattern)} can never apply: the rule at line "
                f"{seen[rule.pattern]} has the same pattern and the first match wins; merge "
                "the two rules",
            )
        seen[rule.pattern] = line
        rules.append(rule)
    conventions_raw = data.get("conventions")
    parsed_conventions = (
        _parse_conventions(conventions_raw, name, data.line_of("conventions"), registry)
        if conventions_raw is not None
        else {}
    )
    policy = Policy(
        path=name,
        files=(name,),
        settings=settings,
        rules=tuple(rules),
        conventions=parsed_conventions,
    )
    return policy, extends, data.line_of("extends")


def merge(base: Policy, child: Policy) -> Policy:
    """``child`` on top of ``base``: its rules first, its settings and parameters win."""
    conventions_merged = dict(base.conventions)
    for name, setting in child.conventions.items():
        previous = conventions_merged.get(name)
        if previous is not None and setting.enabled and not setting.params:
            setting = dataclasses.replace(setting, params=previous.params)
        elif previous is not None and setting.enabled:
            setting = dataclasses.replace(setting, params={**previous.params, **setting.params})
        conventions_merged[name] = setting
    return Policy(
        path=child.path,
        files=child.files + base.files,
        settings={**base.settings, **child.settings},
        rules=child.rules + base.rules,
        conventions=conventions_merged,
    )


def load_policy(
    path: str | os.PathLike[str],
    registry: Mapping[str, Convention] | None = None,
    *,
    root: str | os.PathLike[str] | None = None,
    _chain: tuple[str, ...] = (),
) -> Policy:
    """Load ``path`` and the files it extends; raise :class:`ConfigError` on any bad value.

    ``registry`` holds the conventions a policy may name, by name (default: the built-in
    ones; :func:`pytest_gradcheck.hooks.conventions` gives those the hooks define).
    ``root`` is the directory a relative ``extends:`` must stay under (the plugin passes
    :func:`home` of the file and the rootdir; None: anywhere). An absolute ``extends:``
    names a file outside on purpose, and the paths of that file stay under its directory.
    """
    if registry is None:
        registry = {convention.name: convention for convention in BUILTIN_CONVENTIONS}
    file = Path(path)
    key = str(file.resolve())
    if key in _chain:
        cycle = " -> ".join(os.path.basename(p) for p in (*_chain, key))
        raise ConfigError(file, 0, f"policies extend each other in a cycle ({cycle}); break it")
    policy, extends, line = _parse_file(file, registry)
    if extends is not None:
        parent = file.parent / extends  # an absolute extends replaces the directory
        if root is not None and not os.path.isabs(extends) and not within(parent, root):
            raise ConfigError(file, line, outside_message("extends", extends, root))
        if not is_file(parent):
            raise ConfigError(
                file,
                line,
                f"extends: {excerpt(extends)} not found (looked for "
                f"{excerpt(str(parent), 160)}); the path is relative to this file",
            )
        below = None if root is None else home(parent, root)
        policy = merge(load_policy(parent, registry, root=below, _chain=(*_chain, key)), policy)
    if not _chain:
        _check_merged(policy)
    return policy


_MAX_PATH_BYTES = 4000
_MAX_NAME_BYTES = 255
"""Most file systems refuse longer names (and Linux longer paths than 4096 bytes)."""


def path_problem(given: str) -> str | None:
    """Why the text ``given`` (a path written in a suite or policy file) cannot name a file,
    else None: checked before any file call, which would raise ``ValueError`` for a NUL
    character and ``OSError`` for a name too long."""
    if "\x00" in given:
        return "a path cannot hold a NUL character"
    data = given.encode("utf-8", "surrogatepass")
    if len(data) > _MAX_PATH_BYTES or any(len(part) > _MAX_NAME_BYTES for part in data.split(b"/")):
        return (
            f"a path must be at most {_MAX_PATH_BYTES} bytes, each name in it at most "
            f"{_MAX_NAME_BYTES}, got {len(data)} bytes"
        )
    return None


def is_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a regular file this process may look at (``Path.is_file`` raises
    for a directory it may not enter)."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def within(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> bool:
    """Whether ``path`` lies under the directory ``root`` (both with symbolic links and
    ``..`` resolved, so a link out of the tree is outside)."""
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))


def home(path: str | os.PathLike[str], rootdir: str | os.PathLike[str]) -> Path:
    """The directory that the relative paths in the file ``path`` must stay under:
    ``rootdir`` when ``path`` lies in it, else ``path``'s own directory (a file named
    outside the rootdir on purpose: on the command line or by an absolute path)."""
    return Path(rootdir) if within(path, rootdir) else Path(path).parent


def outside_message(key: str, given: str, root: str | os.PathLike[str]) -> str:
    """The error for a relative path (``key: given``) that leads out of ``root``."""
    return (
        f"{key}: {excerpt(given)} leads out of {root}: a relative path must stay inside "
        "the rootdir (a suite or policy file is reviewed as part of the repository, and "
        "what it reads should be too); to use a file outside on purpose, give its "
        "absolute path"
    )


def _split_origin(origin: str, files: Sequence[str]) -> tuple[str, int]:
    name, _, line = origin.rpartition(":")
    path = next((f for f in files if os.path.basename(f) == name), name)
    return path, int(line) if line.isdigit() else 0


def _check_merged(policy: Policy) -> None:
    """Contradictions that only show once the files are merged."""
    try:
        base = resolve(policy.sources())
    except GradcheckError as exc:
        # Point at the value in the most specific file (the later line within one file).
        places = [_split_origin(origin, policy.files) for _, (_, origin) in policy.settings.items()]
        ranked = [
            place for name, place in zip(policy.settings, places, strict=True) if name in str(exc)
        ] or [(policy.path, 0)]
        path, line = min(
            ranked,
            key=lambda place: (
                policy.files.index(place[0]) if place[0] in policy.files else len(policy.files),
                -place[1],
            ),
        )
        raise ConfigError(path, line, f"{exc}; make the limits agree") from None
    for rule in policy.rules:
        try:
            policy.settings_for(rule, base)
        except GradcheckError as exc:
            path, line = _split_origin(rule.origin, policy.files)
            raise ConfigError(
                path, line, f"the rule for {excerpt(rule.pattern)} contradicts the policy: {exc}"
            ) from None
