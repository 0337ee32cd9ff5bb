"""pytest-gradcheck: fail a test when a model's gradients vanish, explode, go non-finite,
die or go unused.

Importing this package does not import torch (nor pytest): the names below load lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .results import (
    KINDS,
    GradcheckError,
    GradcheckTimeout,
    GradcheckWarning,
    GradientHealthError,
    LayerStats,
    ParamStats,
    Problem,
    Report,
)
from .settings import Settings

if TYPE_CHECKING:
    import pytest

    from .api import check_gradients

    gradient_health: pytest.MarkDecorator

__all__ = [
    "KINDS",
    "GradcheckError",
    "GradcheckTimeout",
    "GradcheckWarning",
    "GradientHealthError",
    "LayerStats",
    "ParamStats",
    "Problem",
    "Report",
    "Settings",
    "check_gradients",
    "gradient_health",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "check_gradients":
        from .api import check_gradients

        return check_gradients
    if name == "gradient_health":
        import pytest

        return pytest.mark.gradient_health
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
