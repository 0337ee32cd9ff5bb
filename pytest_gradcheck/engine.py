"""The torch work of a gradient check: prepare, run the pass, measure, restore.

``check_gradients`` is the one entry point. It resolves settings, moves the model and the
batch to the device, runs one seeded forward/backward pass, reduces every gradient to
plain statistics with batched tensor ops and a single device-to-host transfer, hands the
statistics to :mod:`pytest_gradcheck.checks`, and restores the model exactly as it was.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from . import checks
from .results import GradcheckError, LayerStats, ParamStats, Report
from .settings import Settings, override, resolve

__all__ = ["GradcheckWarning", "check_gradients", "pick_device"]

_SMALL = 1 << 16
"""Tensors up to this many elements are stacked by shape and reduced together."""
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
    and the global RNG state.

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
    named_params = list(model.named_parameters())
    trainable = [(name, p) for name, p in named_params if p.requires_grad]
    frozen = len(named_params) - len(trainable)
    if not trainable:
        raise GradcheckError(
            f"{type(model).__name__} has no trainable parameters "
            f"({frozen} parameter(s) have requires_grad=False); "
            "a gradient check needs at least one parameter with requires_grad=True"
        )
    device = pick_device(settings.device)
    started = time.perf_counter()
    modules = list(model.named_modules())
    with _borrowed(model, modules, [p for _, p in named_params], device, settings) as borrowed:
        moved_batch = _to_device(batch, device)
        loss, graph, small_batchnorm = _forward_backward(model, modules, moved_batch, settings)
        params = _measure([p for _, p in trainable], [n for n, _ in trainable])
        structure = _structure(modules)
        layers = _layers(params, structure)
        problems, check_notes = checks.find_problems(layers, structure, loss, settings)
        # Only an unhealthy check pays for a closer look.
        if graph is not None and any(p.kind in ("vanishing", "exploding") for p in problems):
            layer_of = {id(p): name.rpartition(".")[0] for name, p in trainable}
            structure = dataclasses.replace(
                structure, saturating_ops=_saturating_ops(graph, layer_of)
            )
            problems, check_notes = checks.find_problems(layers, structure, loss, settings)
        del graph
        diagnosis: list[str] = []
        if settings.diagnose and any(p.kind == "nonfinite" for p in problems):
            diagnosis = _diagnose(model, moved_batch, settings, borrowed)
    seconds = time.perf_counter() - started
    notes = [
        f"{name}: train-mode BatchNorm sees {count} value(s) per channel in this batch, so its "
        "gradients are unreliable (they explode artificially); use a larger batch or mode='eval'"
        for name, count in small_batchnorm
    ]
    for note in notes:
        warnings.warn(note, GradcheckWarning, stacklevel=2)
    return Report(
        layers=tuple(layers),
        problems=tuple(problems),
        notes=tuple(notes + check_notes),
        loss=loss,
        device=str(device),
        seconds=seconds,
        frozen_params=frozen,
        settings=settings.to_dict(),
        diagnosis=tuple(diagnosis),
    )


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


@contextmanager
def _borrowed(
    model: nn.Module,
    modules: Sequence[tuple[str, nn.Module]],
    params: Sequence[torch.Tensor],
    device: torch.device,
    settings: Settings,
) -> Iterator[_Borrowed]:
    """Take the model for one check and give it back exactly as it was."""
    grads = [(p, p.grad) for p in params]
    flags = [(m, m.training) for _, m in modules]
    buffers = [
        (module, name, buf, buf.detach().clone())
        for _, module in modules
        for name, buf in module._buffers.items()
        if buf is not None
    ]
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
            for p, _ in grads:
                p.grad = None
            if move:
                model.to(device)
            training = settings.mode == "train"
            if any(m.training != training for m, _ in flags):
                model.train(training)
            torch.manual_seed(settings.seed)
            yield _Borrowed(device=device, seed=settings.seed)
        finally:
            if move and home is not None:
                model.to(home)
            for p, grad in grads:
                p.grad = grad
            for m, was_training in flags:
                if m.training != was_training:
                    m.training = was_training
            for module, name, original, saved in buffers:
                module._buffers[name] = original
                with torch.no_grad():
                    original.copy_(saved)


def _home_device(
    params: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor]
) -> torch.device | None:
    devices = {p.device for p in params} | {b.device for b in buffers}
    return devices.pop() if len(devices) == 1 else None


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {key: _to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_to_device(value, device) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(value, device) for value in batch)
    return batch


# -- the pass -------------------------------------------------------------------------------


def _forward_backward(
    model: nn.Module, modules: Sequence[tuple[str, nn.Module]], batch: Any, settings: Settings
) -> tuple[float, Any, list[tuple[str, int]]]:
    """Run forward, loss and backward; return the loss, its autograd node (the graph's
    structure outlives backward, its saved tensors do not) and the train-mode BatchNorm
    layers that saw too few values per channel to give meaningful gradients."""
    __tracebackhide__ = True
    small_batchnorm: list[tuple[str, int]] = []
    handles = [
        module.register_forward_pre_hook(_batchnorm_hook(name, small_batchnorm))
        for name, module in modules
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training
    ]
    try:
        with torch.enable_grad():
            output = _call(model, batch)
            loss = _loss(output, settings)
            try:
                loss.backward()  # type: ignore[no-untyped-call]
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


def _loss(output: Any, settings: Settings) -> torch.Tensor:
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


def _measure(params: Sequence[torch.Tensor], names: Sequence[str]) -> list[ParamStats]:
    """Reduce every gradient (and weight) to plain numbers: one device-to-host transfer."""
    grads: list[torch.Tensor | None] = []
    for p in params:
        g = p.grad
        if g is not None and g.is_sparse:
            g = g.coalesce().to_dense()
        grads.append(g)
    present = [g for g in grads if g is not None]
    weights = [p.detach() for p in params]
    grad_rows, grad_order = _reduce(present, with_max=True)
    weight_rows, weight_order = _reduce(weights, with_max=False)
    # One transfer for everything; the rows come back grouped, ``*_order`` maps them back.
    flat = torch.cat([grad_rows.reshape(-1), weight_rows.reshape(-1)]).cpu().tolist()
    n = len(present)
    g_norm, g_max, g_nonzero = [0.0] * n, [0.0] * n, [0.0] * n
    for column, index in enumerate(grad_order):
        g_norm[index] = flat[column]
        g_max[index] = flat[n + column]
        g_nonzero[index] = flat[2 * n + column]
    w_norm = [0.0] * len(params)
    for column, index in enumerate(weight_order):
        w_norm[index] = flat[3 * n + column]
    w_norm = _fix_range(w_norm, weights, None)
    g_norm = _fix_range(g_norm, present, g_max)

    stats: list[ParamStats] = []
    k = 0
    for p, name, g in zip(params, names, grads, strict=True):
        numel = p.numel()
        layer = name.rpartition(".")[0]
        shape = tuple(p.shape)
        dtype = str(p.dtype).removeprefix("torch.")
        weight_norm = w_norm[len(stats)]
        if g is None:
            stats.append(
                ParamStats(
                    name, layer, shape, dtype, numel, False, 0.0, 0.0, 1.0, 0, 0, weight_norm
                )
            )
            continue
        norm, max_abs = g_norm[k], g_max[k]
        zero_fraction = 1.0 - g_nonzero[k] / numel if numel else 1.0
        k += 1
        nan_count = inf_count = 0
        if not (math.isfinite(norm) and math.isfinite(max_abs)):
            nan_count = int(torch.isnan(g).sum())
            inf_count = int(torch.isinf(g).sum())
            if nan_count == 0 and inf_count == 0:  # overflow of the sum of squares only
                norm = _scaled_norm(g)
        stats.append(
            ParamStats(
                name,
                layer,
                shape,
                dtype,
                numel,
                True,
                norm,
                max_abs,
                zero_fraction,
                nan_count,
                inf_count,
                weight_norm,
            )
        )
    return stats


def _reduce(tensors: Sequence[torch.Tensor], with_max: bool) -> tuple[torch.Tensor, list[int]]:
    """Per tensor: L2 norm, and with ``with_max`` also max-abs and the count of non-zeros.

    Returns a float32 tensor of shape (rows, len(tensors)) on the tensors' device, with
    columns grouped by shape, and the input index of each column. Small tensors are
    stacked by shape and reduced in one op per group; large ones one by one.
    ``count_nonzero`` is exact (a float32 ``ord=0`` norm is not above 2**24 elements) and
    ``amax`` carries NaN through, so max-abs detects non-finite values cheaply.
    """
    rows = 3 if with_max else 1
    if not tensors:
        return torch.zeros((rows, 0)), []
    device = tensors[0].device
    groups: dict[tuple[Any, ...], list[int]] = {}
    large: list[int] = []
    for i, t in enumerate(tensors):
        if t.numel() <= _SMALL and t.device == device:
            groups.setdefault((t.shape, t.dtype), []).append(i)
        else:
            large.append(i)
    parts: list[torch.Tensor] = []
    order: list[int] = []
    for indices in groups.values():
        if len(indices) == 1:
            stacked = tensors[indices[0]].reshape(1, -1)
        else:
            stacked = torch.stack([tensors[i] for i in indices]).reshape(len(indices), -1)
        parts.append(_reduce_rows(stacked, with_max))
        order.extend(indices)
    for i in large:
        parts.append(_reduce_rows(tensors[i].reshape(1, -1), with_max).to(device))
        order.append(i)
    return torch.cat(parts, dim=1), order


def _reduce_rows(m: torch.Tensor, with_max: bool) -> torch.Tensor:
    """Reduce each row of ``m``; no temporary as large as ``m`` for a single row."""
    norm: torch.Tensor = torch.linalg.vector_norm(m, dim=1, dtype=torch.float32)
    if not with_max:
        return norm.unsqueeze(0)
    if m.shape[1] == 0:
        zeros = torch.zeros_like(norm)
        return torch.stack([norm, zeros, zeros])
    low, high = torch.aminmax(m, dim=1)
    max_abs = torch.maximum(high, -low).float()
    if m.shape[0] == 1:
        nonzero = torch.count_nonzero(m).reshape(1).float()
    else:
        nonzero = torch.count_nonzero(m, dim=1).float()
    return torch.stack([norm, max_abs, nonzero])


def _fix_range(
    norms: list[float], tensors: Sequence[torch.Tensor], max_abs: list[float] | None
) -> list[float]:
    """Recompute, scaled, the norms whose float32 sum of squares under- or overflowed."""
    fixed = list(norms)
    for i, norm in enumerate(norms):
        if max_abs is not None:
            m = max_abs[i]
            suspicious = math.isfinite(m) and m > 0 and (m < _RESCALE_BELOW or m > _RESCALE_ABOVE)
            suspicious = suspicious or (norm == 0 and m > 0)
        else:
            suspicious = 0 < norm < _RESCALE_BELOW or norm > _RESCALE_ABOVE
        if suspicious:
            fixed[i] = _scaled_norm(tensors[i])
    return fixed


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


def _saturating_ops(root: Any, layer_of: Mapping[int, str]) -> dict[str, int]:
    """Per layer: the most Sigmoid/Tanh-like autograd ops on a path from it to the loss.

    Counts functional activations (``torch.sigmoid``) as well as modules. A longest-path
    pass over the autograd graph in topological order; run only for an unhealthy check.
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
    best: dict[Any, int] = {root: int(root.name() in _SATURATING_NODES)}
    ready = [root]
    counts: dict[str, int] = {}
    while ready:
        node = ready.pop()
        here = best[node]
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in layer_of:
            layer = layer_of[id(variable)]
            counts[layer] = max(counts.get(layer, 0), here)
        for child, _ in node.next_functions:
            if child is None:
                continue
            step = here + int(child.name() in _SATURATING_NODES)
            best[child] = max(best.get(child, 0), step)
            indegree[child] -= 1
            if indegree[child] == 0:
                ready.append(child)
    return counts


def _structure(named: Sequence[tuple[str, nn.Module]]) -> checks.Structure:
    """A plain description of the model's modules, for checks and hints."""
    modules: list[checks.ModuleInfo] = []
    for index, (name, module) in enumerate(named):
        extra: dict[str, float] = {}
        if isinstance(module, nn.RNNBase) and module.mode in ("RNN_TANH", "RNN_RELU"):
            weight = getattr(module, "weight_hh_l0", None)
            if isinstance(weight, torch.Tensor) and weight.shape[0] <= 2048:
                with torch.no_grad():
                    eig = torch.linalg.eigvals(weight.detach().float().cpu())
                extra["spectral_radius"] = float(eig.abs().max())
        modules.append(
            checks.ModuleInfo(
                name=name,
                type=type(module).__name__,
                registration=index,
                extra=extra,
            )
        )
    return checks.Structure(modules=tuple(modules))


def _layers(params: Sequence[ParamStats], structure: checks.Structure) -> list[LayerStats]:
    """Group parameters by the module that owns them, in registration order."""
    by_layer: dict[str, list[ParamStats]] = {}
    for p in params:
        by_layer.setdefault(p.layer, []).append(p)
    types = {m.name: m.type for m in structure.modules}
    position = {m.name: m.registration for m in structure.modules}
    names = sorted(by_layer, key=lambda name: position.get(name, len(position)))
    return [
        LayerStats(
            name=name, type=types.get(name, "Module"), depth=depth, params=tuple(by_layer[name])
        )
        for depth, name in enumerate(names)
    ]


# -- diagnosis ------------------------------------------------------------------------------


def _diagnose(model: nn.Module, batch: Any, settings: Settings, borrowed: _Borrowed) -> list[str]:
    """Re-run the failing pass to find where the NaN/Inf was born (only when one was found)."""

    def compute_loss() -> torch.Tensor:
        torch.manual_seed(borrowed.seed)
        return _loss(_call(model, batch), settings)

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
