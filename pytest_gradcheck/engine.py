"""One process's gradient check: take the model, run the seeded passes, measure, ask the
verdict, give the model back.

:func:`run_check` moves the model and the batch to the device, runs a seeded
forward/backward pass, has :mod:`pytest_gradcheck.measure` reduce every gradient to plain
statistics, hands them to :mod:`pytest_gradcheck.verdict`, and restores the model exactly as
it was. Beyond one pass (:class:`~pytest_gradcheck.training.Training`): ``steps=N`` repeats pass, statistics and
verdict at every optimizer step and stops at the first unhealthy one; ``precision`` runs the
passes under ``torch.autocast`` (with a GradScaler on request) and compares a suspicious
pass with fp32. The entry point users call is :func:`pytest_gradcheck.api.check_gradients`.

A model sharded with FSDP2 (DTensor parameters) is checked on every rank alike: its
statistics are gathered across the ranks (:mod:`pytest_gradcheck.sharded`). A compiled
model (``torch.compile``) is reported under the names of the module it wraps, and what its
compiled code cannot give (module hooks) is said in a note.

Imports torch, training, passes, measure, facts, sharded, wrappers, tensors, verdict,
checks, results and settings below it (diagnosis lazily, on a NaN/Inf only).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import operator
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from . import verdict
from .checks import OUTPUT_RMS, needs_forward_scale
from .facts import (
    convention_facts,
    fewest_saturating_ops,
    forward_facts,
    output_scales,
    saturating_ops,
    score_ops,
    what_ran,
)
from .measure import ParamTable, record_activation_grads, walk_modules
from .passes import call, compute_loss, reseed, with_target
from .results import (
    GradcheckError,
    GradcheckTimeout,
    GradcheckWarning,
    LayerStats,
    Problem,
    Report,
    Structure,
)
from .settings import Settings
from .sharded import sharded_stats
from .tensors import describe, tensors, to_device
from .training import Training
from .wrappers import compiled, compiled_notes, data_parallel, unwrap

__all__ = ["pick_device", "require_trainable", "run_check"]


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


def run_check(model: nn.Module, batch: Any, settings: Settings, target: Any = None) -> Report:
    """Check ``model`` on ``batch`` in this process with resolved ``settings`` (see
    :func:`pytest_gradcheck.api.check_gradients`); the report hooks have not run on it."""
    __tracebackhide__ = True
    inner = unwrap(model)  # reported without DDP's "module." and torch.compile's "_orig_mod."
    with _lock(inner):  # two threads checking one model take turns
        return _run_check(model, inner, batch, settings, target)


def _run_check(
    model: nn.Module, inner: nn.Module, batch: Any, settings: Settings, target: Any
) -> Report:
    __tracebackhide__ = True
    deadline = _Deadline(settings)
    is_compiled = compiled(model)
    modules = list(inner.named_modules())
    all_names, all_params, structure = walk_modules(modules)
    names, params = all_names, all_params
    if not all(p.requires_grad for p in all_params):
        names = [name for name, p in zip(all_names, all_params, strict=True) if p.requires_grad]
        params = [p for p in all_params if p.requires_grad]
    frozen = len(all_params) - len(params)
    if frozen:
        taken = set(names)
        structure = dataclasses.replace(
            structure, frozen=tuple(name for name in all_names if name not in taken)
        )
    if not params:
        _no_trainable(inner, frozen)
    device = _wrapped_device(model, inner, params, settings) or pick_device(settings.device)
    if target is not None:
        settings = dataclasses.replace(
            settings, loss_fn=with_target(settings.loss_fn, to_device(target, device))
        )
    started = time.perf_counter()
    outer = modules if inner is model else list(model.named_modules())
    with (
        _borrowed(model, outer, all_params, batch, device, settings) as borrowed,
        Training(model, outer, names, params, device, settings) as training,
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
            where = (
                f"step {step} of {settings.steps}"
                if settings.steps > 1
                else "the forward/backward pass"
            )
            if step > 1:
                training.step()
            with (
                record_activation_grads(hooked if settings.activations else ()) as activations,
                forward_facts(hooked if _conventions_on(settings) else ()) as facts,
                _aliases(table, modules),
            ):
                done = training.forward_backward(
                    model, hooked, moved_batch, activations.before_backward
                )
            loss, graph = done.loss, done.graph
            if step == 1:
                small_batchnorm = done.small_batchnorm
            layers = table.measure()
            deadline.check(where, step)
            seen = structure
            if _conventions_on(settings):
                seen = convention_facts(structure, graph, table.owner_by_id, facts)
            if graph is not None:  # walked only if a hint asks (an unhealthy check)
                seen = dataclasses.replace(
                    seen,
                    saturating_ops=_Lazy(_on_graph(saturating_ops, graph, table)),
                    fewest_saturating_ops=_Lazy(_on_graph(fewest_saturating_ops, graph, table)),
                    score_ops=_Lazy(_on_graph(score_ops, graph, table)),
                    constant_weights=_Lazy(
                        functools.partial(_constant_weights, names, training.params)
                    ),
                    input_rms=_Lazy(functools.partial(_input_rms, moved_batch)),
                )
            if _unreached(layers):
                seen = _reach_facts(seen, model, inner, modules, moved_batch, settings, borrowed)
                seen = dataclasses.replace(seen, missing_inputs=_missing_inputs(inner, batch))
                deadline.check(f"the search for why parameters got no gradient ({where})", step)
            if step == 1 and needs_forward_scale(layers):
                seen = _with_output_scales(seen, model, modules, moved_batch, settings, borrowed)
                deadline.check("the forward pass that measures each layer's output scale")
            problems, check_notes = verdict.evaluate(layers, seen, loss, settings)
            problems = training.findings(problems, layers, step, inner, modules, moved_batch)
            problems = verdict.small_batch_first(problems, small_batchnorm)
            deadline.check(where, step, problems)  # the fp32 comparison pass included
            if problems:
                break
        else:
            problems = training.final_findings(inner, moved_batch)  # expect_loss_decrease
            deadline.check("the last optimizer step and the loss after it", 0, problems)
        diagnosis: list[str] = []
        if settings.diagnose and any(p.kind == "nonfinite" for p in problems):
            diagnosis = _diagnose(inner, moved_batch, settings, borrowed)
            deadline.check("the NaN/Inf origin search", 0, problems)
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
        loss_source=done.loss_source,
        settings=settings.to_dict(),
        diagnosis=tuple(diagnosis),
        activation_grads=activation_grads,
        activation_steps=activation_steps,
    )


class _Deadline:
    """The ``timeout`` of one check, looked at after each phase: a pass (with its statistics
    and verdict), an optimizer step, a failure-path search. Past it, the check raises
    :class:`GradcheckTimeout` between phases, inside the contexts that give the model back.
    A phase that never ends (a forward that never returns) is not interrupted."""

    def __init__(self, settings: Settings) -> None:
        self.limit = settings.timeout
        self.origin = settings.origins.get("timeout", "the defaults")
        self.steps = settings.steps
        self.started = time.perf_counter()

    def check(self, phase: str, step: int = 0, problems: Sequence[Problem] = ()) -> None:
        """Raise when the limit has passed. ``phase`` is what has just run ("step 3 of
        100"), ``step`` the optimizer step it belongs to (0: none), ``problems`` what the
        check had found by then."""
        __tracebackhide__ = True
        if self.limit is None:
            return
        elapsed = time.perf_counter() - self.started
        if elapsed <= self.limit:
            return
        need = elapsed / step * self.steps if step else elapsed
        pace = ""
        if step and step < self.steps:
            pace = f"; at this pace the {self.steps} steps need about {_seconds(need)} s"
        found = ""
        if problems:
            kinds = list(dict.fromkeys(p.kind for p in problems))
            found = f" It had found {len(problems)} problem(s) by then ({', '.join(kinds)})."
        raise GradcheckTimeout(
            f"the check ran past timeout={self.limit:g} s (from {self.origin}): "
            f"{_seconds(elapsed)} s had passed at the end of {phase}{pace}, so it stopped there and "
            f"gave the model back as it was.{found} Raise timeout (e.g. "
            f"timeout={_round_up(2 * need):g}) or turn it off, or check fewer steps or a "
            "smaller batch. The limit is looked at between passes: a forward that never "
            "returns is stopped only by pytest-timeout (--timeout)"
        )


def _seconds(seconds: float) -> str:
    """``0.537``, ``12.3``, ``1,520``: three significant digits, no exponent."""
    return f"{seconds:,.0f}" if seconds >= 100 else f"{seconds:.3g}"


def _round_up(seconds: float) -> float:
    """``seconds`` rounded up to one significant digit (0.23 -> 0.3, 117 -> 200)."""
    magnitude = 10.0 ** math.floor(math.log10(seconds))
    return float(math.ceil(seconds / magnitude) * magnitude)


def _with_output_scales(
    structure: Structure,
    model: nn.Module,
    modules: Sequence[tuple[str, nn.Module]],
    batch: Any,
    settings: Settings,
    borrowed: _Borrowed,
) -> Structure:
    """The structure with each layer's forward output RMS, from one more seeded forward
    pass without gradients (run only when the gradients are large)."""
    reseed(settings.seed, borrowed.device)
    with torch.no_grad(), borrowed.autocast(), output_scales(modules) as scales:
        call(model, batch)
    order = structure.forward_order or tuple(scales)
    return dataclasses.replace(
        structure,
        modules=tuple(
            m._replace(extra={**m.extra, OUTPUT_RMS: scales[m.name]}) if m.name in scales else m
            for m in structure.modules
        ),
        forward_order=order,
    )


def _unreached(layers: Sequence[LayerStats]) -> bool:
    """Some parameter got no gradient, or some layer an all-zero one."""
    return any(map(_no_gradient, layers))


def _no_gradient(layer: LayerStats) -> bool:
    if layer.grad_max_abs == 0.0:  # also every layer without a gradient
        return not layer.nan_count and not layer.inf_count
    return not all(map(_HAS_GRAD, layer.params))


_HAS_GRAD = operator.attrgetter("has_grad")


_OTHER_SEEDS = 2
"""Passes under other seeds that look for gradients the check's seed did not give."""


def _reach_facts(
    structure: Structure,
    model: nn.Module,
    inner: nn.Module,
    modules: Sequence[tuple[str, nn.Module]],
    batch: Any,
    settings: Settings,
    borrowed: _Borrowed,
) -> Structure:
    """Why parameters got no (or an all-zero) gradient: which modules ran and which
    parameters an op read, and which ones get a gradient under other seeds. Two more
    passes, on the failure path only; the gradients are as before afterwards."""
    named = [(name, p) for name, p in inner.named_parameters() if p.requires_grad]
    missing = {name for name, p in named if p.grad is None}
    zero = {name for name, p in named if p.grad is not None and not bool(p.grad.any())}
    watched = {id(p): name for name, p in named if name in missing or name in zero}
    saved = [p.grad for _, p in named]
    ran: set[str] = set()
    read: set[str] = set()
    cuts: dict[str, str] = {}
    zeroed: dict[str, tuple[str, str]] = {}
    indices: dict[str, tuple[str, str]] = {}
    unread: dict[str, tuple[str, str]] = {}
    other: set[str] = set()
    try:
        for k in range(1, _OTHER_SEEDS + 1):
            for _, p in named:
                p.grad = None
            reseed((settings.seed + k) % 2**63, borrowed.device)
            with ExitStack() as stack:
                if k == 1:
                    ran, read, cuts, zeroed, after = stack.enter_context(
                        what_ran(modules, watched, frozenset(zero))
                    )
                with torch.enable_grad(), borrowed.autocast():
                    loss = compute_loss(call(model, batch), settings, inner)
            loss.backward()  # type: ignore[no-untyped-call]
            if k == 1:
                indices, unread = after(loss)
            for name, p in named:
                grad = p.grad
                if (name in missing or name in zero) and grad is not None and bool(grad.any()):
                    other.add(name)
    except (GradcheckError, RuntimeError):
        pass  # a best effort: the facts below stay as far as they got
    finally:
        for (_, p), grad in zip(named, saved, strict=True):
            p.grad = grad
    owners = {name.rpartition(".")[0] for name in missing}
    called = ran | {name.rpartition(".")[0] for name in read}  # its weights used functionally
    never_ran = frozenset(owner for owner in owners if owner not in called) if ran else frozenset()
    not_exercised = frozenset(
        name for name in missing if name.rpartition(".")[0] in never_ran or name not in read
    )
    return dataclasses.replace(
        structure,
        not_exercised=not_exercised,
        never_ran=never_ran,
        other_seeds=frozenset(other),
        reach_looked=bool(ran),
        cuts={name: cut for name, cut in cuts.items() if name in missing},
        through_indices={name: op for name, op in indices.items() if name in missing},
        zeroed=dict(zeroed),
        zero_past={name: op for name, op in unread.items() if name in zero},
    )


def _missing_inputs(model: nn.Module, batch: Any) -> tuple[str, ...]:
    """The optional tensor inputs of ``model.forward`` that ``batch`` does not give."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return ()
    kinds = (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )
    declared = [p for p in signature.parameters.values() if p.kind in kinds]
    if isinstance(batch, Mapping):
        given = {str(key) for key in batch}
    elif isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        given = {p.name for p in declared[: len(batch)]}
    else:
        given = {p.name for p in declared[:1]}
    return tuple(
        p.name
        for p in declared
        if p.name not in given
        and p.default is not inspect.Parameter.empty
        and (p.annotation is inspect.Parameter.empty or "Tensor" in str(p.annotation))
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


class _Lazy(Mapping[str, Any]):
    """A mapping computed on first use: only a hint of an unhealthy check asks for these
    facts (a walk of the autograd graph, a reduction of the batch), so a healthy check
    never pays for them."""

    def __init__(self, compute: Callable[[], Mapping[str, Any]]) -> None:
        self._compute: Callable[[], Mapping[str, Any]] | None = compute
        self._values: Mapping[str, Any] = {}

    def _get(self) -> Mapping[str, Any]:
        if self._compute is not None:
            self._values, self._compute = self._compute(), None
        return self._values

    def __getitem__(self, key: str) -> Any:
        return self._get()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


def _on_graph(
    walk: Callable[[Any, Mapping[int, str]], dict[str, int]], graph: Any, table: ParamTable
) -> Callable[[], dict[str, int]]:
    return lambda: walk(graph, table.owner_by_id())


def _constant_weights(names: Sequence[str], params: Sequence[torch.Tensor]) -> dict[str, float]:
    """Layers whose weight matrix holds one value repeated (a constant init other than 0):
    every unit computes the same thing. Looked at when a hint asks."""
    found: dict[str, float] = {}
    with torch.no_grad():
        for name, p in zip(names, params, strict=True):
            if p.dim() < 2 or p.numel() < 2 or not p.is_floating_point():
                continue
            low, high = float(p.min()), float(p.max())
            if low == high != 0.0:
                found.setdefault(name.rpartition(".")[0], low)
    return found


def _input_rms(batch: Any) -> dict[str, float]:
    found = [t.detach().float() for t in tensors(batch) if t.is_floating_point() and t.numel()]
    if not found:
        return {}
    squares = torch.stack([t.square().sum() for t in found]).sum()
    return {"batch": float((squares / sum(t.numel() for t in found)).sqrt().cpu())}


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
    versions = list(map(_VERSION, params))
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
            changed = sum(map(operator.ne, map(_VERSION, params), versions))
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


_VERSION = operator.attrgetter("_version")
_IS_META = operator.attrgetter("is_meta")


def _refuse_meta(
    modules: Sequence[tuple[str, nn.Module]],
    params: Sequence[torch.Tensor],
    buffers: Sequence[torch.Tensor],
    batch: Any,
) -> None:
    """A meta tensor holds no data: say so before anything moves (a move to meta and back
    would lose every weight)."""
    if any(map(_IS_META, params)) or any(map(_IS_META, buffers)):
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


def _home_device(
    params: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor]
) -> torch.device | None:
    devices = {p.device for p in params} | {b.device for b in buffers}
    return devices.pop() if len(devices) == 1 else None


def _conventions_on(settings: Settings) -> bool:
    return settings.policy is not None and bool(settings.policy.enabled)


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
        reseed(borrowed.seed, borrowed.device)
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
