"""``activations=True``: the gradient flowing into each layer's output, and along time."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from torch import nn

from fixtures.zoo import case, mean_square
from pytest_gradcheck import GradcheckError, check_gradients, measure
from pytest_gradcheck.settings import resolve


def _no_hooks(model: nn.Module) -> bool:
    if nn.modules.module._global_forward_hooks:
        return False
    modules_clean = all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        for m in model.modules()
    )
    params_clean = all(not p._backward_hooks for p in model.parameters())
    return modules_clean and params_clean


def test_one_norm_per_layer_in_depth_order_and_decaying() -> None:
    model, batch = case("sigmoid_mlp_deep").build()
    report = check_gradients(model, batch, activations=True)
    names = [name for name, _ in report.activation_grads]
    assert names == [f"layers.{i}" for i in range(10)]
    assert names == [layer.name for layer in report.layers]
    norms = [norm for _, norm in report.activation_grads]
    # Backprop through a default-init sigmoid layer shrinks the gradient ~7x (Glorot & Bengio).
    steps = [later / earlier for earlier, later in itertools.pairwise(norms)]
    assert all(step > 3 for step in steps), steps
    assert norms[0] < 1e-6 * norms[-1]
    assert report.activation_steps == ()  # no recurrent module, no module called twice


def test_norms_match_autograd() -> None:
    """The recorded norms are those of d loss / d output of each layer, computed directly."""
    model, batch = case("sigmoid_mlp_deep").build()
    report = check_gradients(model, batch, activations=True, loss_fn=mean_square)

    outputs: list[torch.Tensor] = []
    handles = [
        layer.register_forward_hook(lambda m, a, out: outputs.append(out)) for layer in model.layers
    ]
    try:
        loss = mean_square(model(batch))
        grads = torch.autograd.grad(loss, outputs)
    finally:
        for handle in handles:
            handle.remove()
    expected = [float(g.norm()) for g in grads]
    measured = [norm for _, norm in report.activation_grads]
    assert measured == pytest.approx(expected, rel=1e-4)


class _SmallAndLarge(nn.Module):
    """Outputs below and above the size whose gradients are held and normed together, and
    a layer called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.small = nn.Linear(8, 8)
        self.wide = nn.Linear(8, 600)  # 200 x 600 outputs: normed as they come
        self.head = nn.Linear(600, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.small(self.head(torch.tanh(self.wide(self.small(x)))))


@pytest.mark.parametrize("held", [0, 8 * 200, 1 << 22])
def test_held_and_immediate_norms_match_autograd(
    held: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ``held``: how many gradient elements may wait for the end of backward (none, one
    # call's worth, all): every mix of the two paths gives the same norms, in call order.
    monkeypatch.setattr(measure, "_HELD_ELEMENTS", held)
    torch.manual_seed(0)
    model, x = _SmallAndLarge(), torch.randn(200, 8)
    report = check_gradients(model, x, activations=True, loss_fn=mean_square)

    outputs: dict[str, list[torch.Tensor]] = {"small": [], "wide": [], "head": []}
    handles = [
        getattr(model, name).register_forward_hook(
            lambda m, a, out, name=name: outputs[name].append(out)
        )
        for name in outputs
    ]
    try:
        loss = mean_square(model(x))
        flat = [t for name in outputs for t in outputs[name]]
        grads = iter(torch.autograd.grad(loss, flat))
    finally:
        for handle in handles:
            handle.remove()
    per_call = {name: [float(next(grads).norm()) for _ in calls] for name, calls in outputs.items()}
    expected = {name: math.sqrt(sum(v * v for v in calls)) for name, calls in per_call.items()}
    assert [name for name, _ in report.activation_grads] == ["small", "wide", "head"]
    assert dict(report.activation_grads) == pytest.approx(expected, rel=1e-5)
    assert dict(report.activation_steps)["small"] == pytest.approx(per_call["small"], rel=1e-5)


def test_model_is_left_untouched() -> None:
    model, batch = case("sigmoid_mlp_deep").build()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    sentinel = torch.full_like(model.layers[0].weight, 7.0)
    model.layers[0].weight.grad = sentinel
    check_gradients(model, batch, activations=True)
    assert _no_hooks(model)
    assert model.layers[0].weight.grad is sentinel
    assert all(p.grad is None for name, p in model.named_parameters() if name != "layers.0.weight")
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())


class _ReturnsParameter(nn.Module):
    """A module whose output is its own parameter (a leaf): its hook must not stay on it."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(4, 3))

    def forward(self) -> torch.Tensor:
        return self.table


class _UsesTable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = _ReturnsParameter()
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x @ self.embed())


def test_hook_on_a_returned_parameter_is_removed() -> None:
    torch.manual_seed(0)
    model = _UsesTable()
    report = check_gradients(model, torch.randn(5, 4), activations=True)
    assert [name for name, _ in report.activation_grads] == ["embed", "head"]
    # The output is the parameter itself: the gradient into it is the parameter's gradient.
    assert report.activation_grads[0][1] == pytest.approx(report.layer("embed").grad_norm)
    assert _no_hooks(model)


def _forward_hooks(module: nn.Module) -> int:
    """Forward hooks that fire for ``module``: its own and the global ones."""
    global_hooks = nn.modules.module._global_forward_hooks
    return len(module._forward_hooks) + len(module._forward_pre_hooks) + len(global_hooks)


class _CountsHooks(nn.Module):
    """Records how many forward hooks would fire for its layer while the check runs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(_forward_hooks(self.fc))
        return self.fc(x)


def test_default_installs_no_hooks() -> None:
    model = _CountsHooks()
    report = check_gradients(model, torch.randn(3, 4))
    assert model.seen == [0]
    assert report.activation_grads == ()
    assert report.activation_steps == ()
    check_gradients(model, torch.randn(3, 4), activations=True)
    assert model.seen[-1] == 1  # the recorder does hook the layer when asked to
    assert _forward_hooks(model.fc) == 0  # and removes its hook afterwards


def test_activations_do_not_change_the_verdict() -> None:
    for name in ("sigmoid_mlp_deep", "rnn_vanishing"):
        zoo = case(name)
        plain = check_gradients(*zoo.build(), loss_fn=zoo.loss_fn)
        recorded = check_gradients(*zoo.build(), loss_fn=zoo.loss_fn, activations=True)
        assert [layer.grad_norm for layer in recorded.layers] == [
            layer.grad_norm for layer in plain.layers
        ]
        assert recorded.problems == plain.problems
        assert recorded.loss == plain.loss


def test_gradient_along_time_vanishes_in_a_vanilla_rnn_not_in_an_lstm() -> None:
    """Pascanu et al. 2013: radius 0.7 shrinks the gradient at every step back in time; an
    LSTM with a forget-gate bias of 3 carries it over the 64 steps."""
    rnn = check_gradients(*case("rnn_vanishing").build(), activations=True)
    steps = dict(rnn.activation_steps)["rnn"]
    assert len(steps) == 64
    assert steps[0] < 1e-9 * steps[-1]
    assert all(steps[i] < steps[i + 8] for i in range(len(steps) - 8))

    lstm = check_gradients(*case("lstm_seq").build(), activations=True)
    steps = dict(lstm.activation_steps)["rnn"]
    assert len(steps) == 64
    assert steps[0] > 0.1 * steps[-1]


class _CellLoop(nn.Module):
    """An ``nn.RNNCell`` stepped in a Python loop: one call per time step."""

    def __init__(self, steps: int = 12) -> None:
        super().__init__()
        self.steps = steps
        self.cell = nn.RNNCell(3, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], 8)  # on the batch's device
        for t in range(self.steps):
            h = self.cell(x[:, t], h)
        return self.head(h)


def test_a_cell_called_per_step_is_seen_per_call() -> None:
    torch.manual_seed(0)
    model = _CellLoop()
    with torch.no_grad():
        model.cell.weight_hh.mul_(0.3)  # contracting: the gradient shrinks back in time
    report = check_gradients(model, torch.randn(4, 12, 3), activations=True)
    per_call = dict(report.activation_steps)["cell"]
    assert len(per_call) == 12
    assert per_call[0] < per_call[-1] / 10
    total = dict(report.activation_grads)["cell"]
    assert total == pytest.approx(math.sqrt(sum(v * v for v in per_call)), rel=1e-6)


def test_report_data_stays_plain() -> None:
    report = check_gradients(*case("rnn_vanishing").build(), activations=True)
    data = json.loads(json.dumps(report.to_dict()))
    assert [entry[0] for entry in data["activation_grads"]] == [
        name for name, _ in report.activation_grads
    ]
    assert data["settings"]["activations"] is True


def test_setting_is_validated() -> None:
    assert resolve([("the ini file", {"activations": "on"})]).activations is True
    assert resolve([]).activations is False
    with pytest.raises(GradcheckError, match="activations='sometimes' from the ini file"):
        resolve([("the ini file", {"activations": "sometimes"})])


class _Fails(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.rnn = nn.GRU(4, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rnn(self.fc(x))
        raise RuntimeError("boom")


def test_hooks_are_removed_when_the_forward_fails() -> None:
    model = _Fails()
    with pytest.raises(GradcheckError, match="boom"):
        check_gradients(model, torch.randn(2, 3, 4), activations=True)
    assert _no_hooks(model)


class _RootWithParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x * self.scale)


def test_the_root_is_recorded_only_when_it_is_the_only_module() -> None:
    report = check_gradients(_RootWithParameter(), torch.randn(3, 4), activations=True)
    assert [name for name, _ in report.activation_grads] == ["fc"]
    alone = check_gradients(nn.Linear(4, 4), torch.randn(3, 4), activations=True)
    assert [name for name, _ in alone.activation_grads] == [""]


class _InPlace(nn.Module):
    """A layer whose output the next op changes in place."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.first = nn.Linear(8, 8)
        self.act = nn.ReLU(inplace=True)
        self.second = nn.Linear(8, 8)
        self.functional = functional

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        h = torch.relu_(h) if self.functional else self.act(h)
        return self.second(h)


@pytest.mark.parametrize("functional", [False, True])
def test_an_output_changed_in_place_reports_its_own_gradient(functional: bool) -> None:
    # A retained gradient would be the one after the in-place ReLU; the layer's output is
    # the value before it.
    torch.manual_seed(0)
    model, x = _InPlace(functional), torch.randn(16, 8)
    report = check_gradients(model, x, activations=True, loss_fn=mean_square)
    before = model.first(x)
    (expected,) = torch.autograd.grad(mean_square(model.second(torch.relu(before))), [before])
    after = torch.relu(model.first(x))
    (later,) = torch.autograd.grad(mean_square(model.second(after)), [after])
    assert float(expected.norm()) != pytest.approx(float(later.norm()), rel=1e-3)
    assert dict(report.activation_grads)["first"] == pytest.approx(float(expected.norm()), rel=1e-5)
