"""Losses that need targets: ``loss_fn(output, target)`` from the API, the ``gradcheck``
fixture and the automatic check's ``target`` fixture, with clear errors when the two do not
go together."""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pytest_gradcheck import GradcheckError, check_gradients

pytestmark = pytest.mark.usefixtures("inner_environment")  # runs pytest in-process


def classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def test_the_target_reaches_the_loss_and_gives_the_loss_value_of_the_labels() -> None:
    model = classifier()
    x, y = torch.randn(6, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    report = check_gradients(model, x, target=y, loss_fn=F.cross_entropy)
    assert report.ok
    assert report.loss == pytest.approx(float(F.cross_entropy(model(x), y).detach()), rel=1e-6)
    assert report.settings["loss_fn"] == "loss_fn(output, target) with cross_entropy"
    other = check_gradients(
        model, x, target=torch.tensor([2, 2, 2, 2, 2, 2]), loss_fn=F.cross_entropy
    )
    assert other.loss != report.loss, "the labels decide the loss"


def test_a_nested_target_is_moved_like_the_batch() -> None:
    moved: list[torch.device] = []

    def loss(output: torch.Tensor, target: dict[str, torch.Tensor]) -> torch.Tensor:
        moved.append(target["labels"].device)
        return F.cross_entropy(output, target["labels"])

    check_gradients(
        classifier(),
        torch.randn(4, 8),
        target={"labels": torch.tensor([0, 1, 2, 0])},
        loss_fn=loss,
        device="cpu",
    )
    assert moved
    assert all(device.type == "cpu" for device in moved)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": torch.tensor([0, 1])}, r"target= needs a loss that takes it: pass loss_fn="),
        ({"loss_fn": F.cross_entropy}, r"loss_fn=cross_entropy takes a target .* pass target="),
        (
            {"target": torch.tensor([0, 1, 2]), "loss_fn": F.cross_entropy},
            r"loss_fn\(output, target\) raised ValueError.*the target \(Tensor\[3, int64\]\) "
            r"fits the output \(Tensor\[4x3, float32\]\)",
        ),
        (
            {"target": torch.tensor([0, 1, 2, 0]), "loss_fn": F.cross_entropy, "distributed": 2},
            r"target= with distributed=2 is not supported",
        ),
    ],
    ids=["target-without-loss", "loss-without-target", "shape-mismatch", "distributed"],
)
def test_a_target_and_a_loss_that_do_not_go_together_are_a_clear_error(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(GradcheckError, match=message):
        check_gradients(classifier(), torch.randn(4, 8), **kwargs)  # type: ignore[arg-type]


def test_the_fixture_and_the_automatic_check_take_a_target(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        "[pytest]\naddopts = -p no:benchmark\nfilterwarnings = error\ngradcheck_device = cpu\n"
    )
    pytester.makepyfile(
        test_cls=textwrap.dedent(
            """
            import pytest
            import torch
            import torch.nn.functional as F
            from torch import nn

            torch.set_num_threads(1)


            def make():
                torch.manual_seed(0)
                return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


            def test_fixture(gradcheck):
                inputs, target = torch.randn(6, 8), torch.tensor([0, 1, 2, 0, 1, 2])
                report = gradcheck(make(), inputs, target=target, loss_fn=F.cross_entropy)
                assert report.settings["loss_fn"].endswith("cross_entropy")


            @pytest.fixture
            def model():
                return make()


            @pytest.fixture
            def batch():
                return torch.randn(6, 8)


            @pytest.fixture
            def target():
                return torch.tensor([0, 1, 2, 0, 1, 2])


            @pytest.mark.gradient_health(loss_fn=F.cross_entropy)
            def test_automatic(model, batch, target):
                pass
            """
        )
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
