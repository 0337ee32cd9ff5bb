"""Training-step checks: ``steps=N`` with an optimizer, ``expect_loss_decrease``, and the
promise that the user's model is never trained."""

from __future__ import annotations

import copy
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fixtures.training import regression
from pytest_gradcheck import GradcheckError, check_gradients, properties


def first_unhealthy_step(model: nn.Module, batch: Any, lr: float, steps: int) -> int | None:
    """The reference: train a copy by hand with SGD and run the single-pass check before
    every step; return the first step whose check fails."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(1, steps + 1):
        if not check_gradients(model, batch, device="cpu").ok:
            return step
        optimizer.zero_grad(set_to_none=True)
        model(*batch).backward()
        optimizer.step()
    return None


# -- the step where a problem first appears -------------------------------------------------


def test_a_learning_rate_that_explodes_is_caught_at_the_right_step() -> None:
    model, batch = regression()  # on the CPU, as the reference loop: bit-identical steps
    assert check_gradients(model, batch, device="cpu").ok  # healthy at initialisation
    expected = first_unhealthy_step(model, batch, lr=10.0, steps=8)
    assert expected is not None
    assert expected > 2

    report = check_gradients(model, batch, steps=8, optimizer="sgd", lr=10.0, device="cpu")

    assert not report.ok
    assert report.step == expected
    assert {p.step for p in report.problems} == {expected}
    # The same rules as the single-pass check, on the model as it was at that step.
    trained = copy.deepcopy(model)
    optimizer = torch.optim.SGD(trained.parameters(), lr=10.0)
    for _ in range(expected - 1):
        optimizer.zero_grad(set_to_none=True)
        trained(*batch).backward()
        optimizer.step()
    single = check_gradients(trained, batch, device="cpu")
    assert [(p.kind, p.layer, p.value) for p in report.problems] == [
        (p.kind, p.layer, p.value) for p in single.problems
    ]
    assert {p.kind for p in report.problems} <= {"exploding", "nonfinite", "dead"}
    text = report.format_failure()
    assert f"first at step {expected} of 8" in text
    assert f"checked {expected} of 8" in text
    assert ("gradcheck.step", expected) in properties.write(report)


def test_a_well_tuned_optimizer_passes_every_step() -> None:
    model, batch = regression()
    report = check_gradients(model, batch, steps=5, optimizer="adam", lr=1e-2)
    assert report.ok, report.format_failure()
    assert report.step == 5
    assert ("gradcheck.step", 5) in properties.write(report)
    assert "checked 5 of 5" in report.notes[-1]
    assert report.settings["steps"] == 5


def test_a_single_pass_has_no_step_property() -> None:
    model, batch = regression()
    report = check_gradients(model, batch, max_norm=1e-9)
    assert not report.ok
    assert [name for name, _ in properties.write(report) if name == "gradcheck.step"] == []
    assert "step" not in report.format_failure()


# -- expect_loss_decrease --------------------------------------------------------------------


def test_expect_loss_decrease_passes_when_the_model_fits_one_batch() -> None:
    model, batch = regression()
    report = check_gradients(
        model, batch, steps=5, optimizer="adam", lr=1e-2, expect_loss_decrease=True
    )
    assert report.ok, report.format_failure()
    note = report.notes[-1]
    losses = [float(v) for v in note.split("loss at each: ")[1].split(";")[0].split(", ")]
    final = float(note.split("after the last step: ")[1])
    assert len(losses) == 5
    assert final < losses[0]


def test_expect_loss_decrease_fails_when_the_optimizer_holds_other_parameters() -> None:
    model, batch = regression()
    stray = nn.Parameter(torch.zeros(3))

    def wrong_params(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.SGD([stray], lr=0.1)  # the classic bug: not the model's parameters

    report = check_gradients(
        model, batch, steps=3, optimizer=wrong_params, expect_loss_decrease=True
    )
    [problem] = report.problems
    assert problem.kind == "stalled"
    assert problem.step == 3
    assert problem.value == problem.limit  # the loss did not move at all
    assert "holds none of the model's 6 trainable parameters" in problem.hint
    assert "first at step 3 of 3" in report.format_failure()


class Linear1(nn.Module):
    """Least squares with an identity design: loss = ||w - y||^2 / 4, Hessian 0.5 * I, so
    SGD diverges (by 1.5x per step) for lr = 5 and converges for lr = 1."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Linear(4, 1, bias=False)
        with torch.no_grad():
            self.w.weight.zero_()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.w(x).squeeze(1), y)


def test_expect_loss_decrease_catches_a_learning_rate_that_makes_the_loss_rise() -> None:
    batch = (torch.eye(4), torch.tensor([1.0, -2.0, 0.5, 3.0]))
    rising = check_gradients(
        Linear1(), batch, steps=3, optimizer="sgd", lr=5.0, expect_loss_decrease=True
    )
    [problem] = rising.problems  # the gradients stay far below every ceiling
    assert problem.kind == "stalled"
    first = float(((batch[1]) ** 2).mean())
    assert problem.limit == pytest.approx(first)
    assert problem.value == pytest.approx(first * 1.5 ** (2 * 3))  # 3 steps, each x1.5 in w
    assert "the loss rises: lower the learning rate" in problem.hint

    converging = check_gradients(
        Linear1(), batch, steps=3, optimizer="sgd", lr=1.0, expect_loss_decrease=True
    )
    assert converging.ok, converging.format_failure()


# -- the user's model is never trained -------------------------------------------------------


class WithBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.head(torch.relu(self.bn(self.fc(x)))), y)


def test_steps_leave_the_model_and_the_users_optimizer_exactly_as_they_were() -> None:
    torch.manual_seed(0)
    model = WithBatchNorm()
    batch = (torch.randn(16, 8), torch.randn(16, 4))
    users = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(*batch).backward()
    users.step()  # the user's optimizer has state, the parameters have gradients
    model.eval()
    state = copy.deepcopy(model.state_dict())
    grads = {name: p.grad for name, p in model.named_parameters()}
    grad_values = {name: g.clone() for name, g in grads.items() if g is not None}
    params = {name: p for name, p in model.named_parameters()}
    optimizer_state = copy.deepcopy(users.state_dict())
    rng = torch.get_rng_state()

    report = check_gradients(
        model, batch, steps=4, optimizer="adamw", lr=0.5, expect_loss_decrease=True
    )

    assert report.settings["steps"] == 4
    for key, value in model.state_dict().items():  # parameters and BatchNorm buffers
        assert torch.equal(value, state[key]), key
    for name, p in model.named_parameters():
        assert p is params[name]
        assert p.grad is grads[name]  # the very same tensor, with the same values
        assert torch.equal(p.grad, grad_values[name])
    assert not model.training
    assert not model.bn.training
    after = users.state_dict()
    assert after["param_groups"] == optimizer_state["param_groups"]
    for index, entry in optimizer_state["state"].items():
        for key, value in entry.items():
            assert torch.equal(after["state"][index][key], value)
    assert torch.equal(torch.get_rng_state(), rng)


def test_steps_restore_the_model_when_the_check_fails_midway() -> None:
    model, batch = regression()
    state = copy.deepcopy(model.state_dict())
    report = check_gradients(model, batch, steps=8, optimizer="sgd", lr=10.0)
    assert not report.ok
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(p.grad is None for p in model.parameters())


# -- bad settings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"optimizer": "rmsprop"}, "optimizer must be one of sgd, adam, adamw"),
        ({"lr": -1}, "lr must be a positive number"),
        (
            {"optimizer": lambda params: torch.optim.SGD(params, lr=0.1), "lr": 0.1},
            "has no effect with an optimizer factory",
        ),
        ({"steps": 2, "optimizer": lambda params: "adam"}, "returned str, not a torch.optim"),
    ],
)
def test_bad_training_settings_fail_early(settings: dict[str, Any], message: str) -> None:
    model, batch = regression()
    with pytest.raises(GradcheckError, match=message):
        check_gradients(model, batch, **settings)


# -- the marker, end to end ------------------------------------------------------------------

MARKED = """
import pytest
import torch

from fixtures.training import regression

torch.set_num_threads(1)


@pytest.mark.gradient_health(steps=3, optimizer="sgd", lr=0.1, expect_loss_decrease=True)
def test_tuned(gradcheck):
    model, batch = regression()
    report = gradcheck(model, batch)
    assert report.step == 3


@pytest.mark.gradient_health(steps=8, optimizer="sgd", lr=10.0)
def test_too_fast(gradcheck):
    model, batch = regression()
    gradcheck(model, batch)
"""


def test_the_marker_runs_training_steps_end_to_end(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    pytester.syspathinsert(str(Path(__file__).resolve().parents[1]))  # for fixtures.training
    pytester.makeini(
        textwrap.dedent(
            """
            [pytest]
            addopts = --strict-markers -p no:benchmark -p no:randomly
            filterwarnings =
                error
            gradcheck_device = cpu
            """
        )
    )
    pytester.makepyfile(test_steps=MARKED)
    result = pytester.runpytest("--junitxml=out.xml", "--gradcheck-optimizer", "adam")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*gradient check failed:*first at step * of 8*", "*sgd (lr 10)*"])
    root = ET.parse(pytester.path / "out.xml").getroot()
    properties = {
        case.get("name"): {p.get("name"): p.get("value") for p in case.iter("property")}
        for case in root.iter("testcase")
    }
    assert properties["test_tuned"]["gradcheck.step"] == "3"
    assert properties["test_tuned"]["gradcheck.verdict"] == "healthy"
    assert properties["test_too_fast"]["gradcheck.verdict"] == "unhealthy"
    assert 2 < int(properties["test_too_fast"]["gradcheck.step"]) <= 8


def test_the_command_line_takes_the_training_settings(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest("--gradcheck-steps", "0")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--gradcheck-steps*steps must be an integer >= 1*"])
    result = pytester.runpytest(
        "--gradcheck-steps", "3", "--gradcheck-optimizer", "SGD", "--gradcheck-lr", "0.5"
    )
    result.assert_outcomes(passed=1)
