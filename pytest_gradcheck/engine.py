"""The torch work of a gradient check: prepare, run the pass, measure, restore.

``check_gradients`` is the one entry point. It resolves settings, moves the model and the
batch to the device, runs one seeded forward/backward pass, reduces every gradient to
plain statistics with batched tensor ops and a single device-to-host transfer, hands the
statistics to :mod:`pytest_gradcheck.checks`, and restores the model exactly as it was.

Beyond one pass (:class:`_Training`): ``steps=N`` repeats pass, statistics and checks at
every optimizer step and stops at the first unhealthy one; ``precision`` runs the passes
under ``torch.autocast`` (with a GradScaler on request) and compares a suspicious pass with
fp32; ``distributed=N`` hands the check to :mod:`pytest_gradcheck.distributed`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import Any, TypeVar

import torch
from torch import nn

from . import checks
from .hookspecs import current_hook, post_process
from .results import (
    GradcheckError,
    LayerStats,
    ParamStats,
    Problem,
    Report,
)
from .settings import Settings, override, resolve

__all__ = ["GradcheckWarning", "check_gradients", "pick_device"]

_SMALL = 1 << 16
"""Tensors up to this many elements are stacked by shape and reduced together."""
_HELD_ELEMENTS = 1 << 22
"""``activations=True`` holds small activation gradients (up to this many elements in all)
until the end of backward, to norm them together; beyond, each is normed as it comes."""
_RESCALE_BELOW = 1e-15
_RESCALE_ABOVE = 1e15
"""A max-abs outside this band makes a float32 sum of squares lose range: recompute scaled."""


class GradcheckWarning(UserWarning):
    """A check ran, but something about its input makes the numbers less trustworthy."""


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
    else:
        settings = override(settings, "check_gradients() arguments", kwargs)
    if not isinstance(model, nn.Module):
        raise GradcheckError(
            f"model must be a torch.nn.Module, got {type(model).__name__}; "
            "pass the module itself, not its output or a factory"
        )
    inner = _unwrap(model)  # a DDP/DataParallel model is reported without "module."
    modules = list(inner.named_modules())
    all_names, all_params, structure = _walk(modules)
    names, params = all_names, all_params
    if not all(p.requires_grad for p in all_params):
        names = [name for name, p in zip(all_names, all_params, strict=True) if p.requires_grad]
        params = [p for p in all_params if p.requires_grad]
    frozen = len(all_params) - len(params)
    if not params:
        raise GradcheckError(
            f"{type(inner).__name__} has no trainable parameters "
            f"({frozen} parameter(s) have requires_grad=False); "
            "a gradient check needs at least one parameter with requires_grad=True"
        )
    if settings.distributed > 1:
        from .distributed import check_distributed

        return check_distributed(model, batch, settings)
    device = _wrapped_device(model, inner, settings) or pick_device(settings.device)
    started = time.perf_counter()
    outer = modules if inner is model else list(model.named_modules())
    with (
        _borrowed(model, outer, all_params, device, settings) as borrowed,
        _Training(model, names, params, device, settings) as training,
    ):
        borrowed.autocast = training.autocast
        moved_batch = _to_device(batch, device)
        table = _ParamTable(names, params, structure)  # on the device now
        for step in range(1, settings.steps + 1):
            if step > 1:
                training.step()
            with (
                _record_activation_grads(modules if settings.activations else ()) as activations,
                _forward_facts(modules if _conventions_on(settings) else ()) as facts,
            ):
                loss, graph, found = training.forward_backward(
                    model, modules, moved_batch, activations.before_backward
                )
            if step == 1:
                small_batchnorm = found
            layers = table.measure()
            seen = structure
            if _conventions_on(settings):
                seen = _convention_facts(structure, graph, table, facts)
            problems, check_notes = checks.find_problems(layers, seen, loss, settings)
            problems = training.findings(problems, layers, step, inner, modules, moved_batch)
            if problems:
                break
        else:
            problems = training.final_findings(inner, moved_batch)  # expect_loss_decrease
        # Only an unhealthy check pays for a closer look.
        if graph is not None and any(p.kind in ("vanishing", "exploding") for p in problems):
            layer_of = table.owner_by_id()
            seen = dataclasses.replace(seen, saturating_ops=_saturating_ops(graph, layer_of))
            problems, check_notes = checks.find_problems(layers, seen, loss, settings)
            problems = training.findings(problems, layers, step, inner, modules, moved_batch)
        del graph
        diagnosis: list[str] = []
        if settings.diagnose and any(p.kind == "nonfinite" for p in problems):
            diagnosis = _diagnose(inner, moved_batch, settings, borrowed)
    seconds = time.perf_counter() - started
    notes = [
        f"{name}: train-mode BatchNorm sees {count} value(s) per channel in this batch, so its "
        "gradients are unreliable (they explode artificially); use a larger batch or mode='eval'"
        for name, count in small_batchnorm
    ]
    for note in notes:
        warnings.warn(note, GradcheckWarning, stacklevel=2)
    report = Report(
        layers=tuple(layers),
        problems=tuple(problems),
        notes=tuple(notes + check_notes + training.notes),
        loss=loss,
        device=str(device),
        seconds=seconds,
        frozen_params=frozen,
        settings=settings.to_dict(),
        diagnosis=tuple(diagnosis),
        activation_grads=activations.norms,
        activation_steps=activations.steps,
    )
    return post_process(report)  # the pytest_gradcheck_report hooks


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
    device: torch.device,
    settings: Settings,
) -> Iterator[_Borrowed]:
    """Take the model for one check and give it back exactly as it was."""
    # Parallel lists, not pairs: fewer objects for the garbage collector (see _walk).
    grads = [p.grad for p in params]
    children = [module for _, module in modules]
    flags = [module.training for module in children]
    buffers: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]] = []
    for module in children:
        if module._buffers:
            for name, buf in module._buffers.items():
                if buf is not None:
                    buffers.append((module, name, buf, buf.detach().clone()))
    home = _home_device(params, [b for module, _, b, _ in buffers])
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
            for p in params:
                p.grad = None
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
            for m, was_training in zip(children, flags, strict=True):
                if m.training != was_training:
                    m.training = was_training
            for module, name, original, saved in buffers:
                module._buffers[name] = original
                with torch.no_grad():
                    original.copy_(saved)


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


def _map_tensors(batch: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``batch`` with ``fn`` applied to every tensor in it, through mappings (which come
    back as dicts), named tuples, tuples and lists; anything else stays as it is."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {key: _map_tensors(value, fn) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_map_tensors(value, fn) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_map_tensors(value, fn) for value in batch)
    return batch


def _to_device(batch: Any, device: torch.device) -> Any:
    return _map_tensors(batch, lambda t: t.to(device))


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
                output = _call(model, batch)
                loss = _loss(output, settings, _unwrap(model))
            before_backward()
            try:
                (loss if scaler is None else scaler.scale(loss)).backward()
            except RuntimeError as exc:
                raise GradcheckError(_user_error("backward pass", exc)) from None
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


class _ActivationGrads:
    """The norm of the gradient that flows into each layer's outputs (``activations=True``).

    One global module forward hook (only while the check runs; nothing is added to the
    model's modules) sees the outputs of every module that owns parameters. A small output
    (up to ``_HELD_ELEMENTS`` elements in all) keeps its gradient with ``retain_grad()``,
    which autograd does in C++ without calling back into Python; :meth:`finish` norms those
    gradients stacked by shape. A larger output gets a hook on the autograd node that made
    it, which norms its gradient in backward (a tensor: no device sync per call). Every norm
    moves to the host at once. This costs far less than full module backward hooks, which
    wrap every module's inputs and outputs, and less than registering and removing a forward
    hook on every module that owns parameters.

    ``retain_grad()`` keeps the gradient of a tensor's latest version: an output changed in
    place after its module returned it (``ReLU(inplace=True)``) would report the gradient
    after that change. :meth:`before_backward` finds those by their version counter and
    hooks the node that made them instead, which sees the gradient of the module's output.

    Along time: an RNN/LSTM/GRU module runs every step inside one op, so the gradient that
    travels back through its recurrence is seen where it leaves the op, at the input
    sequence: a forward pre-hook passes the input on through an identity view (or, for data
    that needs no gradient, a detached copy that asks for one) and records the norm of its
    gradient per time step. A cell stepped in a Python loop is seen per call instead.
    """

    def __init__(self, modules: Sequence[tuple[str, nn.Module]]) -> None:
        self.norms: tuple[tuple[str, float], ...] = ()
        self.steps: tuple[tuple[str, tuple[float, ...]], ...] = ()
        self._layers: dict[int, str] = {}  # id(module) -> name, for modules owning parameters
        self._slots: dict[str, int] = {}
        self._names: list[str] = []  # in the order of the first forward call
        self._calls: list[int] = []
        self._where: list[tuple[int, int]] = []  # (module, call) of each norm in _values
        self._values: list[torch.Tensor] = []  # a norm, or a small gradient (in _held_at)
        self._held_at: set[int] = set()  # where in _values a gradient waits for its norm
        self._held = 0  # elements of those gradients and of the retained ones
        # (where, output, its node, output_nr, version) of each output that retains its grad
        self._retained: list[tuple[tuple[int, int], torch.Tensor, Any, int, int]] = []
        self._time: list[tuple[str, torch.Tensor]] = []  # (module, norm per time step)
        self._handles: list[Any] = []
        for name, module in modules:
            if not module._parameters:
                continue
            if not name and next(module.children(), None) is not None:
                continue  # the root's output is the model's: its gradient is the loss's
            if any(p is not None for p in module._parameters.values()):
                self._layers[id(module)] = name
                if isinstance(module, nn.RNNBase):
                    hook = self._rnn_input_hook(name, module.batch_first)
                    self._handles.append(module.register_forward_pre_hook(hook))
        if self._layers:
            forward_hook = nn.modules.module.register_module_forward_hook(self._forward_hook)
            self._handles.append(forward_hook)

    def _forward_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        name = self._layers.get(id(module))
        if name is None:
            return
        if isinstance(output, torch.Tensor):
            if not output.requires_grad:
                return
            tensors: Sequence[torch.Tensor] = (output,)
        else:
            tensors = [t for t in _tensors(output) if t.requires_grad]
            if not tensors:
                return
        slot = self._slots.get(name)
        if slot is None:
            slot = self._slots[name] = len(self._names)
            self._names.append(name)
            self._calls.append(0)
        where = (slot, self._calls[slot])
        self._calls[slot] += 1
        for tensor in tensors:
            node = tensor.grad_fn
            if node is None:  # a leaf (a parameter returned as is): a hook we must remove
                hook = functools.partial(self._record, where)
                self._handles.append(tensor.register_hook(hook))  # type: ignore[no-untyped-call]
                continue
            numel = tensor.numel()
            if numel <= _SMALL and self._held + numel <= _HELD_ELEMENTS:
                self._held += numel
                tensor.retain_grad()
                self._retained.append((where, tensor, node, tensor.output_nr, tensor._version))
            else:  # a hook on the node dies with the graph; cheaper than a tensor hook
                node.register_prehook(functools.partial(self._record_node, where, tensor.output_nr))

    def before_backward(self) -> None:
        """Between forward and backward: an output changed in place since its module
        returned it retains a later version's gradient; hook its node instead."""
        kept = []
        for entry in self._retained:
            where, tensor, node, output_nr, version = entry
            if tensor._version == version:
                kept.append(entry)
            else:
                node.register_prehook(functools.partial(self._record_node, where, output_nr))
        self._retained = kept

    def _record(self, where: tuple[int, int], grad: torch.Tensor) -> None:
        self._where.append(where)
        numel = grad.numel()
        if numel <= _SMALL and self._held + numel <= _HELD_ELEMENTS:
            self._held += numel  # normed in finish(), stacked with the others of its shape
            self._held_at.add(len(self._values))
            self._values.append(grad)
        else:
            self._values.append(torch.linalg.vector_norm(grad, dtype=torch.float32))

    def _record_node(
        self, where: tuple[int, int], output_nr: int, grads: tuple[torch.Tensor | None, ...]
    ) -> None:
        grad = grads[output_nr] if output_nr < len(grads) else None
        if grad is not None:
            self._record(where, grad)

    def _norms(self, device: torch.device) -> tuple[list[torch.Tensor], list[int]]:
        """1-D float32 norms of every recorded value, and the value each entry belongs to.

        The small gradients held back in backward are stacked by shape: one norm per group
        instead of one (Python-dispatched) norm per gradient."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        done: list[int] = []
        for index, value in enumerate(self._values):
            if index in self._held_at:
                groups.setdefault((value.shape, value.dtype, value.device), []).append(index)
            else:
                done.append(index)
        parts: list[torch.Tensor] = []
        order: list[int] = []
        for indices in groups.values():
            stacked = torch.stack([self._values[i] for i in indices]).reshape(len(indices), -1)
            parts.append(torch.linalg.vector_norm(stacked, dim=1, dtype=torch.float32).to(device))
            order += indices
        if done:
            parts.append(torch.stack([self._values[i].to(device) for i in done]))
            order += done
        self._held_at.clear()
        return parts, order

    def _rnn_input_hook(self, name: str, batch_first: bool) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            if not args or not torch.is_grad_enabled():
                return None
            x = args[0]
            if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
                return None  # a PackedSequence has no time axis to measure along
            x = x.view_as(x) if x.requires_grad else x.detach().requires_grad_()
            time_dim = 1 if batch_first and x.dim() == 3 else 0
            dims = [d for d in range(x.dim()) if d != time_dim]

            def grad_hook(grad: torch.Tensor) -> None:
                norm = torch.linalg.vector_norm(grad.detach(), dim=dims, dtype=torch.float32)
                self._time.append((name, norm))

            self._handles.append(x.register_hook(grad_hook))  # type: ignore[no-untyped-call]
            return (x, *args[1:])

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def finish(self) -> None:
        """Turn the recorded norms into plain numbers with one device-to-host transfer."""
        for where, tensor, _, _, _ in self._retained:
            grad = tensor.grad
            if grad is not None:  # None: no gradient reached this output
                self._where.append(where)
                self._held_at.add(len(self._values))
                self._values.append(grad)
        self._retained.clear()
        flat: list[float] = []
        if self._values or self._time:
            device = (self._values or [v for _, v in self._time])[0].device
            parts, order = self._norms(device)
            parts += [v.to(device) for _, v in self._time]
            values = torch.cat(parts).cpu().tolist()
            column = [0] * len(order)
            for index, entry in enumerate(order):
                column[entry] = index
            flat = [values[c] for c in column] + values[len(order) :]
        squares = [[0.0] * calls for calls in self._calls]
        for (index, call), value in zip(self._where, flat, strict=False):
            squares[index][call] += value * value
        time: dict[str, list[float]] = {}
        offset = len(self._values)
        for name, per_step in self._time:
            values = flat[offset : offset + per_step.numel()]
            offset += per_step.numel()
            seen = time.setdefault(name, [0.0] * len(values))
            if len(seen) == len(values):  # the same module on sequences of another length: skip
                time[name] = [a + b * b for a, b in zip(seen, values, strict=True)]
        self.norms = tuple(
            (name, math.sqrt(sum(calls))) for name, calls in zip(self._names, squares, strict=True)
        )
        steps = [(name, tuple(math.sqrt(v) for v in values)) for name, values in time.items()]
        steps += [
            (name, tuple(math.sqrt(v) for v in calls))
            for name, calls in zip(self._names, squares, strict=True)
            if len(calls) > 1 and name not in time
        ]
        self.steps = tuple(steps)


@contextmanager
def _record_activation_grads(
    modules: Sequence[tuple[str, nn.Module]],
) -> Iterator[_ActivationGrads]:
    """Record activation-gradient norms of ``modules`` (none: no hooks) during the block."""
    recorder = _ActivationGrads(modules)
    try:
        yield recorder
        recorder.remove()
        recorder.finish()
    finally:
        recorder.remove()


def _call(model: nn.Module, batch: Any) -> Any:
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
            _user_error(f"the forward pass ({how} with batch={_describe(batch)})", exc)
            + "; check that the sample batch matches what the model's forward expects"
        ) from None


def _loss(output: Any, settings: Settings, model: nn.Module | None = None) -> torch.Tensor:
    """The loss: ``loss_fn``, the model's own, a ``pytest_gradcheck_default_loss`` hook's
    (given ``model``), else the seeded default."""
    __tracebackhide__ = True
    if settings.loss_fn is not None:
        try:
            loss = settings.loss_fn(output)
        except Exception as exc:
            raise GradcheckError(_user_error("loss_fn(output)", exc)) from None
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
            f"{where} must be a scalar tensor, got {_describe(loss)}; "
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
        raise GradcheckError(_user_error("a pytest_gradcheck_default_loss hook", exc)) from None


def _default_loss(output: Any, seed: int) -> torch.Tensor:
    """A seeded random projection of every floating-point output, scaled to unit gradient norm.

    ``sum_i <out_i, r_i> / sqrt(numel(out_i))`` with ``r_i ~ N(0, 1)``: the gradient that
    reaches each output is a random direction of norm about 1, which is what a real loss
    (cross-entropy, MSE) sends back from a randomly initialised model.
    """
    leaves = [t for t in _tensors(output) if t.is_floating_point() and t.requires_grad]
    if not leaves:
        raise GradcheckError(
            f"the model output ({_describe(output)}) has no floating-point tensor that "
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


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    seen: set[int] = set()

    def walk(item: Any) -> Iterator[torch.Tensor]:
        if isinstance(item, torch.Tensor):
            if id(item) not in seen:
                seen.add(id(item))
                yield item
        elif isinstance(item, Mapping):
            for sub in item.values():
                yield from walk(sub)
        elif isinstance(item, (list, tuple)):
            for sub in item:
                yield from walk(sub)
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            for f in dataclasses.fields(item):
                yield from walk(getattr(item, f.name))

    yield from walk(value)


# -- statistics -----------------------------------------------------------------------------


class _ParamTable:
    """The trainable parameters of one check, and what stays fixed between its passes: their
    names, owning layers, shapes, dtypes and sizes, how they are stacked for reduction, and
    which run of them each layer owns (they come in module order, so a layer's are adjacent).

    Built once per check, on the check's device; :meth:`measure` runs after every backward
    and makes the records in C from columns: on a model of hundreds of small layers, per-
    record Python objects and the garbage collector's work on them cost more than the
    reductions (``benchmarks/run.py`` prints the collector's time per check).
    """

    def __init__(
        self, names: Sequence[str], params: Sequence[torch.Tensor], structure: checks.Structure
    ) -> None:
        self.names, self.params, n = names, params, len(params)
        self.owners = [name.rpartition(".")[0] for name in names]  # each one's layer
        shapes = [p.shape for p in params]
        dtypes = [p.dtype for p in params]
        self.shapes: list[tuple[int, ...]] = list(map(tuple, shapes))
        self.dtypes = [_DTYPE_NAMES.get(d) or str(d).removeprefix("torch.") for d in dtypes]
        self.numels = [p.numel() for p in params]
        # Small parameters of one shape, dtype and device are stacked, their gradients with
        # them (a gradient has its parameter's shape, dtype and device); large ones alone.
        groups: dict[tuple[Any, ...], list[int]] = {}
        self.large: list[int] = []
        for i, (p, shape, dtype, numel) in enumerate(
            zip(params, shapes, dtypes, self.numels, strict=True)
        ):
            if numel <= _SMALL:
                groups.setdefault((shape, dtype, p.device), []).append(i)
            else:
                self.large.append(i)
        self.groups = list(groups.values())
        slots: list[int] = []  # the slot (i: gradient i, n + i: weight i) of each column
        for indices in self.groups:
            slots += indices
            slots += [n + i for i in indices]
        for i in self.large:
            slots += [i, n + i]
        self._slots = torch.tensor(slots, dtype=torch.long)
        self._numel = torch.tensor(self.numels, dtype=torch.float64)
        # The layers: each one's run of parameters, [first, end).
        owners = self.owners
        bounds = [i for i in range(n) if i == 0 or owners[i] != owners[i - 1]]
        self._bounds = list(zip(bounds, [*bounds[1:], n], strict=True))
        self._layer_names = [owners[first] for first, _ in self._bounds]
        modules = structure.by_name
        self._layer_types = [
            module.type if (module := modules.get(name)) is not None else "Module"
            for name in self._layer_names
        ]
        self._layer_numels = [sum(self.numels[first:end]) for first, end in self._bounds]
        self._layer_of = torch.tensor(
            [j for j, (first, end) in enumerate(self._bounds) for _ in range(first, end)],
            dtype=torch.long,
        )

    def owner_by_id(self) -> dict[int, str]:
        """The owning layer's module path by ``id`` of each parameter."""
        return dict(zip(map(id, self.params), self.owners, strict=True))

    def measure(self) -> list[LayerStats]:
        """Every layer's statistics, its parameters' within: one device-to-host transfer."""
        grads: list[torch.Tensor | None] = [p.grad for p in self.params]
        has_grad = [g is not None for g in grads]
        if any(g is not None and g.is_sparse for g in grads):  # nn.Embedding(sparse=True)
            grads = [g.coalesce().to_dense() if g is not None and g.is_sparse else g for g in grads]
        with torch.no_grad():  # parameters are stacked as they are: no detach() per tensor
            stats = self._reduce(grads)
        n, wide = len(self.params), torch.float64
        norm, max_abs, nonzero = stats[0, :n], stats[1, :n], stats[2, :n]
        weight_norm = stats[0, n:]
        numel = self._numel
        zero_fraction = torch.where(numel > 0, (numel - nonzero) / numel, 1.0)
        # Rows that need a closer look: a NaN/Inf, or a norm whose float32 sum of squares
        # under- or overflowed (a missing gradient was reduced as zeros: never one).
        closer = (
            ~(torch.isfinite(norm) & torch.isfinite(max_abs))
            | (
                (max_abs > 0)
                & ((norm == 0) | (max_abs < _RESCALE_BELOW) | (max_abs > _RESCALE_ABOVE))
            )
            | ((weight_norm > 0) & (weight_norm < _RESCALE_BELOW))
            | (weight_norm > _RESCALE_ABOVE)
        ).to(wide)
        # Layer aggregates, as LayerStats sums them (in float64, in parameter order).
        measured = torch.tensor(has_grad, dtype=wide)
        sums = torch.zeros(7, len(self._bounds), dtype=wide)
        layer_of = self._layer_of
        sums[0].index_add_(0, layer_of, norm * norm * measured)
        sums[1].index_add_(0, layer_of, numel * measured)
        sums[2].index_add_(0, layer_of, zero_fraction * numel * measured)
        sums[3].scatter_reduce_(0, layer_of, max_abs * measured, "amax")
        sums[4].index_add_(0, layer_of, weight_norm * weight_norm)
        sums[5].index_add_(0, layer_of, measured)
        sums[6].index_add_(0, layer_of, closer)
        square, measured_numel, zeros, layer_max, weight_square, with_grad, looked = sums
        layer_norm = square.sqrt()
        has_numel = measured_numel > 0
        per_param = torch.stack([norm, max_abs, zero_fraction, weight_norm, closer])
        per_layer = torch.stack(
            [
                layer_norm,
                torch.where(has_numel, layer_norm / measured_numel.sqrt(), 0.0),
                layer_max,
                torch.where(has_numel, zeros / measured_numel, 1.0),
                weight_square.sqrt(),
                with_grad,
                looked,
            ]
        )
        host = torch.cat([per_param.reshape(-1), per_layer.reshape(-1)]).tolist()
        g_norm, g_max, g_zeros, w_norm, look = (host[k * n : (k + 1) * n] for k in range(5))
        param_stats = list(
            map(
                _records(ParamStats),
                zip(
                    self.names,
                    self.owners,
                    self.shapes,
                    self.dtypes,
                    self.numels,
                    has_grad,
                    g_norm,
                    g_max,
                    g_zeros,
                    itertools.repeat(0),
                    itertools.repeat(0),
                    w_norm,
                ),
            )
        )
        for i in itertools.compress(range(n), look):
            param_stats[i] = ParamStats._make(
                self._closer_row(i, grads[i], g_norm[i], g_max[i], g_zeros[i], w_norm[i])
            )
        owned = [tuple(param_stats[first:end]) for first, end in self._bounds]
        count = len(owned)
        l_norm, l_rms, l_max, l_zeros, l_weight, l_grad, l_look = (
            host[5 * n + k * count : 5 * n + (k + 1) * count] for k in range(7)
        )
        layers = list(
            map(
                _records(LayerStats),
                zip(
                    self._layer_names,
                    self._layer_types,
                    range(count),
                    owned,
                    self._layer_numels,
                    map(bool, l_grad),
                    l_norm,
                    l_rms,
                    l_max,
                    l_zeros,
                    itertools.repeat(0),
                    itertools.repeat(0),
                    l_weight,
                ),
            )
        )
        for j in itertools.compress(range(count), l_look):
            # A layer with a row looked at closer sums its parameters' final figures.
            layers[j] = LayerStats(self._layer_names[j], self._layer_types[j], j, owned[j])
        return layers

    def _closer_row(
        self,
        i: int,
        g: torch.Tensor | None,
        norm: float,
        largest: float,
        zero_fraction: float,
        weight_norm: float,
    ) -> tuple[Any, ...]:
        """A parameter's row looked at closer: NaN/Inf counts, norms recomputed scaled."""
        if 0 < weight_norm < _RESCALE_BELOW or weight_norm > _RESCALE_ABOVE:
            weight_norm = _scaled_norm(self.params[i])
        fixed = (self.names[i], self.owners[i], self.shapes[i], self.dtypes[i], self.numels[i])
        if g is None:
            return (*fixed, False, 0.0, 0.0, 1.0, 0, 0, weight_norm)
        nan_count = inf_count = 0
        if not (math.isfinite(norm) and math.isfinite(largest)):
            nan_count = int(torch.isnan(g).sum())
            inf_count = int(torch.isinf(g).sum())
            if nan_count == 0 and inf_count == 0:  # overflow of the sum of squares only
                norm = _scaled_norm(g)
        elif largest > 0 and (norm == 0 or largest < _RESCALE_BELOW or largest > _RESCALE_ABOVE):
            norm = _scaled_norm(g)  # the float32 sum of squares under- or overflowed
        return (*fixed, True, norm, largest, zero_fraction, nan_count, inf_count, weight_norm)

    def _reduce(self, grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """L2 norm, max-abs and count of non-zeros of every gradient, then of every weight: a
        (3, 2n) float64 tensor on the CPU, columns in ``[*grads, *params]`` order (a weight's
        max-abs and non-zeros are 0; a missing gradient reads as zeros).

        One op per statistic per stacked group; everything reaches the host in one transfer.
        ``count_nonzero`` is exact (a float32 ``ord=0`` norm is not above 2**24 elements)
        and ``amax`` carries NaN through, so max-abs detects non-finite values.
        """
        params = self.params
        parts: list[torch.Tensor] = []
        for indices in self.groups:
            tensors = [
                g if (g := grads[i]) is not None else torch.zeros_like(params[i]) for i in indices
            ]
            tensors += [params[i] for i in indices]
            stacked = torch.stack(tensors).reshape(len(tensors), -1)
            parts.append(_reduce_rows(stacked, with_max=True))
        for i in self.large:
            g = grads[i]
            if g is None:  # reads as one zero
                parts.append(_reduce_rows(params[i].new_zeros(1, 1), with_max=True))
            else:
                parts.append(_reduce_rows(g.reshape(1, -1), with_max=True))
            parts.append(_reduce_rows(params[i].reshape(1, -1), with_max=False))
        if not parts:
            return torch.zeros(3, 0, dtype=torch.float64)
        device = parts[0].device
        rows = torch.cat([part.to(device) for part in parts], dim=1).cpu().double()
        return rows.new_empty(rows.shape).index_copy_(1, self._slots, rows)


_Record = TypeVar("_Record", bound=tuple[Any, ...])


def _records(cls: type[_Record]) -> Callable[[Iterable[Any]], _Record]:
    """Makes a ``cls`` (a named tuple) from all its fields in order, computed ones included,
    in C: the engine makes one per parameter, layer and module of every check."""
    return functools.partial(tuple.__new__, cls)


_DTYPE_NAMES = {
    dtype: str(dtype).removeprefix("torch.")
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
}


def _reduce_rows(m: torch.Tensor, with_max: bool) -> torch.Tensor:
    """Reduce each row of ``m`` to (norm, max-abs, non-zeros), a (3, rows) tensor (no
    temporary as large as ``m``); without ``with_max`` the last two rows are 0.

    The rows are float64 (float32 on MPS, which has no float64), so that a count of
    non-zeros above 2**24 and a float64 tensor's statistics survive the trip to the host.
    A single row uses whole-tensor reductions: on CPU, ``aminmax(dim=1)`` over one long row
    is about 4x slower than ``aminmax()``, and ``count_nonzero`` beats ``bool().sum()`` there.
    """
    wide = torch.float32 if m.device.type == "mps" else torch.float64
    accumulate = torch.float64 if m.dtype == torch.float64 else torch.float32
    single = m.shape[0] == 1
    norm: torch.Tensor
    if single:
        norm = torch.linalg.vector_norm(m, dtype=accumulate).reshape(1)
    else:
        norm = torch.linalg.vector_norm(m, dim=1, dtype=accumulate)
    norm = norm.to(wide)
    if not with_max or m.shape[1] == 0:
        zeros = torch.zeros_like(norm)
        return torch.stack([norm, zeros, zeros])
    if single:
        low, high = torch.aminmax(m)
        max_abs = torch.maximum(high, -low).reshape(1)
        nonzero = torch.count_nonzero(m).reshape(1)
    else:  # on CPU, amax + amin beat aminmax(dim=1) 10x, bool().sum beats count_nonzero 3x
        max_abs = torch.maximum(m.amax(dim=1), -m.amin(dim=1))
        nonzero = m.bool().sum(dim=1)
    return torch.stack([norm, max_abs.to(wide), nonzero.to(wide)])


def _scaled_norm(t: torch.Tensor) -> float:
    """L2 norm without under/overflow: max-abs times the norm of the rescaled tensor."""
    flat = t.detach().reshape(-1)
    if flat.dtype != torch.float64 and flat.device.type != "mps":
        flat = flat.double()
    else:
        flat = flat.float()
    finite = flat[torch.isfinite(flat)]
    m = float(finite.abs().max()) if finite.numel() else 0.0
    if m == 0.0 or not math.isfinite(m):
        return m
    return m * float(torch.linalg.vector_norm(finite / m))


# -- structure ------------------------------------------------------------------------------

_SATURATING_NODES = frozenset(
    {
        "SigmoidBackward0",
        "TanhBackward0",
        "HardtanhBackward0",
        "HardsigmoidBackward0",
        "LogSigmoidBackward0",
        "SoftsignBackward0",
    }
)


def _walk_graph(
    root: Any,
    layer_of: Mapping[int, str],
    step: Callable[[int, str], int],
    merge: Callable[[int, int], int],
) -> dict[str, int]:
    """Propagate a count from the loss down the autograd graph, in topological order.

    ``step(count, node_name)`` gives a child's count from its parent's, ``merge`` combines
    the counts of several parents (max: longest path, min: shortest). Returns, per layer,
    the largest count that reaches one of its parameters. Run only for unhealthy checks.
    """
    indegree: dict[Any, int] = {root: 0}
    stack = [root]
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is None:
                continue
            if child not in indegree:
                indegree[child] = 0
                stack.append(child)
            indegree[child] += 1
    value: dict[Any, int] = {root: step(0, root.name())}
    ready = [root]
    counts: dict[str, int] = {}
    while ready:
        node = ready.pop()
        here = value[node]
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in layer_of:
            layer = layer_of[id(variable)]
            counts[layer] = max(counts.get(layer, 0), here)
        for child, _ in node.next_functions:
            if child is None:
                continue
            candidate = step(here, child.name())
            value[child] = merge(value[child], candidate) if child in value else candidate
            indegree[child] -= 1
            if indegree[child] == 0:
                ready.append(child)
    return counts


def _saturating_ops(root: Any, layer_of: Mapping[int, str]) -> dict[str, int]:
    """Per layer: the most Sigmoid/Tanh-like autograd ops on a path from it to the loss.

    Counts functional activations (``torch.sigmoid``) as well as modules.
    """
    return _walk_graph(root, layer_of, lambda count, name: count + (name in _SATURATING_NODES), max)


# What a policy's conventions need beyond the module list (measured only when it has any).

_NORM_NODES = frozenset(
    {
        "NativeLayerNormBackward0",
        "NativeBatchNormBackward0",
        "CudnnBatchNormBackward0",
        "MiopenBatchNormBackward0",
        "NativeGroupNormBackward0",
        "RsqrtBackward0",  # RMSNorm written out (Llama, T5)
    }
)


def _conventions_on(settings: Settings) -> bool:
    return settings.policy is not None and bool(settings.policy.enabled)


@dataclasses.dataclass
class _ForwardFacts:
    """What the forward pass shows about the structure: call order and RNN lengths."""

    order: list[str] = dataclasses.field(default_factory=list)
    """Module names in the order of their first call."""
    lengths: dict[str, int] = dataclasses.field(default_factory=dict)
    """Steps each vanilla RNN ran over (an RNNCell: its calls)."""


@contextmanager
def _forward_facts(modules: Sequence[tuple[str, nn.Module]]) -> Iterator[_ForwardFacts]:
    """Record :class:`_ForwardFacts` during the block (no modules: no hooks)."""
    facts = _ForwardFacts()
    called: set[str] = set()

    def record(name: str, rnn: nn.Module | None) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if name not in called:
                called.add(name)
                facts.order.append(name)
            if rnn is None:
                return
            x = args[0] if args else None
            if isinstance(rnn, nn.RNNCell):  # one step per call
                facts.lengths[name] = facts.lengths.get(name, 0) + 1
                return
            if isinstance(x, nn.utils.rnn.PackedSequence):
                steps = len(x.batch_sizes)
            elif isinstance(x, torch.Tensor) and x.dim() >= 2:
                steps = x.shape[1 if getattr(rnn, "batch_first", False) and x.dim() == 3 else 0]
            else:
                return
            facts.lengths[name] = max(facts.lengths.get(name, 0), steps)

        return hook

    handles = []
    for name, module in modules:
        vanilla = (
            isinstance(module, nn.RNNBase) and module.mode in ("RNN_TANH", "RNN_RELU")
        ) or isinstance(module, nn.RNNCell)
        handles.append(module.register_forward_pre_hook(record(name, module if vanilla else None)))
    try:
        yield facts
    finally:
        for handle in handles:
            handle.remove()


def _convention_facts(
    structure: checks.Structure,
    graph: Any,
    table: _ParamTable,
    facts: _ForwardFacts,
) -> checks.Structure:
    lengths = facts.lengths
    modules = tuple(
        m._replace(extra={**m.extra, "sequence_length": float(lengths[m.name])})
        if m.name in lengths
        else m
        for m in structure.modules
    )
    chain: dict[str, int] = {}
    if graph is not None:
        chain = _saturating_chain(graph, table.owner_by_id())
    return dataclasses.replace(
        structure, modules=modules, saturating_chain=chain, forward_order=tuple(facts.order)
    )


def _saturating_chain(root: Any, layer_of: Mapping[int, str]) -> dict[str, int]:
    """Per layer: the fewest Sigmoid/Tanh-like ops since the last normalization op on any
    path from it to the loss (a skip connection is such a path)."""

    def step(count: int, name: str) -> int:
        return 0 if name in _NORM_NODES else count + (name in _SATURATING_NODES)

    return _walk_graph(root, layer_of, step, min)


def _walk(
    modules: Sequence[tuple[str, nn.Module]],
) -> tuple[list[str], list[nn.Parameter], checks.Structure]:
    """One pass over ``model.named_modules()``: the parameters and their names as
    ``model.named_parameters()`` lists them (a shared one once, under its first owner), and
    a plain description of the modules for checks and hints.

    (Parallel lists, not a list of pairs: every object a check keeps alive is work for the
    garbage collector.)"""
    names: list[str] = []
    params: list[nn.Parameter] = []
    rows: list[tuple[Any, ...]] = []  # ModuleInfo fields, in order
    seen: set[int] = set()
    for index, (prefix, module) in enumerate(modules):
        owned = 0
        for name, p in module._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                owned += p.numel()
                names.append(f"{prefix}.{name}" if prefix else name)
                params.append(p)
        extra: Mapping[str, float] = checks.NO_EXTRA
        if isinstance(module, nn.RNNBase) and module.mode in ("RNN_TANH", "RNN_RELU"):
            weight = getattr(module, "weight_hh_l0", None)
            if isinstance(weight, torch.Tensor) and weight.shape[0] <= 2048:
                with torch.no_grad():
                    eig = torch.linalg.eigvals(weight.detach().float().cpu())
                extra = {"spectral_radius": float(eig.abs().max())}
        rows.append((prefix, type(module).__name__, index, extra, owned))
    return names, params, checks.Structure(modules=tuple(map(_records(checks.ModuleInfo), rows)))


# -- steps, precision and wrappers ----------------------------------------------------------

_DEFAULT_LR = {"sgd": 1e-2, "adam": 1e-3, "adamw": 1e-3}
_MIN_LOSS_SCALE = 1.0
"""GradScaler backing off below this scale: the gradients overflow fp16 even unscaled."""
_MIN_DECREASE = 1e-6
"""``expect_loss_decrease``: the last loss must be below the first by this fraction of it."""
_LOW = (torch.float16, torch.bfloat16)
_SPARSE_GRADIENTS = frozenset({"Embedding", "EmbeddingBag"})
"""Layer types whose gradient is mostly exact zeros by construction (rows not looked up)."""


class _Training:
    """What a check does beyond one fp32 pass: optimizer steps, autocast and loss scaling.

    With the defaults (one step, fp32, no scaler) it holds nothing and costs nothing.
    Optimizer steps change the trainable parameters in place: they are copied first and
    written back on exit, bit for bit; the optimizer (and its state) dies with the check.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        params: Sequence[torch.Tensor],
        device: torch.device,
        settings: Settings,
    ) -> None:
        self.settings = settings
        self.names = names
        self.params = params
        self.device = device
        self.wrapped = _unwrap(model) is not model
        self.autocast = _autocast(device, settings.precision)
        self.notes: list[str] = []
        self._losses: list[float] = []
        self._final_loss: float | None = None
        self._reference: tuple[int, list[LayerStats], float] | None = None
        self._overflows = 0
        self._collapsed: tuple[float, float] | None = None
        steps = settings.steps > 1 or settings.expect_loss_decrease
        self._saved = [p.detach().clone() for p in self.params] if steps else []
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

    def __exit__(self, *exc: object) -> None:
        """Write the parameters back and drop the optimizer and its state."""
        if self._saved:
            with torch.no_grad():
                for p, saved in zip(self.params, self._saved, strict=True):
                    p.copy_(saved)
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
            raise GradcheckError(_user_error("the optimizer step", exc)) from None
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
        """Add what the precision and the loss scale explain, and the step of each problem."""
        found = list(problems)
        precision = self.settings.precision
        if precision != "fp32" and self._suspicious(found, layers):
            if self._reference is None or self._reference[0] != step:
                reference, reference_loss = self._fp32_pass(model, modules, batch)
                self._reference = (step, reference, reference_loss)
            _, reference, reference_loss = self._reference
            scale = float(self.scaler.get_scale()) if self.scaler is not None else None
            found = checks.precision_problems(
                found, layers, reference, reference_loss, precision, scale
            )
        if self._collapsed is not None:
            initial, final = self._collapsed
            found.insert(0, checks.collapsed_scale(initial, final, self._overflows))
        found.sort(key=Problem.sort_key)
        if self.settings.steps > 1:
            found = [dataclasses.replace(p, step=step) if p.step is None else p for p in found]
        self.notes = self._describe(step)
        return found

    def _suspicious(self, problems: Sequence[Problem], layers: Sequence[LayerStats]) -> bool:
        """Only a pass with many exact zeros or a NaN/Inf pays for the fp32 comparison.

        An embedding's gradient is zero in every row the batch does not look up, in fp32 as
        well: its zeros alone do not ask for the comparison (they are compared when it runs).
        """
        return any(p.kind == "nonfinite" for p in problems) or any(
            layer.has_grad
            and layer.zero_fraction >= checks.UNDERFLOW_FRACTION
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
            loss, _, _ = _forward_backward(model, modules, _upcast(batch), self.settings)
            layers = _ParamTable(self.names, self.params, _walk(modules)[2]).measure()
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
            final = float(_loss(_call(model, batch), settings, model).detach().float().cpu())
        first = self._losses[0]
        self._final_loss = final
        self.notes = self._describe(settings.steps)
        if math.isfinite(final) and first - final > _MIN_DECREASE * abs(first):
            return []
        mine = {id(p) for p in self.params}
        covered = 0
        if self.optimizer is not None:
            held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
            covered = len(mine & held)
        return [
            checks.stalled(
                first, final, settings.steps, _optimizer_name(settings), covered, len(mine)
            )
        ]

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
            raise GradcheckError(_user_error("the optimizer factory", exc)) from None
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


def _upcast(batch: Any) -> Any:
    """``batch`` with its fp16/bf16 tensors in fp32."""
    return _map_tensors(batch, lambda t: t.float() if t.dtype in _LOW else t)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel or DataParallel, else ``model``."""
    wrappers = tuple(
        kind
        for kind in (
            getattr(nn.parallel, "DistributedDataParallel", None),
            getattr(nn, "DataParallel", None),
        )
        if isinstance(kind, type)
    )
    if wrappers and isinstance(model, wrappers):
        inner = model.module
        assert isinstance(inner, nn.Module)
        return inner
    return model


def _wrapped_device(model: nn.Module, inner: nn.Module, settings: Settings) -> torch.device | None:
    """A wrapped (DDP) model is checked where it lives: it cannot move."""
    if inner is model:
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

    def compute_loss() -> torch.Tensor:
        _seed(borrowed.seed, borrowed.device)
        with borrowed.autocast():
            return _loss(_call(model, batch), settings, model)

    grads = [(p, p.grad) for p in model.parameters()]
    try:
        from .diagnosis import find_nonfinite_origin

        return find_nonfinite_origin(model, compute_loss)
    except Exception as exc:  # the diagnosis must never hide the verdict
        return [f"(the NaN/Inf origin search failed: {type(exc).__name__}: {exc})"]
    finally:
        for p, grad in grads:
            p.grad = grad


# -- error messages -------------------------------------------------------------------------


def _user_error(what: str, exc: BaseException) -> str:
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


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        shape = "x".join(str(s) for s in value.shape) or "scalar"
        return f"Tensor[{shape}, {str(value.dtype).removeprefix('torch.')}]"
    if isinstance(value, Mapping):
        inner = ", ".join(f"{k}={_describe(v)}" for k, v in list(value.items())[:6])
        return f"{type(value).__name__}({inner})"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_describe(v) for v in list(value)[:6])
        return f"{type(value).__name__}({inner})"
    return type(value).__name__
