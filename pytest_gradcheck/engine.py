"""One process's gradient check: take the model, run the seeded passes, measure, ask the
verdict, give the model back.

:func:`run_check` moves the model and the batch to the device, runs a seeded
forward/backward pass, has :mod:`pytest_gradcheck.measure` reduce every gradient to plain
statistics, hands them to :mod:`pytest_gradcheck.verdict`, and restores the model exactly as
it was. Beyond one pass (:class:`_Training`): ``steps=N`` repeats pass, statistics and
verdict at every optimizer step and stops at the first unhealthy one; ``precision`` runs the
passes under ``torch.autocast`` (with a GradScaler on request) and compares a suspicious
pass with fp32. The entry point users call is :func:`pytest_gradcheck.api.check_gradients`.

A model sharded with FSDP2 (DTensor parameters) is checked on every rank alike: its
statistics are gathered across the ranks (:mod:`pytest_gradcheck.sharded`). A compiled
model (``torch.compile``) is reported under the names of the module it wraps, and what its
compiled code cannot give (module hooks) is said in a note.

Imports torch, measure, sharded, wrappers, tensors, verdict, hooks, checks, results and
settings below it (diagnosis lazily, on a NaN/Inf only).
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
import traceback
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from . import verdict
from .checks import UNDERFLOW_FRACTION
from .hooks import current_hook
from .measure import (
    ParamTable,
    convention_facts,
    forward_facts,
    record_activation_grads,
    saturating_ops,
    walk_modules,
)
from .results import GradcheckError, GradcheckWarning, LayerStats, Problem, Report
from .settings import Settings
from .sharded import sharded_stats
from .tensors import describe, tensors, to_device, upcast
from .wrappers import compiled, compiled_notes, data_parallel, unwrap

__all__ = ["call", "compute_loss", "pick_device", "require_trainable", "run_check"]


def require_trainable(model: nn.Module) -> None:
    """Raise unless ``model`` (a wrapper: the module inside) has a trainable parameter."""
    params = list(unwrap(model).parameters())
    if not any(p.requires_grad for p in params):
        _no_trainable(unwrap(model), len(params))


def _no_trainable(model: nn.Module, frozen: int) -> None:
    raise GradcheckError(
        f"{type(model).__name__} has no trainable parameters "
        f"({frozen} parameter(s) have requires_grad=False); "
        "a gradient check needs at least one parameter with requires_grad=True"
    )


def run_check(model: nn.Module, batch: Any, settings: Settings) -> Report:
    """Check ``model`` on ``batch`` in this process with resolved ``settings`` (see
    :func:`pytest_gradcheck.api.check_gradients`); the report hooks have not run on it."""
    __tracebackhide__ = True
    inner = unwrap(model)  # reported without DDP's "module." and torch.compile's "_orig_mod."
    is_compiled = compiled(model)
    modules = list(inner.named_modules())
    all_names, all_params, structure = walk_modules(modules)
    names, params = all_names, all_params
    if not all(p.requires_grad for p in all_params):
        names = [name for name, p in zip(all_names, all_params, strict=True) if p.requires_grad]
        params = [p for p in all_params if p.requires_grad]
    frozen = len(all_params) - len(params)
    if not params:
        _no_trainable(inner, frozen)
    device = _wrapped_device(model, inner, params, settings) or pick_device(settings.device)
    started = time.perf_counter()
    outer = modules if inner is model else list(model.named_modules())
    with (
        _lock(inner),
        _borrowed(model, outer, all_params, batch, device, settings) as borrowed,
        _Training(model, outer, names, params, device, settings) as training,
    ):
        borrowed.autocast = training.autocast
        moved_batch = to_device(batch, device)
        table = ParamTable(names, training.params, structure)  # on the device now
        if table.sharded is not None:  # every rank alike, or a clear error on every rank
            table.sharded.agree_on_batch(moved_batch)
            training.across_ranks = table.sharded.mean
        _check_batch(moved_batch)
        hooked = () if is_compiled else modules  # compiled code calls no module hooks
        for step in range(1, settings.steps + 1):
            if step > 1:
                training.step()
            with (
                record_activation_grads(hooked if settings.activations else ()) as activations,
                forward_facts(hooked if _conventions_on(settings) else ()) as facts,
                _aliases(table, modules),
            ):
                loss, graph, found = training.forward_backward(
                    model, hooked, moved_batch, activations.before_backward
                )
            if step == 1:
                small_batchnorm = found
            layers = table.measure()
            seen = structure
            if _conventions_on(settings):
                seen = convention_facts(structure, graph, table, facts)
            if graph is not None:  # walked only if a hint asks (an unhealthy check)
                seen = dataclasses.replace(
                    seen, saturating_ops=_LazyCounts(saturating_ops, graph, table.owner_by_id)
                )
            problems, check_notes = verdict.evaluate(layers, seen, loss, settings)
            problems = training.findings(problems, layers, step, inner, modules, moved_batch)
            if problems:
                break
        else:
            problems = training.final_findings(inner, moved_batch)  # expect_loss_decrease
        diagnosis: list[str] = []
        if settings.diagnose and any(p.kind == "nonfinite" for p in problems):
            diagnosis = _diagnose(inner, moved_batch, settings, borrowed)
    del graph, seen
    seconds = time.perf_counter() - started
    notes = [
        f"{name}: train-mode BatchNorm sees {count} value(s) per channel in this batch, so its "
        "gradients are unreliable (they explode artificially); use a larger batch or mode='eval'"
        for name, count in small_batchnorm
    ]
    for note in notes:
        warnings.warn(note, GradcheckWarning, stacklevel=3)
    if is_compiled:
        notes += compiled_notes(modules, settings, _conventions_on(settings), bool(diagnosis))
    activation_grads, activation_steps = activations.norms, activations.steps
    if table.sharded is not None and settings.activations:
        activation_grads, activation_steps = table.sharded.combine_norms(
            activation_grads, activation_steps
        )
    return Report(
        layers=tuple(layers),
        problems=tuple(problems),
        notes=tuple(notes + check_notes + training.notes),
        loss=loss,
        device=str(device),
        seconds=seconds,
        frozen_params=frozen,
        settings=settings.to_dict(),
        diagnosis=tuple(diagnosis),
        activation_grads=activation_grads,
        activation_steps=activation_steps,
    )


_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()


def _lock(model: nn.Module) -> threading.RLock:
    """The lock of ``model``: two threads checking one model take turns (each borrows the
    whole model, its flags and its ``.grad``)."""
    with _LOCKS_LOCK:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


class _LazyCounts(Mapping[str, int]):
    """Per-layer counts read off the autograd graph on first use: only a hint of an
    unhealthy check asks for them, so a healthy check never walks the graph."""

    def __init__(
        self,
        walk: Callable[[Any, Mapping[int, str]], dict[str, int]],
        graph: Any,
        layer_of: Callable[[], Mapping[int, str]],
    ) -> None:
        self._walk, self._graph, self._layer_of = walk, graph, layer_of
        self._counts: dict[str, int] | None = None

    def _get(self) -> dict[str, int]:
        if self._counts is None:
            self._counts = self._walk(self._graph, self._layer_of())
            self._graph = None
        return self._counts

    def __getitem__(self, key: str) -> int:
        return self._get()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


# -- device and state -----------------------------------------------------------------------


# -- device and state -----------------------------------------------------------------------


def pick_device(requested: str | None) -> torch.device:
    """``None`` picks CUDA, then MPS, then CPU; an explicit device must be available."""
    if requested is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise GradcheckError(
                f"device={requested!r} but CUDA is not available here; "
                "use device='auto' to fall back to the CPU"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise GradcheckError(
                f"device={requested!r} but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise GradcheckError(
                f"device={requested!r} but MPS is not available here; "
                "use device='auto' to fall back to the CPU"
            )
    if device.type == "xpu":
        xpu = getattr(torch, "xpu", None)
        if xpu is None or not xpu.is_available():
            raise GradcheckError(
                f"device={requested!r} but no XPU is available to this torch "
                f"({torch.__version__}); use device='auto' to fall back to the CPU"
            )
    return device


@dataclasses.dataclass
class _Borrowed:
    device: torch.device
    seed: int
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext
    """Enters the pass's autocast (``precision``) for a re-run of the pass."""


@contextmanager
def _borrowed(
    model: nn.Module,
    modules: Sequence[tuple[str, nn.Module]],
    params: Sequence[torch.Tensor],
    batch: Any,
    device: torch.device,
    settings: Settings,
) -> Iterator[_Borrowed]:
    """Take the model (and the batch's ``.grad``) for one check and give them back exactly
    as they were, autograd's version counters included, so that a graph the user built
    before the check still runs ``backward()``: the check runs on copies of the buffers
    (train-mode BatchNorm updates its running statistics in place), and the user's own
    buffer objects are put back untouched. A DDP-wrapped model keeps its buffers (DDP holds
    them): those are copied first and written back where the check changed them."""
    # Parallel lists, not pairs: fewer objects for the garbage collector (see walk_modules).
    grads = [p.grad for p in params]
    versions = [p._version for p in params]
    children = [module for _, module in modules]
    flags = [module.training for module in children]
    buffers: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]] = []
    for module in children:
        if module._buffers:
            for name, buf in module._buffers.items():
                if buf is not None:
                    buffers.append((module, name, buf, buf.detach().clone()))
    _refuse_meta(modules, params, [b for _, _, b, _ in buffers], batch)
    swap = not data_parallel(model)  # DDP holds the buffers (it broadcasts them)
    inputs = [t for t in tensors(batch) if t.requires_grad and t.is_leaf]
    input_grads = [t.grad for t in inputs]
    home = _home_device(params, [b for _, _, b, _ in buffers])
    move = home is not None and home != device
    rng_devices: list[int] = []
    if device.type == "cuda":
        rng_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with ExitStack() as stack:
        stack.enter_context(
            torch.random.fork_rng(
                devices=rng_devices, device_type=device.type if rng_devices else "cuda"
            )
        )
        try:
            for t in (*params, *inputs):
                t.grad = None
            if swap:
                for module, name, _, copy in buffers:
                    module._buffers[name] = copy
            if move:
                model.to(device)
            training = settings.mode == "train"
            if (not training) in flags:
                model.train(training)
            yield _Borrowed(device=device, seed=settings.seed)
        finally:
            if move and home is not None:
                model.to(home)
            for p, grad in zip(params, grads, strict=True):
                p.grad = grad
            for t, grad in zip(inputs, input_grads, strict=True):
                t.grad = grad
            for m, was_training in zip(children, flags, strict=True):
                if m.training != was_training:
                    m.training = was_training
            for module, name, original, copy in buffers:
                module._buffers[name] = original
                if not swap and not torch.equal(original, copy):
                    with torch.no_grad():
                        original.copy_(copy)
            changed = sum(p._version != v for p, v in zip(params, versions, strict=True))
            # With steps, a DDP or sharded model's parameters are written back bit for bit.
            restored = settings.steps > 1 or settings.expect_loss_decrease
            if changed and not move and not restored:
                warnings.warn(
                    f"the model's forward changed {changed} of its parameters in place (e.g. a "
                    "clamp of its own weights); a one-pass check runs on the model's own "
                    "parameters and cannot undo that: with steps >= 2 it runs on copies",
                    GradcheckWarning,
                    stacklevel=4,
                )


def _refuse_meta(
    modules: Sequence[tuple[str, nn.Module]],
    params: Sequence[torch.Tensor],
    buffers: Sequence[torch.Tensor],
    batch: Any,
) -> None:
    """A meta tensor holds no data: say so before anything moves (a move to meta and back
    would lose every weight)."""
    if any(t.is_meta for t in (*params, *buffers)):
        names = [
            f"{prefix}.{name}" if prefix else name
            for prefix, module in modules
            for name, t in (*module._parameters.items(), *module._buffers.items())
            if t is not None and t.is_meta
        ]
        raise GradcheckError(
            f"the model has {len(names)} tensor(s) on the meta device (e.g. {names[0]!r}), "
            "which hold no data; materialise the model first (model.to_empty(device=...) and "
            "initialise it, or load its weights)"
        )
    if any(t.is_meta for t in tensors(batch)):
        raise GradcheckError(
            f"the sample batch ({describe(batch)}) holds tensors on the meta device, which "
            "hold no data; pass real tensors (e.g. torch.randn of the same shape)"
        )


def _check_batch(batch: Any) -> None:
    """An empty sample batch gives no gradient to check: say so instead of reporting every
    layer dead."""
    found = list(tensors(batch))
    if found and all(t.numel() == 0 for t in found):
        raise GradcheckError(
            f"the sample batch is empty ({describe(batch)}): a gradient check needs at least "
            "one sample"
        )


def _seed(seed: int, device: torch.device) -> None:
    """Seed the generators a pass on ``device`` draws from: the CPU's and that device's.

    (``torch.manual_seed`` seeds every backend there is, which costs 0.2 ms per call.)
    """
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)
    elif device.type == "mps":
        torch.mps.manual_seed(seed)


def _home_device(
    params: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor]
) -> torch.device | None:
    devices = {p.device for p in params} | {b.device for b in buffers}
    return devices.pop() if len(devices) == 1 else None


# -- the pass -------------------------------------------------------------------------------


def _forward_backward(
    model: nn.Module,
    modules: Sequence[tuple[str, nn.Module]],
    batch: Any,
    settings: Settings,
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
    scaler: Any = None,
    before_backward: Callable[[], None] = lambda: None,
) -> tuple[float, Any, list[tuple[str, int]]]:
    """Run forward, loss and backward; return the loss, its autograd node (the graph's
    structure outlives backward, its saved tensors do not) and the train-mode BatchNorm
    layers that saw too few values per channel to give meaningful gradients.

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
                loss = compute_loss(output, settings, unwrap(model))
            before_backward()
            try:
                (loss if scaler is None else scaler.scale(loss)).backward()
            except RuntimeError as exc:
                raise GradcheckError(user_error("backward pass", exc)) from None
    finally:
        for handle in handles:
            handle.remove()
    return float(loss.detach().float().cpu()), loss.grad_fn, small_batchnorm


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
    if settings.loss_fn is not None:
        try:
            loss = settings.loss_fn(output)
        except Exception as exc:
            raise GradcheckError(user_error("loss_fn(output)", exc)) from None
        where = "loss_fn(output)"
    elif isinstance(output, torch.Tensor) and output.dim() == 0:
        loss, where = output, "the model's scalar output"
    elif isinstance(getattr(output, "loss", None), torch.Tensor):
        loss, where = output.loss, "output.loss"
    elif isinstance(output, Mapping) and isinstance(output.get("loss"), torch.Tensor):
        loss, where = output["loss"], "output['loss']"
    elif (family := _family_loss(model, output, settings)) is not None:
        loss, where = family, "the loss from the pytest_gradcheck_default_loss hook"
    else:
        return _default_loss(output, settings.seed)
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
    return loss.reshape(())


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


def _conventions_on(settings: Settings) -> bool:
    return settings.policy is not None and bool(settings.policy.enabled)


# -- steps, precision and wrappers ----------------------------------------------------------

_DEFAULT_LR = {"sgd": 1e-2, "adam": 1e-3, "adamw": 1e-3}
_MIN_LOSS_SCALE = 1.0
"""GradScaler backing off below this scale: the gradients overflow fp16 even unscaled."""
_LOW = (torch.float16, torch.bfloat16)
_SPARSE_GRADIENTS = frozenset({"Embedding", "EmbeddingBag"})
"""Layer types whose gradient is mostly exact zeros by construction (rows not looked up)."""


class _Training:
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

    def __enter__(self) -> _Training:
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
    ) -> tuple[float, Any, list[tuple[str, int]]]:
        """One seeded pass (the same dropout at every step). With a GradScaler, an overflow
        backs the scale off and repeats the pass on the same parameters, as GradScaler skips
        that step; below a scale of 1 the scale has collapsed and the pass is reported."""
        __tracebackhide__ = True
        settings = self.settings
        while True:
            _seed(settings.seed, self.device)
            try:
                loss, graph, small = _forward_backward(
                    model, modules, batch, settings, self.autocast, self.scaler, before_backward
                )
            except GradcheckError as exc:
                if settings.precision == "fp16" and "Half" in str(exc):
                    raise GradcheckError(
                        f"{exc}; precision='fp16' reached an op without an fp16 kernel on "
                        f"{self.device.type}: use precision='bf16' or run on CUDA"
                    ) from None
                raise
            if self.scaler is None or not self._overflowed(loss):
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
            loss = self.across_ranks(loss)
        self._losses.append(loss)
        return loss, graph, small

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
            _seed(self.settings.seed, self.device)
            loss, _, _ = _forward_backward(model, modules, upcast(batch), self.settings)
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
        _seed(settings.seed, self.device)
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


def _aliases(table: ParamTable, modules: Sequence[tuple[str, nn.Module]]) -> Any:
    """A sharded model's unsharded parameters by module path, noted during the pass."""
    if table.sharded is None:
        return nullcontext()
    return table.sharded.record_aliases(modules)


def _wrapped_device(
    model: nn.Module, inner: nn.Module, params: Sequence[torch.Tensor], settings: Settings
) -> torch.device | None:
    """A DDP model or a sharded one is checked where it lives: it cannot move."""
    if not data_parallel(model) and sharded_stats(params) is None:
        return None
    home = _home_device(list(inner.parameters()), list(inner.buffers()))
    if home is None:
        return None
    if settings.device is not None and torch.device(settings.device) != home:
        raise GradcheckError(
            f"device={settings.device!r} but the {type(model).__name__} model lives on {home} "
            "and cannot move; drop the device setting (it is checked where it is)"
        )
    return home


# -- diagnosis ------------------------------------------------------------------------------


def _diagnose(model: nn.Module, batch: Any, settings: Settings, borrowed: _Borrowed) -> list[str]:
    """Re-run the failing pass to find where the NaN/Inf was born (only when one was found)."""

    def loss_of_batch() -> torch.Tensor:
        _seed(borrowed.seed, borrowed.device)
        with borrowed.autocast():
            return compute_loss(call(model, batch), settings, model)

    grads = [(p, p.grad) for p in model.parameters()]
    try:
        from .diagnosis import find_nonfinite_origin

        return find_nonfinite_origin(model, loss_of_batch)
    except Exception as exc:  # the diagnosis must never hide the verdict
        return [f"(the NaN/Inf origin search failed: {type(exc).__name__}: {exc})"]
    finally:
        for p, grad in grads:
            p.grad = grad


# -- error messages -------------------------------------------------------------------------


def user_error(what: str, exc: BaseException) -> str:
    """``what`` raised ``exc``: name the user's frame where it happened, not torch's."""
    location = ""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if not _is_library_frame(frame.filename):
            location = f" at {os.path.basename(frame.filename)}:{frame.lineno}"
            break
    return f"{what} raised {type(exc).__name__}{location}: {exc}"


def _is_library_frame(filename: str) -> bool:
    here = os.path.dirname(os.path.abspath(__file__))
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    path = os.path.abspath(filename)
    return path.startswith((here, torch_dir)) or (
        "site-packages" in path and (f"{os.sep}torch{os.sep}" in path)
    )
