"""Known-broken models: each fails the gate, and the failure says where and why.

They are marked ``xfail(strict=True)`` so that the demo run exits 0 while still showing
each diagnosis in the gradcheck summary; remove the mark to see a real failure.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fixtures.models import mlp
from pytest_gradcheck import GradientHealthError, gradient_health

broken = pytest.mark.xfail(strict=True, raises=GradientHealthError, reason="known broken")


@broken
@gradient_health
def test_deep_sigmoid_mlp_vanishes(gradcheck) -> None:
    torch.manual_seed(0)
    gradcheck(mlp(10, 64, "sigmoid"), torch.randn(32, 64))


class LogFeatures(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.log(torch.relu(self.encoder(x)))  # log(0) for every inactive unit
        return self.head(features)


@broken
@gradient_health
def test_log_of_relu_is_nonfinite(gradcheck) -> None:
    torch.manual_seed(0)
    gradcheck(LogFeatures(), torch.randn(8, 16))


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)
        self.aux_head = nn.Linear(16, 4)  # defined, never called

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


@broken
@gradient_health
def test_forgotten_head_is_unused(gradcheck) -> None:
    torch.manual_seed(0)
    gradcheck(TwoHeads(), torch.randn(8, 16))


@broken
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
    gradcheck(Recurrent(), torch.randn(4, 64, 8))
