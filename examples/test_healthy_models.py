"""Healthy models pass the gate with the default settings.

Two styles: call the ``gradcheck`` fixture yourself, or mark a test that has ``model``
and ``batch`` fixtures and let the plugin run the check after the test body.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fixtures.models import SmallCNN, TinyTransformer
from pytest_gradcheck import gradient_health


class ResidualMLP(nn.Module):
    """Pre-norm residual MLP: the textbook cure for deep-network vanishing gradients."""

    def __init__(self, width: int = 32, depth: int = 12) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())
            for _ in range(depth)
        )
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


# Style 1: call the fixture. It returns the report, or fails the test with a diagnosis.
@gradient_health(max_norm=1e3)
def test_residual_mlp(gradcheck) -> None:
    torch.manual_seed(0)
    report = gradcheck(ResidualMLP(), torch.randn(16, 32))
    assert len(report.layers) == 2 * 12 + 1  # a LayerNorm and a Linear per block, the head


@gradient_health
def test_small_cnn_with_batchnorm(gradcheck) -> None:
    torch.manual_seed(0)
    gradcheck(SmallCNN(), torch.randn(8, 3, 32, 32))


@gradient_health
def test_lstm_classifier(gradcheck) -> None:
    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(8, 32, batch_first=True)
            self.head = nn.Linear(32, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.lstm(x)
            return self.head(out[:, -1])

    torch.manual_seed(0)
    model = Classifier()
    labels = torch.randint(0, 4, (16,))
    gradcheck(
        model,
        torch.randn(16, 20, 8),
        loss_fn=lambda logits: nn.functional.cross_entropy(logits, labels),
    )


# Style 2: the module provides ``model`` and ``batch``; the marker is all the test needs.
@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return TinyTransformer()


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.randint(0, 100, (4, 16))


@gradient_health(seed=1)
def test_tiny_transformer(model: nn.Module) -> None:
    assert model.training  # the test body runs first; the check follows
