"""Known-broken models: each fails the gate, and the failure says where and why.

Each test asserts that the gate rejects its model and prints the diagnosis (``-rP`` shows
it), so that the demo exits 0. In your own suite, a plain ``gradcheck(model, batch)``
call fails the test with exactly this text.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fixtures.models import mlp
from pytest_gradcheck import GradientHealthError, gradient_health


def rejected(gradcheck, model: nn.Module, batch: torch.Tensor, kind: str) -> None:
    """The gate must reject ``model`` with a ``kind`` problem; show what a user would see."""
    with pytest.raises(GradientHealthError) as failure:
        gradcheck(model, batch)
    assert kind in {p.kind for p in failure.value.report.problems}
    print(failure.value)


@gradient_health
def test_deep_sigmoid_mlp_vanishes(gradcheck) -> None:
    torch.manual_seed(0)
    rejected(gradcheck, mlp(10, 64, "sigmoid"), torch.randn(32, 64), "vanishing")


class LogFeatures(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.log(torch.relu(self.encoder(x)))  # log(0) for every inactive unit
        return self.head(features)


@gradient_health
def test_log_of_relu_is_nonfinite(gradcheck) -> None:
    torch.manual_seed(0)
    rejected(gradcheck, LogFeatures(), torch.randn(8, 16), "nonfinite")


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)
        self.aux_head = nn.Linear(16, 4)  # defined, never called

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


@gradient_health
def test_forgotten_head_is_unused(gradcheck) -> None:
    torch.manual_seed(0)
    rejected(gradcheck, TwoHeads(), torch.randn(8, 16), "unused")


@gradient_health
def test_vanilla_rnn_explodes(gradcheck) -> None:
    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.RNN(8, 32, batch_first=True)
            with torch.no_grad():
                nn.init.orthogonal_(self.rnn.weight_hh_l0)
                self.rnn.weight_hh_l0.mul_(3.0)  # spectral radius 3
            self.head = nn.Linear(32, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.rnn(x)
            return self.head(out.mean(1))

    torch.manual_seed(0)
    rejected(gradcheck, Recurrent(), torch.randn(4, 64, 8), "exploding")
