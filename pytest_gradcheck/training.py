"""What a check does beyond one fp32 pass: optimizer steps, autocast and loss scaling.

:class:`Training` runs each pass of a check (seeded, under autocast, with a GradScaler on
request), takes the optimizer steps of ``steps=N`` on copies of the parameters, compares a
suspicious low-precision pass with the same pass in fp32, and hands what it measured to
:mod:`pytest_gradcheck.verdict`. With the defaults it holds nothing and costs nothing.

Imports torch, passes, measure, verdict, checks, results, settings and tensors below it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from . import verdict
from .checks import UNDERFLOW_FRACTION
from .measure import ParamTable, walk_modules
from .passes import Pass, call, compute_loss, forward_backward, reseed, user_error
from .results import GradcheckError, LayerStats, Problem
from .settings import Settings
from .sharded import sharded_stats
from .tensors import upcast
from .wrappers import data_parallel

__all__ = ["Training"]

_DEFAULT_LR = {"sgd": 1e-2, "adam": 1e-3, "adamw": 1e-3}
_MIN_LOSS_SCALE = 1.0
"""GradScaler backing off below this scale: the gradients overflow fp16 even unscaled."""
_LOW = (torch.float16, torch.bfloat16)
_SPARSE_GRADIENTS = frozenset({"Embedding", "EmbeddingBag"})
"""Layer types whose gradient is mostly exact zeros by construction (rows not looked up)."""


class Training:
    """What a check does beyond one fp32 pass: optimizer steps, autocast and loss scaling.

    With the defaults (one step, fp32, no scaler) it holds nothing and costs nothing.
    Optimizer steps would change the trainable parameters in place, which breaks any graph
    the user built before the check (autograd's version counters). So the steps run on
    copies: each trainable parameter is swapped out of its modules for a copy while the
    check runs, and the user's own parameter objects are put back untouched. A model
    wrapped in DDP cannot swap (DDP holds its parameters): its parameters are copied first
    and written back on exit, bit for bit. The optimizer (and its state) dies with the check.
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Sequence[tuple[str, nn.Module]],
        names: Sequence[str],
        params: Sequence[torch.Tensor],
        device: torch.device,
        settings: Settings,
    ) -> None:
        self.settings = settings
        self.names = names
        self.device = device
        # DDP holds the parameters, FSDP swaps its own in and out: neither can swap copies in.
        self.wrapped = data_parallel(model) or sharded_stats(params) is not None
        self.across_ranks: Callable[[float], float] | None = None
        """A sharded model's: the mean of every rank's loss (a collective)."""
        self.autocast = _autocast(device, settings.precision)
        self.notes: list[str] = []
        self._losses: list[float] = []
        self._final_loss: float | None = None
        self._reference: tuple[int, list[LayerStats], float] | None = None
        self._overflows = 0
        self._collapsed: tuple[float, float] | None = None
        steps = settings.steps > 1 or settings.expect_loss_decrease
        self._swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
        self._saved: list[torch.Tensor] = []
        if steps and not self.wrapped:
            params = self._swap(modules, params)
        elif steps:
            self._saved = [p.detach().clone() for p in params]
        self.params = params
        self.optimizer: torch.optim.Optimizer | None = None
        if steps or settings.grad_scaler is not False:
            self.optimizer = _optimizer(settings, self.params)
        self.scaler: Any = None
        self._initial_scale = 0.0
        if settings.grad_scaler is not False:
            self.scaler = _grad_scaler(device, settings.grad_scaler)
            self._initial_scale = float(self.scaler.get_scale())

    def __enter__(self) -> Training:
        return self

    def _swap(
        self, modules: Sequence[tuple[str, nn.Module]], params: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Put a copy of each trainable parameter where the model holds it (a tied one
        everywhere it is held); return the copies, in the order of ``params``."""
        copies = {id(p): nn.Parameter(p.detach().clone()) for p in params}
        for _, module in modules:
            for name, p in module._parameters.items():
                if p is not None and id(p) in copies:
                    self._swapped.append((module, name, p))
                    module._parameters[name] = copies[id(p)]
        return [copies[id(p)] for p in params]

    def __exit__(self, *exc: object) -> None:
        """Give the parameters back and drop the optimizer and its state."""
        for module, name, original in reversed(self._swapped):
            module._parameters[name] = original
        if self._saved:
            with torch.no_grad():
                for p, saved in zip(self.params, self._saved, strict=True):
                    p.copy_(saved)
        self._swapped = []
        self._saved = []
        self.optimizer = None
        self.scaler = None

    def forward_backward(
        self,
        model: nn.Module,
        modules: Sequence[tuple[str, nn.Module]],
        batch: Any,
        before_backward: Callable[[], None] = lambda: None,
    ) -> Pass:
        """One seeded pass (the same dropout at every step). With a GradScaler, an overflow
        backs the scale off and repeats the pass on the same parameters, as GradScaler skips
        that step; below a scale of 1 the scale has collapsed and the pass is reported."""
        __tracebackhide__ = True
        settings = self.settings
        while True:
            reseed(settings.seed, self.device)
            try:
                done = forward_backward(
                    model, modules, batch, settings, self.autocast, self.scaler, before_backward
                )
            except GradcheckError as exc:
                if settings.precision == "fp16" and "Half" in str(exc):
                    raise GradcheckError(
                        f"{exc}; precision='fp16' reached an op without an fp16 kernel on "
                        f"{self.device.type}: use precision='bf16' or run on CUDA"
                    ) from None
                raise
            if self.scaler is None or not self._overflowed(done.loss):
                break
            self.scaler.update()  # GradScaler skips this step and backs the scale off
            self._overflows += 1
            scale = float(self.scaler.get_scale())
            if scale < _MIN_LOSS_SCALE:
                self._collapsed = (self._initial_scale, scale)
                break
            for p in self.params:
                p.grad = None
        if self.across_ranks is not None:
            done = done._replace(loss=self.across_ranks(done.loss))
        self._losses.append(done.loss)
        return done

    def _overflowed(self, loss: float) -> bool:
        """Unscale the gradients; True when they hold a NaN/Inf that a smaller scale may fix."""
        assert self.optimizer is not None
        try:
            self.scaler.unscale_(self.optimizer)
        except ValueError as exc:  # "Attempting to unscale FP16 gradients."
            raise GradcheckError(
                f"grad_scaler cannot unscale these gradients ({exc}): GradScaler needs fp32 "
                "parameters; keep the model in fp32 and let precision='fp16' autocast it"
            ) from None
        grads = [p.grad for p in self.params if p.grad is not None]
        finite = (
            bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True
        )
        # A non-finite loss is a forward overflow: no scale fixes it (a DDP rank cannot tell:
        # its loss is its own, its gradients are everyone's).
        return not finite and (math.isfinite(loss) or self.wrapped)

    def step(self) -> None:
        """One optimizer step on the current gradients, then clear them."""
        __tracebackhide__ = True
        assert self.optimizer is not None
        try:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        except Exception as exc:
            raise GradcheckError(user_error("the optimizer step", exc)) from None
        for p in self.params:
            p.grad = None

    def findings(
        self,
        problems: Sequence[Problem],
        layers: Sequence[LayerStats],
        step: int,
        model: nn.Module,
        modules: Sequence[tuple[str, nn.Module]],
        batch: Any,
    ) -> list[Problem]:
        """Measure what the verdict needs beyond one fp32 pass (the same pass in fp32 when
        this one looks suspicious) and let it add what precision, the loss scale and the
        step explain."""
        precision = self.settings.precision
        reference: tuple[Sequence[LayerStats], float] | None = None
        if precision != "fp32" and self._suspicious(problems, layers):
            if self._reference is None or self._reference[0] != step:
                fp32_layers, fp32_loss = self._fp32_pass(model, modules, batch)
                self._reference = (step, fp32_layers, fp32_loss)
            reference = self._reference[1], self._reference[2]
        self.notes = self._describe(step)
        return verdict.beyond_one_pass(
            problems,
            layers,
            step=step,
            steps=self.settings.steps,
            precision=precision,
            reference=reference,
            loss_scale=float(self.scaler.get_scale()) if self.scaler is not None else None,
            collapsed=None if self._collapsed is None else (*self._collapsed, self._overflows),
        )

    def _suspicious(self, problems: Sequence[Problem], layers: Sequence[LayerStats]) -> bool:
        """Only a pass with many exact zeros or a NaN/Inf pays for the fp32 comparison.

        An embedding's gradient is zero in every row the batch does not look up, in fp32 as
        well: its zeros alone do not ask for the comparison (they are compared when it runs).
        """
        return any(p.kind == "nonfinite" for p in problems) or any(
            layer.has_grad
            and layer.zero_fraction >= UNDERFLOW_FRACTION
            and layer.type not in _SPARSE_GRADIENTS
            for layer in layers
        )

    def _fp32_pass(
        self, model: nn.Module, modules: Sequence[tuple[str, nn.Module]], batch: Any
    ) -> tuple[list[LayerStats], float]:
        """The same pass in fp32 on the same parameters (fp16/bf16 parameters, buffers and
        inputs upcast for it); leaves gradients, buffers and dtypes as they were."""
        grads = [p.grad for p in self.params]
        buffers = [
            (module, name, buf, buf.detach().clone())
            for _, module in modules
            for name, buf in module._buffers.items()
            if buf is not None
        ]
        cast = [
            (p, p.data)
            for _, module in modules
            for p in module._parameters.values()
            if p is not None and p.dtype in _LOW
        ]
        try:
            for p in self.params:
                p.grad = None
            for p, data in cast:
                p.data = data.float()
            for module, name, buf, _ in buffers:
                if buf.dtype in _LOW:
                    module._buffers[name] = buf.float()
            reseed(self.settings.seed, self.device)
            loss = forward_backward(model, modules, upcast(batch), self.settings).loss
            layers = ParamTable(self.names, self.params, walk_modules(modules)[2]).measure()
        finally:
            for p, data in cast:
                p.data = data
            for module, name, buf, saved in buffers:
                module._buffers[name] = buf
                with torch.no_grad():
                    buf.copy_(saved)
            for p, grad in zip(self.params, grads, strict=True):
                p.grad = grad
        return layers, loss

    def final_findings(self, model: nn.Module, batch: Any) -> list[Problem]:
        """After healthy steps: with ``expect_loss_decrease``, take the last step and
        compare the loss it leads to with the first loss."""
        __tracebackhide__ = True
        settings = self.settings
        if not settings.expect_loss_decrease:
            return []
        self.step()
        reseed(settings.seed, self.device)
        with torch.enable_grad(), self.autocast():
            final = float(compute_loss(call(model, batch), settings, model).detach().float().cpu())
        if self.across_ranks is not None:
            final = self.across_ranks(final)
        self._final_loss = final
        self.notes = self._describe(settings.steps)
        mine = {id(p) for p in self.params}
        covered = 0
        if self.optimizer is not None:
            held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
            covered = len(mine & held)
        return verdict.after_steps(
            self._losses[0], final, settings.steps, _optimizer_name(settings), covered, len(mine)
        )

    def _describe(self, step: int) -> list[str]:
        """Notes: the loss at every step, the optimizer, the loss scale."""
        settings = self.settings
        notes: list[str] = []
        if settings.steps > 1 or settings.expect_loss_decrease:
            losses = ", ".join(f"{loss:.4g}" for loss in self._losses)
            after = (
                "" if self._final_loss is None else f"; after the last step: {self._final_loss:.4g}"
            )
            notes.append(
                f"{_optimizer_name(settings)} steps on the sample batch, checked {step} of "
                f"{settings.steps}; loss at each: {losses}{after}"
            )
        if self.scaler is not None:
            notes.append(
                f"GradScaler: initial scale {self._initial_scale:g}, now "
                f"{float(self.scaler.get_scale()):g}, {self._overflows} overflowing pass(es) "
                "skipped"
            )
        return notes


def _optimizer(settings: Settings, params: Sequence[torch.Tensor]) -> torch.optim.Optimizer:
    __tracebackhide__ = True
    spec = settings.optimizer
    if callable(spec):
        try:
            optimizer = spec(list(params))
        except Exception as exc:
            raise GradcheckError(user_error("the optimizer factory", exc)) from None
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise GradcheckError(
                f"the optimizer factory returned {type(optimizer).__name__}, not a "
                "torch.optim.Optimizer; it is called with the list of trainable parameters"
            )
        return optimizer
    lr = settings.lr if settings.lr is not None else _DEFAULT_LR[spec]
    if spec == "sgd":
        return torch.optim.SGD(list(params), lr=lr)
    if spec == "adamw":
        return torch.optim.AdamW(list(params), lr=lr)
    return torch.optim.Adam(list(params), lr=lr)


def _optimizer_name(settings: Settings) -> str:
    spec = settings.optimizer
    if callable(spec):
        return f"{getattr(spec, '__qualname__', type(spec).__name__)}()"
    lr = settings.lr if settings.lr is not None else _DEFAULT_LR[spec]
    return f"{spec} (lr {lr:g})"


def _autocast(device: torch.device, precision: str) -> Callable[[], AbstractContextManager[Any]]:
    """A factory of the autocast context of ``precision``; checks that it is supported."""
    if precision == "fp32":
        return nullcontext
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    kind = device.type

    def enter() -> AbstractContextManager[Any]:
        return torch.autocast(device_type=kind, dtype=dtype)

    reason = ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "autocast disabled": detected below
            with enter():
                active = _autocast_active(kind, dtype)
    except (RuntimeError, ValueError) as exc:
        active, reason = False, f" ({exc})"
    if not active:
        other = "precision='bf16'" if precision == "fp16" else "precision='fp16'"
        raise GradcheckError(
            f"precision={precision!r} needs torch.autocast with {dtype} on {kind}, which torch "
            f"{torch.__version__} does not support here{reason}; use {other} or run on CUDA"
        )
    return enter


def _autocast_active(kind: str, dtype: torch.dtype) -> bool:
    try:
        return bool(torch.is_autocast_enabled(kind)) and torch.get_autocast_dtype(kind) == dtype
    except (TypeError, AttributeError):  # torch < 2.4
        if kind == "cpu":
            return torch.is_autocast_cpu_enabled() and torch.get_autocast_cpu_dtype() == dtype
        return bool(torch.is_autocast_enabled())


def _grad_scaler(device: torch.device, setting: bool | float) -> Any:
    init_scale = 2.0**16 if setting is True else float(setting)
    scaler = getattr(torch.amp, "GradScaler", None)
    if scaler is not None:
        return scaler(device.type, init_scale=init_scale)
    if device.type != "cuda":
        raise GradcheckError(
            f"grad_scaler on {device.type} needs torch.amp.GradScaler (torch >= 2.3); "
            "use precision='bf16', which needs no loss scaling, or run on CUDA"
        )
    return torch.cuda.amp.GradScaler(init_scale=init_scale)
