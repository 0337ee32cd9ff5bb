"""One seeded forward/backward pass: calling the model on the batch, its loss, backward.

:func:`call` calls ``model(batch)``, ``model(*batch)`` or ``model(**batch)``;
:func:`compute_loss` picks the loss (``loss_fn``, the model's own, a
``pytest_gradcheck_default_loss`` hook's, or the seeded default projection);
:func:`forward_backward` runs both and backward under autocast or a GradScaler when asked.
Errors raised by the user's code name the user's frame (:func:`user_error`).

Imports torch, hooks, facts (the user-frame finder), tensors, results and settings.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, NamedTuple

import torch
from torch import nn

from .facts import user_location
from .hooks import current_hook
from .results import GradcheckError
from .settings import Settings
from .tensors import describe, tensors
from .wrappers import unwrap

__all__ = [
    "Pass",
    "call",
    "compute_loss",
    "forward_backward",
    "pick_loss",
    "reseed",
    "user_error",
    "with_target",
]


def reseed(seed: int, device: torch.device) -> None:
    """Seed the generators a pass on ``device`` draws from: the CPU's and that device's.

    (``torch.manual_seed`` seeds every backend there is, which costs 0.2 ms per call.)
    """
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)
    elif device.type == "mps":
        torch.mps.manual_seed(seed)


class Pass(NamedTuple):
    """What one forward/backward pass leaves besides the gradients."""

    loss: float
    graph: Any
    """The loss's autograd node (the graph's structure outlives backward, its saved tensors
    do not)."""
    small_batchnorm: list[tuple[str, int]]
    """Train-mode BatchNorm layers that saw too few values per channel: ``(path, count)``."""
    loss_source: str
    """Where the loss came from (:func:`pick_loss`)."""


def forward_backward(
    model: nn.Module,
    modules: Sequence[tuple[str, nn.Module]],
    batch: Any,
    settings: Settings,
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
    scaler: Any = None,
    before_backward: Callable[[], None] = lambda: None,
) -> Pass:
    """Run forward, loss and backward; return the loss, its autograd node, the train-mode
    BatchNorm layers that saw too few values per channel to give meaningful gradients and
    where the loss came from.

    Forward and loss run under ``autocast()``; backward of ``scaler.scale(loss)`` with a
    GradScaler. ``before_backward`` runs between the two (the activation recorder's)."""
    __tracebackhide__ = True
    small_batchnorm: list[tuple[str, int]] = []
    handles = [
        module.register_forward_pre_hook(_batchnorm_hook(name, small_batchnorm))
        for name, module in modules
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training
    ]
    try:
        with torch.enable_grad():
            with autocast():
                output = call(model, batch)
                loss, source = pick_loss(output, settings, unwrap(model))
            before_backward()
            try:
                (loss if scaler is None else scaler.scale(loss)).backward()
            except RuntimeError as exc:
                raise GradcheckError(user_error("backward pass", exc)) from None
    finally:
        for handle in handles:
            handle.remove()
    return Pass(float(loss.detach().float().cpu()), loss.grad_fn, small_batchnorm, source)


def _batchnorm_hook(
    name: str, small: list[tuple[str, int]]
) -> Callable[[nn.Module, tuple[Any, ...]], None]:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() > 1:
            x = args[0]
            per_channel = x.numel() // max(1, x.shape[1])
            if per_channel <= 2 and all(seen != name for seen, _ in small):
                small.append((name or "<root>", per_channel))

    return hook


def call(model: nn.Module, batch: Any) -> Any:
    __tracebackhide__ = True
    call: Callable[[], Any]
    if isinstance(batch, Mapping):
        how, call = "model(**batch)", lambda: model(**batch)
    elif isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        how, call = "model(*batch)", lambda: model(*batch)
    else:
        how, call = "model(batch)", lambda: model(batch)
    try:
        return call()
    except Exception as exc:
        raise GradcheckError(
            user_error(f"the forward pass ({how} with batch={describe(batch)})", exc)
            + "; check that the sample batch matches what the model's forward expects"
        ) from None


def compute_loss(output: Any, settings: Settings, model: nn.Module | None = None) -> torch.Tensor:
    """The loss: ``loss_fn``, the model's own, a ``pytest_gradcheck_default_loss`` hook's
    (given ``model``), else the seeded default."""
    __tracebackhide__ = True
    return pick_loss(output, settings, model)[0]


def pick_loss(
    output: Any, settings: Settings, model: nn.Module | None = None
) -> tuple[torch.Tensor, str]:
    """The loss (as :func:`compute_loss`) and where it came from, as the reports name it:
    ``loss_fn``, ``loss_fn(output, target)``, ``scalar output``, ``output.loss``,
    ``output['loss']``, ``pytest_gradcheck_default_loss hook`` or ``default projection``."""
    __tracebackhide__ = True
    if settings.loss_fn is not None:
        try:
            loss = settings.loss_fn(output)
        except GradcheckError:
            raise
        except Exception as exc:
            raise GradcheckError(user_error("loss_fn(output)", exc)) from None
        where = getattr(settings.loss_fn, "__qualname__", "loss_fn(output)")
        where = where if where.startswith("loss_fn(") else "loss_fn(output)"
        source = "loss_fn(output, target)" if where.startswith(_WITH_TARGET) else "loss_fn"
    elif isinstance(output, torch.Tensor) and output.dim() == 0:
        loss, where, source = output, "the model's scalar output", "scalar output"
    elif isinstance(getattr(output, "loss", None), torch.Tensor):
        loss, where, source = output.loss, "output.loss", "output.loss"
    elif isinstance(output, Mapping) and isinstance(output.get("loss"), torch.Tensor):
        loss, where, source = output["loss"], "output['loss']", "output['loss']"
    elif (family := _family_loss(model, output, settings)) is not None:
        loss, where = family, "the loss from the pytest_gradcheck_default_loss hook"
        source = "pytest_gradcheck_default_loss hook"
    else:
        return _default_loss(output, settings.seed), "default projection"
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise GradcheckError(
            f"{where} must be a scalar tensor, got {describe(loss)}; "
            "reduce it, e.g. with .mean() or .sum()"
        )
    if not loss.requires_grad:
        raise GradcheckError(
            f"{where} does not require grad: it does not depend on any trainable parameter "
            "(was it computed under torch.no_grad() or from detached tensors?)"
        )
    return loss.reshape(()), source


_WITH_TARGET = "loss_fn(output, target)"


def with_target(loss_fn: Any, target: Any) -> Callable[[Any], Any]:
    """``loss_fn(output, target)`` as a loss of the output alone; a failure names both."""
    __tracebackhide__ = True

    def loss(output: Any) -> Any:
        __tracebackhide__ = True
        try:
            return loss_fn(output, target)
        except Exception as exc:
            raise GradcheckError(
                user_error("loss_fn(output, target)", exc)
                + f"; check that the target ({describe(target)}) fits the output "
                f"({describe(output)}) and what loss_fn expects of it"
            ) from None

    name = getattr(loss_fn, "__qualname__", type(loss_fn).__name__)
    loss.__qualname__ = f"{_WITH_TARGET} with {name}"
    return loss


def _family_loss(model: nn.Module | None, output: Any, settings: Settings) -> Any:
    """The first ``pytest_gradcheck_default_loss`` implementation's loss, or None."""
    __tracebackhide__ = True
    if model is None:
        return None
    try:
        return current_hook().pytest_gradcheck_default_loss(
            model=model, output=output, settings=settings
        )
    except Exception as exc:
        raise GradcheckError(user_error("a pytest_gradcheck_default_loss hook", exc)) from None


def _default_loss(output: Any, seed: int) -> torch.Tensor:
    """A seeded random projection of every floating-point output, scaled to unit gradient norm.

    ``sum_i <out_i, r_i> / sqrt(numel(out_i))`` with ``r_i ~ N(0, 1)``: the gradient that
    reaches each output is a random direction of norm about 1, which is what a real loss
    (cross-entropy, MSE) sends back from a randomly initialised model.
    """
    leaves = [t for t in tensors(output) if t.is_floating_point() and t.requires_grad]
    if not leaves:
        raise GradcheckError(
            f"the model output ({describe(output)}) has no floating-point tensor that "
            "requires grad; pass loss_fn=... or check that the forward uses its parameters"
        )
    generator = torch.Generator().manual_seed(seed)
    total: torch.Tensor | None = None
    for leaf in leaves:
        direction = torch.randn(leaf.shape, generator=generator).to(leaf.device)
        term = (leaf.float() * direction).sum() / math.sqrt(max(1, leaf.numel()))
        total = term if total is None else total + term
    assert total is not None
    return total


def user_error(what: str, exc: BaseException) -> str:
    """``what`` raised ``exc``: name the user's frame where it happened, not torch's."""
    where = user_location(traceback.extract_tb(exc.__traceback__))
    location = f" at {where}" if where else ""
    return f"{what} raised {type(exc).__name__}{location}: {exc}"
