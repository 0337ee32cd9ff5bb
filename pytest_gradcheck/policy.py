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

:func:`evaluate` is the checks stage of a gradient check: it runs the
``pytest_gradcheck_check`` hooks (the built-in checks among them) under the settings that
govern each layer, runs the policy's conventions, and drops what the rules ignore. No torch
and no pytest here.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .checks import NORMALIZATION, SATURATING, ModuleInfo, Structure
from .hookspecs import current_hook, hookimpl
from .results import KINDS, GradcheckError, LayerStats, Problem
from .settings import SETTING_NAMES, Settings, override, resolve

__all__ = [
    "POLICY_KEYS",
    "RULE_KEYS",
    "RULE_SETTINGS",
    "BuiltinConventions",
    "ConfigError",
    "Convention",
    "LayerRule",
    "Policy",
    "conventions",
    "did_you_mean",
    "evaluate",
    "load_policy",
    "load_yaml",
    "merge",
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
        prefix = f"{where}: entry {entry!r}: " if entry else f"{where}: "
        super().__init__(prefix + message)


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest option, else ``""``."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


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
    would read a string), so the file means the same to the JSON Schema and to us.
    """


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
                f"key {key!r} appears twice (lines {data.lines[key]} and {line}); keep one of them",
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
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(path: str | os.PathLike[str], what: str = "file") -> Any:
    """Read ``path`` with a safe loader that records line numbers; errors are ConfigError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, 0, f"{what} not found; check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, 0, f"cannot read the {what}: {exc}") from None
    loader = _LineLoader(text)
    loader.name = str(path)
    try:
        return loader.get_single_data()
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise ConfigError(
            path,
            mark.line + 1 if mark is not None else 0,
            f"YAML tag not allowed ({exc.problem}): the file holds plain data only "
            "(mappings, lists, strings, numbers, booleans); remove the tag",
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        problem = " ".join(p for p in (exc.context, exc.problem) if p)
        raise ConfigError(
            path, line, f"YAML syntax error: {problem}; check the indentation and quoting"
        ) from None
    except yaml.YAMLError as exc:  # e.g. a tag that the safe loader refuses
        raise ConfigError(path, 0, f"YAML error: {exc}") from None
    finally:
        loader.dispose()


def check_keys(mapping: Map, allowed: Sequence[str], path: str, what: str, entry: str = "") -> None:
    """Raise ConfigError for the first key of ``mapping`` not in ``allowed``."""
    for key in mapping:
        if key not in allowed:
            hint = did_you_mean(str(key), allowed) or f"; valid keys: {', '.join(allowed)}"
            raise ConfigError(
                path, mapping.line_of(key), f"unknown key {key!r} in {what}{hint}", entry
            )


def type_name(value: object) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


# -- policy data ---------------------------------------------------------------------------


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
        return f"{self.origin} {self.pattern!r}"

    def matches(self, layer: str) -> bool:
        return _matcher(self.pattern)(layer)

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


# -- conventions ---------------------------------------------------------------------------

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


def conventions(hook: Any = None) -> dict[str, Convention]:
    """Every convention the hooks define, by name (a user's before a built-in one)."""
    relay = hook if hook is not None else current_hook()
    found: dict[str, Convention] = {}
    for batch in relay.pytest_gradcheck_conventions():
        for convention in batch or ():
            if not isinstance(convention, Convention):
                raise GradcheckError(
                    "pytest_gradcheck_conventions must return Convention objects "
                    f"(from pytest_gradcheck.policy), got {type(convention).__name__}"
                )
            found.setdefault(convention.name, convention)
    return found


_WEIGHT_TYPES = frozenset({"Linear", "Bilinear", "LazyLinear", "Conv1D"})
_RNN_TYPES = frozenset({"RNN", "RNNCell"})


_CONV = re.compile(r"^(Lazy)?Conv(Transpose)?[123]d$")


def _is_weight_layer(kind: str) -> bool:
    return kind in _WEIGHT_TYPES or _CONV.match(kind) is not None


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


def _init_scale(
    structure: Structure, layers: Sequence[LayerStats], params: Mapping[str, Any]
) -> list[Finding]:
    factor = float(params["factor"])
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
            ratios = (std / he, std / xavier)
            if any(1 / factor <= r <= factor for r in ratios):
                continue
            nearest = min(ratios, key=lambda r: abs(math.log(r)))
            findings.append(
                Problem(
                    kind="convention",
                    layer=layer.display_name,
                    param=p.name,
                    value=nearest,
                    limit=factor,
                    message=(
                        f"weight std {std:.3g} is {nearest:.3g}x the He/Xavier std for fan-in "
                        f"{fan_in} (He {he:.3g}, Xavier {xavier:.3g}); allowed within a "
                        f"factor {factor:g}"
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
        "their fan-in (all-zero weights are deliberate and skipped)",
        _at_least_one,
    ),
    Convention(
        "no_unused_parameters",
        _no_unused_parameters,
        {},
        "every trainable parameter receives a gradient",
    ),
    Convention(
        "max_parameters",
        _max_parameters,
        {"max": 100_000_000},
        "the model has at most `max` parameters (trainable and frozen)",
    ),
)


class BuiltinConventions:
    """The built-in conventions, registered like a user's (``trylast``: a user's wins)."""

    name = "gradcheck-conventions"

    @hookimpl(trylast=True)
    def pytest_gradcheck_conventions(self) -> Iterable[Convention]:
        return BUILTIN_CONVENTIONS


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
            raise ConfigError(path, key_line, f"unknown setting {name!r} in {what}{hint}")
        try:
            resolve([("here", {name: value})])
        except GradcheckError as exc:
            detail = str(exc).split(" from here: ", 1)[-1]
            raise ConfigError(path, key_line, f"{name}: {detail}") from None
        values[name] = (value, key_line)
    return values


def _known_kinds(registry: Mapping[str, Convention]) -> list[str]:
    return [*KINDS, *(f"convention:{name}" for name in registry)]


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
                path, raw.line_of("match"), f"invalid regular expression {pattern[3:]!r}: {exc}"
            ) from None
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
                f"unknown problem kind {kind!r} in ignore_kinds"
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
            f"the rule for {pattern!r} says `ignore: true` and also "
            + ("ignore_kinds" if kinds_raw else "settings")
            + ": ignoring the layer makes the rest meaningless; keep one of them",
        )
    for kind in ("dead", "unused"):
        if settings.get(kind) is True and kind in kinds_raw:
            raise ConfigError(
                path,
                raw.line,
                f"the rule for {pattern!r} both requires the {kind!r} check "
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
            raise ConfigError(path, key_line, f"unknown convention {name!r}{hint}")
        convention = registry[name]
        if isinstance(value, bool):
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
                    path, param_line, f"unknown parameter {param!r} of convention {name!r}{hint}"
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
        if isinstance(default, int) and not float(value).is_integer():
            return f"must be a whole number, got {value!r}"
        if not math.isfinite(value) or value < 0:
            return f"must be a finite number >= 0, got {value!r}"
        return None
    if isinstance(default, str) and not isinstance(value, str):
        return f"must be text, got {type_name(value)}"
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
                f"the rule for {rule.pattern!r} can never apply: the rule at line "
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
    _chain: tuple[str, ...] = (),
) -> Policy:
    """Load ``path`` and the files it extends; raise :class:`ConfigError` on any bad value.

    ``registry`` holds the conventions a policy may name (default: those the current hooks
    define, the built-in ones included).
    """
    registry = conventions() if registry is None else registry
    file = Path(path)
    key = str(file.resolve())
    if key in _chain:
        cycle = " -> ".join(os.path.basename(p) for p in (*_chain, key))
        raise ConfigError(file, 0, f"policies extend each other in a cycle ({cycle}); break it")
    policy, extends, line = _parse_file(file, registry)
    if extends is not None:
        parent = (file.parent / extends) if not os.path.isabs(extends) else Path(extends)
        if not parent.is_file():
            raise ConfigError(
                file,
                line,
                f"extends: {extends!r} not found (looked for {parent}); the path is relative "
                "to this file",
            )
        policy = merge(load_policy(parent, registry, _chain=(*_chain, key)), policy)
    if not _chain:
        _check_merged(policy)
    return policy


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
                path, line, f"the rule for {rule.pattern!r} contradicts the policy: {exc}"
            ) from None


# -- the checks stage ------------------------------------------------------------------------


def _run_checks(
    hook: Any,
    layers: Sequence[LayerStats],
    structure: Structure,
    loss: float,
    settings: Settings,
) -> tuple[list[Problem], list[str]]:
    notes: list[str] = []
    problems: list[Problem] = []
    for found in hook.pytest_gradcheck_check(
        layers=tuple(layers), structure=structure, loss=loss, settings=settings, notes=notes
    ):
        for problem in found or ():
            if not isinstance(problem, Problem):
                raise GradcheckError(
                    "a pytest_gradcheck_check implementation returned "
                    f"{type(problem).__name__}; return Problem objects (or None)"
                )
            problems.append(problem)
    return problems, notes


def _names(names: Sequence[str], most: int = 4) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def evaluate(
    layers: Sequence[LayerStats],
    structure: Structure,
    loss: float,
    settings: Settings,
    hook: Any = None,
) -> tuple[list[Problem], list[str]]:
    """Statistics in, problems and notes out: the check hooks, conventions and rules."""
    relay = hook if hook is not None else current_hook()
    policy = settings.policy
    if policy is None:
        problems, notes = _run_checks(relay, layers, structure, loss, settings)
        return _sorted(problems, layers), notes

    cache: dict[str, LayerRule | None] = {}

    def rule_for(layer: str) -> LayerRule | None:
        if layer not in cache:
            cache[layer] = policy.rule_for(layer)
        return cache[layer]

    base, notes = _run_checks(relay, layers, structure, loss, settings)
    problems = [p for p in base if not _overrides(rule_for(p.layer))]
    governing: dict[LayerRule, list[str]] = {}
    for layer in layers:
        rule = rule_for(layer.display_name)
        if rule is not None:
            governing.setdefault(rule, []).append(layer.display_name)
    for rule, governed in governing.items():
        if not rule.settings:
            continue
        variant = policy.settings_for(rule, settings)
        found, found_notes = _run_checks(relay, layers, structure, loss, variant)
        for problem in found:
            if rule_for(problem.layer) is rule:
                problems.append(
                    dataclasses.replace(
                        problem, message=f"{problem.message} [rule {rule.label}]", rule=rule.label
                    )
                )
        notes += [note for note in found_notes if note not in notes]
        notes.append(f"policy rule {rule.describe()} set the limits of {_names(governed)}")

    if policy.enabled:
        registry = conventions(relay)
        for setting in policy.enabled:
            convention = registry.get(setting.name)
            if convention is None:
                raise GradcheckError(
                    f"the policy {setting.origin} switches on the convention {setting.name!r}, "
                    f"which no pytest_gradcheck_conventions hook defines here"
                    + did_you_mean(setting.name, registry)
                )
            params = {**convention.defaults, **setting.params}
            for finding in convention.check(structure, layers, params):
                problems.append(_convention_problem(finding, setting))

    kept: list[Problem] = []
    ignored: dict[LayerRule, list[str]] = {}
    for problem in problems:
        rule = rule_for(problem.layer)
        if rule is not None and (
            rule.ignore
            or problem.kind in rule.ignore_kinds
            or (problem.kind == "convention" and f"convention:{problem.rule}" in rule.ignore_kinds)
        ):
            ignored.setdefault(rule, []).append(f"{problem.kind}:{problem.layer}")
            continue
        kept.append(problem)
    for rule, what in ignored.items():
        unique = list(dict.fromkeys(what))
        notes.append(
            f"policy rule {rule.describe()} ignored {len(what)} problem(s): {_names(unique)}"
        )
    return _sorted(kept, layers), notes


def _overrides(rule: LayerRule | None) -> bool:
    return rule is not None and bool(rule.settings)


def _convention_problem(finding: Finding, setting: ConventionSetting) -> Problem:
    source = f"(convention {setting.name}, {setting.origin})"
    if isinstance(finding, Problem):
        return dataclasses.replace(
            finding, kind="convention", message=f"{finding.message} {source}", rule=setting.name
        )
    layer, message = finding
    return Problem(
        kind="convention",
        layer=layer or "<root>",
        param=None,
        value=math.nan,
        limit=None,
        message=f"{message} {source}",
        rule=setting.name,
    )


def _sorted(problems: list[Problem], layers: Sequence[LayerStats]) -> list[Problem]:
    if not problems:
        return problems
    depth = {layer.display_name: layer.depth for layer in layers}
    return sorted(problems, key=lambda p: (p.sort_key(), depth.get(p.layer, -1)))
