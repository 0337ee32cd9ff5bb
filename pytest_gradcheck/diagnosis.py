"""Where a NaN or Inf is born: the diagnostic re-run after a check found non-finite values.

The engine calls :func:`find_nonfinite_origin` only when a check already failed with NaN or
Inf, so a healthy check never pays for any of this. The re-run runs the forward and the
backward once more and reports the first place where a non-finite value appears:

* **weights**: a parameter (or a buffer) already holds NaN or Inf before anything runs;
* **input**: the input batch already holds NaN;
* **forward**: the first module whose output holds NaN/Inf while its inputs did not, and the op
  inside it that made the value. Every torch call is watched by a ``TorchFunctionMode``; each
  non-finite tensor is tagged with the op that first produced that kind of value (an op whose
  inputs held no value of that kind), and the tag travels with the data to the loss. Only
  values that reach the loss count, so an intentional ``-inf`` attention mask is no origin;
* **backward**: when the loss is finite, a hook on every node of the autograd graph finds the
  first node that outputs a non-finite gradient while the gradient it received was finite.
  Anomaly mode (``check_nan=False``: it must not raise) records where each node was created.

Source locations are ``file.py:LINE`` of the innermost frame outside torch and this package.

Imports torch, the tensor walker and :mod:`pytest_gradcheck.facts` (source paths).
"""

from __future__ import annotations

import os
import re
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.autograd.graph import Node
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from .facts import source_path
from .tensors import leaves

__all__ = ["Diagnosis", "NonfiniteOrigin", "diagnose_nonfinite", "find_nonfinite_origin"]

Kind = Literal["NaN", "Inf"]
Phase = Literal["forward", "backward", "weights", "input"]

_NONE: frozenset[Kind] = frozenset()
_SKIP_DIRS = (
    os.path.dirname(torch.__file__) + os.sep,
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
)
_VIEW_NODE = re.compile(
    r"(View|UnsafeView|Reshape\w*|Expand|Squeeze\w*|Unsqueeze\w*|Transpose|Permute|T|"
    r"AsStrided|Alias|Select|Slice|Clone|ToCopy)Backward\d*"
)
"""Nodes that only reshape or copy: an op like ``F.linear`` on 3-d input ends in a View."""
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+)')


@dataclass(frozen=True)
class NonfiniteOrigin:
    """The first place where a NaN or Inf appears."""

    value: Kind
    phase: Phase
    module: str
    """Module path as in ``named_modules()`` (``<root>``), or ``<loss>``, ``<input>``."""
    op: str | None = None
    """The autograd node (``SqrtBackward0``), or the torch function when there is none."""
    source: str | None = None
    """``file.py:LINE`` of the user's code that created the op."""
    detail: str = ""

    def describe(self) -> str:
        where = ", ".join(
            part for part in (self.op, f"created at {self.source}" if self.source else None) if part
        )
        where = f" ({where})" if where else ""
        if self.phase == "weights":
            return f"{self.value} is already in the weights of {self.module} ({self.detail})"
        if self.phase == "input":
            return f"{self.value} is already in the input batch ({self.detail})"
        if self.phase == "forward":
            text = f"{self.value} first appears in the forward of {self.module}{where}"
            return f"{text}: {self.detail}" if self.detail else text
        text = f"{self.value} first appears in the backward of {self.module}{where}"
        return f"{text}; {self.detail}" if self.detail else text


@dataclass(frozen=True)
class Diagnosis:
    """What the diagnostic re-run found: the origin (or None), and lines that explain it."""

    origin: NonfiniteOrigin | None
    also: tuple[str, ...] = ()
    """Further findings: the rest of a chain (Inf that turns into NaN), more bad weights."""
    hints: tuple[str, ...] = ()
    checked: str = ""
    """What was checked, when no origin was found."""

    def lines(self) -> list[str]:
        first = [self.origin.describe()] if self.origin else [self.checked]
        return [*first, *self.also, *self.hints]


def find_nonfinite_origin(
    model: torch.nn.Module, compute_loss: Callable[[], torch.Tensor]
) -> list[str]:
    """Re-run forward and backward once and say where the first NaN or Inf appears.

    ``compute_loss()`` runs the model on the prepared batch and returns the scalar loss. The
    re-run registers temporary hooks, runs ``compute_loss()`` and, when the loss is finite,
    ``loss.backward()`` (both under ``torch.enable_grad()``); then it removes every hook,
    restores each parameter's ``.grad`` (None during the re-run) and every buffer, and returns
    human-readable lines, the first one naming the origin. It never raises: a re-run that
    fails, or finds nothing, is reported as a line that says what was checked.
    """
    return diagnose_nonfinite(model, compute_loss).lines()


def diagnose_nonfinite(
    model: torch.nn.Module, compute_loss: Callable[[], torch.Tensor]
) -> Diagnosis:
    """Like :func:`find_nonfinite_origin`, with the origin as structured data."""
    bad_weights = _nonfinite_weights(model)
    if bad_weights:
        return Diagnosis(
            origin=bad_weights[0],
            also=tuple(origin.describe() for origin in bad_weights[1:]),
            hints=(_WEIGHTS_HINT,),
        )
    tracker = _Tracker(model)
    params = list(model.parameters())
    saved_grads = [p.grad for p in params]
    saved_buffers = [
        (module, name, buffer, buffer.detach().clone())
        for module in model.modules()
        for name, buffer in module.named_buffers(recurse=False)
    ]
    handles: list[RemovableHandle] = []
    try:
        for p in params:
            p.grad = None
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(tracker.pre_hook, with_kwargs=True))
            handles.append(
                module.register_forward_hook(tracker.post_hook, with_kwargs=True, always_call=True)
            )
        with (
            torch.enable_grad(),
            torch.autograd.set_detect_anomaly(True, check_nan=False),
            tracker,
        ):
            loss = compute_loss()
        for handle in handles:
            handle.remove()
        handles.clear()
        if not isinstance(loss, torch.Tensor):
            return Diagnosis(None, checked=f"compute_loss() returned {type(loss).__name__}")
        kinds = _kinds(loss)
        if kinds:
            return tracker.forward_diagnosis(loss, "NaN" if "NaN" in kinds else "Inf")
        nan_inputs = [site for site in tracker.inputs if site.kind == "NaN"]
        if nan_inputs:
            return Diagnosis(_origin(nan_inputs[0]), hints=(_INPUT_HINT,))
        return _backward_diagnosis(tracker, loss, handles)
    except Exception as exc:  # the re-run explains a failure; it must never cause one
        return Diagnosis(
            None, checked=f"the NaN/Inf search could not run: {type(exc).__name__}: {exc}"
        )
    finally:
        for handle in handles:
            handle.remove()
        for p, grad in zip(params, saved_grads, strict=True):
            p.grad = grad
        _restore_buffers(saved_buffers)
        tracker.clear()


def _restore_buffers(
    saved: list[tuple[torch.nn.Module, str, torch.Tensor, torch.Tensor]],
) -> None:
    """Put back every buffer (running statistics move in a train-mode forward)."""
    with torch.no_grad():
        for module, name, buffer, value in saved:
            try:
                if getattr(module, name, None) is not buffer:
                    setattr(module, name, buffer)
                buffer.copy_(value)
            except RuntimeError:  # an inference tensor cannot be written outside inference mode
                continue


# -- values -------------------------------------------------------------------------------------


def _kinds(tensor: torch.Tensor) -> frozenset[Kind]:
    """Which kinds of non-finite value the tensor holds (empty for finite or non-float)."""
    try:
        if not (tensor.is_floating_point() or tensor.is_complex()):
            return _NONE
        data = tensor.detach()
        if data.numel() and not data.untyped_storage().nbytes():
            return _NONE  # storage freed, e.g. FSDP's unsharded parameter between passes
        if bool(torch.isfinite(data).all()):
            return _NONE
        found: set[Kind] = set()
        if bool(torch.isnan(data).any()):
            found.add("NaN")
        if bool(torch.isinf(data).any()):
            found.add("Inf")
        return frozenset(found)
    except (RuntimeError, NotImplementedError, TypeError):  # meta, sparse, quantized...
        return _NONE


def _counts(tensor: torch.Tensor) -> str:
    data = tensor.detach()
    parts = []
    for kind, count in (
        ("NaN", int(torch.isnan(data).sum())),
        ("Inf", int(torch.isinf(data).sum())),
    ):
        if count:
            parts.append(f"{count} {kind} value{'s' if count != 1 else ''}")
    return ", ".join(parts)


def _first(kinds: frozenset[Kind]) -> Kind:
    return "NaN" if "NaN" in kinds else "Inf"


def _module_of(name: str) -> str:
    return name.rpartition(".")[0] or "<root>"


def _nonfinite_weights(model: torch.nn.Module) -> list[NonfiniteOrigin]:
    """Parameters with NaN/Inf, and buffers with NaN (an Inf buffer can be a deliberate mask)."""
    found = []
    for what, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in named:
            kinds = _kinds(tensor)
            if kinds and (what == "parameter" or "NaN" in kinds):
                detail = f"{what} {name}, {_counts(tensor)}"
                found.append(
                    NonfiniteOrigin(_first(kinds), "weights", _module_of(name), None, None, detail)
                )
    return found


# -- source locations ---------------------------------------------------------------------------


def _is_user_file(filename: str) -> bool:
    return not filename.startswith(_SKIP_DIRS) and not filename.startswith("<frozen")


def _user_source() -> str | None:
    """``file.py:LINE`` of the innermost calling frame outside torch and this package."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if _is_user_file(filename):
            return f"{source_path(filename)}:{frame.f_lineno}"
        frame = frame.f_back  # type: ignore[assignment]
    return None


def _node_source(node: Node) -> str | None:
    """Where anomaly mode saw the node being created (its forward stack), as ``file.py:LINE``."""
    try:
        metadata: object = getattr(node, "metadata", None)  # a property, typed as a method
        if callable(metadata):
            metadata = metadata()
    except (RuntimeError, TypeError):
        return None
    stack = metadata.get("traceback_") if isinstance(metadata, dict) else None
    if not isinstance(stack, list):
        return None
    for entry in reversed(stack):
        match = _FRAME.search(str(entry))
        if match and _is_user_file(match["file"]):
            return f"{source_path(match['file'])}:{match['line']}"
    return None


def _op_name(func: Callable[..., Any]) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    owner = "Tensor" if "Tensor" in getattr(func, "__qualname__", "") else "torch"
    return f"{owner}.{name}"


# -- the forward --------------------------------------------------------------------------------


@dataclass(eq=False)
class _Site:
    """Where one kind of non-finite value was made (or found, for weights and inputs)."""

    kind: Kind
    phase: Phase
    module: str
    op: str | None = None
    source: str | None = None
    detail: str = ""
    dtype: str = ""
    input_kinds: frozenset[Kind] = _NONE
    cause: _Site | None = None
    """For a value made from a value of the other kind (NaN from Inf): where that came from."""
    fed_by: str | None = None
    """The autograd node that made the op's first input (``SoftmaxBackward0`` for
    ``log(softmax(x))``): picks the numerically safe function to suggest."""


@dataclass(eq=False)
class _NodeInfo:
    """The forward call that created an autograd node."""

    module: str
    source: str | None
    input_kinds: frozenset[Kind] | None
    """None when the node was created by code the mode does not see (a custom Function)."""
    output_kinds: frozenset[Kind] = _NONE


@dataclass(eq=False)
class _TensorState:
    ref: weakref.ref[torch.Tensor]
    version: int
    kinds: frozenset[Kind]
    taint: dict[Kind, _Site] = field(default_factory=dict)


@dataclass(eq=False)
class _Call:
    module: torch.nn.Module
    path: str
    input_kinds: frozenset[Kind]


@dataclass(frozen=True, eq=False)
class _Candidate:
    """A module whose output holds a kind of value that its inputs did not."""

    module: str
    kind: Kind
    site: _Site | None
    op: str | None
    source: str | None


def _version(tensor: torch.Tensor) -> int:
    """The tensor's in-place version counter (-1 for inference tensors, which have none)."""
    try:
        return tensor._version
    except RuntimeError:
        return -1


class _Tracker(TorchFunctionMode):
    """Watches every torch call of the forward; tags non-finite tensors with their origin."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.root = model
        self.paths = {id(m): name or "<root>" for name, m in model.named_modules()}
        self.stack: list[_Call] = []
        self.tensors: dict[int, _TensorState] = {}
        self.nodes: dict[Node, _NodeInfo] = {}
        self.candidates: list[_Candidate] = []
        self.inputs: list[_Site] = []
        self.busy = False
        self.model_done = False
        self.ops = 0
        self.calls = 0
        for name, buffer in model.named_buffers():  # Inf in a buffer may be a deliberate mask
            state = self.state(buffer)
            for kind in state.kinds:
                detail = f"buffer {name}, {_counts(buffer)}"
                state.taint[kind] = _Site(kind, "weights", _module_of(name), detail=detail)

    def clear(self) -> None:
        self.tensors.clear()
        self.nodes.clear()
        self.stack.clear()

    @property
    def current(self) -> str:
        if self.stack:
            return self.stack[-1].path
        return "<loss>" if self.model_done else "<outside the model>"

    def state(self, tensor: torch.Tensor) -> _TensorState:
        version = _version(tensor)
        state = self.tensors.get(id(tensor))
        if state is None or state.ref() is not tensor:
            state = _TensorState(weakref.ref(tensor), version, _kinds(tensor))
            self.tensors[id(tensor)] = state
        elif state.version != version:
            state.version = version
            state.kinds = _kinds(tensor)
            state.taint = {k: site for k, site in state.taint.items() if k in state.kinds}
        return state

    def adopt(self, node: Node | None, info: _NodeInfo | None, module: str | None = None) -> None:
        """Record the creator of ``node`` and of every unrecorded node behind it."""
        todo = [node]
        while todo:
            current = todo.pop()
            if current is None or current in self.nodes:
                continue
            if info is None:
                info = _NodeInfo(module or self.current, None, None)
            self.nodes[current] = info
            todo.extend(next_node for next_node, _ in current.next_functions)

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if self.busy:
            return func(*args, **kwargs)
        inputs = tensors_in((args, kwargs))
        before = []
        for tensor in inputs:
            state = self.state(tensor)
            before.append((state.kinds, dict(state.taint)))
            self.adopt(tensor.grad_fn, None)
        versions = [_version(tensor) for tensor in inputs]
        input_kinds: frozenset[Kind] = frozenset().union(*(kinds for kinds, _ in before))
        result = func(*args, **kwargs)
        outputs = tensors_in(result)
        # an in-place op that returns nothing (``x[mask] = -inf``) made its first argument
        outputs += [
            tensor
            for tensor, version in zip(inputs, versions, strict=True)
            if _version(tensor) != version and all(tensor is not o for o in outputs)
        ]
        if not outputs:
            return result
        self.ops += 1
        made: dict[Kind, _Site] = {}
        states = [self.state(tensor) for tensor in outputs]
        for tensor, state in zip(outputs, states, strict=True):
            taint: dict[Kind, _Site] = {}
            for kind in state.kinds:
                if kind in input_kinds:
                    inherited = next((t[kind] for k, t in before if kind in k and kind in t), None)
                    if inherited is not None:
                        taint[kind] = inherited
                    continue
                if kind not in made:
                    made[kind] = self._site(kind, func, tensor, input_kinds, before)
                taint[kind] = made[kind]
            state.taint = taint
        output_kinds = frozenset().union(*(state.kinds for state in states))
        info: _NodeInfo | None = None
        for tensor in outputs:
            node = tensor.grad_fn
            if node is not None and node not in self.nodes:
                if info is None:
                    info = _NodeInfo(self.current, _user_source(), input_kinds, output_kinds)
                self.adopt(node, info)
        return result

    def _site(
        self,
        kind: Kind,
        func: Callable[..., Any],
        tensor: torch.Tensor,
        input_kinds: frozenset[Kind],
        before: list[tuple[frozenset[Kind], dict[Kind, _Site]]],
    ) -> _Site:
        node = tensor.grad_fn
        while node is not None and _VIEW_NODE.fullmatch(node.name()):
            # the value was made deeper in this call's own nodes (those not yet recorded)
            inner = [n for n, _ in node.next_functions if n is not None and n not in self.nodes]
            if len(inner) != 1:
                break
            node = inner[0]
        cause = next((t[k] for k in input_kinds for _, t in before if k in t), None)
        return _Site(
            kind,
            "forward",
            self.current,
            op=node.name() if node is not None else _op_name(func),
            source=_user_source(),
            dtype=str(tensor.dtype).removeprefix("torch."),
            input_kinds=input_kinds,
            cause=cause,
            fed_by=_fed_by(node),
        )

    def pre_hook(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self.busy = True
        try:
            self.calls += 1
            path = self.paths.get(id(module), type(module).__name__)
            kinds: frozenset[Kind] = _NONE
            for label, tensor in _argument_leaves(args, kwargs):
                state = self.state(tensor)
                kinds |= state.kinds
                self.adopt(tensor.grad_fn, None)
                if module is self.root:
                    for kind in state.kinds - state.taint.keys():
                        detail = f"{label}, {_counts(tensor)}"
                        site = _Site(kind, "input", "<input>", detail=detail)
                        state.taint[kind] = site
                        self.inputs.append(site)
            self.stack.append(_Call(module, path, kinds))
        finally:
            self.busy = False

    def post_hook(
        self,
        module: torch.nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: Any,
    ) -> None:
        self.busy = True
        try:
            index = next(
                (i for i in range(len(self.stack) - 1, -1, -1) if self.stack[i].module is module),
                None,
            )
            if index is None:
                return
            call = self.stack[index]
            for tensor in tensors_in(output):
                self.adopt(tensor.grad_fn, None, call.path)
                state = self.state(tensor)
                for kind in state.kinds - call.input_kinds:
                    node = tensor.grad_fn
                    op = node.name() if node is not None else None
                    source = _node_source(node) if node is not None else None
                    site = state.taint.get(kind)
                    self.candidates.append(_Candidate(call.path, kind, site, op, source))
            del self.stack[index:]
            if module is self.root:
                self.model_done = True
        finally:
            self.busy = False

    def forward_diagnosis(self, loss: torch.Tensor, kind: Kind) -> Diagnosis:
        """The loss holds ``kind``: follow its tag back to where that value was made."""
        site = self.state(loss).taint.get(kind)
        if site is None:
            candidate = next((c for c in self.candidates if c.kind == kind), None)
            if candidate is None:
                return Diagnosis(
                    None,
                    checked=(
                        f"the loss is {kind}, but no watched op or module output held {kind} "
                        f"first ({self.calls} module calls, {self.ops} ops checked)"
                    ),
                )
            origin = NonfiniteOrigin(
                kind, "forward", candidate.module, candidate.op, candidate.source
            )
            return Diagnosis(origin, hints=_hints(origin, ""))
        chain = [site]
        cause = site.cause
        while cause is not None and cause not in chain:
            chain.append(cause)
            cause = cause.cause
        chain.reverse()  # earliest first
        # the first module whose output held the chain's value while its inputs did not
        # decides which link is the origin: the NaN of a softmax over an all -inf row, not the
        # -inf of the mask, when both happen inside one attention module
        first = next((c.site for c in self.candidates if c.site in chain), None)
        main = first or chain[0]
        origin = _origin(main)
        also = []
        position = chain.index(main)
        for index, other in enumerate(chain):
            where = _where(other)
            if index < position:
                also.append(
                    f"the {other.kind} in its inputs was made in the forward of "
                    f"{other.module}{where}"
                )
            elif index > position:
                also.append(
                    f"the {chain[index - 1].kind} then turns into {other.kind} in the forward "
                    f"of {other.module}{where}"
                )
        hints = _hints(origin, main.dtype, main.fed_by)
        if main.phase == "input":
            hints = (_INPUT_HINT, *hints)
        elif main.phase == "weights":
            hints = (_WEIGHTS_HINT, *hints)
        return Diagnosis(origin, tuple(also), hints)


def _argument_leaves(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> list[tuple[str, torch.Tensor]]:
    found: list[tuple[str, torch.Tensor]] = []
    for index, value in enumerate(args):
        found.extend(leaves(value, f"argument {index}"))
    for key, value in kwargs.items():
        found.extend(leaves(value, f"argument {key!r}"))
    return found


def _where(site: _Site) -> str:
    parts = [p for p in (site.op, f"created at {site.source}" if site.source else None) if p]
    return f" ({', '.join(parts)})" if parts else ""


def _fed_by(node: Any) -> str | None:
    """The node that made ``node``'s first input, looking through views, copies and the
    scaling and reductions around it (a loss's ``mean``, a ``/ sqrt(d)``)."""
    if node is None:
        return None
    inputs = [n for n, _ in node.next_functions if n is not None]
    for _ in range(8):
        if not inputs or not _PASS_THROUGH.fullmatch(inputs[0].name()):
            break
        inputs = [n for n, _ in inputs[0].next_functions if n is not None]
    return inputs[0].name() if inputs else None


_PASS_THROUGH = re.compile(_VIEW_NODE.pattern + r"|(Div|Mul|Mean|Sum)Backward\d*")


def _origin(site: _Site) -> NonfiniteOrigin:
    if site.phase != "forward":
        return NonfiniteOrigin(site.kind, site.phase, site.module, None, None, site.detail)
    if not site.input_kinds:
        detail = "its inputs were finite"
    else:
        held = " and ".join(sorted(site.input_kinds))
        detail = f"its inputs held no {site.kind} (they held {held})"
    return NonfiniteOrigin(site.kind, "forward", site.module, site.op, site.source, detail)


# -- the backward -------------------------------------------------------------------------------


def _graph(root: Node) -> list[Node]:
    seen: set[Node] = set()
    order = []
    todo = [root]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        order.append(node)
        todo.extend(n for n, _ in node.next_functions if n is not None and n not in seen)
    return order


def _backward_diagnosis(
    tracker: _Tracker, loss: torch.Tensor, handles: list[RemovableHandle]
) -> Diagnosis:
    """The loss is finite: find the first node that makes a non-finite gradient."""
    if loss.grad_fn is None:
        return Diagnosis(
            None, checked="the loss is finite and has no autograd graph: nothing to search"
        )
    found: list[tuple[Node, Kind]] = []

    def hook_for(node: Node) -> Callable[[Any, Any], None]:
        def hook(grad_inputs: Any, grad_outputs: Any) -> None:
            if found:
                return
            received = frozenset().union(*(_kinds(g) for g in tensors_in(grad_outputs)))
            made = frozenset().union(*(_kinds(g) for g in tensors_in(grad_inputs)))
            new = made - received
            if new:
                found.append((node, _first(new)))

        return hook

    nodes = [n for n in _graph(loss.grad_fn) if "AccumulateGrad" not in n.name()]
    for node in nodes:
        handles.append(node.register_hook(hook_for(node)))
    with torch.enable_grad(), torch.autograd.set_detect_anomaly(False):
        torch.autograd.backward(loss)
    if not found:
        return Diagnosis(
            None,
            checked=(
                "no NaN or Inf appeared in the diagnostic re-run: the weights, the input "
                f"batch, {tracker.calls} module calls ({tracker.ops} ops) and "
                f"{len(nodes)} backward nodes were finite; the failure may depend on "
                "randomness or state that this re-run did not reproduce"
            ),
        )
    node, kind = found[0]
    info = tracker.nodes.get(node)
    module = info.module if info is not None else "<unknown>"
    source = _node_source(node) or (info.source if info is not None else None)
    detail = ""
    if info is not None and info.input_kinds is not None:
        if info.input_kinds:
            detail = f"its forward inputs held {' and '.join(sorted(info.input_kinds))}"
        else:
            detail = "its forward inputs were finite"
    origin = NonfiniteOrigin(kind, "backward", module, node.name(), source, detail)
    hints = _hints(origin, "")
    if info is not None and info.output_kinds:
        held = " and ".join(sorted(info.output_kinds))
        hints = (
            f"keep the unselected branch finite too (clamp its input): its forward output held "
            f"{held} in entries that a later op (torch.where, a mask, indexing) hid from the "
            "loss, and the gradient through such an entry is NaN even when it is not selected",
            *hints,
        )
    if isinstance(node, torch.autograd.function.BackwardCFunction):
        hints = (
            f"{node.name()} is the backward() of a custom torch.autograd.Function: it returned "
            f"{kind} from a finite gradient; guard its divisions (clamp_min(eps) on norms)",
            *hints,
        )
    return Diagnosis(origin, (), hints)


# -- remedies -----------------------------------------------------------------------------------

_WEIGHTS_HINT = (
    "re-initialise the parameters or reload the last good checkpoint, then find the step "
    "that wrote the non-finite values (a diverged optimizer step: lower the learning rate or "
    "clip gradients; or the loading code)"
)
_INPUT_HINT = (
    "the batch itself holds NaN: clean the data (drop the rows, or torch.nan_to_num) before "
    "the model sees it"
)

_HINTS = {
    "Sqrt": "sqrt has an infinite slope at 0: use torch.sqrt(x + eps) or x.clamp_min(eps).sqrt()",
    "Rsqrt": "rsqrt is infinite at 0: use torch.rsqrt(x + eps)",
    "Pow": "x ** p with p < 1 has an infinite slope at 0: add eps to the base",
    "Log": (
        "log(0) is -inf and its slope is infinite at 0: use torch.log(x + eps) or "
        "x.clamp_min(eps).log()"
    ),
    "Div": (
        "0 / 0 is NaN and x / 0 is Inf: add eps to the denominator, "
        "e.g. x / (x.norm(dim=-1, keepdim=True) + eps), or use F.normalize"
    ),
    "Acos": "acos has an infinite slope at ±1: clamp its argument to [-1 + eps, 1 - eps]",
    "Asin": "asin has an infinite slope at ±1: clamp its argument to [-1 + eps, 1 - eps]",
    "Softmax": (
        "never mask a whole row of a softmax (every entry -inf gives NaN): keep one entry of "
        "each row unmasked, or mask with a finite value (torch.finfo(dtype).min) and zero the "
        "fully masked rows after"
    ),
    "MaskedFill": (
        "fill with a finite value (torch.finfo(dtype).min) instead of -inf/inf, and never "
        "mask a whole row of a softmax"
    ),
    "Exp": (
        "exp overflows ({dtype} tops out at {max:.4g}): subtract the max first "
        "(logsumexp), clamp the argument, or compute in float32"
    ),
    "Std": (
        "the unbiased std of a single value divides by n - 1 = 0: use correction=0 "
        "(unbiased=False) or reduce over more than one value"
    ),
    "CtcLoss": (
        "the CTC loss is Inf when a target is longer than its input sequence: check the "
        "input and target lengths, or pass zero_infinity=True"
    ),
}
_HINTS["LogSoftmax"] = _HINTS["Softmax"]
_HINTS["Var"] = _HINTS["Std"]
_HINTS["StdMean"] = _HINTS["Std"]
_HINTS["VarMean"] = _HINTS["Std"]
#: The numerically safe form of an op fed by another: ``log(softmax(x))``.
_SAFER = {
    ("Log", "Softmax"): "use log_softmax(x) instead of log(softmax(x)) (and F.cross_entropy on "
    "the logits instead of nll_loss on log-probabilities)",
    ("Log", "Sigmoid"): "use F.logsigmoid(x) instead of log(sigmoid(x)), and "
    "binary_cross_entropy_with_logits on the logits instead of BCELoss after a sigmoid",
}
_MATMULS = ("Bmm", "Mm", "Addmm", "Baddbmm", "Mul", "Matmul")
_REDUCTIONS = ("Mean", "Sum", "Div")


def _hints(origin: NonfiniteOrigin, dtype: str, fed_by: str | None = None) -> tuple[str, ...]:
    """The remedy for the op that made the value: the numerically safe function when one
    exists, the op's own remedy, or a general one when the op is unknown."""
    if origin.op is None:
        return ()
    base = re.sub(r"Backward\d*$", "", origin.op)
    feeder = re.sub(r"Backward\d*$", "", fed_by or "")
    safer = _SAFER.get((base, feeder))
    if safer is not None:
        return (safer,)
    if base in ("Softmax", "LogSoftmax") and dtype == "float16" and feeder in _MATMULS:
        return (
            "attention scores overflow float16: scale them by 1/sqrt(head dim) before the "
            "softmax, or compute the softmax in float32",
        )
    hint = _HINTS.get(base)
    if hint is None and base in _REDUCTIONS:  # a mean of the op that made it (a loss's)
        hint = _HINTS.get(feeder)
    if hint is None:
        return (
            f"no remedy is known for {base}: find which of its inputs makes it non-finite "
            "(a zero, a huge or a negative value) and clamp it or add eps there",
        )
    if "{dtype}" in hint:
        dtype = dtype or "float32"
        try:
            biggest = torch.finfo(getattr(torch, dtype)).max
        except (AttributeError, TypeError):
            biggest = torch.finfo(torch.float32).max
        hint = hint.format(dtype=dtype, max=biggest)
    return (hint,)


def tensors_in(obj: object) -> list[torch.Tensor]:
    return [tensor for _, tensor in leaves(obj)]
