"""The NaN/Inf origin search: each known pathology is located, and the model is left untouched."""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import fixtures.nonfinite as nonfinite
from fixtures.nonfinite import CASES, NonfiniteCase
from pytest_gradcheck.diagnosis import diagnose_nonfinite, find_nonfinite_origin

torch.set_num_threads(1)

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    return model(batch)


def _compute_loss(
    model: nn.Module, batch: Any, loss_fn: Callable[[Any], torch.Tensor]
) -> Callable[[], torch.Tensor]:
    return lambda: loss_fn(_call(model, batch))


def _marker_line(name: str) -> str:
    """``fixtures/nonfinite.py:LINE`` (relative to the working directory, as messages name
    it) of the line marked ``# origin: <name>`` in the fixtures."""
    path = inspect.getsourcefile(nonfinite)
    assert path is not None
    with open(path, encoding="utf-8") as source:
        lines = [
            i for i, text in enumerate(source, 1) if text.rstrip().endswith(f"# origin: {name}")
        ]
    assert len(lines) == 1, f"expected one '# origin: {name}' marker, found {lines}"
    return f"{os.path.relpath(path)}:{lines[0]}"


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "grads": {name: p.grad for name, p in model.named_parameters()},
        "grad_values": {
            name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None
        },
        "training": {name: m.training for name, m in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
    }


def _assert_untouched(model: nn.Module, before: dict[str, Any]) -> None:
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before["state"].keys()
    for key, value in before["state"].items():
        torch.testing.assert_close(after[key].detach(), value, rtol=0, atol=0, equal_nan=True)
    for name, param in model.named_parameters():
        assert param.grad is before["grads"][name], f"{name}.grad was replaced"
        if name in before["grad_values"]:
            torch.testing.assert_close(param.grad, before["grad_values"][name], rtol=0, atol=0)
        assert param.requires_grad == before["requires_grad"][name]
    assert {name: m.training for name, m in model.named_modules()} == before["training"]
    for name, module in model.named_modules():
        for attribute in _HOOK_DICTS:
            assert not getattr(module, attribute), f"{attribute} left on {name or '<root>'}"
    assert not torch.is_anomaly_enabled()
    assert torch._C._len_torch_function_stack() == 0


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def case(request: pytest.FixtureRequest) -> NonfiniteCase:
    return request.param  # type: ignore[no-any-return]


def test_each_case_is_located(case: NonfiniteCase) -> None:
    model, batch = case.build()
    expected = case.expected

    diagnosis = diagnose_nonfinite(model, _compute_loss(model, batch, case.loss_fn))

    origin = diagnosis.origin
    assert origin is not None, diagnosis.lines()
    assert (origin.phase, origin.module, origin.value, origin.op) == (
        expected.phase,
        expected.module,
        expected.value,
        expected.op,
    ), diagnosis.lines()
    if expected.phase in ("forward", "backward"):
        assert origin.source == _marker_line(case.name)
    else:
        assert origin.source is None


def test_first_line_names_phase_module_value_op_and_source(case: NonfiniteCase) -> None:
    model, batch = case.build()
    expected = case.expected

    lines = find_nonfinite_origin(model, _compute_loss(model, batch, case.loss_fn))

    first = lines[0]
    assert first.startswith(f"{expected.value} ")
    if expected.phase == "weights":
        assert f"already in the weights of {expected.module} " in first
    elif expected.phase == "input":
        assert "already in the input batch" in first
    else:
        assert f"first appears in the {expected.phase} of {expected.module} (" in first
        assert f"({expected.op}, created at {_marker_line(case.name)})" in first


def test_healthy_twin_has_no_origin(case: NonfiniteCase) -> None:
    model, batch = case.build_healthy()
    loss_fn = case.fixed_loss_fn
    assert torch.isfinite(loss_fn(_call(model, batch))).all()

    diagnosis = diagnose_nonfinite(model, _compute_loss(model, batch, loss_fn))

    assert diagnosis.origin is None, diagnosis.lines()
    assert diagnosis.lines()[0].startswith("no NaN or Inf appeared in the diagnostic re-run")


@pytest.mark.parametrize("healthy", [False, True], ids=["sick", "healthy"])
def test_model_is_left_untouched(case: NonfiniteCase, healthy: bool) -> None:
    model, batch = case.build_healthy() if healthy else case.build()
    loss_fn = case.fixed_loss_fn if healthy else case.loss_fn
    params = list(model.parameters())
    params[0].grad = torch.full_like(params[0], 0.25)  # an existing grad is restored
    model.train()
    model.encoder.eval()  # a mixed train/eval state survives too
    before = _snapshot(model)

    find_nonfinite_origin(model, _compute_loss(model, batch, loss_fn))

    _assert_untouched(model, before)


def test_running_statistics_are_restored() -> None:
    case = nonfinite.case("sqrt_distance")
    model, batch = case.build()
    model.train()
    norm = model.layers[1].norm
    assert isinstance(norm, nn.BatchNorm1d)
    before = norm.running_mean.clone()
    _call(model, batch)  # a train-mode forward moves the running mean...
    assert not torch.equal(norm.running_mean, before)
    moved = norm.running_mean.clone()
    batches = int(norm.num_batches_tracked)

    diagnosis = diagnose_nonfinite(model, _compute_loss(model, batch, case.loss_fn))

    assert diagnosis.origin is not None
    assert torch.equal(norm.running_mean, moved)  # ...the diagnostic re-run does not
    assert int(norm.num_batches_tracked) == batches


def test_repeated_runs_agree(case: NonfiniteCase) -> None:
    model, batch = case.build()
    compute_loss = _compute_loss(model, batch, case.loss_fn)
    assert find_nonfinite_origin(model, compute_loss) == find_nonfinite_origin(model, compute_loss)


# -- the explanation around the origin ----------------------------------------------------------


def test_masked_softmax_names_the_mask_as_cause() -> None:
    case = nonfinite.case("masked_attention")
    model, batch = case.build()

    lines = find_nonfinite_origin(model, _compute_loss(model, batch, case.loss_fn))

    assert "its inputs held no NaN (they held Inf)" in lines[0]
    mask_line = _marker_line("masked_attention").split(":")
    cause = (
        f"layers.1.attn (MaskedFillBackward0, created at {mask_line[0]}:{int(mask_line[1]) - 1})"
    )
    assert lines[1] == f"the Inf in its inputs was made in the forward of {cause}"
    assert any("torch.finfo(dtype).min" in line for line in lines[2:])


def test_inf_turning_into_nan_later_is_reported_after_the_origin() -> None:
    case = nonfinite.case("log_zero")
    model, batch = case.build()

    lines = find_nonfinite_origin(model, _compute_loss(model, batch, case.loss_fn))

    assert lines[0].endswith(": its inputs were finite")
    assert re.fullmatch(
        r"the Inf then turns into NaN in the forward of head \(AddmmBackward0, created at "
        r"fixtures/nonfinite\.py:\d+\)",
        lines[1],
    )


def test_where_trick_explains_the_hidden_branch() -> None:
    case = nonfinite.case("where_sqrt")
    model, batch = case.build()
    assert torch.isfinite(case.loss_fn(_call(model, batch)))

    lines = find_nonfinite_origin(model, _compute_loss(model, batch, case.loss_fn))

    assert lines[0].endswith("; its forward inputs were finite")
    assert lines[1].startswith("keep the unselected branch finite too (clamp its input)")
    assert "its forward output held NaN in entries that a later op" in lines[1]


def test_custom_function_backward_is_named() -> None:
    case = nonfinite.case("custom_backward")
    model, batch = case.build()

    lines = find_nonfinite_origin(model, _compute_loss(model, batch, case.loss_fn))

    assert "is the backward() of a custom torch.autograd.Function" in lines[1]


def test_nan_weights_count_every_bad_parameter() -> None:
    model, batch = nonfinite.case("nan_weights").build()
    with torch.no_grad():
        model.head.bias[1] = float("inf")

    lines = find_nonfinite_origin(model, lambda: _call(model, batch).sum())

    assert lines[0] == (
        "NaN is already in the weights of encoder.2 (parameter encoder.2.weight, 3 NaN values)"
    )
    assert lines[1] == "Inf is already in the weights of head (parameter head.bias, 1 Inf value)"


def test_nan_input_by_keyword_is_named() -> None:
    model, batch = nonfinite.case("masked_attention").build_healthy()
    batch["x"][0, 1, 2] = float("nan")

    diagnosis = diagnose_nonfinite(model, lambda: _call(model, batch).sum())

    assert diagnosis.origin is not None
    assert diagnosis.origin.phase == "input"
    assert diagnosis.lines()[0] == "NaN is already in the input batch (argument 'x', 1 NaN value)"


# -- buffers ------------------------------------------------------------------------------------


class CausalScores(nn.Module):
    """Attention weights with a deliberate -inf causal mask buffer, then an optional 0/0."""

    def __init__(self, divide_by_zero: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.register_buffer("mask", torch.full((4, 4), float("-inf")).triu(1))
        self.divide_by_zero = divide_by_zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        weights = torch.softmax(h[:, :, None] * h[:, None, :] + self.mask, dim=-1)
        out = (weights @ h[:, :, None]).squeeze(-1)
        if self.divide_by_zero:
            out = (out - out) / (out - out)  # origin: buffer_case
        return out


def test_a_deliberate_inf_mask_buffer_is_no_origin() -> None:
    torch.manual_seed(0)
    healthy = CausalScores(divide_by_zero=False)
    x = torch.randn(3, 4)

    assert diagnose_nonfinite(healthy, lambda: healthy(x).sum()).origin is None

    sick = CausalScores(divide_by_zero=True)
    origin = diagnose_nonfinite(sick, lambda: sick(x).sum()).origin
    assert origin is not None
    assert (origin.phase, origin.module, origin.value, origin.op) == (
        "forward",
        "<root>",
        "NaN",
        "DivBackward0",
    )
    assert origin.source == f"{os.path.relpath(__file__)}:{_this_file_marker('buffer_case')}"


def test_nan_in_a_buffer_is_in_the_weights() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model[1].running_var[2] = float("nan")
    model.eval()

    lines = find_nonfinite_origin(model, lambda: model(torch.randn(5, 3)).sum())

    assert lines[0] == "NaN is already in the weights of 1 (buffer 1.running_var, 1 NaN value)"


def _this_file_marker(name: str) -> int:
    with open(__file__, encoding="utf-8") as source:
        return next(
            i for i, line in enumerate(source, 1) if line.rstrip().endswith(f"# origin: {name}")
        )


# -- it never raises ----------------------------------------------------------------------------


def test_a_failing_compute_loss_is_reported_not_raised() -> None:
    model, _ = nonfinite.case("log_zero").build()
    before = _snapshot(model)

    def broken() -> torch.Tensor:
        model(torch.randn(2, 99))  # wrong width: the forward raises inside a module
        raise AssertionError("unreachable")

    lines = find_nonfinite_origin(model, broken)

    assert lines[0].startswith("the NaN/Inf search could not run: RuntimeError: ")
    _assert_untouched(model, before)


def test_user_anomaly_mode_does_not_make_it_raise() -> None:
    case = nonfinite.case("where_sqrt")
    model, batch = case.build()

    with torch.autograd.set_detect_anomaly(True, check_nan=True):
        origin = diagnose_nonfinite(model, _compute_loss(model, batch, case.loss_fn)).origin
        assert torch.is_anomaly_enabled()

    assert origin is not None
    assert origin.op == "SqrtBackward0"
    assert not torch.is_anomaly_enabled()
