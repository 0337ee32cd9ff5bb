"""Measuring: gradients in, plain statistics out.

:class:`ParamTable` reduces every trainable parameter's gradient and weight to statistics
with batched tensor ops and one device-to-host transfer, and makes the per-parameter and
per-layer records. :class:`ActivationGrads` records the gradient that flows into each
layer's outputs (``activations=True``). :func:`walk_modules` describes the model's modules
as plain data. Facts beyond the gradients live in :mod:`pytest_gradcheck.facts`.

DTensor (FSDP2) parameters are reduced on their local shards and combined across ranks by
:mod:`pytest_gradcheck.sharded`.

Imports torch, :mod:`pytest_gradcheck.sharded`, :mod:`pytest_gradcheck.tensors` and
:mod:`pytest_gradcheck.results`.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import nn

from .results import NO_EXTRA, LayerStats, ModuleInfo, ParamStats, Structure
from .sharded import SMALL, ShardedStats, sharded_stats, unsharded_type
from .tensors import tensors as nested_tensors

__all__ = [
    "SMALL",
    "ActivationGrads",
    "ParamTable",
    "record_activation_grads",
    "records",
    "walk_modules",
]

_HELD_ELEMENTS = 1 << 22
"""``activations=True`` holds small activation gradients (up to this many elements in all)
until the end of backward, to norm them together; beyond, each is normed as it comes."""
_RESCALE_BELOW = 1e-15
_RESCALE_ABOVE = 1e15
"""A max-abs outside this band makes a float32 sum of squares lose range: recompute scaled."""


class ActivationGrads:
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
            tensors = [t for t in nested_tensors(output) if t.requires_grad]
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
            if numel <= SMALL and self._held + numel <= _HELD_ELEMENTS:
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
        if numel <= SMALL and self._held + numel <= _HELD_ELEMENTS:
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
def record_activation_grads(
    modules: Sequence[tuple[str, nn.Module]],
) -> Iterator[ActivationGrads]:
    """Record activation-gradient norms of ``modules`` (none: no hooks) during the block."""
    recorder = ActivationGrads(modules)
    try:
        yield recorder
        recorder.remove()
        recorder.finish()
    finally:
        recorder.remove()


# -- statistics -----------------------------------------------------------------------------


class ParamTable:
    """The trainable parameters of one check, and what stays fixed between its passes: their
    names, owning layers, shapes, dtypes and sizes, how they are stacked for reduction, and
    which run of them each layer owns (they come in module order, so a layer's are adjacent).

    Built once per check, on the check's device; :meth:`measure` runs after every backward
    and makes the records in C from columns: on a model of hundreds of small layers, per-
    record Python objects and the garbage collector's work on them cost more than the
    reductions (``benchmarks/run.py`` prints the collector's time per check).
    """

    def __init__(
        self, names: Sequence[str], params: Sequence[torch.Tensor], structure: Structure
    ) -> None:
        self.names, self.params, n = names, params, len(params)
        self.sharded: ShardedStats | None = sharded_stats(params)
        """DTensor parameters: their statistics are gathered across the ranks."""
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
            if numel <= SMALL:
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
        owners = dict(zip(map(id, self.params), self.owners, strict=True))
        if self.sharded is not None:  # the unsharded parameters the graph reaches
            owners.update(self.sharded.aliases)
        return owners

    def measure(self) -> list[LayerStats]:
        """Every layer's statistics, its parameters' within: one device-to-host transfer."""
        grads: list[torch.Tensor | None] = [p.grad for p in self.params]
        has_grad = [g is not None for g in grads]
        if any(g is not None and g.is_sparse for g in grads):  # nn.Embedding(sparse=True)
            grads = [g.coalesce().to_dense() if g is not None and g.is_sparse else g for g in grads]
        with torch.no_grad():  # parameters are stacked as they are: no detach() per tensor
            stats = self._reduce(grads) if self.sharded is None else self.sharded.reduce(grads)
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
                records(ParamStats),
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
            g = grads[i] if self.sharded is None else self.sharded.full(grads[i])
            param_stats[i] = ParamStats._make(
                self._closer_row(i, g, g_norm[i], g_max[i], g_zeros[i], w_norm[i])
            )
        owned = [tuple(param_stats[first:end]) for first, end in self._bounds]
        count = len(owned)
        l_norm, l_rms, l_max, l_zeros, l_weight, l_grad, l_look = (
            host[5 * n + k * count : 5 * n + (k + 1) * count] for k in range(7)
        )
        layers = list(
            map(
                records(LayerStats),
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
            weight = self.params[i] if self.sharded is None else self.sharded.full(self.params[i])
            weight_norm = _scaled_norm(weight)  # type: ignore[arg-type]
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


def records(cls: type[_Record]) -> Callable[[Iterable[Any]], _Record]:
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


def walk_modules(
    modules: Sequence[tuple[str, nn.Module]],
) -> tuple[list[str], list[nn.Parameter], Structure]:
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
        extra: Mapping[str, float] = NO_EXTRA
        if isinstance(module, _MEASURED):
            extra = _extra(module)
        rows.append((prefix, _type_name(module), index, extra, owned))
    root = modules[0][1] if modules else None
    scale = getattr(getattr(root, "config", None), "initializer_range", None)
    if isinstance(scale, float) and rows:  # the library's own init (transformers)
        rows[0] = (*rows[0][:3], {**rows[0][3], "initializer_range": scale}, rows[0][4])
    return names, params, Structure(modules=tuple(map(records(ModuleInfo), rows)))


_MEASURED = (nn.RNNBase, nn.GroupNorm, nn.modules.dropout._DropoutNd)
"""Modules whose hints need a measurement (one isinstance per module on the hot path)."""


def _extra(module: nn.Module) -> Mapping[str, float]:
    """What the hints need to know of a module beyond its type."""
    if isinstance(module, nn.RNNBase):
        weight = getattr(module, "weight_hh_l0", None)
        if (
            module.mode in ("RNN_TANH", "RNN_RELU")
            and isinstance(weight, torch.Tensor)
            and weight.shape[0] <= 2048
        ):
            with torch.no_grad():
                eig = torch.linalg.eigvals(weight.detach().float().cpu())
            return {"spectral_radius": float(eig.abs().max())}
        return NO_EXTRA
    if isinstance(module, nn.GroupNorm):
        return {"channels_per_group": module.num_channels / module.num_groups}
    return {"p": float(getattr(module, "p", 0.0))}


def _type_name(module: nn.Module) -> str:
    kind = type(module).__name__
    if kind.startswith("FSDP"):  # FSDP2's FSDP<name> subclass: reported as <name>
        kind = unsharded_type(module)
    return kind
