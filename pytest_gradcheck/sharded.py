"""Sharded parameters: gradient statistics of a model whose parameters are DTensors.

A model sharded with FSDP2 (``fully_shard``) or any other DTensor scheme holds on each rank
only its shard of every parameter and of its gradient. :class:`ShardedStats` gives
:class:`~pytest_gradcheck.measure.ParamTable` the same figures the unsharded model would
give: each rank reduces its local shards to per-parameter partial statistics (sum of
squares, max-abs, count of non-zeros), the stacked partials are gathered once per process
group a shard is spread over (one collective for a whole FSDP model, not one per
parameter) and combined in rank order (sums, max), so every rank holds the same,
bit-identical figures; the norms are the square roots of the summed squares. A
``Replicate()`` dimension is not reduced over (it would count each value once per
replica); a ``Partial()`` one is made whole first.

Also what a sharded check needs around the pass: every rank's batch must have the same
structure (:meth:`ShardedStats.agree_on_batch`, one collective: a mismatch is a clear error
on every rank, not a hang), the loss is the mean over the ranks (:meth:`ShardedStats.mean`,
one collective), ``activations=True`` norms cover the whole batch
(:meth:`ShardedStats.combine_norms`), and the module paths of the unsharded parameters FSDP
swaps in during the forward (:meth:`ShardedStats.record_aliases`) let a hint walk the
autograd graph. A healthy check of an FSDP model adds three collectives in all.

Last, what ``distributed_strategy="fsdp"`` shards (:func:`blocks`, :func:`shard`) and the
class name a sharded module is reported under (:func:`unsharded_type`).

Imports torch (``torch.distributed`` only once a DTensor exists, FSDP2 only to shard),
:mod:`.tensors` and :mod:`.results`; nothing above them.
"""

from __future__ import annotations

import math
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .results import GradcheckError
from .tensors import leaves

__all__ = [
    "SMALL",
    "ShardedStats",
    "blocks",
    "dtensor_type",
    "fully_shard_function",
    "shard",
    "sharded_stats",
    "unsharded_type",
]

SMALL = 1 << 16
"""Tensors up to this many elements are stacked by shape and reduced together (local shards
here, whole gradients in :class:`~pytest_gradcheck.measure.ParamTable`)."""


def dtensor_type() -> type | None:
    """The DTensor class, or None when torch has not loaded it (then no DTensor exists: this
    never imports ``torch.distributed`` itself)."""
    for name in ("torch.distributed.tensor", "torch.distributed._tensor"):  # torch >= 2.4, older
        module = sys.modules.get(name)
        kind = getattr(module, "DTensor", None)
        if isinstance(kind, type):
            return kind
    return None


def sharded_stats(params: Sequence[torch.Tensor]) -> ShardedStats | None:
    """A :class:`ShardedStats` when any of ``params`` is a DTensor, else None (at C speed:
    one set of types for the whole model)."""
    kind = dtensor_type()
    if kind is None or not any(issubclass(t, kind) for t in set(map(type, params))):
        return None
    return ShardedStats(params, kind)


def unsharded_type(module: nn.Module) -> str:
    """The class name of ``module`` as it was before ``fully_shard`` made it an instance of
    its ``FSDP<name>`` subclass (the roles of the checks and the report's types use it)."""
    cls = type(module)
    name = cls.__name__
    if name.startswith("FSDP"):
        base = next((b for b in cls.__mro__[1:] if b.__name__ == name[4:]), None)
        if base is not None:
            return base.__name__
    return name


class ShardedStats:
    """Per-parameter gradient and weight statistics of DTensor parameters (see module doc).

    Plain tensors among them (a parameter left out of the sharding) are taken as they are on
    this rank. Every method that communicates is called on every rank in the same order:
    the engine calls them at the same points of every check, and what decides whether a
    rank calls one (the gathered statistics, the mean loss) is the same on every rank.
    """

    def __init__(self, params: Sequence[torch.Tensor], kind: type) -> None:
        self.params = params
        self._kind = kind
        self.aliases: dict[int, str] = {}
        """Module path of the owner of each unsharded parameter FSDP swapped in, by ``id``."""
        first = next(p for p in params if isinstance(p, kind))
        self._mesh: Any = first.device_mesh  # type: ignore[attr-defined]
        self._spread: dict[tuple[int, Any], tuple[Any, ...]] = {}
        self.collectives = 0
        """Collectives this object issued (``benchmarks/sharded.py`` prints them)."""

    # -- statistics -------------------------------------------------------------------------

    def reduce(self, grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """L2 norm, max-abs and count of non-zeros of every gradient, then of every weight, as
        :meth:`~pytest_gradcheck.measure.ParamTable` reduces unsharded ones: a (3, 2n)
        float64 CPU tensor, columns in ``[*grads, *params]`` order (a weight's max-abs and
        non-zeros are 0; a missing gradient reads as zeros). One transfer to the host."""
        columns = [*grads, *self.params]
        local: list[torch.Tensor | None] = []
        spread: list[tuple[Any, ...]] = []  # the process groups each column is sharded over
        for index, tensor in enumerate(columns):
            if tensor is None:  # a missing gradient: zeros, spread like its parameter
                local.append(None)
                spread.append(self._groups(self.params[index]))
                continue
            tensor = self._whole(tensor)
            local.append(tensor.to_local() if isinstance(tensor, self._kind) else tensor)  # type: ignore[attr-defined]
            spread.append(self._groups(tensor))
        partials = self._partials(local, len(grads))  # (3, count) on the device
        order: dict[int, Any] = {}
        for groups in spread:
            for group in groups:
                order.setdefault(id(group), group)
        for group in order.values():
            mask = torch.tensor([group in groups for groups in spread], device=partials.device)
            gathered = self._gather(partials, group)  # (world, 3, count)
            combined = torch.stack(
                [gathered[:, 0].sum(0), gathered[:, 1].amax(0), gathered[:, 2].sum(0)]
            )
            partials = torch.where(mask, combined, partials)
        rows = partials.cpu().double()  # the one transfer
        rows[0] = rows[0].sqrt()
        return rows

    def _whole(self, tensor: torch.Tensor) -> torch.Tensor:
        """A DTensor with its ``Partial()`` placements made ``Replicate()`` (a partial sum's
        square is not the sum's; rare for parameters and their gradients)."""
        if not isinstance(tensor, self._kind):
            return tensor
        placements = tensor.placements  # type: ignore[attr-defined]
        if not any(p.is_partial() for p in placements):
            return tensor
        from torch.distributed.tensor import Replicate

        whole = [Replicate() if p.is_partial() else p for p in placements]
        self.collectives += 1
        return tensor.redistribute(tensor.device_mesh, whole)  # type: ignore[attr-defined,no-any-return]

    def _groups(self, tensor: torch.Tensor) -> tuple[Any, ...]:
        """The process groups of the mesh dimensions ``tensor`` is sharded over."""
        if not isinstance(tensor, self._kind):
            return ()
        distributed: Any = tensor
        mesh, placements = distributed.device_mesh, distributed.placements
        key = (id(mesh), placements)
        groups = self._spread.get(key)
        if groups is None:
            groups = self._spread[key] = tuple(
                mesh.get_group(dim)
                for dim, placement in enumerate(placements)
                if placement.is_shard()
            )
        return groups

    def _partials(self, local: Sequence[torch.Tensor | None], grads: int) -> torch.Tensor:
        """(sum of squares, max-abs, non-zeros) of every local shard, in float64 (float32 on
        MPS): a (3, len(local)) tensor on the shards' device. Small shards of one shape,
        dtype and device are stacked; an empty shard contributes zeros."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        alone: list[int] = []
        device: torch.device | None = None
        for index, tensor in enumerate(local):
            if tensor is None:
                continue
            device = device or tensor.device
            if tensor.numel() <= SMALL:
                key = (index < grads, tensor.shape, tensor.dtype, tensor.device)
                groups.setdefault(key, []).append(index)
            else:
                alone.append(index)
        if device is None:
            device = self._device()
        wide = torch.float32 if device.type == "mps" else torch.float64
        out = torch.zeros(3, len(local), dtype=wide, device=device)
        with torch.no_grad():
            for indices in [*groups.values(), *([i] for i in alone)]:
                shards = [t for i in indices if (t := local[i]) is not None]
                rows = shards[0].reshape(1, -1) if len(shards) == 1 else torch.stack(shards)
                stats = _rows(rows.reshape(len(shards), -1), wide, with_max=indices[0] < grads)
                out[:, torch.tensor(indices, device=device)] = stats.to(device)
        return out

    def _gather(self, partials: torch.Tensor, group: Any) -> torch.Tensor:
        """Every rank's ``partials`` in ``group``, stacked in rank order: one collective."""
        import torch.distributed as dist

        world = dist.get_world_size(group)
        mine = self._on_comm_device(partials.reshape(-1).contiguous(), group)
        out = mine.new_empty(world * mine.numel())  # gloo takes the flat form only
        gather: Callable[..., Any] = getattr(dist, "all_gather_single", None) or (
            dist.all_gather_into_tensor
        )
        self.collectives += 1
        gather(out, mine, group=group)
        return out.reshape(world, *partials.shape).to(partials.device)

    def _on_comm_device(self, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        """NCCL communicates CUDA tensors only (a CPU-offloaded shard's figures move there)."""
        import torch.distributed as dist

        if tensor.device.type == "cpu" and dist.get_backend(group) == "nccl":
            return tensor.to(torch.device("cuda", torch.cuda.current_device()))
        return tensor

    def _device(self) -> torch.device:
        first = next(p for p in self.params if isinstance(p, self._kind))
        return first.to_local().device  # type: ignore[attr-defined,no-any-return]

    def full(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        """The whole tensor of a DTensor (a collective), else ``tensor``: for the rare
        parameter looked at closer (a NaN/Inf, a norm out of float32's range), on every rank
        alike since every rank holds the same statistics."""
        if not isinstance(tensor, self._kind):
            return tensor
        distributed: Any = tensor
        self.collectives += 1
        return distributed.full_tensor()  # type: ignore[no-any-return]

    # -- around the pass --------------------------------------------------------------------

    def _mesh_groups(self) -> list[Any]:
        mesh = self._mesh
        return [mesh.get_group(dim) for dim in range(mesh.ndim)]

    def agree_on_batch(self, batch: Any) -> None:
        """Raise on every rank unless every rank's batch has the same structure: the same
        tensors in the same places, with the same dtypes and sizes but the first. One small
        collective; on a mismatch one more, to say which rank differs and how."""
        import torch.distributed as dist

        mine = _signature(batch)
        digest = zlib.crc32(repr(mine).encode()) & 0x7FFFFFFF
        for group in self._mesh_groups():
            device = self._device()
            code = self._on_comm_device(torch.tensor([digest], device=device), group)
            gathered = self._gather(code, group).reshape(-1).tolist()
            if len(set(gathered)) == 1:
                continue
            signatures: list[Any] = [None] * len(gathered)
            self.collectives += 1
            dist.all_gather_object(signatures, mine, group=group)
            ranks = dist.get_process_group_ranks(group)
            odd = [r for r, s in zip(ranks, signatures, strict=True) if s != signatures[0]]
            raise GradcheckError(
                f"the sample batch differs across ranks of the sharded model: rank "
                f"{odd[0]} passed {_show(signatures[ranks.index(odd[0])])}, rank {ranks[0]} "
                f"{_show(signatures[0])} (ranks that differ from rank {ranks[0]}: "
                f"{', '.join(map(str, odd))}); every rank must pass a batch with the same "
                "tensors, dtypes and sizes (only the first dimension, the samples, may differ)"
            )

    def mean(self, loss: float) -> float:
        """The mean of every rank's loss (the loss whose gradient FSDP computes): one
        collective per mesh dimension. A NaN/Inf on one rank is one on every rank."""
        import torch.distributed as dist

        value = torch.tensor([loss], dtype=torch.float64, device=self._device())
        for group in self._mesh_groups():
            value = self._on_comm_device(value, group)
            self.collectives += 1
            dist.all_reduce(value, group=group)
            value /= dist.get_world_size(group)
        return float(value.cpu())

    def combine_norms(
        self,
        norms: tuple[tuple[str, float], ...],
        steps: tuple[tuple[str, tuple[float, ...]], ...],
    ) -> tuple[tuple[tuple[str, float], ...], tuple[tuple[str, tuple[float, ...]], ...]]:
        """Activation-gradient norms of the whole batch from every rank's (``activations=True``):
        each rank's gradients are its share of the mean loss, ``1/world`` of the loss over
        the batch, so the norm over the batch is ``sqrt(sum of the ranks' squares) / world``.
        A module only some ranks saw combines the ranks that did; one rank 0 did not see is
        left out. One collective per mesh dimension (the lists are pickled: names and lengths
        may differ across ranks)."""
        import torch.distributed as dist

        mine: dict[str, list[float]] = {name: [value] for name, value in norms}
        mine.update({f"\0{name}": list(values) for name, values in steps})
        for group in self._mesh_groups():
            size = dist.get_world_size(group)
            every: list[Any] = [None] * size
            self.collectives += 1
            dist.all_gather_object(every, mine, group=group)
            combined: dict[str, list[float]] = {}
            for key in every[0]:
                rows = [
                    theirs[key]
                    for theirs in every
                    if len(theirs.get(key, ())) == len(every[0][key])
                ]
                combined[key] = [
                    math.sqrt(sum(row[i] ** 2 for row in rows)) / size
                    for i in range(len(every[0][key]))
                ]
            mine = combined
        return (
            tuple((name, mine[name][0]) for name, _ in norms),
            tuple((name, tuple(mine[f"\0{name}"])) for name, _ in steps),
        )

    @contextmanager
    def record_aliases(self, modules: Sequence[tuple[str, nn.Module]]) -> Iterator[None]:
        """During the block, note the module path of every parameter a module holds when its
        forward starts: FSDP has swapped the unsharded parameters in by then, and those are
        the ones the autograd graph reaches."""
        aliases = self.aliases

        def note(name: str) -> Callable[[nn.Module, Any], None]:
            def hook(module: nn.Module, args: Any) -> None:
                for p in module._parameters.values():
                    if p is not None:
                        aliases.setdefault(id(p), name)

            return hook

        handles = [
            module.register_forward_pre_hook(note(name))
            for name, module in modules
            if module._parameters
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _rows(m: torch.Tensor, wide: torch.dtype, with_max: bool) -> torch.Tensor:
    """(sum of squares, max-abs, non-zeros) of each row of ``m``: a (3, rows) tensor; without
    ``with_max`` the last two rows are 0. Sums of squares accumulate as the unsharded
    reduction does (float32, float64 for float64 tensors)."""
    if m.shape[1] == 0:
        return torch.zeros(3, m.shape[0], dtype=wide, device=m.device)
    accumulate = torch.float64 if m.dtype == torch.float64 else torch.float32
    single = m.shape[0] == 1  # whole-tensor reductions: several times faster on CPU
    norm = torch.linalg.vector_norm(m, dtype=accumulate) if single else None
    if norm is None:
        norm = torch.linalg.vector_norm(m, dim=1, dtype=accumulate)
    squares = norm.reshape(-1).to(wide).square()
    if not with_max:
        zeros = torch.zeros_like(squares)
        return torch.stack([squares, zeros, zeros])
    if single:
        low, high = torch.aminmax(m)
        max_abs = torch.maximum(high, -low).reshape(1)
        nonzero = torch.count_nonzero(m).reshape(1)
    else:
        max_abs = torch.maximum(m.amax(dim=1), -m.amin(dim=1))
        nonzero = m.bool().sum(dim=1)
    return torch.stack([squares, max_abs.to(wide), nonzero.to(wide)])


def _signature(batch: Any) -> list[tuple[str, str, tuple[int, ...], bool]]:
    """Where each tensor of ``batch`` is, its dtype, its sizes after the first, and whether
    it is empty (an empty batch on one rank would fail there alone)."""
    return [(label, str(t.dtype), tuple(t.shape[1:]), t.numel() == 0) for label, t in leaves(batch)]


def _show(signature: Any) -> str:
    if not signature:
        return "no tensors"
    parts = [
        f"{label or 'batch'}: {dtype.removeprefix('torch.')} [N{''.join(f', {s}' for s in shape)}]"
        + (" (empty)" if empty else "")
        for label, dtype, shape, empty in signature[:4]
    ]
    more = f" and {len(signature) - 4} more" if len(signature) > 4 else ""
    return "(" + "; ".join(parts) + more + ")"


# -- sharding a model (distributed_strategy="fsdp") -----------------------------------------


def fully_shard_function() -> Callable[..., Any] | None:
    """FSDP2's ``fully_shard`` (torch >= 2.6; ``torch.distributed._composable.fsdp`` in 2.4
    and 2.5), or None when this torch has none."""
    for name in ("torch.distributed.fsdp", "torch.distributed._composable.fsdp"):
        try:
            module = __import__(name, fromlist=["fully_shard"])
        except ImportError:
            continue
        function = getattr(module, "fully_shard", None)
        if callable(function):
            return function  # type: ignore[no-any-return]
    return None


def blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks ``distributed_strategy="fsdp"`` shards one by one before the root: each
    child of the root that holds parameters, and within a ``ModuleList``/``ModuleDict`` (no
    forward of its own, so no FSDP hooks would run) each of its children that does."""
    found: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if next(child.parameters(), None) is None:
                continue
            if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                visit(f"{path}.", child)
            else:
                found.append((path, child))

    visit("", model)
    return found


def shard(model: nn.Module, mesh: Any) -> list[str]:
    """``fully_shard`` every block of ``model`` (see :func:`blocks`), then the root, over
    ``mesh``; return the blocks' module paths."""
    fully_shard = fully_shard_function()
    if fully_shard is None:
        raise GradcheckError(
            f"distributed_strategy='fsdp' needs FSDP2's fully_shard (torch >= 2.4), which "
            f"torch {torch.__version__} does not have; use distributed_strategy='ddp'"
        )
    found = blocks(model)
    for _, block in found:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return [name for name, _ in found]
