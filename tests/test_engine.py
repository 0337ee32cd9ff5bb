"""The engine: inputs, losses, measurement precision, non-invasiveness, bad input, devices."""

from __future__ import annotations

import copy
import itertools
import math
from collections import OrderedDict
from typing import Any, NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pytest_gradcheck import (
    GradcheckError,
    GradientHealthError,
    LayerStats,
    Report,
    check_gradients,
    engine,
    measure,
    properties,
)
from pytest_gradcheck.results import GradcheckWarning, Structure


def relu_mlp(depth: int = 3, width: int = 8) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        linear = nn.Linear(width, width)
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        layers += [linear, nn.ReLU()]
    layers.append(nn.Linear(width, 2))
    return nn.Sequential(*layers)


# -- batches and losses ---------------------------------------------------------------------


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(y)


class KeywordInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 2)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        hidden = self.embed(input_ids)
        if attention_mask is not None:
            hidden = hidden * attention_mask.unsqueeze(-1)
        return {"logits": self.head(hidden), "ids": input_ids}


class Pair(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor


def test_tensor_tuple_and_mapping_batches() -> None:
    assert check_gradients(relu_mlp(), torch.randn(4, 8)).ok
    assert check_gradients(TwoInputs(), (torch.randn(2, 4), torch.randn(2, 5))).ok
    assert check_gradients(TwoInputs(), [torch.randn(2, 4), torch.randn(2, 5)]).ok
    batch = {"input_ids": torch.randint(0, 10, (2, 6)), "attention_mask": torch.ones(2, 6)}
    report = check_gradients(KeywordInputs(), batch)
    assert report.ok
    assert [layer.name for layer in report.layers] == ["embed", "head"]


def test_named_tuple_batch_is_one_argument() -> None:
    class Takes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, pair: Pair) -> torch.Tensor:
            return self.lin(pair.x) * pair.y

    assert check_gradients(Takes(), Pair(torch.randn(2, 3), torch.randn(2, 3))).ok


def test_loss_fn_scalar_output_and_loss_attribute() -> None:
    model = relu_mlp()
    x = torch.randn(4, 8)
    custom = check_gradients(model, x, loss_fn=lambda out: out.pow(2).mean())
    assert custom.loss == pytest.approx(float(model(x).pow(2).mean().detach()), rel=1e-5)

    class Scalar(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x).sum()

    scalar = Scalar()
    assert check_gradients(scalar, x).loss == pytest.approx(float(scalar(x).detach()), rel=1e-5)

    class WithLoss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> Any:
            out = self.lin(x)
            return OrderedDict(loss=out.square().mean(), logits=out)

    with_loss = WithLoss()
    expected = float(with_loss(x)["loss"].detach())
    assert check_gradients(with_loss, x).loss == pytest.approx(expected, rel=1e-5)


def test_default_loss_is_seeded_and_unit_scale() -> None:
    model = relu_mlp()
    x = torch.randn(16, 8)
    first = check_gradients(model, x)
    again = check_gradients(model, x)
    other = check_gradients(model, x, seed=1)
    assert first.to_dict()["layers"] == again.to_dict()["layers"]
    assert first.loss == again.loss != other.loss
    # The output gradient of the default loss is a random direction of norm ~1.
    head = first.layer("6")
    assert 0.05 < head.grad_norm < 20


def test_loss_errors_are_clear() -> None:
    x = torch.randn(4, 8)
    with pytest.raises(GradcheckError, match=r"must be a scalar tensor, got Tensor\[4x2"):
        check_gradients(relu_mlp(), x, loss_fn=lambda out: out)
    with pytest.raises(GradcheckError, match="does not require grad"):
        check_gradients(relu_mlp(), x, loss_fn=lambda out: out.detach().sum())
    with pytest.raises(GradcheckError, match="loss_fn must be a callable"):
        check_gradients(relu_mlp(), x, loss_fn="mse")


# -- bad input ------------------------------------------------------------------------------


class Raises(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.lin(x))
        raise ValueError("boom in user code")
        return h  # pragma: no cover


def test_forward_that_raises_names_user_line_and_leaves_model_alone() -> None:
    model = Raises()
    model.eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(
        GradcheckError, match=r"raised ValueError at tests/test_engine\.py:\d+: boom"
    ):
        check_gradients(model, torch.randn(4, 8))
    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())


def test_wrong_shape_batch() -> None:
    with pytest.raises(GradcheckError, match=r"model\(batch\) with batch=Tensor\[4x3, float32\]"):
        check_gradients(relu_mlp(), torch.randn(4, 3))


def test_not_a_module_and_no_trainable_parameters() -> None:
    with pytest.raises(GradcheckError, match=r"must be a torch\.nn\.Module"):
        check_gradients(lambda x: x, torch.randn(2))  # type: ignore[arg-type]
    frozen = relu_mlp().requires_grad_(False)
    with pytest.raises(GradcheckError, match=r"no trainable parameters \(8 parameter"):
        check_gradients(frozen, torch.randn(2, 8))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_norm": -1}, "min_norm=-1 from check_gradients"),
        ({"max_norm": "big"}, "max_norm must be a number"),
        ({"min_norm": 10, "max_norm": 1}, "min_norm=10 .* must be below max_norm=1"),
        ({"mode": "training"}, "mode must be one of train, eval"),
        ({"min_nrom": 1}, "unknown gradcheck setting 'min_nrom'.*valid settings: min_norm"),
        ({"device": "tpu"}, "device must be auto, cpu, cuda"),
    ],
)
def test_bad_settings(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(GradcheckError, match=message):
        check_gradients(relu_mlp(), torch.randn(2, 8), **kwargs)


# -- measurement ----------------------------------------------------------------------------


class Scaled(nn.Module):
    """A linear layer whose gradient is multiplied by a constant (tiny or huge)."""

    def __init__(self, scale: float, dtype: torch.dtype = torch.float32, n: int = 64) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n, dtype=dtype))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weight * x).float().sum() * self.scale


def test_tiny_gradient_norm_does_not_underflow_to_zero() -> None:
    # grad = 1e-32 per element: the float32 sum of squares (1e-64) underflows to 0.
    report = check_gradients(Scaled(1e-32), torch.ones(64), relative=False, floor_rms=1e-40)
    (param,) = report.layers[0].params
    assert param.grad_norm == pytest.approx(1e-32 * 8, rel=1e-5)
    assert param.zero_fraction == 0.0


def test_huge_gradient_norm_does_not_overflow() -> None:
    report = check_gradients(Scaled(1e30), torch.ones(64), ceiling_norm=1e38)
    (param,) = report.layers[0].params
    assert param.grad_norm == pytest.approx(1e30 * 8, rel=1e-5)
    assert param.inf_count == 0
    assert report.ok


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradients(dtype: torch.dtype) -> None:
    report = check_gradients(Scaled(300.0, dtype, n=4096), torch.ones(4096, dtype=dtype))
    (param,) = report.layers[0].params
    # 4096 entries of 300: the norm (19200) and its square overflow fp16; measured exactly.
    assert param.grad_norm == pytest.approx(300 * 64, rel=1e-2)
    assert param.dtype == str(dtype).removeprefix("torch.")
    assert param.grad_max_abs == pytest.approx(300, rel=1e-2)


@pytest.mark.parametrize("nonzero", [((1 << 24) + 1000) // 8, (1 << 24) + 997])
def test_zero_fraction_is_exact_above_2_pow_24(nonzero: int) -> None:
    # A float32 count (ord=0 norm, or a count moved to the host as float32) is not exact
    # above 2**24: neither the zeros nor the non-zeros may be counted in float32.
    n = (1 << 24) + 1000
    x = torch.zeros(n)
    x[:nonzero] = 1.0  # these entries get a gradient, the rest exact zeros

    class Big(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(n))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (self.weight * x).sum()

    (param,) = check_gradients(Big(), x).layers[0].params
    assert param.zero_fraction == (n - nonzero) / n


def test_statistics_match_direct_computation() -> None:
    model = relu_mlp(depth=2)
    x = torch.randn(8, 8)
    report = check_gradients(model, x, loss_fn=lambda out: out.square().mean())
    reference = copy.deepcopy(model)
    reference(x).square().mean().backward()
    for layer in report.layers:
        for p in layer.params:
            grad = dict(reference.named_parameters())[p.name].grad
            assert grad is not None
            assert p.grad_norm == pytest.approx(float(grad.norm()), rel=1e-5)
            assert p.grad_max_abs == pytest.approx(float(grad.abs().max()), rel=1e-6)
            assert p.zero_fraction == pytest.approx(float((grad == 0).float().mean()))
            weight = dict(reference.named_parameters())[p.name]
            assert p.weight_norm == pytest.approx(float(weight.detach().norm()), rel=1e-5)


def test_grouped_reduction_matches_each_tensor_alone() -> None:
    # Small parameters are stacked by shape (gradients and weights together), large ones are
    # reduced alone, a missing gradient leaves a gap: every statistic must land on its tensor.
    torch.manual_seed(0)
    shapes = [(4, 4), (4,), (4, 4), (4,), (300, 300), (4, 4), (7,), (4,)]
    params = [nn.Parameter(torch.randn(shape)) for shape in shapes]
    params.append(nn.Parameter(torch.randn(4, 4, dtype=torch.float64)))
    for i, p in enumerate(params):
        if i in (2, 7):
            continue  # no gradient: in the middle of a shape group
        g = torch.randn_like(p) * 10.0**-i
        g[g > 0.5 * 10.0**-i] = 0.0  # exact zeros
        g.view(-1)[0] = -0.0  # a negative zero counts as zero
        p.grad = g
    names = [f"layer{i}.weight" for i in range(len(params))]
    table = measure.ParamTable(names, params, Structure(()))
    stats = [p for layer in table.measure() for p in layer.params]
    for p, s in zip(params, stats, strict=True):
        assert s.weight_norm == pytest.approx(float(p.detach().norm()), rel=1e-6)
        assert s.shape == tuple(p.shape)
        assert s.numel == p.numel()
        if p.grad is None:
            assert not s.has_grad
            assert (s.grad_norm, s.zero_fraction) == (0.0, 1.0)
            continue
        assert s.has_grad
        assert s.grad_norm == pytest.approx(float(p.grad.norm()), rel=1e-6)
        assert s.grad_max_abs == pytest.approx(float(p.grad.abs().max()), rel=1e-6)
        assert s.zero_fraction == float((p.grad == 0).sum()) / p.numel()
    assert stats[-1].dtype == "float64"


def test_layers_in_registration_order_with_depth() -> None:
    report = check_gradients(relu_mlp(depth=3), torch.randn(4, 8))
    assert [layer.name for layer in report.layers] == ["0", "2", "4", "6"]
    assert [layer.depth for layer in report.layers] == [0, 1, 2, 3]
    assert [layer.type for layer in report.layers] == ["Linear"] * 4


def test_frozen_parameters_are_skipped_and_counted() -> None:
    model = relu_mlp()
    model[0].requires_grad_(False)
    report = check_gradients(model, torch.randn(4, 8))
    assert report.ok
    assert report.frozen_params == 2
    assert "0" not in [layer.name for layer in report.layers]


# -- non-invasive ---------------------------------------------------------------------------


class Busy(nn.Module):
    """BatchNorm (running stats), Dropout (RNG), an eval-mode child and a forward hook."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.relu(self.bn(self.lin(x)))))


def snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "grad_ids": {n: id(p.grad) for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "devices": {n: p.device for n, p in model.named_parameters()},
        "hooks": {
            n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for n, m in model.named_modules()
        },
    }


def assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    for key, value in before["state"].items():
        torch.testing.assert_close(value, after["state"][key], rtol=0, atol=0, equal_nan=True)
    for name, grad in before["grads"].items():
        other = after["grads"][name]
        assert (grad is None) == (other is None), name
        if grad is not None:
            assert torch.equal(grad, other), name
    for key in ("grad_ids", "training", "requires_grad", "devices", "hooks"):
        assert before[key] == after[key], key


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_model_is_exactly_as_before(mode: str) -> None:
    torch.manual_seed(0)
    model = Busy()
    model.drop.eval()  # a mixed train/eval flag must survive
    model.lin.weight.grad = torch.full_like(model.lin.weight, 3.0)  # an existing gradient
    model.head.bias.requires_grad_(False)
    model.bn(torch.randn(16, 8))  # non-default running statistics
    batch = torch.randn(16, 8)
    before = snapshot(model)
    cpu_rng = torch.get_rng_state()
    report = check_gradients(model, batch, mode=mode)
    assert report.layers
    assert_same(before, snapshot(model))
    assert torch.equal(torch.get_rng_state(), cpu_rng)


def test_model_is_restored_when_the_check_fails() -> None:
    model = Busy()
    with torch.no_grad():
        model.lin.weight[0, 0] = float("nan")
    before = snapshot(model)
    report = check_gradients(model, torch.randn(16, 8))
    assert not report.ok
    assert_same(before, snapshot(model))
    with pytest.raises(GradientHealthError, match="nonfinite"):
        report.raise_if_unhealthy()


def test_runs_under_no_grad_context() -> None:
    with torch.no_grad():
        assert check_gradients(relu_mlp(), torch.randn(4, 8)).ok


# -- devices --------------------------------------------------------------------------------


def test_device_auto_prefers_cuda_then_mps_then_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert engine.pick_device(None) == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert engine.pick_device(None) == torch.device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert engine.pick_device(None) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is absent")
def test_explicit_unavailable_device_is_a_clear_error() -> None:
    with pytest.raises(GradcheckError, match="CUDA is not available here; use device='auto'"):
        check_gradients(relu_mlp(), torch.randn(2, 8), device="cuda:1")


def test_explicit_cpu_device() -> None:
    report = check_gradients(relu_mlp(), torch.randn(2, 8), device="cpu")
    assert report.device == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_round_trip() -> None:  # pragma: no cover - runs on GPU machines
    model = Busy()
    before = snapshot(model)
    report = check_gradients(model, torch.randn(16, 8), device="cuda")
    assert report.device.startswith("cuda")
    assert_same(before, snapshot(model))


# -- report ---------------------------------------------------------------------------------


def test_report_is_plain_data() -> None:
    import json
    import pickle

    model = Busy()
    with torch.no_grad():
        model.head.weight.fill_(float("inf"))
    report = check_gradients(model, torch.randn(16, 8))
    json.dumps(report.to_dict())
    assert pickle.loads(pickle.dumps(report)).to_dict() == report.to_dict()
    for name, value in properties.write(report):
        assert name.startswith("gradcheck.")
        assert type(value) in (str, int, float)


def test_small_batchnorm_batch_warns_naming_the_layer() -> None:
    class Conv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, stride=4)
            self.bn = nn.BatchNorm2d(4)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.bn(self.conv(x)).mean((2, 3)))

    with pytest.warns(GradcheckWarning, match="bn: train-mode BatchNorm sees 2 value"):
        report = check_gradients(Conv(), torch.randn(2, 3, 4, 4))
    assert any("bn: train-mode BatchNorm" in note for note in report.notes)


# -- property-based -------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    widths=st.lists(st.integers(1, 6), min_size=2, max_size=5),
    batch=st.integers(1, 4),
    container=st.sampled_from(["tensor", "tuple", "list", "dict"]),
)
def test_any_small_mlp_and_batch_container(widths: list[int], batch: int, container: str) -> None:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.Tanh()]
    body = nn.Sequential(*layers)

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = body

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    x = torch.randn(batch, widths[0])
    data: Any = {"tensor": x, "tuple": (x,), "list": [x], "dict": {"x": x}}[container]
    model = Wrap()
    before = snapshot(model)
    report = check_gradients(model, data)
    assert isinstance(report, Report)
    assert len(report.layers) == len(widths) - 1
    assert all(math.isfinite(layer.grad_norm) for layer in report.layers)
    assert_same(before, snapshot(model))


# -- diagnosis on the failure path only -----------------------------------------------------


def test_vanishing_hint_counts_functional_saturating_ops() -> None:
    from fixtures.zoo import case

    model, batch = case("sigmoid_mlp_deep").build()  # torch.sigmoid, not nn.Sigmoid modules
    report = check_gradients(model, batch)
    assert "9 Sigmoid/Tanh ops lie between layers.0 and the loss" in report.format_failure()


def test_nonfinite_failure_names_where_it_was_born() -> None:
    from fixtures.nonfinite import case

    nan_case = case("zero_norm")
    model, batch = nan_case.build()
    report = check_gradients(model, batch, loss_fn=nan_case.loss_fn)
    text = report.format_failure()
    assert "origin: NaN first appears in the forward of layers.1.norm (DivBackward0" in text
    assert check_gradients(model, batch, loss_fn=nan_case.loss_fn, diagnose=False).diagnosis == ()


def test_healthy_check_does_not_load_the_diagnosis(tmp_path: Any) -> None:
    import subprocess
    import sys

    code = (
        "import sys, torch; torch.set_num_threads(1)\n"
        "from pytest_gradcheck import check_gradients\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))\n"
        "assert check_gradients(m, torch.randn(8, 4)).ok\n"
        "print('pytest_gradcheck.diagnosis' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_layer_aggregates_equal_those_of_their_parameters() -> None:
    # The engine sums a layer's figures on the host in one go; the constructor sums the
    # parameters' final figures. Cover missing gradients, non-finite ones and a plain layer.
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(6, 6)
            self.head = nn.Linear(6, 2)
            self.unused = nn.Linear(6, 2)
            self.scale = nn.Parameter(torch.ones(6))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.body(x)) * self.scale)

    model = Mixed()
    x = torch.randn(5, 6)
    healthy = check_gradients(model, x)
    broken = check_gradients(model, x, loss_fn=lambda out: out.sum() * float("inf"))
    for report in (healthy, broken):
        for layer in report.layers:
            again = LayerStats(layer.name, layer.type, layer.depth, layer.params)
            for field, value, expected in zip(LayerStats._fields, layer, again, strict=True):
                if not isinstance(expected, float):
                    assert value == expected, field
                elif math.isnan(expected):
                    assert math.isnan(value), field
                else:
                    assert value == pytest.approx(expected, rel=1e-12, abs=0.0), field
    assert not healthy.layer("unused").has_grad
    assert any(not math.isfinite(layer.grad_max_abs) for layer in broken.layers)


def test_shared_modules_and_tied_weights_are_layers_once() -> None:
    # A module shared by two parents is one layer, under its first path (depth first); a
    # tied weight is one parameter, under its first owner; a None child is skipped: the
    # report's parameters are named_parameters(), in its order.
    shared = nn.Linear(3, 3)

    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.deep = shared
            self.other = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.other(self.deep(x))

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Sequential(Inner(), nn.ReLU())
            self.again = shared  # registered later, at a shallower path
            self.register_module("empty", None)
            self.last = nn.Sequential(nn.Linear(3, 3), Inner())
            self.tied = nn.Linear(3, 3)
            self.tied.weight = self.first[0].other.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.tied(self.last(self.again(self.first(x))))

    model = Outer()
    report = check_gradients(model, torch.randn(2, 3))
    names = [layer.name for layer in report.layers]
    assert "first.0.deep" in names
    assert "again" not in names
    assert len(names) == len(set(names))
    assert [p.name for layer in report.layers for p in layer.params] == [
        name for name, _ in model.named_parameters()
    ]


def test_sparse_embedding_gradient_is_measured_as_dense() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 4, sparse=True), nn.Flatten(), nn.Linear(12, 2))
    ids = torch.tensor([[1, 2, 2], [7, 1, 9]])

    def loss_fn(out: torch.Tensor) -> torch.Tensor:
        return out.square().mean()

    twin = copy.deepcopy(model)
    loss_fn(twin(ids)).backward()
    expected = twin[0].weight.grad
    assert expected is not None
    assert expected.is_sparse
    dense = expected.to_dense()
    model[0].weight.grad = torch.ones(50, 4).to_sparse()  # an earlier gradient, kept as is
    before = model[0].weight.grad
    embed = check_gradients(model, ids, loss_fn=loss_fn).layer("0").params[0]
    assert embed.has_grad
    assert embed.grad_norm == pytest.approx(float(dense.norm()), rel=1e-6)
    assert embed.grad_max_abs == pytest.approx(float(dense.abs().max()), rel=1e-6)
    assert embed.zero_fraction == float((dense == 0).sum()) / dense.numel()
    assert embed.zero_fraction == pytest.approx(1 - 4 * 4 / 200)  # rows 1, 2, 7, 9 looked up
    assert model[0].weight.grad is before
