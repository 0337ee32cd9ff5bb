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
