"""Mixed precision: fp16/bf16 autocast passes compared with fp32 (underflow, overflow), the
GradScaler and its collapse, fp16 parameters, and the settings that go with them."""

from __future__ import annotations

import copy

import pytest
import torch

from fixtures.training import huge_loss, tiny_loss
from fixtures.zoo import case
from pytest_gradcheck import GradcheckError, check_gradients, training

LAYERS = ["layers.0", "layers.2", "layers.4"]


@pytest.fixture(scope="module")
def fp16() -> None:
    """Skip where this torch has no fp16 autocast on the CPU (older releases: bf16 only)."""
    try:
        training._autocast(torch.device("cpu"), "fp16")
    except GradcheckError as exc:
        pytest.skip(f"no fp16 autocast on this CPU: {exc}")


# -- underflow ------------------------------------------------------------------------------


def test_fp16_autocast_underflow_is_caught_and_named(fp16: None) -> None:
    model, batch = tiny_loss(1e-4)
    report = check_gradients(model, batch, precision="fp16", device="cpu")
    assert [p.kind for p in report.problems] == ["underflow"] * 3
    assert [p.layer for p in report.problems] == LAYERS
    for problem in report.problems:
        assert problem.value == 1.0  # the fraction of exact zeros
        assert "100% of the gradient values are exact zeros in fp16 autocast, 0% in fp32" in (
            problem.message
        )
    assert "GradScaler" in report.problems[0].hint
    assert "bf16" in report.problems[0].hint
    assert "dead" not in report.problem_summary()  # the zeros are explained, not dead layers


def test_the_bf16_and_fp32_twins_and_a_sensible_loss_pass(fp16: None) -> None:
    model, batch = tiny_loss(1e-4)
    assert check_gradients(model, batch, precision="bf16", device="cpu").ok
    assert check_gradients(model, batch, precision="fp32", device="cpu").ok
    model, batch = tiny_loss(1.0)
    assert check_gradients(model, batch, precision="fp16", device="cpu").ok


def test_a_grad_scaler_cures_the_underflow_and_a_small_scale_does_not(fp16: None) -> None:
    model, batch = tiny_loss(1e-4)
    report = check_gradients(model, batch, precision="fp16", grad_scaler=True, device="cpu")
    assert report.ok, report.format_failure()
    assert "GradScaler: initial scale 65536, now 65536" in report.notes[-1]

    small = check_gradients(model, batch, precision="fp16", grad_scaler=4.0, device="cpu")
    assert [p.kind for p in small.problems] == ["underflow"] * 3
    assert "the loss scale 4 is too small" in small.problems[0].hint
    assert "grad_scaler=1024" in small.problems[0].hint


def test_fp16_parameters_underflow_instead_of_dying(fp16: None) -> None:
    zoo = case("fp16_underflow")
    model, batch = zoo.build()
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    plain = check_gradients(model, batch, loss_fn=zoo.loss_fn, device="cpu")
    assert {p.kind for p in plain.problems} == {"dead"}  # without the fp32 comparison

    report = check_gradients(model, batch, loss_fn=zoo.loss_fn, precision="fp16", device="cpu")
    assert {p.kind for p in report.problems} == {"underflow"}
    assert sorted({p.layer for p in report.problems}) == sorted(zoo.expected_layers)
    # the fp32 comparison upcast the model for one pass and gave it back as it was
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert all(p.grad is None for p in model.parameters())

    scaled = case("fp16_loss_scaled")
    model, batch = scaled.build()
    assert check_gradients(model, batch, loss_fn=scaled.loss_fn, precision="fp16").ok


# -- overflow and a collapsed loss scale ------------------------------------------------------


def test_fp16_overflow_is_reported_as_finite_in_fp32(fp16: None) -> None:
    model, batch = huge_loss(1e7)
    report = check_gradients(model, batch, precision="fp16", device="cpu", diagnose=False)
    assert report.problems
    assert {p.kind for p in report.problems} == {"nonfinite"}
    for problem in report.problems:
        assert "in fp16 autocast, all finite in fp32" in problem.message
        assert "fp16 overflows above 65504: use bf16" in problem.hint
    assert "hint (nonfinite): fp16 overflows above 65504" in report.format_failure()
    assert check_gradients(model, batch, precision="bf16", device="cpu").ok


def test_a_collapsed_loss_scale_is_reported(fp16: None) -> None:
    model, batch = huge_loss(1e7)
    report = check_gradients(
        model, batch, precision="fp16", grad_scaler=True, device="cpu", diagnose=False
    )
    first = report.problems[0]
    assert first.kind == "nonfinite"
    assert first.layer == "<loss scale>"
    assert first.value == 0.5  # 65536 halved 17 times: every scale down to 1 overflowed
    assert "collapsed from 65536 to 0.5 after 17 overflowing passes" in first.message
    assert "bf16" in first.hint
    assert "17 overflowing pass(es) skipped" in report.notes[-1]


def test_an_overflow_that_a_scale_cures_is_not_a_problem(fp16: None) -> None:
    # dL/d output = 1.0 fits fp16, but times the default scale 65536 it overflows: GradScaler
    # backs off, as in training, and the check passes at the scale that fits.
    model, batch = huge_loss(16384.0)
    report = check_gradients(model, batch, precision="fp16", grad_scaler=True, device="cpu")
    assert report.ok, report.format_failure()
    note = report.notes[-1]
    assert "initial scale 65536" in note
    assert "0 overflowing" not in note


# -- with steps, non-invasive, settings -------------------------------------------------------


def test_precision_with_training_steps(fp16: None) -> None:
    model, batch = tiny_loss(1.0)
    state = copy.deepcopy(model.state_dict())
    report = check_gradients(
        model, batch, precision="bf16", steps=3, optimizer="sgd", lr=0.1, device="cpu"
    )
    assert report.ok, report.format_failure()
    report = check_gradients(
        model, batch, precision="fp16", grad_scaler=True, steps=3, expect_loss_decrease=True
    )
    assert report.ok, report.format_failure()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])
    underflow = check_gradients(tiny_loss(1e-4)[0], batch, precision="fp16", steps=3)
    assert {p.step for p in underflow.problems} == {1}


def test_unsupported_autocast_names_the_alternative(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(training, "_autocast_active", lambda kind, dtype: False)
    model, batch = tiny_loss(1.0)
    with pytest.raises(GradcheckError, match=r"precision='fp16' needs torch.autocast.*bf16"):
        check_gradients(model, batch, precision="fp16", device="cpu")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"precision": "fp8"}, "precision must be fp32, fp16 or bf16"),
        ({"grad_scaler": True}, r"grad_scaler=True .* needs precision='fp16'"),
        ({"precision": "bf16", "grad_scaler": 1024}, "needs precision='fp16'"),
        ({"precision": "fp16", "grad_scaler": -2}, "an initial loss scale"),
    ],
)
def test_bad_precision_settings_fail_early(settings: dict[str, object], message: str) -> None:
    model, batch = tiny_loss(1.0)
    with pytest.raises(GradcheckError, match=message):
        check_gradients(model, batch, **settings)


def test_precision_aliases() -> None:
    model, batch = tiny_loss(1.0)
    report = check_gradients(model, batch, precision="bfloat16", device="cpu")
    assert report.settings["precision"] == "bf16"


class Embedded(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(1000, 16)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids)).float().square().mean()


def test_the_fp32_comparison_runs_only_when_the_low_precision_pass_looks_wrong(
    fp16: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    original = training.Training._fp32_pass

    def counted(self: training.Training, *args: object) -> object:
        calls.append(1)
        return original(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(training.Training, "_fp32_pass", counted)
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (8, 4))  # 32 of 1000 rows looked up: 97% exact zeros
    report = check_gradients(Embedded(), ids, precision="fp16", device="cpu")
    assert report.ok, report.format_failure()
    assert report.layer("embed").zero_fraction > 0.9
    assert calls == []  # an embedding's zeros are its own, in fp32 too
    model, batch = tiny_loss(1e-4)
    assert not check_gradients(model, batch, precision="fp16", device="cpu").ok
    assert calls == [1]
