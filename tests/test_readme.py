"""The README's first test, copied as a new user would, runs and passes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("inner_environment")  # runs pytest in-process

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readmes_first_test_for_a_classifier_with_labels_runs(
    pytester: pytest.Pytester,
) -> None:
    install = README.read_text().split("## Install", 1)[1].split("\n## ", 1)[0]
    [code] = re.findall(r"```python\n(.*?)```", install, re.S)
    assert "target=labels" in code
    pytester.makeini(
        "[pytest]\naddopts = -p no:benchmark\nfilterwarnings = error\ngradcheck_device = cpu\n"
    )
    pytester.makepyfile(test_first=code)
    result = pytester.runpytest("-p", "no:cacheprovider", "--junitxml=out.xml")
    result.assert_outcomes(passed=1)
    assert 'name="gradcheck.verdict" value="healthy"' in (pytester.path / "out.xml").read_text()


def test_the_readmes_complete_policy_file_loads_and_matches_the_schema(tmp_path: Path) -> None:
    """pip does not install examples/: the policy a user copies from the README must load."""
    from pytest_gradcheck.policy import load_policy

    [text] = [
        block
        for block in re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S)
        if block.startswith("# yaml-language-server: $schema=policy.schema.json")
    ]
    team = tmp_path / "team" / "gradcheck-policy.yaml"
    team.parent.mkdir()
    team.write_text(text)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "gradcheck-policy.yaml").write_text("settings: {ceiling_norm: 1.0e+6}\n")
    policy = load_policy(team)
    assert set(policy.conventions) == {
        "saturating_chain",
        "normalized_stacks",
        "init_scale",
        "no_unused_parameters",
        "must_train",
        "max_parameters",
    }
    assert [rule.pattern for rule in policy.rules][:3] == [
        "*.embeddings.*",
        r"re:.*\.(query|key)$",
        "*.pooler.*",
    ]
    jsonschema = pytest.importorskip("jsonschema")
    import json

    import yaml

    schema = json.loads(
        (README.parent / "pytest_gradcheck" / "schema" / "policy.schema.json").read_text()
    )
    jsonschema.validate(yaml.safe_load(text), schema)
