"""The entry point: :func:`check_gradients`.

It resolves the settings, runs the check in this process (:mod:`pytest_gradcheck.engine`)
or across local DDP processes (:mod:`pytest_gradcheck.distributed`), and runs the
``pytest_gradcheck_report`` hooks once, on the final report.

Imports torch, the engine, the distributed launcher, the hooks and the settings below it.
"""

from __future__ import annotations

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
    settings: Settings | None = None,
    **kwargs: Any,
) -> Report:
    """Run one forward/backward pass of ``model`` on ``batch`` and diagnose every layer's gradient.

    ``batch`` is called as ``model(batch)`` for a tensor, ``model(*batch)`` for a tuple or
    list and ``model(**batch)`` for a mapping. Keyword arguments are settings (see
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
    if settings.distributed > 1:
        from .distributed import check_distributed

        require_trainable(model)
        report = check_distributed(model, batch, settings)
    else:
        report = run_check(model, batch, settings)
    return post_process(report)  # the pytest_gradcheck_report hooks, once
