"""The ``gradcheck.*`` JUnit properties: written and read back by :mod:`pytest_gradcheck.properties`.

Plain data only: no pytest run, no torch.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pytest_gradcheck.properties import PREFIX, RecordedCheck, read, write
from pytest_gradcheck.results import LayerStats, ParamStats, Problem, Report


def _param(layer: str, norm: float) -> ParamStats:
    return ParamStats(
        f"{layer}.weight", layer, (4, 4), "float32", 16, True, norm, norm, 0.0, 0, 0, 1.0
    )


def _report(steps: int = 1, precision: str = "fp32") -> Report:
    layers = tuple(
        LayerStats(name, "Linear", depth, (_param(name, norm),))
        for depth, (name, norm) in enumerate([("0", 1e-9), ("2", 0.5)])
    )
    problem = Problem("vanishing", "0", None, 1e-9, 1e-6, "gradient norm below the floor")
    return Report(
        layers=layers,
        problems=(problem,),
        device="cpu",
        seconds=0.123456,
        frozen_params=2,
        loss_source="loss_fn(output, target)",
        settings={"steps": steps, "precision": precision},
    )


def test_the_first_check_has_the_plain_names() -> None:
    assert write(_report()) == [
        ("gradcheck.verdict", "unhealthy"),
        ("gradcheck.problems", "vanishing:0"),
        ("gradcheck.min_grad_norm", "1e-09"),
        ("gradcheck.max_grad_norm", "0.5"),
        ("gradcheck.worst_layer", "0"),
        ("gradcheck.device", "cpu"),
        ("gradcheck.precision", "fp32"),
        ("gradcheck.steps", 1),
        ("gradcheck.loss_source", "loss_fn(output, target)"),
        ("gradcheck.frozen_params", 2),
        ("gradcheck.seconds", 0.1235),
    ]
    assert write(_report(steps=3))[-1] == ("gradcheck.step", 3)


def test_later_checks_and_extra_keys_carry_the_check_number_once() -> None:
    extra = [("profile", '{"0":1e-09}'), ("baseline", "new"), ("plot", "charts/a.png")]
    names = [name for name, _ in write(_report(), 2, extra)]
    assert names[0] == "gradcheck.verdict.2"
    assert names[-3:] == ["gradcheck.profile.2", "gradcheck.baseline.2", "gradcheck.plot.2"]
    assert all(name.startswith(PREFIX) and name.endswith(".2") for name in names)


def test_read_gives_back_each_check_as_text() -> None:
    pairs = [
        ("other", "ignored"),
        *write(_report()),
        *write(_report(steps=3), 2, [("plot", "charts/b.png")]),
        ("gradcheck.note.3", "no verdict: not a check"),
    ]
    first, second = read(pairs)
    assert first == RecordedCheck(
        number=1,
        verdict="unhealthy",
        problems=("vanishing:0",),
        worst_layer="0",
        min_grad_norm="1e-09",
        max_grad_norm="0.5",
        device="cpu",
        precision="fp32",
        steps="1",
        loss_source="loss_fn(output, target)",
        frozen_params="2",
        seconds="0.1235",
    )
    assert (second.number, second.step, second.plot) == (2, "3", "charts/b.png")
    assert first.setup_text() == "cpu, fp32, loss: loss_fn(output, target), 2 frozen"
    assert second.setup_text() == "cpu, fp32, 3 steps, loss: loss_fn(output, target), 2 frozen"


def test_a_record_without_the_setup_keys_gives_what_it_holds() -> None:
    """A JUnit file of an earlier version has no precision, steps, loss or frozen count."""
    (old,) = read([("gradcheck.verdict", "healthy"), ("gradcheck.device", "cuda")])
    assert old.setup_text() == "cuda"
    (bf16,) = read(write(_report(steps=5, precision="bf16")))
    assert bf16.setup_text() == "cpu, bf16, 5 steps, loss: loss_fn(output, target), 2 frozen"


@given(st.lists(st.integers(min_value=1, max_value=50), unique=True, max_size=6))
def test_read_inverts_write(numbers: list[int]) -> None:
    pairs = [pair for number in numbers for pair in write(_report(), number, [("baseline", "new")])]
    recorded = read(pairs)
    assert [check.number for check in recorded] == sorted(numbers)
    assert all(check.baseline == "new" and check.verdict == "unhealthy" for check in recorded)
