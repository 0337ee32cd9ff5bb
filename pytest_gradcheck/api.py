"""The entry point: :func:`check_gradients`.

It resolves the settings, runs the check in this process (:mod:`pytest_gradcheck.engine`)
or across local DDP processes (:mod:`pytest_gradcheck.distributed`), and runs the
``pytest_gradcheck_report`` hooks once, on the final report.

Imports torch, the engine, the distributed launcher, the hooks and the settings below it.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from .engine import require_trainable, run_check
from .hooks import post_process
from .results import GradcheckError, Report
from .settings import Settings, override, resolve

__all__ = ["check_gradients"]


def check_gradients(
    model: nn.Module,
    batch: Any,
    *,
    target: Any = None,
    settings: Settings | None = None,
    **kwargs: Any,
) -> Report:
    """Run one forward/backward pass of ``model`` on ``batch`` and diagnose every layer's gradient.

    ``batch`` is called as ``model(batch)`` for a tensor, ``model(*batch)`` for a tuple or
    list and ``model(**batch)`` for a mapping. ``target`` (a tensor or any nesting of
    tensors, moved to the check's device like the batch) is given to the loss as
    ``loss_fn(output, target)``: ``check_gradients(model, x, target=y,
    loss_fn=F.cross_entropy)``; a DataLoader's ``(inputs, target)`` pair is unpacked by the
    caller (``inputs, target = batch``). Keyword arguments are settings (see
    :class:`~pytest_gradcheck.settings.Settings`) and override ``settings``. The model is
    left exactly as it was: parameters, buffers, ``.grad``, train/eval flags, device, hooks
    and the global RNG state, also after ``steps=N`` optimizer steps (the optimizer is the
    check's own). A model wrapped in ``DistributedDataParallel`` is checked where it lives,
    with module paths as in ``model.module``.

    Raises :class:`~pytest_gradcheck.results.GradcheckError` for bad input; returns a
    :class:`~pytest_gradcheck.results.Report` (call ``report.raise_if_unhealthy()`` to assert).
    """
    __tracebackhide__ = True
    if settings is None:
        settings = resolve([("check_gradients() arguments", kwargs)])
    elif not isinstance(settings, Settings):
        raise GradcheckError(
            f"settings= must be a Settings (from Policy.to_settings() or "
            f"pytest_gradcheck.settings.resolve), got {type(settings).__name__}; pass "
            "individual settings as keywords instead: check_gradients(model, batch, **values)"
        )
    else:
        settings = override(settings, "check_gradients() arguments", kwargs)
    if not isinstance(model, nn.Module):
        raise GradcheckError(
            f"model must be a torch.nn.Module, got {type(model).__name__}; "
            "pass the module itself, not its output or a factory"
        )
    _check_target(target, settings)
    if settings.distributed > 1:
        from .distributed import check_distributed

        if target is not None:
            raise GradcheckError(
                f"target= with distributed={settings.distributed} is not supported: the "
                "processes shard the batch only; put the target in the batch and compute the "
                "loss from the output (or check with distributed=1)"
            )
        require_trainable(model)
        report = check_distributed(model, batch, settings)
    else:
        report = run_check(model, batch, settings, target)
    return post_process(report)  # the pytest_gradcheck_report hooks, once


def _check_target(target: Any, settings: Settings) -> None:
    """A target needs a loss that takes it, and a loss that takes one needs a target."""
    if target is not None and settings.loss_fn is None:
        raise GradcheckError(
            "target= needs a loss that takes it: pass loss_fn=, a callable (output, target) -> "
            "scalar, e.g. loss_fn=torch.nn.functional.cross_entropy"
        )
    if target is None and settings.loss_fn is not None and _required(settings.loss_fn) >= 2:
        name = getattr(settings.loss_fn, "__qualname__", type(settings.loss_fn).__name__)
        raise GradcheckError(
            f"loss_fn={name} takes a target as its second argument, but none was given: pass "
            "target= (e.g. check_gradients(model, inputs, target=labels, loss_fn=...)), or a "
            "loss_fn that takes the output alone"
        )


def _required(fn: Any) -> int:
    """How many positional arguments ``fn`` requires (0 when it cannot be told)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return 0
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(
        1
        for p in signature.parameters.values()
        if p.kind in kinds and p.default is inspect.Parameter.empty
    )
