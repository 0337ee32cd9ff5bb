"""Facts that checks and hints need beyond the gradient statistics, read off the autograd
graph and off one more traced forward pass, and only when a check asks for them.

Saturating ops on the way to the loss (a hint of a vanishing gradient), what a policy's
conventions need (call order, RNN lengths), each layer's forward output scale (when the
gradients are large), and on the failure path: which modules ran, which parameters an op
read, where a parameter's path to the loss was cut, which integer output (a top-k selector's
indices) carried its values to the loss, which op made a dead layer's output all zeros, and
past which join (``torch.cat``) the loss reads none of the positions a dead layer feeds.
:func:`user_location` names the user's line for a message.

Imports torch, the tensor walker and results.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import traceback
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .results import ONE_HOT_SOFTMAX, SAME_VALUES, Structure
from .tensors import tensors as nested_tensors

__all__ = [
    "ForwardFacts",
    "convention_facts",
    "fewest_saturating_ops",
    "forward_facts",
    "is_library_frame",
    "output_scales",
    "saturating_ops",
    "score_ops",
    "source_path",
    "user_location",
    "what_ran",
]

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
    edge: Callable[[int, str, str, int], int],
    merge: Callable[[int, int], int],
    per_layer: Callable[[int, int], int] = max,
) -> dict[str, int]:
    """Propagate a count from the loss down the autograd graph, in topological order.

    The loss's node starts at ``edge(0, "", its name, 0)``; ``edge(count, parent, child,
    index)`` gives a child's count from its parent's (``index``: the child's place among
    the parent's inputs), ``merge`` combines the counts of several parents (max: longest
    path, min: shortest). Returns, per layer, the ``per_layer`` (max or min) of the counts
    that reach its parameters. Run only for unhealthy checks.
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
    value: dict[Any, int] = {root: edge(0, "", root.name(), 0)}
    ready = [root]
    counts: dict[str, int] = {}
    while ready:
        node = ready.pop()
        here = value[node]
        name = node.name()
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in layer_of:
            layer = layer_of[id(variable)]
            counts[layer] = per_layer(counts[layer], here) if layer in counts else here
        for index, (child, _) in enumerate(node.next_functions):
            if child is None:
                continue
            candidate = edge(here, name, child.name(), index)
            value[child] = merge(value[child], candidate) if child in value else candidate
            indegree[child] -= 1
            if indegree[child] == 0:
                ready.append(child)
    return counts


def _saturating(count: int, parent: str, child: str, index: int) -> int:
    return count + (child in _SATURATING_NODES)


def saturating_ops(root: Any, layer_of: Mapping[int, str]) -> dict[str, int]:
    """Per layer: the most Sigmoid/Tanh-like autograd ops on a path from it to the loss.

    Counts functional activations (``torch.sigmoid``) as well as modules.
    """
    return _walk_graph(root, layer_of, _saturating, max)


def fewest_saturating_ops(root: Any, layer_of: Mapping[int, str]) -> dict[str, int]:
    """Per layer: the fewest Sigmoid/Tanh-like autograd ops on any path from it to the loss
    (a skip connection is a path with fewer). Equal to :func:`saturating_ops` where no path
    goes around the saturating chain."""
    return _walk_graph(root, layer_of, _saturating, min)


def _weighing(count: int, parent: str, child: str, index: int) -> int:
    """One more when ``parent`` computes attention or routing weights from ``child``: a
    softmax (``SafeSoftmax``: sdpa's math), or the query/key inputs of a fused attention."""
    weighs = "Softmax" in parent and "LogSoftmax" not in parent
    fused = "ScaledDotProduct" in parent and index < 2
    return count + (weighs or fused)


def score_ops(root: Any, layer_of: Mapping[int, str]) -> dict[str, int]:
    """Per layer: the fewest softmax ops (or query/key inputs of a fused attention) on any
    path from one of its parameters to the loss. At least 1: the layer only computes
    attention or routing weights (a query or key projection, a router), whose gradient sits
    low at initialisation when the things it weighs are alike."""
    return _walk_graph(root, layer_of, _weighing, min, per_layer=min)


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


@dataclasses.dataclass
class ForwardFacts:
    """What the forward pass shows about the structure: call order and RNN lengths."""

    order: list[str] = dataclasses.field(default_factory=list)
    """Module names in the order of their first call."""
    lengths: dict[str, int] = dataclasses.field(default_factory=dict)
    """Steps each vanilla RNN ran over (an RNNCell: its calls)."""


@contextmanager
def forward_facts(modules: Sequence[tuple[str, nn.Module]]) -> Iterator[ForwardFacts]:
    """Record :class:`ForwardFacts` during the block (no modules: no hooks)."""
    facts = ForwardFacts()
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


def convention_facts(
    structure: Structure,
    graph: Any,
    layer_of: Callable[[], Mapping[int, str]],
    facts: ForwardFacts,
) -> Structure:
    lengths = facts.lengths
    modules = tuple(
        m._replace(extra={**m.extra, "sequence_length": float(lengths[m.name])})
        if m.name in lengths
        else m
        for m in structure.modules
    )
    chain: dict[str, int] = {}
    if graph is not None:
        chain = _saturating_chain(graph, layer_of())
    return dataclasses.replace(
        structure, modules=modules, saturating_chain=chain, forward_order=tuple(facts.order)
    )


def _saturating_chain(root: Any, layer_of: Mapping[int, str]) -> dict[str, int]:
    """Per layer: the fewest Sigmoid/Tanh-like ops since the last normalization op on any
    path from it to the loss (a skip connection is such a path)."""

    def step(count: int, parent: str, child: str, index: int) -> int:
        return 0 if child in _NORM_NODES else count + (child in _SATURATING_NODES)

    return _walk_graph(root, layer_of, step, min)


@contextmanager
def output_scales(modules: Sequence[tuple[str, nn.Module]]) -> Iterator[dict[str, float]]:
    """During the block, record the RMS of the first floating-point output of each module
    that owns parameters, at its first call; the dict fills in forward order when the block
    ends (one device-to-host transfer). Used only when the gradients are large."""
    owners = {
        id(module): name
        for name, module in modules
        if name and any(p is not None for p in module._parameters.values())
    }
    names: list[str] = []
    values: list[torch.Tensor] = []

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        name = owners.get(id(module))
        if name is None or name in names:
            return
        found = next((t for t in nested_tensors(output) if t.is_floating_point()), None)
        if found is not None and found.numel():
            names.append(name)
            values.append(torch.linalg.vector_norm(found.detach(), dtype=torch.float32))
            values[-1] = values[-1] / math.sqrt(found.numel())

    scales: dict[str, float] = {}
    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        yield scales
    finally:
        handle.remove()
    if values:
        device = values[0].device
        host = torch.stack([v.to(device) for v in values]).cpu().tolist()
        scales.update(zip(names, host, strict=True))


def is_library_frame(filename: str) -> bool:
    """A frame of torch or of this package, not of the user's code."""
    path = os.path.abspath(filename)
    return path.startswith((_HERE, _TORCH)) or (
        "site-packages" in path and f"{os.sep}torch{os.sep}" in path
    )


_HERE = os.path.dirname(os.path.abspath(__file__))
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))


def source_path(filename: str) -> str:
    """A source file as a message names it: relative to the working directory (the rootdir
    of a pytest run in CI) when it lies below it, else its base name."""
    path = os.path.abspath(filename)
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive
        return os.path.basename(path)
    return os.path.basename(path) if relative.startswith(os.pardir) else relative


def user_location(frames: Iterable[traceback.FrameSummary]) -> str:
    """``path/file.py:LINE`` of the innermost of ``frames`` in the user's code, or ``""``."""
    for frame in reversed(list(frames)):
        if not is_library_frame(frame.filename):
            return f"{source_path(frame.filename)}:{frame.lineno}"
    return ""


_JOINS = frozenset(
    {"cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack", "column_stack"}
)
"""Ops that join tensors along positions: the backward hands each input its slice of the
output's gradient, so an input whose slice is all zeros feeds positions the loss never reads
(a zero from a saturated or rounding op is made elsewhere)."""


def _user_line() -> str:
    """:func:`user_location` of the calling stack, without reading source lines."""
    frame = sys._getframe(1)
    while frame is not None:
        if not is_library_frame(frame.f_code.co_filename):
            return f"{source_path(frame.f_code.co_filename)}:{frame.f_lineno}"
        frame = frame.f_back  # type: ignore[assignment]
    return ""


class _ReadMode(TorchFunctionMode):
    """Records which of ``watched`` (tensor id -> parameter name) any torch function reads,
    and, following what is computed from them, the first op whose result leaves autograd's
    graph (``.detach()``, ``.item()``, an integer result, an op under ``torch.no_grad()``):
    where the path from each parameter to the loss is cut."""

    def __init__(self, watched: Mapping[int, str], zeroing: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.watched = watched
        self.zeroing = zeroing
        self.read: set[int] = set()
        self.cuts: dict[str, str] = {}
        self.zeroed: dict[str, tuple[str, str]] = {}
        """Per parameter of ``zeroing``: the first op (name, ``file:line``) that turned what
        was computed from it into all zeros (a ReLU that never fires, dropout p=1, x * 0)."""
        # What each tensor computed from them comes from (the tensor kept alive: ids stay unique)
        self._derived: dict[int, tuple[torch.Tensor, frozenset[str]]] = {}
        self._ranks: dict[str, int] = {}  # of each cut: .detach() before no_grad before ...
        self.selects: dict[str, tuple[str, str]] = {}
        """Per parameter: the first op (name, ``file:line``) that turned values computed from
        it into integers or booleans (topk's indices, argmax, a comparison's mask)."""
        # Tensors computed from them off the graph, and tensors downstream of such an op:
        # weak references (a dead tensor's id may be reused), checked on every look-up
        self._offgraph: dict[int, tuple[weakref.ref[torch.Tensor], frozenset[str]]] = {}
        self._indexed: dict[int, tuple[weakref.ref[torch.Tensor], frozenset[str]]] = {}
        # For the parameters of ``zeroing``: each op on what they compute (name, file:line,
        # the ids of its inputs and outputs on the graph, the parameters), and per such
        # tensor whether the gradient that reached it in backward had a non-zero
        self._steps: list[tuple[str, str, tuple[int, ...], tuple[int, ...], frozenset[str]]] = []
        self._nonzero: dict[int, bool] = {}
        self._weights: set[int] = set()  # softmax outputs computed from ``zeroing``
        self._mixed: set[str] = set()  # names whose entry in ``zeroed`` is a mixing op

    def after(
        self, loss: torch.Tensor
    ) -> tuple[dict[str, tuple[str, str]], dict[str, tuple[str, str]]]:
        """:meth:`through_indices` and :meth:`zero_past`, once the loss's backward ran."""
        return self.through_indices(loss), self.zero_past()

    def zero_past(self) -> dict[str, tuple[str, str]]:
        """After backward, per parameter of ``zeroing``: the op nearest the loss that joins
        tensors along positions (``torch.cat``) whose output got a non-zero gradient while
        what it took from the parameter got none (a head that reads only the CLS token)."""
        found: dict[str, tuple[str, str]] = {}
        for op, where, ins, outs, names in reversed(self._steps):
            if any(self._nonzero.get(i, False) for i in outs) and not any(
                self._nonzero.get(i, False) for i in ins
            ):
                for name in names:
                    found.setdefault(name, (op, where))
        return found

    def through_indices(self, loss: torch.Tensor) -> dict[str, tuple[str, str]]:
        """:attr:`selects` of the parameters whose integer output reached ``loss``: they steer
        what the loss is computed from, not its value."""
        names = _lookup(self._indexed, loss)
        return {name: op for name, op in self.selects.items() if name in names}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if _metadata(func):  # weight.dtype, .device, .shape: not a read of its values
            return func(*args, **kwargs)
        sources: set[str] = set()
        inputs: list[torch.Tensor] = []
        offgraph: set[str] = set()
        indexed: set[str] = set()
        for t in nested_tensors((args, kwargs)):
            name = self.watched.get(id(t))
            if name is not None:
                self.read.add(id(t))
                sources.add(name)
                inputs.append(t)
            elif (derived := self._derived.get(id(t))) is not None:
                sources.update(derived[1])
                inputs.append(t)
            elif self._offgraph:
                offgraph.update(_lookup(self._offgraph, t))
            if self._indexed:
                indexed.update(_lookup(self._indexed, t))
        result = func(*args, **kwargs)
        if not (sources or offgraph or indexed):
            return result
        produced = list(nested_tensors(result))
        if produced:
            self._follow(func, sources | offgraph, indexed, produced)
        if not sources:
            return result
        outputs = [t for t in produced if t.requires_grad]
        origin = frozenset(sources)
        for t in outputs:
            self._derived[id(t)] = (t, origin)
        op = getattr(func, "__name__", str(func))
        if outputs and not origin.isdisjoint(self.zeroing):
            if not self._mixed >= self.zeroing:
                with suppress(Exception):  # a best effort: an odd tensor leaves no fact
                    self._mixing_op(op, args, kwargs, origin, inputs, outputs)
            if not self.zeroing <= set(self.zeroed):
                self._zeroing_op(op, origin, inputs, outputs)
            self._watch_backward(op, origin & self.zeroing, inputs, outputs)
        if not torch.is_grad_enabled():
            rank, how = 1, f"{op} under torch.no_grad()"
        elif outputs:
            if len(outputs) == len(produced):
                return result
            rank, how = 4, f"the non-differentiable output of {op}"  # topk's indices
        elif produced:
            rank, how = (0, ".detach()") if op == "detach" else (3, f"{op} (non-differentiable)")
        elif op in ("item", "tolist"):
            rank, how = 2, f".{op}()"
        else:
            return result  # .size(), .dim(): metadata, not a cut
        where = _user_line()
        text = f"{how} at {where}" if where else how
        for name in sources:
            if rank < self._ranks.get(name, 99):
                self._ranks[name] = rank
                self.cuts[name] = text
        return result

    def _follow(
        self, func: Any, values: set[str], indexed: set[str], produced: list[torch.Tensor]
    ) -> None:
        """Follow values computed from the watched parameters off the graph (under
        ``torch.no_grad()``, detached) into an op with an integer or boolean result, and that
        result onward to the loss."""
        if values and any(not (t.is_floating_point() or t.is_complex()) for t in produced):
            new = [name for name in values if name not in self.selects]
            if new:
                op = getattr(func, "__name__", str(func))
                where = _user_line()
                self.selects.update((name, (op, where)) for name in new)
            indexed = indexed | values
        off = frozenset(values)
        tags = frozenset(indexed)
        for t in produced:
            if off and not t.requires_grad:
                self._offgraph[id(t)] = (weakref.ref(t), off)
            if tags:
                self._indexed[id(t)] = (weakref.ref(t), tags)

    def _watch_backward(
        self,
        op: str,
        names: frozenset[str],
        inputs: Sequence[torch.Tensor],
        outputs: Sequence[torch.Tensor],
    ) -> None:
        ins = [t for t in inputs if t.grad_fn is not None]  # no hook on a parameter
        if not ins or op not in _JOINS:
            return
        for t in (*ins, *outputs):
            if id(t) not in self._nonzero:
                self._nonzero[id(t)] = False
                t.register_hook(functools.partial(self._record_grad, id(t)))  # type: ignore[no-untyped-call]
        ids = tuple(id(t) for t in ins), tuple(id(t) for t in outputs)
        self._steps.append((op, _user_line(), *ids, names))

    def _record_grad(self, key: int, grad: torch.Tensor | None) -> None:
        if not self._nonzero[key] and grad is not None:
            self._nonzero[key] = bool(grad.any())

    def _mixing_op(
        self,
        op: str,
        args: Any,
        kwargs: Mapping[str, Any],
        origin: frozenset[str],
        inputs: Sequence[torch.Tensor],
        outputs: Sequence[torch.Tensor],
    ) -> None:
        """Record a softmax (or an attention) computed from ``zeroing`` whose weights had
        nothing to choose between: every row one-hot, or every key's value the same."""
        name = op.strip("_")
        found = None
        with torch.no_grad():
            if name in ("softmax", "softmax_"):
                self._weights.update(id(t) for t in outputs)
                if all(t.is_floating_point() and _one_hot(t) for t in outputs):
                    found = ONE_HOT_SOFTMAX
            elif name == "scaled_dot_product_attention":
                given = [*args, *(kwargs.get(k) for k in ("query", "key", "value"))]
                qkv = [t for t in given if isinstance(t, torch.Tensor)][:3]
                if len(qkv) == 3 and qkv[1].dim() >= 2:
                    if qkv[1].shape[-2] == 1:
                        found = ONE_HOT_SOFTMAX
                    elif _same_rows(qkv[2]):
                        found = SAME_VALUES
            elif any(id(t) in self._weights for t in inputs):
                if name in ("matmul", "bmm", "__matmul__") and len(args) >= 2:
                    first, second = args[0], args[1]
                    if id(first) in self._weights and isinstance(second, torch.Tensor):
                        found = SAME_VALUES if _same_rows(second) else None
                elif name in _PASS_WEIGHTS:
                    self._weights.update(id(t) for t in outputs)
        if found is None:
            return
        where = _user_line()
        for param in origin & self.zeroing:
            if param not in self._mixed:
                self._mixed.add(param)
                self.zeroed[param] = (found, where)

    def _zeroing_op(
        self,
        op: str,
        origin: frozenset[str],
        inputs: Sequence[torch.Tensor],
        outputs: Sequence[torch.Tensor],
    ) -> None:
        with torch.no_grad():
            if not all(t.is_floating_point() and not bool(t.any()) for t in outputs):
                return
            if not any(t.is_floating_point() and bool(t.any()) for t in inputs):
                return  # zeros in, zeros out: made earlier
        where = _user_line()
        for name in origin & self.zeroing:
            self.zeroed.setdefault(name, (op, where))


_METADATA = frozenset(
    {
        "dtype", "device", "shape", "ndim", "layout", "requires_grad", "is_leaf", "is_cuda",
        "is_cpu", "is_mps", "is_meta", "is_sparse", "is_quantized", "is_nested", "itemsize",
        "nbytes", "names", "size", "dim", "numel", "nelement", "element_size", "stride",
        "storage_offset", "is_contiguous", "is_floating_point", "is_complex", "get_device",
        "data_ptr",
    }
)  # fmt: skip
"""What a forward may ask of a tensor without reading its values (``weight.dtype`` to cast
an input): such a call does not make a parameter read, nor its module run."""


def _metadata(func: Any) -> bool:
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a property: ``weight.dtype`` is ``dtype.__get__(weight)``
        name = getattr(getattr(func, "__self__", None), "__name__", "")
    return name in _METADATA


def _lookup(
    tags: Mapping[int, tuple[weakref.ref[torch.Tensor], frozenset[str]]], t: torch.Tensor
) -> frozenset[str]:
    entry = tags.get(id(t))
    return entry[1] if entry is not None and entry[0]() is t else frozenset()


_PASS_WEIGHTS = frozenset({"dropout", "to", "type_as", "float", "contiguous", "view", "reshape"})
"""Ops after which attention weights are still the weights (dropout, a cast, a reshape)."""


def _one_hot(weights: torch.Tensor) -> bool:
    """Every value exactly 0 or 1: a softmax over one element per row (the rest masked)."""
    return weights.numel() > 0 and bool(((weights == 0) | (weights == 1)).all())


def _same_rows(values: torch.Tensor) -> bool:
    """The same vector at every position of the second-to-last dimension (every key)."""
    if values.dim() < 2 or values.shape[-2] < 2 or not values.is_floating_point():
        return False
    return bool((values == values[..., :1, :]).all())


@contextmanager
def what_ran(
    modules: Sequence[tuple[str, nn.Module]],
    params: Mapping[int, str],
    zeroing: frozenset[str] = frozenset(),
) -> Iterator[
    tuple[
        set[str],
        set[str],
        dict[str, str],
        dict[str, tuple[str, str]],
        Callable[[torch.Tensor], tuple[dict[str, tuple[str, str]], dict[str, tuple[str, str]]]],
    ]
]:
    """During the block, record the modules (owning parameters) that ran, which of
    ``params`` (id -> name) an op read, where each one's path to the loss was cut, and,
    for the parameters named in ``zeroing``, the op that made what they compute all zeros:
    ``(ran, read, cuts, zeroed, after)``, filled in as the block runs. ``after(loss)``,
    called once the loss's backward ran, gives per parameter the op whose integer output
    carried its values to the loss (a top-k selector's indices) and, per parameter of
    ``zeroing``, the op past which no gradient flowed back to it (a head that reads only
    some positions)."""
    ran: set[str] = set()
    handles = [
        module.register_forward_pre_hook(lambda *_, name=name: ran.add(name))
        for name, module in modules
        if any(p is not None for p in module._parameters.values())
    ]
    mode = _ReadMode(params, zeroing)
    read: set[str] = set()
    try:
        with mode:
            yield ran, read, mode.cuts, mode.zeroed, mode.after
    finally:
        for handle in handles:
            handle.remove()
        read.update(params[i] for i in mode.read)
