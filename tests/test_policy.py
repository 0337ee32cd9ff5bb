"""Policies: loading (lines, did-you-mean, contradictions, extends), per-layer rules and
the built-in conventions on tiny models, the JSON Schemas, and the policy in a pytest run.
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from fixtures.models import TwoHeads, mlp
from pytest_gradcheck import KINDS, check_gradients
from pytest_gradcheck.batches import TENSOR_KEYS
from pytest_gradcheck.conventions import BUILTIN_CONVENTIONS
from pytest_gradcheck.policy import (
    POLICY_KEYS,
    RULE_KEYS,
    RULE_SETTINGS,
    ConfigError,
    Policy,
    load_policy,
    load_yaml,
    nested_repeat,
)
from pytest_gradcheck.results import Report
from pytest_gradcheck.settings import ConventionSetting
from pytest_gradcheck.suite import DEFAULTS_KEYS, ENTRY_KEYS, SUITE_KEYS

pytestmark = pytest.mark.usefixtures("inner_environment")  # runs pytest in-process

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "pytest_gradcheck" / "schema"


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def check(policy: Policy, model: nn.Module, batch: Any, **overrides: Any) -> Report:
    return check_gradients(model, batch, settings=policy.to_settings(device="cpu", **overrides))


def x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def seeded(build: Any, *args: Any, **kwargs: Any) -> nn.Module:
    torch.manual_seed(0)
    model: nn.Module = build(*args, **kwargs)
    return model


# -- YAML with lines -----------------------------------------------------------------------------


def test_yaml_lines_floats_and_duplicates(tmp_path: Path) -> None:
    data = load_yaml(write(tmp_path, "a: 1e-4\nb:\n  - x\n  - {c: 2}\n"))
    assert data == {"a": 1e-4, "b": ["x", {"c": 2}]}
    assert isinstance(data["a"], float)  # YAML 1.2, like editors (PyYAML alone: a string)
    assert data.line_of("b") == 2
    assert data["b"].line_of(1) == 4
    with pytest.raises(
        ConfigError, match=r"policy.yaml:3: key 'a' appears twice \(lines 1 and 3\)"
    ):
        load_yaml(write(tmp_path, "a: 1\nb: 2\na: 3\n"))


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        pytest.param(
            "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n"
            + "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9)),
            5,
            "holds more than 100,000 values once its YAML aliases (*name) are expanded",
            id="alias-bomb",
        ),
        pytest.param("a: &a [1, *a]\n", 1, "refers to a mapping or list that holds it", id="cycle"),
        pytest.param(
            "a: " + "[" * 50_000 + "]" * 50_000 + "\n",
            1,
            "nested more than 100 levels deep",
            id="deep-flow",
        ),
        pytest.param(
            "".join(" " * i + "- \n" for i in range(150)),
            101,
            "nested more than 100 levels deep",
            id="deep-block",
        ),
        pytest.param("a: 1\nb: x\x00\n", 2, "control character U+0000", id="nul"),
        pytest.param("a: x\x1by\n", 1, "control character U+001B", id="escape"),
        pytest.param(
            "a: 2001-13-45\n", 1, "a value cannot be read (ValueError: month must be", id="date"
        ),
        pytest.param("a: !!timestamp x\n", 1, "a value cannot be read (AttributeError", id="tag"),
    ],
)
def test_yaml_bounds_hold_for_every_file(
    tmp_path: Path, text: str, line: int, message: str
) -> None:
    """One reader for suites and policies: the same bounds, a clear error with the line."""
    with pytest.raises(ConfigError) as error:
        load_yaml(write(tmp_path, text))
    assert error.value.line == line
    assert message in str(error.value)


def test_yaml_errors_quote_the_file_as_an_excerpt(tmp_path: Path) -> None:
    secret = "\n".join(f"secret{i:03d}x" for i in range(200))
    path = tmp_path / "notes.txt"
    path.write_text(secret)
    with pytest.raises(ConfigError) as error:
        load_policy(path)
    assert "secret000x" in str(error.value)
    assert "secret020x" not in str(error.value)
    alias = write(tmp_path, f"a: *{'x' * 5000}\n", "alias.yaml")
    with pytest.raises(ConfigError, match="found undefined alias") as error:
        load_yaml(alias)
    assert len(str(error.value)) < 400


def test_relative_extends_stays_under_the_root(tmp_path: Path) -> None:
    root, outside = tmp_path / "repo", tmp_path / "org"
    root.mkdir()
    outside.mkdir()
    write(outside, "settings:\n  seed: 1\n", "base.yaml")
    write(outside, "extends: base.yaml\nsettings:\n  max_norm: 10\n", "org.yaml")
    team = write(root, "extends: ../org/org.yaml\n", "team.yaml")
    with pytest.raises(ConfigError) as error:
        load_policy(team, root=root)
    assert error.value.line == 1
    assert "extends: '../org/org.yaml' leads out of" in str(error.value)
    assert "give its absolute path" in str(error.value)
    assert load_policy(team).files[-1].endswith("base.yaml")  # no root: no limit
    write(root, f"extends: {outside / 'org.yaml'}\n", "team.yaml")  # on purpose
    # The absolute file's own relative extends stays under its directory.
    assert [Path(f).name for f in load_policy(team, root=root).files] == [
        "team.yaml",
        "org.yaml",
        "base.yaml",
    ]
    write(outside, "extends: ../repo/team.yaml\n", "org.yaml")
    with pytest.raises(ConfigError, match=re.escape("'../repo/team.yaml' leads out of")):
        load_policy(team, root=root)


@pytest.mark.parametrize(
    ("regex", "nested"),
    [
        ("(a+)+$", "(a+)+"),
        ("(?:\\w*\\.)*x", "(?:\\w*\\.)*"),
        ("(x|y?){2,}", "(x|y?){2,}"),
        ("(a{2,5})+", "(a{2,5})+"),
        ("(a(b+)c)*", "(a(b+)c)*"),
        ("(?i)(.*)*", "(.*)*"),
        ("(?:[^]a+]+)+", "(?:[^]a+]+)+"),
        ("encoder\\.layer\\.\\d+\\.attention\\..*", ""),
        ("(encoder|decoder)\\.layers\\.\\d+", ""),
        ("(a+)?", ""),
        ("(a{2})+", ""),
        ("[(a+)]+", ""),
        ("\\(a+\\)+", ""),
        ("(a{}b)+", ""),
        ("([]a+])+", ""),
        ("(?#a+)(x)+", ""),
        ("a++", ""),
    ],
)
def test_nested_repeats_are_found(regex: str, nested: str) -> None:
    assert nested_repeat(regex) == nested


# -- loading and merging -------------------------------------------------------------------------

ORG = """
description: org
settings:
  max_norm: 1.0e4
  seed: 1
rules:
  - match: "*.embeddings.*"
    ignore_kinds: [dead]
conventions:
  saturating_chain: {max: 4}
  max_parameters: {max: 1000}
  no_unused_parameters: true
"""

TEAM = """
extends: org.yaml
settings:
  seed: 2
rules:
  - match: 're:encoder\\.layer\\.\\d+\\.attention\\..*'
    settings: {vanishing_ratio: 1.0e-6}
conventions:
  saturating_chain: {max: 2}
  max_parameters: false
  init_scale: true
"""


def test_extends_merges_base_first(tmp_path: Path) -> None:
    write(tmp_path, ORG, "org.yaml")
    team = load_policy(write(tmp_path, TEAM, "team.yaml"))
    assert [Path(f).name for f in team.files] == ["team.yaml", "org.yaml"]
    assert team.name == "team.yaml (extends org.yaml)"
    assert {k: v for k, (v, _) in team.settings.items()} == {"max_norm": 1e4, "seed": 2}
    assert team.settings["seed"][1] == "team.yaml:3"
    assert [r.pattern for r in team.rules] == [
        "re:encoder\\.layer\\.\\d+\\.attention\\..*",
        "*.embeddings.*",
    ]
    assert {c.name: (c.enabled, dict(c.params)) for c in team.conventions.values()} == {
        "saturating_chain": (True, {"max": 2}),
        "max_parameters": (False, {}),
        "no_unused_parameters": (True, {}),
        "init_scale": (True, {}),
    }
    settings_ = team.to_settings(seed=5)
    assert settings_.max_norm == 1e4
    assert settings_.seed == 5
    assert settings_.policy is team
    assert settings_.to_dict()["policy"] == "team.yaml (extends org.yaml)"


def test_rule_matching_glob_and_regex(tmp_path: Path) -> None:
    policy = load_policy(
        write(
            tmp_path,
            """
            rules:
              - match: "*.embeddings.*"
                ignore: true
              - match: 're:encoder\\.layer\\.\\d+\\.attention\\..*'
                ignore_kinds: [dead]
              - match: "head"
                ignore_kinds: [unused]
            """,
        )
    )
    first, second, third = policy.rules
    assert policy.rule_for("bert.embeddings.word_embeddings") is first
    assert policy.rule_for("embeddings.word_embeddings") is first  # a leading *. matches the root
    assert policy.rule_for("encoder.layer.11.attention.self.query") is second
    assert policy.rule_for("bert.encoder.layer.1.attention.self.query") is None  # fullmatch
    assert policy.rule_for("head") is third
    assert policy.rule_for("heads") is None
    assert policy.rule_for("<loss>") is None


BAD_POLICIES = [
    (
        "setings:\n  max_norm: 1\n",
        1,
        "unknown key 'setings' in the policy; did you mean 'settings'?",
    ),
    (
        "settings:\n  max_nrom: 1\n",
        2,
        "unknown setting 'max_nrom' in the policy's settings; did you mean 'max_norm'?",
    ),
    (
        "settings:\n  max_norm: -1\n",
        2,
        "max_norm: max_norm must be a positive number or None, got -1",
    ),
    (
        "settings:\n  loss_fn: x\n",
        2,
        "'loss_fn' cannot be set in the policy's settings: loss_fn is Python",
    ),
    (
        "rules:\n  - match: a\n    ignroe: true\n",
        3,
        "unknown key 'ignroe' in a rule; did you mean 'ignore'?",
    ),
    (
        "rules:\n  - match: a\n    settings: {seed: 1}\n",
        3,
        "'seed' cannot be set in a rule's settings: seed applies to the whole pass",
    ),
    ("rules:\n  - ignore: true\n", 2, "a rule needs `match:`"),
    ("rules:\n  - match: 're:('\n", 2, "invalid regular expression '('"),
    (
        "rules:\n  - match: a\n    ignore_kinds: [daed]\n",
        3,
        "unknown problem kind 'daed' in ignore_kinds; did you mean 'dead'?",
    ),
    (
        "rules:\n  - match: a\n    ignore_kinds: dead\n",
        3,
        "ignore_kinds must be a list of problem kinds, got str 'dead'",
    ),
    (
        "rules:\n  - match: a\n    ignore: true\n    settings: {max_norm: 1}\n",
        2,
        "says `ignore: true` and also settings",
    ),
    (
        "rules:\n  - match: a\n    ignore_kinds: [dead]\n    settings: {dead: true}\n",
        2,
        "both requires the 'dead' check (settings: dead: true) and ignores it",
    ),
    (
        "rules:\n  - match: a\n    ignore: true\n  - match: b\n  - match: a\n",
        5,
        "the rule for 'a' can never apply: the rule at line 2 has the same pattern",
    ),
    (
        "settings:\n  min_norm: 10\n  max_norm: 1\n",
        3,
        "min_norm=10 (from the policy policy.yaml:2) must be below max_norm=1",
    ),
    (
        "settings: {max_norm: 1}\nrules:\n  - match: a\n    settings: {min_norm: 5}\n",
        3,
        "the rule for 'a' contradicts the policy: min_norm=5",
    ),
    (
        "conventions:\n  saturating_chian: true\n",
        2,
        "unknown convention 'saturating_chian'; did you mean 'saturating_chain'?",
    ),
    (
        "conventions:\n  init_scale: {factr: 2}\n",
        2,
        "unknown parameter 'factr' of convention 'init_scale'; did you mean 'factor'?",
    ),
    (
        "conventions:\n  init_scale: {factor: 0.5}\n",
        2,
        "convention 'init_scale': factor must be at least 1",
    ),
    (
        "conventions:\n  max_parameters: {max: lots}\n",
        2,
        "max_parameters.max: must be a number, got str 'lots'",
    ),
    (
        "conventions:\n  max_parameters: 7\n",
        2,
        "must be true, false or a mapping of parameters (max)",
    ),
    (
        "conventions:\n  must_train: true\n",
        2,
        "convention 'must_train': modules must name at least one module (a glob)",
    ),
    (
        "conventions:\n  must_train: {modules: encoder}\n",
        2,
        "must_train.modules: must be a list of names or globs (e.g. [encoder.*]), got str",
    ),
    ("extends: nowhere.yaml\n", 1, "extends: 'nowhere.yaml' not found"),
    ("rules: [\n", 2, "YAML syntax error"),
]


@pytest.mark.parametrize(("text", "line", "message"), BAD_POLICIES)
def test_bad_policies_name_file_and_line(
    tmp_path: Path, text: str, line: int, message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_policy(path)
    assert f"policy.yaml:{line}: " in str(error.value)
    assert message in str(error.value)


def test_contradiction_after_merge_names_the_extending_file(tmp_path: Path) -> None:
    write(tmp_path, "settings:\n  max_norm: 1.0e-3\n", "org.yaml")
    path = write(tmp_path, "extends: org.yaml\nsettings:\n  min_norm: 1.0e-2\n", "team.yaml")
    with pytest.raises(ConfigError) as error:
        load_policy(path)
    assert error.value.path.endswith("team.yaml")
    assert error.value.line == 3
    assert "must be below max_norm=0.001 (from the policy org.yaml:2)" in str(error.value)
    write(tmp_path, "extends: team2.yaml\n", "team1.yaml")
    write(tmp_path, "extends: team1.yaml\n", "team2.yaml")
    with pytest.raises(
        ConfigError, match=r"extend each other in a cycle \(team1.yaml -> team2.yaml"
    ):
        load_policy(tmp_path / "team1.yaml")


_NAMES = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)


@st.composite
def policies(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    values = {
        "seed": st.integers(0, 2**31),
        "mode": st.sampled_from(["train", "eval"]),
        "dead": st.booleans(),
        "vanishing_ratio": st.floats(1e-9, 1.0),
        "ceiling_norm": st.floats(1.0, 1e12),
        "max_norm": st.floats(1.0, 1e9),
    }
    chosen = draw(st.lists(st.sampled_from(sorted(values)), unique=True))
    if chosen:
        doc["settings"] = {name: draw(values[name]) for name in chosen}
    patterns = draw(st.lists(_NAMES, unique=True, max_size=4))
    rules = []
    for pattern in patterns:
        rule: dict[str, Any] = {"match": f"*.{pattern}"}
        how = draw(st.sampled_from(["ignore", "kinds", "settings"]))
        if how == "ignore":
            rule["ignore"] = True
        elif how == "kinds":
            rule["ignore_kinds"] = draw(st.lists(st.sampled_from(KINDS), unique=True, min_size=1))
        else:
            rule["settings"] = {"exploding_ratio": draw(st.floats(1.0, 1e6))}
        rules.append(rule)
    if rules:
        doc["rules"] = rules
    names = draw(st.lists(st.sampled_from([c.name for c in BUILTIN_CONVENTIONS]), unique=True))
    if names:
        switches = {name: draw(st.booleans()) for name in names}
        # must_train needs its modules: on, it is a mapping of parameters.
        doc["conventions"] = {
            name: {"modules": ["encoder.*"]} if on and name == "must_train" else on
            for name, on in switches.items()
        }
    return doc


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(doc=policies())
def test_valid_policies_round_trip(tmp_path: Path, doc: dict[str, Any]) -> None:
    policy = load_policy(write(tmp_path, yaml.safe_dump(doc, sort_keys=False)))
    assert {k: v for k, (v, _) in policy.settings.items()} == doc.get("settings", {})
    assert [r.pattern for r in policy.rules] == [r["match"] for r in doc.get("rules", [])]
    for rule, raw in zip(policy.rules, doc.get("rules", []), strict=True):
        assert rule.ignore == raw.get("ignore", False)
        assert list(rule.ignore_kinds) == raw.get("ignore_kinds", [])
        assert dict(rule.settings) == raw.get("settings", {})
    assert {c.name: c.enabled for c in policy.conventions.values()} == {
        name: value is not False for name, value in doc.get("conventions", {}).items()
    }


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_misspelt_policy_keys_get_a_did_you_mean(tmp_path: Path, data: st.DataObject) -> None:
    where = data.draw(st.sampled_from(["policy", "rule", "settings"]))
    valid = {"policy": POLICY_KEYS, "rule": RULE_KEYS, "settings": RULE_SETTINGS}[where]
    key = data.draw(st.sampled_from([k for k in valid if len(k) >= 4]))
    index = data.draw(st.integers(0, len(key) - 1))
    typo = key[:index] + key[index + 1 :]  # one letter dropped
    if typo in valid:
        return
    doc: dict[str, Any] = {typo: 1} if where == "policy" else {}
    if where == "rule":
        doc["rules"] = [{"match": "a", typo: 1}]
    elif where == "settings":
        doc["rules"] = [{"match": "a", "settings": {typo: 1}}]
    with pytest.raises(ConfigError, match=r"did you mean '[a-z_]+'\?"):
        load_policy(write(tmp_path, yaml.safe_dump(doc, sort_keys=False)))


# -- per-layer rules on real checks ----------------------------------------------------------------


def test_rule_ignores_a_layer_and_the_report_says_which_rule(tmp_path: Path) -> None:
    model, batch = seeded(mlp, 8, 16, "sigmoid"), x(16, 16)
    plain = check(load_policy(write(tmp_path, "{}\n")), model, batch)
    assert {p.layer for p in plain.problems} >= {"layers.0", "layers.1"}
    policy = load_policy(
        write(
            tmp_path,
            """
            rules:
              - match: "layers.[0-3]"
                ignore: true
                reason: legacy block, tracked in TICKET-1
            """,
        )
    )
    report = check(policy, model, batch)
    assert report.ok
    assert any(
        "policy rule policy.yaml:2 'layers.[0-3]' (ignore; legacy block, tracked in TICKET-1) "
        "ignored"
        in note
        and "vanishing:layers.0" in note
        for note in report.notes
    ), report.notes


def test_rule_overrides_thresholds_for_matched_layers_only(tmp_path: Path) -> None:
    model, batch = seeded(mlp, 3, 8, "relu", "he"), x(4, 8)
    policy = load_policy(
        write(
            tmp_path,
            """
            rules:
              - match: layers.0
                settings: {max_norm: 1.0e-9}
              - match: re:layers\\.[12]
                settings: {min_norm: 1.0e9}
            """,
        )
    )
    report = check(policy, model, batch)
    found = {(p.kind, p.layer, p.rule) for p in report.problems}
    assert found == {
        ("exploding", "layers.0", "policy.yaml:2 'layers.0'"),
        ("vanishing", "layers.1", "policy.yaml:4 're:layers\\\\.[12]'"),
        ("vanishing", "layers.2", "policy.yaml:4 're:layers\\\\.[12]'"),
    }
    assert "[rule policy.yaml:2 'layers.0']" in report.format_failure()
    assert any("set the limits of layers.0" in n for n in report.notes)
    # The same check without the policy is healthy: the rules made the difference.
    assert check(load_policy(write(tmp_path, "{}\n", "empty.yaml")), model, batch).ok


def test_rule_ignores_kinds_and_the_first_match_wins(tmp_path: Path) -> None:
    model, batch = seeded(TwoHeads, use_aux=False), x(8, 32)
    policy = load_policy(
        write(
            tmp_path,
            """
            rules:
              - match: aux_head
                ignore_kinds: [unused]
              - match: "*"
                ignore: true
            """,
        )
    )
    assert check(policy, model, batch).ok
    swapped = load_policy(
        write(
            tmp_path,
            """
            rules:
              - match: aux_head
                ignore_kinds: [dead]
              - match: "*"
                ignore: true
            """,
            "swapped.yaml",
        )
    )
    report = check(swapped, model, batch)  # aux_head's first rule does not ignore `unused`
    assert [(p.kind, p.layer) for p in report.problems] == [
        ("unused", "aux_head"),
        ("unused", "aux_head"),
    ]


# -- conventions: each one triggers on a model that breaks it and passes its healthy twin -----------


class ResidualSigmoid(nn.Module):
    def __init__(self, depth: int = 6, width: int = 16) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = h + torch.sigmoid(block(h))  # a skip path around every Sigmoid
        return h


class NormLast(nn.Module):
    """Registers its norms after its Linears, calls them interleaved."""

    def __init__(self, depth: int = 6, width: int = 16) -> None:
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for fc, norm in zip(self.fcs, self.norms, strict=True):
            h = torch.relu(norm(fc(h)))
        return h


class Recurrent(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.rnn = {"rnn": nn.RNN, "lstm": nn.LSTM}[kind](4, 8, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(seq)
        return self.head(out[:, -1])


class CellLoop(nn.Module):
    def __init__(self, steps: int) -> None:
        super().__init__()
        self.cell = nn.RNNCell(4, 8)
        self.steps = steps

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(seq.shape[0], 8)
        for t in range(self.steps):
            h = self.cell(seq[:, t], h)
        return h


def scaled(std: float | None) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    if std is not None:
        nn.init.normal_(model[0].weight, std=std)
    return model


def frozen_first(model: nn.Module) -> nn.Module:
    """A layer frozen by mistake: the check passes it by, the must_train convention does not."""
    for p in model.layers[0].parameters():  # type: ignore[union-attr]
        p.requires_grad_(False)
    return model


CONVENTION_CASES = [
    (
        "saturating_chain: {max: 3}",
        lambda: seeded(mlp, 6, 16, "sigmoid"),
        lambda: seeded(ResidualSigmoid),
        (8, 16),
        "layers.0",
        "5 Sigmoid/Tanh-like activations follow each other",
    ),
    (
        "normalized_stacks: {max_depth: 4}",
        lambda: seeded(mlp, 6, 16, "relu", "he"),
        lambda: seeded(NormLast),
        (8, 16),
        "layers.0",
        "6 Linear/Conv layers from layers.0 to layers.5",
    ),
    (
        "gated_recurrence: {max_sequence_length: 16}",
        lambda: seeded(Recurrent, "rnn"),
        lambda: seeded(Recurrent, "lstm"),
        (2, 32, 4),
        "rnn",
        "a vanilla RNN runs over 32 steps",
    ),
    (
        "gated_recurrence: {max_sequence_length: 16}",
        lambda: seeded(CellLoop, 20),
        lambda: seeded(CellLoop, 8),
        (2, 20, 4),
        "cell",
        "a vanilla RNNCell runs over 20 steps",
    ),
    (
        "init_scale: {factor: 4}",
        lambda: scaled(1e-3),
        lambda: scaled(None),
        (8, 64),
        "0",
        "weight std 0.000996 is 20x below the init std 0.02 for fan-in 64",
    ),
    (
        "init_scale: {factor: 4}",
        lambda: scaled(1.0),
        lambda: scaled(0.0),
        (8, 64),
        "0",
        "is 5.6x above He for fan-in 64",
    ),
    (
        "no_unused_parameters: true",
        lambda: seeded(TwoHeads, use_aux=False),
        lambda: seeded(mlp, 3, 32),
        (8, 32),
        "aux_head",
        "2 parameter(s) never receive a gradient: aux_head.weight, aux_head.bias",
    ),
    (
        "must_train: {modules: ['layers.*']}",
        lambda: frozen_first(seeded(mlp, 3, 16)),
        lambda: seeded(mlp, 3, 16),
        (8, 16),
        "layers.0",
        "2 parameter(s) are frozen (requires_grad=False) in a module that must train: "
        "layers.0.weight, layers.0.bias",
    ),
    (
        "max_parameters: {max: 1000}",
        lambda: seeded(mlp, 3, 32),
        lambda: seeded(mlp, 2, 8),
        (8, 8),
        "<root>",
        "parameters (at most 1,000)",
    ),
]


@pytest.mark.parametrize(
    ("convention", "broken", "healthy", "shape", "layer", "message"),
    CONVENTION_CASES,
    ids=[f"{c[0].split(':')[0]}-{i}" for i, c in enumerate(CONVENTION_CASES)],
)
def test_convention_triggers_and_its_twin_passes(
    tmp_path: Path,
    convention: str,
    broken: Any,
    healthy: Any,
    shape: tuple[int, ...],
    layer: str,
    message: str,
) -> None:
    policy = load_policy(write(tmp_path, f"conventions:\n  {convention}\n"))
    name = convention.split(":")[0]
    model = broken()
    batch = x(*shape) if "max_parameters" not in convention else x(shape[0], 32)
    report = check(policy, model, batch)
    found = [p for p in report.problems if p.kind == "convention"]
    assert [(p.layer, p.rule) for p in found][:1] == [(layer, name)], report.format_failure()
    assert message in found[0].message
    assert f"(convention {name}, policy.yaml:2)" in found[0].message
    twin = healthy()
    twin_batch = x(*shape) if "max_parameters" not in convention else x(shape[0], 8)
    assert not [p for p in check(policy, twin, twin_batch).problems if p.kind == "convention"]
    # Off, or ignored for that layer by a rule: no convention problem.
    off = load_policy(write(tmp_path, f"conventions:\n  {name}: false\n", "off.yaml"))
    assert not [p for p in check(off, broken(), batch).problems if p.kind == "convention"]
    ignored = load_policy(
        write(
            tmp_path,
            f"rules:\n  - match: '{layer}'\n    ignore_kinds: ['convention:{name}']\n"
            f"conventions:\n  {convention}\n",
            "ignored.yaml",
        )
    )
    assert not [
        p
        for p in check(ignored, broken(), batch).problems
        if p.kind == "convention" and p.layer == layer
    ]


def test_saturating_chain_resets_at_normalization(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, "conventions:\n  saturating_chain: {max: 1}\n"))
    torch.manual_seed(0)
    normed = nn.Sequential(
        *[m for _ in range(4) for m in (nn.Linear(8, 8), nn.LayerNorm(8), nn.Tanh())]
    )
    assert not [p for p in check(policy, normed, x(4, 8)).problems if p.kind == "convention"]


# -- the JSON Schemas ----------------------------------------------------------------------------


def _schema(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    return schema


def test_schemas_and_loaders_agree_on_keys() -> None:
    policy, suite = _schema("policy"), _schema("suite")
    fix = "update pytest_gradcheck/schema/*.schema.json and the loader together"
    assert tuple(policy["properties"]) == POLICY_KEYS, fix
    assert tuple(policy["$defs"]["rule"]["properties"]) == RULE_KEYS, fix
    assert tuple(policy["$defs"]["ruleSettings"]["properties"]) == RULE_SETTINGS, fix
    from pytest_gradcheck.policy import POLICY_SETTINGS

    assert tuple(policy["$defs"]["settings"]["properties"]) == POLICY_SETTINGS, fix
    assert set(policy["$defs"]["conventions"]["properties"]) == {
        c.name for c in BUILTIN_CONVENTIONS
    }
    for convention in BUILTIN_CONVENTIONS:
        variants = policy["$defs"]["conventions"]["properties"][convention.name]["anyOf"]
        assert set(variants[1]["properties"]) == set(convention.defaults), fix
    assert tuple(suite["properties"]) == SUITE_KEYS, fix
    assert tuple(suite["$defs"]["entry"]["properties"]) == ENTRY_KEYS, fix
    assert tuple(suite["properties"]["defaults"]["properties"]) == DEFAULTS_KEYS, fix
    tensor = tuple(suite["$defs"]["tensor"]["properties"]) + tuple(
        suite["$defs"]["alias"]["properties"]
    )
    assert tensor == TENSOR_KEYS, fix
    assert set(
        policy["$defs"]["rule"]["properties"]["ignore_kinds"]["items"]["anyOf"][0]["enum"]
    ) == set(KINDS)


def test_examples_validate_against_the_schemas() -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema validates the examples")
    for name, files in (
        ("policy", ["examples/policies/org.yaml", "examples/policies/team.yaml"]),
        ("suite", ["examples/gradcheck_team_suite.yaml"]),
    ):
        schema = _schema(name)
        jsonschema.Draft202012Validator.check_schema(schema)
        validator = jsonschema.Draft202012Validator(schema)
        for file in files:
            data = json.loads(json.dumps(load_yaml(ROOT / file)))
            assert [e.message for e in validator.iter_errors(data)] == [], file
        # and the schema rejects what the loader rejects
        assert list(validator.iter_errors({"bogus": 1}))
    suite = jsonschema.Draft202012Validator(_schema("suite"))
    bad_batch = {"models": {"m": {"model": "a:b", "batch": {"shape": [2], "vocab": 0}}}}
    assert list(suite.iter_errors(bad_batch))
    assert not list(
        suite.iter_errors(
            {"models": {"m": {"model": "a:b", "batch": {"ids": {"shape": [2], "vocab": 3}}}}}
        )
    )


def test_example_policies_load() -> None:
    team = load_policy(ROOT / "examples" / "policies" / "team.yaml")
    assert team.name == "team.yaml (extends org.yaml)"
    assert team.conventions["saturating_chain"].params == {"max": 2}
    assert math.isclose(team.settings["max_norm"][0], 1e4)


# -- in a pytest run -------------------------------------------------------------------------------

TESTS = """
import torch
from torch import nn

torch.set_num_threads(1)


def twoheads():
    torch.manual_seed(0)
    model = nn.ModuleDict({"body": nn.Linear(8, 8), "aux": nn.Linear(8, 2)})
    model.forward = lambda x: model["body"](x)
    return model


def test_unused_head(gradcheck):
    gradcheck(twoheads(), torch.randn(4, 8))


def test_capped(gradcheck):
    torch.manual_seed(0)
    gradcheck(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(4, 8))
"""


@pytest.mark.parametrize("how", ["option", "ini"])
def test_policy_applies_to_fixture_checks(pytester: pytest.Pytester, how: str) -> None:
    pytester.makepyfile(test_policy_run=TESTS)
    pytester.makefile(
        ".yaml",
        team="""
rules:
  - match: aux
    ignore_kinds: [unused]
    reason: the aux head is trained in stage 2
  - match: "2"
    settings: {max_norm: 1.0e-9}
""",
    )
    ini = ["[pytest]", "addopts = -p no:benchmark -p no:cacheprovider", "gradcheck_device = cpu"]
    args: list[str] = []
    if how == "ini":
        ini.append("gradcheck_policy = team.yaml")
    else:
        args.append("--gradcheck-policy=team.yaml")
    pytester.makeini("\n".join(ini) + "\n")
    result = pytester.runpytest(*args)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*_ test_capped _*",
            "*gradient check failed: 1 problem(s) (exploding) in 1 of 2 layers*",
            "*2 *exploding*gradient norm * > max_norm 1e-09 [[]rule team.yaml:5 '2'[]]",
            "*note: policy rule team.yaml:5 '2' (max_norm=1e-09) set the limits of 2",
        ]
    )


def test_policy_defaults_sit_below_the_ini_and_bad_policies_stop_the_run(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_policy_run=TESTS)
    pytester.makefile(
        ".yaml",
        strict="settings:\n  max_norm: 1.0e-9\n",
        broken="rules:\n  - match: a\n    ignroe: true\n",
    )
    pytester.makeini(
        "[pytest]\naddopts = -p no:benchmark -p no:cacheprovider\ngradcheck_device = cpu\n"
    )
    strict = pytester.runpytest("--gradcheck-policy=strict.yaml", "-k", "capped")
    strict.assert_outcomes(failed=1, deselected=1)
    strict.stdout.fnmatch_lines(["*max_norm 1e-09*"])
    relaxed = pytester.runpytest(
        "--gradcheck-policy=strict.yaml", "-k", "capped", "--gradcheck-max-norm=1e9"
    )
    relaxed.assert_outcomes(passed=1, deselected=1)
    without = pytester.runpytest("-k", "unused")
    without.assert_outcomes(failed=1, deselected=1)  # the policy's rule made it pass
    broken = pytester.runpytest("--gradcheck-policy=broken.yaml")
    assert broken.ret == pytest.ExitCode.USAGE_ERROR
    broken.stderr.fnmatch_lines(
        [
            "ERROR: *broken.yaml:3: unknown key 'ignroe' in a rule; did you mean 'ignore'?",
            "(the policy file named by --gradcheck-policy=broken.yaml)",
        ]
    )


@pytest.mark.slow
def test_init_scale_accepts_a_transformers_models_own_init() -> None:
    """BERT initialises with config.initializer_range (0.02), about 0.16x He: an org policy
    that switches init_scale on with its defaults passes it, and still catches a model whose
    weights are far from every init it could mean."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(config)
    policy = Policy(
        path="org.yaml",
        files=("org.yaml",),
        conventions={"init_scale": ConventionSetting("init_scale", True, {}, "org.yaml:1")},
    )
    batch = {"input_ids": torch.randint(0, 64, (2, 8))}
    report = check_gradients(model, batch, settings=policy.to_settings())
    assert not [p for p in report.problems if p.kind == "convention"], report.format_failure()
    with torch.no_grad():
        model.bert.encoder.layer[0].intermediate.dense.weight.mul_(1e-3)
    report = check_gradients(model, batch, settings=policy.to_settings())
    [problem] = [p for p in report.problems if p.kind == "convention"]
    assert problem.param == "bert.encoder.layer.0.intermediate.dense.weight"
    assert "below the init std 0.02" in problem.message
