"""What may wrap a user's module, and what each wrapper allows a check.

``DistributedDataParallel`` and ``DataParallel`` hold their module's parameters and buffers
(the check cannot move the model or swap copies in); ``torch.compile``'s ``OptimizedModule``
runs compiled code that calls no module hooks. :func:`unwrap` finds the module inside (its
module paths are the ones reported: no ``module.``, no ``_orig_mod.``), and
:func:`compiled_notes` says what a check of a compiled model could not see.

Imports torch and the settings; never ``torch._dynamo`` itself.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from torch import nn

from .settings import Settings

__all__ = ["compiled", "compiled_notes", "data_parallel", "unwrap"]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel or DataParallel and inside torch.compile's
    wrapper (either way round), else ``model``."""
    while True:
        if compiled(model):
            inner = model._orig_mod
        elif data_parallel(model, through_compile=False):
            inner = model.module
        else:
            return model
        assert isinstance(inner, nn.Module)
        model = inner


def data_parallel(model: nn.Module, through_compile: bool = True) -> bool:
    """Whether ``model`` (or, by default, the module torch.compile wraps) is a
    DistributedDataParallel or DataParallel wrapper, which holds its module's tensors."""
    while through_compile and compiled(model):
        model = model._orig_mod  # type: ignore[assignment]
    wrappers = tuple(
        kind
        for kind in (
            getattr(nn.parallel, "DistributedDataParallel", None),
            getattr(nn, "DataParallel", None),
        )
        if isinstance(kind, type)
    )
    return bool(wrappers) and isinstance(model, wrappers)


def compiled(model: nn.Module) -> bool:
    """Whether ``model`` is torch.compile's ``OptimizedModule`` (never imports dynamo)."""
    frame = sys.modules.get("torch._dynamo.eval_frame")
    kind = getattr(frame, "OptimizedModule", None)
    return isinstance(kind, type) and isinstance(model, kind)


def compiled_notes(
    modules: Sequence[tuple[str, nn.Module]], settings: Settings, conventions: bool, diagnosed: bool
) -> list[str]:
    """What the check of a compiled model could not see, or saw another way."""
    why = "the compiled code (torch.compile) calls no module hooks"
    notes = []
    if settings.activations:
        notes.append(
            f"activations=True: no activation gradient was recorded: {why}; check the "
            "uncompiled module (model._orig_mod) to see them"
        )
    if conventions:
        notes.append(f"the policy's conventions saw no forward call order or RNN lengths: {why}")
    if settings.mode == "train" and any(
        isinstance(module, nn.modules.batchnorm._BatchNorm) for _, module in modules
    ):
        notes.append(f"train-mode BatchNorm's values per channel were not counted: {why}")
    if diagnosed:
        notes.append("the NaN/Inf origin search re-ran the uncompiled module eagerly")
    return notes
