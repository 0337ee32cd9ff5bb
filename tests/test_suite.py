"""YAML suites: ``gradcheck*.yaml`` files collected as tests, end to end with pytester, and
the loader's checks of every value (each mistake a collection error naming file, entry and
line), with property-based tests of the batch specs and of unknown keys.
"""

from __future__ import annotations

import os
import re
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_gradcheck.batches import TENSOR_KEYS, build_batch, build_target
from pytest_gradcheck.policy import ConfigError
from pytest_gradcheck.suite import DEFAULTS_KEYS, ENTRY_KEYS, SUITE_KEYS, SuiteError, load_suite

pytestmark = pytest.mark.usefixtures("inner_environment")  # runs pytest in-process

FACTORIES = '''
import torch
from torch import nn

torch.set_num_threads(1)


def mlp(depth=3, width=8, activation="relu"):
    """ReLU with He init (healthy), or Sigmoid with default init (vanishing when deep)."""
    layers = []
    for _ in range(depth):
        linear = nn.Linear(width, width)
        if activation == "relu":
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU() if activation == "relu" else nn.Sigmoid()]
    return nn.Sequential(*layers)


class TokenModel(nn.Module):
    """Keyword inputs, Hugging Face style; its own loss when labels are given."""

    def __init__(self, vocab=32, width=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask, labels=None):
        hidden = self.embed(input_ids) * attention_mask.unsqueeze(-1)
        logits = self.head(hidden)
        if labels is None:
            return logits
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


def two_inputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    return Two()


def mean_square(output):
    return output.pow(2).mean()


def not_a_module():
    return 42
'''

SUITE = """
defaults:
  device: cpu
models:
  relu_mlp:
    model: factories:mlp
    args: {depth: 3}
    batch: {shape: [4, 8]}
    loss: factories:mean_square
  sigmoid_mlp:
    model: factories:mlp
    args: {depth: 12, activation: sigmoid}
    batch: {shape: [4, 8], low: -1.0, high: 1.0}
  tokens:
    model: factories:TokenModel
    args: {vocab: 32}
    batch:
      input_ids: {shape: [2, 5], vocab: 32}
      attention_mask: {shape: [2, 5], fill: 1, dtype: int64}
      labels: {same_as: input_ids}
  positional:
    model: factories:two_inputs
    batch: [{shape: [3, 4]}, {shape: [3, 4]}]
    seed: 3
  known_broken:
    model: factories:mlp
    args: {depth: 12, activation: sigmoid}
    batch: {shape: [4, 8]}
    marks: [{xfail: {reason: vanishes, strict: true}}]
"""

IDS = ["relu_mlp", "sigmoid_mlp", "tokens", "positional", "known_broken"]


def write_ini(pytester: pytest.Pytester, *lines: str) -> None:
    pytester.makeini(
        "\n".join(
            [
                "[pytest]",
                "addopts = --strict-markers -p no:benchmark -p no:cacheprovider",
                "filterwarnings =",
                "    error",
                "gradcheck_device = cpu",
                *lines,
            ]
        )
        + "\n"
    )


def make_suite(
    pytester: pytest.Pytester, text: str = SUITE, name: str = "gradcheck_models"
) -> Path:
    pytester.makepyfile(factories=FACTORIES)
    return pytester.makefile(".yaml", **{name: textwrap.dedent(text)})


def junit(path: Path) -> dict[str, dict[str, str]]:
    root = ET.parse(path).getroot()
    return {
        str(case.get("name")): {
            p.get("name", ""): p.get("value", "") for p in case.iter("property")
        }
        for case in root.iter("testcase")
    }


# -- end to end ----------------------------------------------------------------------------------


def test_suite_end_to_end(pytester: pytest.Pytester) -> None:
    write_ini(pytester)
    make_suite(pytester)
    collected = pytester.runpytest("--collect-only", "-q")
    assert [line for line in collected.outlines if "::" in line] == [
        f"gradcheck_models.yaml::{name}" for name in IDS
    ]

    result = pytester.runpytest("-rA", "--junitxml=out.xml")
    result.assert_outcomes(passed=3, failed=1, xfailed=1)
    # The same failure text as the gradcheck fixture's, then where the entry is.
    result.stdout.fnmatch_lines(
        [
            "*_ sigmoid_mlp _*",
            "gradient check failed: * (vanishing) in * of 12 layers on cpu",
            "*layer*kind*value*limit*what",
            "hint (vanishing):*Sigmoid*",
            "(entry 'sigmoid_mlp' at gradcheck_models.yaml:9: model factories:mlp)",
        ]
    )
    result.stdout.no_fnmatch_line("*Traceback*")
    result.stdout.no_fnmatch_line("*pytest_gradcheck*.py:*")
    # The gradcheck summary lists suite entries like any check.
    result.stdout.fnmatch_lines(["*unhealthy*gradcheck_models.yaml::sigmoid_mlp*worst layer: 0*"])

    cases = junit(pytester.path / "out.xml")
    assert set(cases) == set(IDS)
    assert cases["relu_mlp"]["gradcheck.verdict"] == "healthy"
    assert cases["sigmoid_mlp"]["gradcheck.verdict"] == "unhealthy"
    assert cases["sigmoid_mlp"]["gradcheck.problems"].startswith("vanishing:0")
    assert cases["tokens"]["gradcheck.device"] == "cpu"
    assert {"gradcheck.verdict", "gradcheck.min_grad_norm", "gradcheck.seconds"} <= set(
        cases["positional"]
    )

    selected = pytester.runpytest("-k", "tokens or positional", "-q")
    selected.assert_outcomes(passed=2, deselected=3)


def test_suite_settings_marks_and_rerun_of_failures(pytester: pytest.Pytester) -> None:
    """Entry settings reach the check; markers select; --lf reruns the failed entry by id."""
    pytester.makeini(
        "[pytest]\naddopts = --strict-markers -p no:benchmark\n"
        "markers =\n    heavy: a big model\ngradcheck_device = cpu\n"
    )
    make_suite(
        pytester,
        """
        defaults:
          marks: [heavy]
        models:
          capped:
            model: factories:mlp
            batch: {shape: [4, 8]}
            max_norm: 1.0e-9
          skipped:
            model: factories:mlp
            batch: {shape: [4, 8]}
            marks: [{skip: not today}]
        """,
    )
    result = pytester.runpytest("-m", "heavy", "-rs")
    result.assert_outcomes(failed=1, skipped=1)
    result.stdout.fnmatch_lines(["*exploding*gradient norm * > max_norm 1e-09*", "*not today*"])
    rerun = pytester.runpytest("--lf", "-v")
    rerun.assert_outcomes(failed=1)  # the skipped entry is not run again
    rerun.stdout.fnmatch_lines(["gradcheck_models.yaml::capped FAILED*"])


def test_suite_under_xdist(pytester: pytest.Pytester) -> None:
    write_ini(pytester)
    make_suite(pytester)
    result = pytester.runpytest_subprocess("-n", "2", "--junitxml=out.xml")
    result.assert_outcomes(passed=3, failed=1, xfailed=1)
    cases = junit(pytester.path / "out.xml")
    assert cases["sigmoid_mlp"]["gradcheck.verdict"] == "unhealthy"
    assert cases["relu_mlp"]["gradcheck.verdict"] == "healthy"


def test_suite_pattern_is_configurable(pytester: pytest.Pytester) -> None:
    write_ini(pytester, "gradcheck_suite_pattern = models_*.yml")
    make_suite(pytester, name="gradcheck_ignored")
    pytester.makefile(
        ".yml",
        models_team="models:\n  one:\n    model: factories:mlp\n    batch: {shape: [2, 8]}\n",
    )
    result = pytester.runpytest("--collect-only", "-q")
    assert [line for line in result.outlines if "::" in line] == ["models_team.yml::one"]


def test_suite_policy_stacks_on_the_run_policy(pytester: pytest.Pytester) -> None:
    """The suite's ``policy:`` goes on top of --gradcheck-policy: both sets of rules apply,
    the suite's first; the entry's own settings win over both policies' defaults."""
    write_ini(pytester)
    pytester.makefile(".yaml", org="rules:\n  - match: '0'\n    settings: {max_norm: 1.0e-9}\n")
    pytester.makefile(
        ".yaml",
        team="settings:\n  max_norm: 1.0e-9\nrules:\n  - match: '2'\n    settings: {max_norm: 1.0e-9}\n",
    )
    make_suite(
        pytester,
        """
        policy: team.yaml
        models:
          both_rules:
            model: factories:mlp
            args: {depth: 3}
            batch: {shape: [4, 8]}
            max_norm: 1.0e9
        """,
    )
    result = pytester.runpytest("--gradcheck-policy=org.yaml")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "gradient check failed: 2 problem(s) (exploding) in 2 of 3 layers on cpu",
            "*0 *exploding*[[]rule org.yaml:2 '0'[]]",
            "*2 *exploding*[[]rule team.yaml:4 '2'[]]",
        ]
    )
    result.stdout.no_fnmatch_line("*4 *exploding*")  # the entry's max_norm beat the team's


def test_runtime_errors_fail_the_entry_with_the_reason(pytester: pytest.Pytester) -> None:
    write_ini(pytester)
    make_suite(
        pytester,
        """
        models:
          not_a_module:
            model: factories:not_a_module
            batch: {shape: [2, 8]}
          wrong_batch:
            model: factories:mlp
            batch: {shape: [2, 5]}
        """,
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "*factories:not_a_module(**args) returned int, not a torch.nn.Module*",
            "the gradient check could not run: the forward pass*raised RuntimeError*",
            "(entry 'wrong_batch' at gradcheck_models.yaml:5: model factories:mlp)",
        ]
    )
    result.stdout.no_fnmatch_line("*Traceback*")


# -- bad input: collection errors ------------------------------------------------------------------

BAD: dict[str, tuple[str, list[str]]] = {
    "syntax": (
        "models:\n  a:\n    model: factories:mlp\n    batch: {shape: [2, 8]\n",
        ["*gradcheck_syntax.yaml:4: YAML syntax error:*expected ',' or '}'*"],
    ),
    "unknown_key": (
        "models:\n  a:\n    model: factories:mlp\n    bacth: {shape: [2, 8]}\n",
        [
            "*gradcheck_unknown_key.yaml:4: entry 'a': unknown key 'bacth' in the entry; did you mean 'batch'?"
        ],
    ),
    "wrong_type": (
        "models:\n  a:\n    model: factories:mlp\n    batch: {shape: 8}\n",
        [
            "*gradcheck_wrong_type.yaml:4: entry 'a': batch: shape must be a list of positive integers, got int 8"
        ],
    ),
    "no_module": (
        "models:\n  a:\n    model: factoriez:mlp\n    batch: {shape: [2, 8]}\n",
        [
            "*gradcheck_no_module.yaml:3: entry 'a': model: factoriez:mlp: cannot import module "
            "'factoriez': no module named 'factoriez'; did you mean 'factories'?*"
        ],
    ),
    "no_attribute": (
        "models:\n  a:\n    model: factories:mpl\n    batch: {shape: [2, 8]}\n",
        [
            "*gradcheck_no_attribute.yaml:3: entry 'a': model: factories:mpl: 'factories' has no "
            "attribute 'mpl'; did you mean 'mlp'?"
        ],
    ),
    "bad_argument": (
        "models:\n  a:\n    model: factories:mlp\n    args: {dept: 3}\n    batch: {shape: [2, 8]}\n",
        [
            "*gradcheck_bad_argument.yaml:4: entry 'a': args: factories:mlp has no parameter 'dept'; did you mean 'depth'?"
        ],
    ),
    "missing_file": (
        "models:\n  a:\n    model: factories:mlp\n    batch: {file: fixtures/nothing.pt}\n",
        [
            "*gradcheck_missing_file.yaml:4: entry 'a': batch.file: 'fixtures/nothing.pt' not found (looked for *"
        ],
    ),
    "not_tensors": (
        "models:\n  a:\n    model: factories:mlp\n    batch: {file: garbage.pt}\n",
        [
            "*gradcheck_not_tensors.yaml:4: entry 'a': batch.file: 'garbage.pt' is not a tensor "
            "file that torch.load(weights_only=True) can read*"
        ],
    ),
    "policy": (
        "policy: contradicting.yaml\nmodels:\n  a:\n    model: factories:mlp\n    batch: {shape: [2, 8]}\n",
        [
            "*contradicting.yaml:2: the rule for '*.head' says `ignore: true` and also settings: "
            "ignoring the layer makes the rest meaningless; keep one of them"
        ],
    ),
    "target_without_loss": (
        "models:\n  a:\n    model: factories:mlp\n    batch: {shape: [2, 8]}\n"
        "    target: {shape: [2], vocab: 8, dtype: int64}\n",
        [
            "*gradcheck_target_without_loss.yaml:5: entry 'a': target: needs a loss: that takes "
            "(output, target), e.g. loss: torch.nn.functional:cross_entropy"
        ],
    ),
    "target_same_as": (
        "models:\n  a:\n    model: factories:TokenModel\n"
        "    batch:\n      input_ids: {shape: [2, 5], vocab: 32}\n"
        "      attention_mask: {shape: [2, 5], fill: 1, dtype: int64}\n"
        "    target: {same_as: input_idz}\n    loss: factories:mean_square\n",
        [
            "*gradcheck_target_same_as.yaml:7: entry 'a': target: same_as: 'input_idz' is not a "
            "tensor input of this entry's batch; did you mean 'input_ids'?"
        ],
    ),
    "target_shape": (
        "models:\n  a:\n    model: factories:mlp\n    batch: {shape: [2, 8]}\n"
        "    target: {shape: 2, vocab: 8}\n    loss: factories:mean_square\n",
        [
            "*gradcheck_target_shape.yaml:5: entry 'a': target: shape must be a list of positive "
            "integers, got int 2"
        ],
    ),
    "python_tag": (
        "models:\n  a:\n    model: !!python/object/apply:os.system ['touch hacked']\n    batch: {shape: [2, 8]}\n",
        ["*gradcheck_python_tag.yaml:3: YAML tag not allowed (could not determine a constructor*"],
    ),
}


def test_every_bad_input_is_a_collection_error_naming_file_entry_and_line(
    pytester: pytest.Pytester,
) -> None:
    write_ini(pytester)
    pytester.makepyfile(factories=FACTORIES)
    pytester.makefile(".pt", garbage="this is not a zip archive")
    pytester.makefile(
        ".yaml",
        contradicting="rules:\n  - match: '*.head'\n    ignore: true\n    settings: {max_norm: 10}\n",
    )
    for name, (text, _) in BAD.items():
        pytester.makefile(".yaml", **{f"gradcheck_{name}": text})
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.INTERRUPTED  # collection errors stop the run
    result.assert_outcomes(errors=len(BAD))
    for name, (_, lines) in BAD.items():
        result.stdout.fnmatch_lines([f"*ERROR collecting gradcheck_{name}.yaml*", *lines])
    result.stdout.no_fnmatch_line("*Traceback*")
    result.stdout.no_fnmatch_line("*site-packages*")
    result.stdout.no_fnmatch_line("*pytest_gradcheck*.py*")
    assert not (pytester.path / "hacked").exists()  # YAML never runs code


def test_all_mistakes_of_a_file_are_listed(tmp_path: Path) -> None:
    (tmp_path / "factories_all.py").write_text(FACTORIES)
    path = tmp_path / "gradcheck_all.yaml"
    path.write_text(
        "models:\n"
        "  a:\n    model: factories_all:mlp\n    batch: {shape: [2, 8], dtype: float33}\n"
        "  b:\n    model: factories_all:mlp\n    batch: {shape: [2, 8]}\n    mode: training\n"
        "  c d:\n    model: factories_all:mlp\n"
    )
    with pytest.raises(SuiteError) as error:
        load_suite(path)
    found = [(e.entry, e.line) for e in error.value.errors]
    assert found == [("a", 4), ("b", 8), ("c d", 9)]
    text = str(error.value)
    assert "unknown dtype 'float33'; did you mean 'float32'?" in text
    assert "mode: mode must be one of train, eval, got 'training'" in text
    assert "an entry name becomes the test id" in text


# -- batch specs -------------------------------------------------------------------------------


def test_batch_forms_and_files(tmp_path: Path) -> None:
    numpy = pytest.importorskip("numpy")
    (tmp_path / "factories_files.py").write_text(FACTORIES)
    batches = tmp_path / "fixtures"
    batches.mkdir()
    ids = torch.randint(0, 32, (2, 5))
    torch.save({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, batches / "tokens.pt")
    numpy.save(batches / "x.npy", numpy.ones((3, 4), dtype=numpy.float32))
    numpy.savez(
        batches / "xy.npz", x=numpy.zeros((3, 4), dtype=numpy.float32), y=numpy.ones((3, 4))
    )
    path = tmp_path / "gradcheck_files.yaml"
    path.write_text(
        textwrap.dedent(
            """
            models:
              pt_mapping:
                model: factories_files:TokenModel
                batch: {file: fixtures/tokens.pt}
              npy_and_npz:
                model: factories_files:two_inputs
                batch: [{file: fixtures/x.npy}, {file: fixtures/xy.npz, key: x}]
              generated:
                model: factories_files:TokenModel
                batch:
                  input_ids: {shape: [2, 5], vocab: 32}
                  attention_mask: {shape: [2, 5], fill: 1, dtype: int64}
                  labels: {same_as: input_ids}
                  return_dict: true
            """
        )
    )
    suite = load_suite(path, rootdir=tmp_path)
    pt, npy, generated = (build_batch(e.batch, seed=0) for e in suite.entries)
    assert torch.equal(pt["input_ids"], ids)
    assert npy[0].shape == (3, 4)
    assert npy[0].dtype == torch.float32
    assert float(npy[0].sum()) == 12
    assert float(npy[1].abs().sum()) == 0
    assert generated["labels"] is generated["input_ids"]
    assert generated["return_dict"] is True
    assert generated["attention_mask"].dtype == torch.int64
    assert bool((generated["attention_mask"] == 1).all())
    again = build_batch(suite.entries[2].batch, seed=0)
    assert torch.equal(again["input_ids"], generated["input_ids"])  # seeded
    other = build_batch(suite.entries[2].batch, seed=1)
    assert not torch.equal(other["input_ids"], generated["input_ids"])

    bad = tmp_path / "gradcheck_bad_key.yaml"
    bad.write_text(
        "models:\n  a:\n    model: factories_files:two_inputs\n"
        "    batch: [{file: fixtures/xy.npz, key: z}]\n"
    )
    with pytest.raises(ConfigError, match=r":4: entry 'a': batch\[0\]\.key: .* has no entry 'z'"):
        load_suite(bad, rootdir=tmp_path)


def _tensor_specs() -> st.SearchStrategy[dict[str, object]]:
    shape = st.lists(st.integers(1, 4), min_size=1, max_size=3)
    floats = st.builds(
        lambda s, dtype, bounds: {"shape": s, "dtype": dtype, **bounds},
        shape,
        st.sampled_from(["float32", "float64"]),
        st.one_of(
            st.just({}),
            st.tuples(st.floats(-5, 0), st.floats(0.5, 5)).map(
                lambda b: {"low": b[0], "high": b[1]}
            ),
            st.floats(-3, 3).map(lambda f: {"fill": f}),
        ),
    )
    ints = st.builds(
        lambda s, dtype, vocab: {"shape": s, "dtype": dtype, "vocab": vocab},
        shape,
        st.sampled_from(["int64", "int32"]),
        st.integers(1, 100),
    )
    return st.one_of(floats, ints)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    specs=st.dictionaries(
        st.from_regex(r"[a-z]{1,6}_in", fullmatch=True), _tensor_specs(), min_size=1, max_size=3
    ),
    seed=st.integers(0, 2**31),
)
def test_valid_specs_round_trip(
    tmp_path: Path, specs: dict[str, dict[str, object]], seed: int
) -> None:
    """Any valid keyword-input spec loads, and the batch has the shapes, dtypes and ranges it says."""
    path = tmp_path / "gradcheck_prop.yaml"
    doc = {"models": {"m": {"model": "torch.nn:Identity", "batch": specs}}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    (entry,) = load_suite(path).entries
    batch = build_batch(entry.batch, seed)
    assert list(batch) == list(specs)
    for name, spec in specs.items():
        tensor = batch[name]
        assert tuple(tensor.shape) == tuple(spec["shape"])  # type: ignore[arg-type]
        assert str(tensor.dtype) == f"torch.{spec['dtype']}"
        values = tensor.double()
        if "vocab" in spec:
            assert float(values.min()) >= 0
            assert float(values.max()) < spec["vocab"]  # type: ignore[operator]
        if "fill" in spec:
            assert torch.allclose(values, torch.full_like(values, float(spec["fill"])), atol=1e-6)  # type: ignore[arg-type]
        if "low" in spec:
            assert float(spec["low"]) - 1e-6 <= float(values.min())  # type: ignore[arg-type]
            assert float(values.max()) <= float(spec["high"]) + 1e-6  # type: ignore[arg-type]


def _one_edit(word: str, data: st.DataObject) -> str:
    index = data.draw(st.integers(0, len(word) - 1))
    how = data.draw(st.sampled_from(["drop", "swap", "double"]))
    if how == "drop":
        return word[:index] + word[index + 1 :]
    if how == "double":
        return word[:index] + word[index] + word[index:]
    other = data.draw(st.sampled_from("abcdefghijklmnopqrstuvwxyz"))
    return word[:index] + other + word[index + 1 :]


KEY_SETS = {
    "suite": SUITE_KEYS,
    "defaults": DEFAULTS_KEYS,
    "entry": ENTRY_KEYS,
    "tensor": tuple(k for k in TENSOR_KEYS if k != "same_as"),
}


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(where=st.sampled_from(sorted(KEY_SETS)), data=st.data())
def test_misspelt_keys_always_get_a_did_you_mean(
    tmp_path: Path, where: str, data: st.DataObject
) -> None:
    valid = KEY_SETS[where]
    key = data.draw(st.sampled_from([k for k in valid if len(k) >= 4]))
    typo = _one_edit(key, data)
    if typo in valid or typo in {"model", "batch", "shape", "models"}:
        return  # not a typo here, or a key the document already uses elsewhere
    entry: dict[str, object] = {"model": "torch.nn:Identity", "batch": {"shape": [2]}}
    doc: dict[str, object] = {"models": {"m": entry}}
    if where == "suite":
        doc[typo] = 1
    elif where == "defaults":
        doc["defaults"] = {typo: 1}
    elif where == "entry":
        entry[typo] = 1
    else:
        entry["batch"] = {"shape": [2], typo: 1}
    text = yaml.safe_dump(doc, sort_keys=False)
    path = tmp_path / "gradcheck_typo.yaml"
    path.write_text(text)
    with pytest.raises(SuiteError) as error:
        load_suite(path)
    message = str(error.value)
    assert f"unknown key {typo!r}" in message
    assert re.search(r"did you mean '[a-z_]+'\?", message), message
    expected_line = next(
        i
        for i, line in enumerate(text.splitlines(), 1)
        if re.match(rf"\s*{re.escape(typo)}:", line)
    )
    assert f"gradcheck_typo.yaml:{expected_line}:" in message


def test_example_suite_loads() -> None:
    """The shipped example: every entry resolves, and the ids are the model names."""
    pytest.importorskip("transformers")
    examples = Path(__file__).resolve().parent.parent / "examples"
    suite = load_suite(examples / "gradcheck_team_suite.yaml", rootdir=examples.parent)
    assert [e.name for e in suite.entries] == [
        "bert_masked_lm",
        "bert_encoder",
        "gpt2_lm",
        "vit_classifier",
        "resnet_classifier",
        "deep_sigmoid_mlp",
    ]
    assert suite.policy is not None
    assert [os.path.basename(f) for f in suite.policy.files] == ["team.yaml", "org.yaml"]


# -- what a suite may read, import and call ------------------------------------------------------

SMALL_FACTORIES = """
import subprocess

from torch import nn


class NotAModule:
    def __init__(self, **kwargs):
        raise AssertionError("called")


def annotated_int() -> int:
    raise AssertionError("called")


def mlp():
    return nn.Sequential(nn.Linear(4, 2))
"""


def test_relative_paths_stay_inside_the_rootdir(tmp_path: Path) -> None:
    root, outside = tmp_path / "repo", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "org.yaml").write_text("settings:\n  seed: 1\n")
    torch.save(torch.ones(2, 4), outside / "x.pt")
    (root / "factories_inside.py").write_text(SMALL_FACTORIES)
    entry = "models:\n  a:\n    model: factories_inside:mlp\n    batch: {file: %s}\n"
    path = root / "gradcheck_paths.yaml"
    path.write_text("policy: ../outside/org.yaml\n" + entry % "../outside/x.pt")
    with pytest.raises(SuiteError) as error:
        load_suite(path, rootdir=root)
    assert [(e.line, e.detail.split(":")[0]) for e in error.value.errors] == [
        (1, "policy"),
        (5, "batch.file"),
    ]
    assert "'../outside/x.pt' leads out of" in str(error.value)
    assert "give its absolute path" in str(error.value)
    path.write_text(f"policy: {outside / 'org.yaml'}\n" + entry % (outside / "x.pt"))
    suite = load_suite(path, rootdir=root)  # absolute: outside on purpose
    assert suite.policy is not None
    assert load_suite(path).entries  # no rootdir: no limit (the Python API)


def test_errors_quote_long_values_as_short_excerpts(tmp_path: Path) -> None:
    (tmp_path / "factories_long.py").write_text(SMALL_FACTORIES)
    long = "x" * 5000
    path = tmp_path / "gradcheck_long.yaml"
    path.write_text(  # a key of over 1024 characters is written as "? key"
        f"? {long}\n: 1\nmodels:\n  a:\n    model: factories_long:mlp\n    mode: {long}\n"
        "    batch: {shape: [2, 4]}\n"
        f"  b:\n    model: factories_long:mlp\n    batch: {{shape: [2, 4], dtype: {long}}}\n"
        f"  ? {long}\n  : {{model: factories_long:mlp}}\n"
    )
    with pytest.raises(SuiteError) as error:
        load_suite(path)
    assert len(error.value.errors) == 4
    for line in str(error.value).splitlines():
        assert len(line) < 400, line
        assert "(5000 characters)" in line


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("os:mkdir", "module 'os' is part of Python's standard library"),
        ("subprocess:Popen", "module 'subprocess' is part of Python's standard library"),
        ("factories_refused:subprocess.getoutput", "module 'subprocess' is part of Python's"),
        ("factories_refused:NotAModule", "the class factories_refused.NotAModule is not a"),
        ("factories_refused:annotated_int", "it is annotated to return int, not a torch.nn"),
        ("torch:zeros", "a builtin (C) function does not build a torch.nn.Module"),
    ],
)
def test_a_model_that_cannot_build_a_module_is_refused_before_the_call(
    tmp_path: Path, model: str, message: str
) -> None:
    (tmp_path / "factories_refused.py").write_text(SMALL_FACTORIES)
    path = tmp_path / "gradcheck_refused.yaml"
    path.write_text(f"models:\n  a:\n    model: {model}\n    batch: {{shape: [2, 4]}}\n")
    with pytest.raises(SuiteError) as error:
        load_suite(path)  # nothing was called: the factories above raise when called
    assert f"gradcheck_refused.yaml:3: entry 'a': model: {model}: {message}" in str(error.value)


def test_suite_imports_allow_only_the_listed_modules(pytester: pytest.Pytester) -> None:
    write_ini(pytester, "gradcheck_suite_imports = factories")
    make_suite(
        pytester,
        """
        models:
          mine:
            model: factories:mlp
            args: {depth: 2}
            batch: {shape: [4, 8]}
          torch_direct:
            model: torch.nn:Linear
            args: {in_features: 8, out_features: 2}
            batch: {shape: [4, 8]}
          torch_through_mine:
            model: factories:nn.Linear
            args: {in_features: 8, out_features: 2}
            batch: {shape: [4, 8]}
        """,
    )
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*:7: entry 'torch_direct': model: torch.nn:Linear: module 'torch.nn' is not under "
            "gradcheck_suite_imports (factories)*",
            "*:11: entry 'torch_through_mine': model: factories:nn.Linear: module 'torch.nn' is "
            "not under gradcheck_suite_imports (factories)*",
        ]
    )
    result = pytester.runpytest("-o", "gradcheck_suite_imports=factories torch.nn")
    result.assert_outcomes(passed=3)
    result = pytester.runpytest("-o", "gradcheck_suite_imports=factories os.path/x")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["'os.path/x' from -o gradcheck_suite_imports=* is not a module*"])


# -- targets, the gradient_health mark and unknown marks -------------------------------------------

TARGETS = """
defaults:
  device: cpu
models:
  classifier:
    model: factories:mlp
    args: {depth: 3}
    batch: {shape: [8, 8]}
    target: {shape: [8], vocab: 8, dtype: int64}
    loss: torch.nn.functional:cross_entropy
  language_model:
    model: factories:TokenModel
    args: {vocab: 32}
    batch:
      input_ids: {shape: [2, 5], vocab: 32}
      attention_mask: {shape: [2, 5], fill: 1, dtype: int64}
    target: {same_as: input_ids}
    loss: factories:token_loss
  mismatch:
    model: factories:mlp
    batch: {shape: [8, 8]}
    target: {shape: [3], vocab: 8, dtype: int64}
    loss: torch.nn.functional:cross_entropy
"""

TOKEN_LOSS = """

def token_loss(logits, labels):
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
"""


@pytest.mark.parametrize("xdist", [[], ["-n", "2"]], ids=["plain", "n2"])
def test_suite_targets_reach_the_loss(pytester: pytest.Pytester, xdist: list[str]) -> None:
    """``target:`` is the second argument of ``loss(output, target)``: class indices made
    from a spec, or the batch's own input ids for a language model."""
    write_ini(pytester)
    pytester.makepyfile(factories=FACTORIES + TOKEN_LOSS)
    pytester.makefile(".yaml", gradcheck_targets=textwrap.dedent(TARGETS))
    run = pytester.runpytest_subprocess if xdist else pytester.runpytest
    result = run(*xdist, "--junitxml=out.xml")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*_ mismatch _*",
            "the gradient check could not run: loss_fn(output, target) raised ValueError*"
            "check that the target (Tensor?3, int64?) fits the output (Tensor?8x8, float32?)*",
        ]
    )
    cases = junit(pytester.path / "out.xml")
    for name in ("classifier", "language_model"):
        assert cases[name]["gradcheck.verdict"] == "healthy"
        assert cases[name]["gradcheck.loss_source"] == "loss_fn(output, target)"


def test_a_suite_target_is_seeded_apart_from_the_batch(tmp_path: Path) -> None:
    (tmp_path / "target_factories.py").write_text(FACTORIES + TOKEN_LOSS)
    suite_file = tmp_path / "gradcheck_targets.yaml"
    suite_file.write_text(textwrap.dedent(TARGETS).replace("factories:", "target_factories:"))
    entries = {entry.name: entry for entry in load_suite(suite_file, tmp_path).entries}
    classifier = entries["classifier"]
    assert classifier.target is not None
    batch = build_batch(classifier.batch, 0)
    target = build_target(classifier.target, batch, 0)
    assert target.dtype == torch.int64
    assert target.shape == (8,)
    assert 0 <= int(target.min()) <= int(target.max()) < 8
    # Its own generator: not the draws that the batch's seed would give the same spec.
    same_seed = torch.randint(0, 8, (8,), generator=torch.Generator().manual_seed(0))
    assert not torch.equal(target, same_seed)
    assert torch.equal(target, build_target(classifier.target, build_batch(classifier.batch, 0), 0))
    language_model = entries["language_model"]
    assert language_model.target is not None
    tokens = build_batch(language_model.batch, 0)
    assert build_target(language_model.target, tokens, 0) is tokens["input_ids"]


def test_suite_items_carry_the_gradient_health_mark(pytester: pytest.Pytester) -> None:
    """``-m gradient_health`` selects every gate: marked Python tests and every suite entry."""
    write_ini(pytester)
    make_suite(pytester)
    pytester.makepyfile(
        test_plain="def test_not_a_gate():\n    pass\n",
        test_gate=(
            "from pytest_gradcheck import gradient_health\n\n\n"
            "@gradient_health\ndef test_gate(gradcheck):\n"
            "    import torch\n    gradcheck(torch.nn.Linear(4, 4), torch.randn(2, 4))\n"
        ),
    )
    result = pytester.runpytest("--collect-only", "-q", "-m", "gradient_health")
    assert sorted(line for line in result.outlines if "::" in line) == sorted(
        ["test_gate.py::test_gate", *(f"gradcheck_models.yaml::{name}" for name in IDS)]
    )


def test_an_unknown_suite_mark_warns_at_the_suite_line(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        "[pytest]\naddopts = -p no:benchmark -p no:cacheprovider\ngradcheck_device = cpu\n"
    )
    make_suite(
        pytester,
        """
        models:
          a:
            model: factories:mlp
            batch: {shape: [4, 8]}
            marks: [slwo]
        """,
    )
    result = pytester.runpytest("-W", "always::pytest.PytestUnknownMarkWarning")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "*gradcheck_models.yaml:5: PytestUnknownMarkWarning: entry 'a': unknown mark 'slwo'; "
            "is it a typo? Register it under `markers` in the ini*"
        ]
    )
    result.stdout.no_fnmatch_line("*suite.py*")
    # Warnings as errors: the suite's own collection error, at the same line.
    errors = pytester.runpytest("-W", "error::pytest.PytestUnknownMarkWarning")
    errors.assert_outcomes(errors=1)
    errors.stdout.fnmatch_lines(
        ["*gradcheck_models.yaml:5: entry 'a': marks: unknown mark 'slwo': register it*"]
    )
    errors.stdout.no_fnmatch_line("*Traceback*")
