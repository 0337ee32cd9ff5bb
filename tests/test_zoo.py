"""The reference zoo: every pathology is flagged with its kind, no healthy model is flagged."""

from __future__ import annotations

import pytest

from fixtures import nonfinite
from fixtures.zoo import CASES, ZooCase, case
from pytest_gradcheck import check_gradients


def _params(slow: bool) -> list[object]:
    return [
        pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.slow else [])
        for c in CASES
        if c.slow == slow
    ]


def _check(zoo_case: ZooCase) -> tuple[set[str], dict[str, set[str]], object]:
    model, batch = zoo_case.build()
    report = check_gradients(model, batch, loss_fn=zoo_case.loss_fn)
    kinds = {p.kind for p in report.problems}
    flagged: dict[str, set[str]] = {}
    for problem in report.problems:
        flagged.setdefault(problem.kind, set()).add(problem.layer)
    return kinds, flagged, report


def _assert_verdict(zoo_case: ZooCase) -> None:
    kinds, flagged, report = _check(zoo_case)
    if zoo_case.label == "healthy":
        assert not kinds, f"{zoo_case.name} is healthy but was flagged:\n{report}"
        return
    assert zoo_case.label in kinds, f"{zoo_case.name}: expected {zoo_case.label}, got {kinds}"
    missing = set(zoo_case.expected_layers) - flagged[zoo_case.label]
    assert not missing, f"{zoo_case.name}: {sorted(missing)} not flagged {zoo_case.label}"


@pytest.mark.parametrize("zoo_case", _params(slow=False))
def test_small_zoo(zoo_case: ZooCase) -> None:
    _assert_verdict(zoo_case)


@pytest.mark.parametrize("zoo_case", _params(slow=True))
def test_transformers_zoo(zoo_case: ZooCase) -> None:
    pytest.importorskip("transformers")
    _assert_verdict(zoo_case)


def test_zoo_covers_the_literature() -> None:
    pathologies = [c for c in CASES if c.label != "healthy"]
    healthy_real = [c for c in CASES if c.label == "healthy" and c.slow]
    assert len(pathologies) >= 12
    assert len(healthy_real) >= 10
    for pathology in pathologies:
        assert pathology.twin is not None, pathology.name
        twin = case(pathology.twin)
        assert twin.label == "healthy", (pathology.name, twin.name)


@pytest.mark.parametrize("nan_case", nonfinite.CASES, ids=lambda c: c.name)
def test_nonfinite_cases_fail_and_their_fixes_pass(nan_case: nonfinite.NonfiniteCase) -> None:
    model, batch = nan_case.build()
    report = check_gradients(model, batch, loss_fn=nan_case.loss_fn)
    assert "nonfinite" in {p.kind for p in report.problems}
    assert report.diagnosis, "the origin search ran"
    model, batch = nan_case.build_healthy()
    assert check_gradients(model, batch, loss_fn=nan_case.fixed_loss_fn).ok


# -- remedies that cure: the first remedy of a failure names what its healthy twin changed ----


def _first_remedy(hint: str) -> str:
    return hint.split("; ")[0]


@pytest.mark.parametrize(
    "zoo_case", [c for c in CASES if c.label != "healthy" and not c.slow], ids=lambda c: c.name
)
def test_the_first_remedy_names_the_twins_cure(zoo_case: ZooCase) -> None:
    assert zoo_case.cure, f"{zoo_case.name}: give the case the cure its twin applies"
    model, batch = zoo_case.build()
    report = check_gradients(model, batch, loss_fn=zoo_case.loss_fn)
    first = next(p for p in report.problems if p.kind == zoo_case.label)
    assert zoo_case.cure in _first_remedy(first.hint), (zoo_case.name, first.hint)


@pytest.mark.parametrize("nan_case", nonfinite.CASES, ids=lambda c: c.name)
def test_the_nan_origins_first_remedy_names_the_fix(nan_case: nonfinite.NonfiniteCase) -> None:
    from pytest_gradcheck.diagnosis import diagnose_nonfinite
    from pytest_gradcheck.passes import call

    assert nan_case.cure, f"{nan_case.name}: give the case the cure its fix applies"
    model, batch = nan_case.build()
    diagnosis = diagnose_nonfinite(model, lambda: nan_case.loss_fn(call(model, batch)))
    assert diagnosis.hints, nan_case.name
    assert nan_case.cure in diagnosis.hints[0], (nan_case.name, diagnosis.hints)


def test_a_remedy_never_contradicts_the_models_structure() -> None:
    """No failure of the zoo advises normalization to a model that has it, nor the loss scale
    when the loss is unit-scale."""
    for zoo_case in (c for c in CASES if c.label in ("vanishing", "exploding") and not c.slow):
        model, batch = zoo_case.build()
        report = check_gradients(model, batch, loss_fn=zoo_case.loss_fn)
        has_norm = any("Norm" in type(m).__name__ for m in model.modules())
        for problem in report.problems:
            if has_norm:
                assert "add normalization" not in problem.hint, (zoo_case.name, problem.hint)
                assert "add BatchNorm or LayerNorm" not in problem.hint, zoo_case.name
            if zoo_case.loss_fn is None:
                assert "check the loss scale" not in problem.hint, (zoo_case.name, problem.hint)
