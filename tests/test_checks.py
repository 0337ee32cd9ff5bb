"""The built-in rules on plain statistics (no model, no torch)."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_gradcheck import LayerStats, ParamStats
from pytest_gradcheck.checks import role
from pytest_gradcheck.results import ModuleInfo, Structure
from pytest_gradcheck.settings import Settings, resolve
from pytest_gradcheck.trend import depth_correlation
from pytest_gradcheck.verdict import evaluate as find_problems


def param(
    name: str,
    rms: float,
    numel: int = 64,
    *,
    has_grad: bool = True,
    weight_norm: float = 1.0,
    nan: int = 0,
    zero_fraction: float = 0.0,
) -> ParamStats:
    norm = rms * math.sqrt(numel)
    return ParamStats(
        name=name,
        layer=name.rpartition(".")[0],
        shape=(numel,),
        dtype="float32",
        numel=numel,
        has_grad=has_grad,
        grad_norm=norm if has_grad else 0.0,
        grad_max_abs=(math.nan if nan else rms * 3) if has_grad else 0.0,
        zero_fraction=zero_fraction,
        nan_count=nan,
        inf_count=0,
        weight_norm=weight_norm,
    )


def stack(
    rms_values: list[float], prefix: str = "layers", kind: str = "Linear"
) -> list[LayerStats]:
    return [
        LayerStats(f"{prefix}.{i}", kind, i, (param(f"{prefix}.{i}.weight", rms),))
        for i, rms in enumerate(rms_values)
    ]


def structure(layers: list[LayerStats], extra: tuple[ModuleInfo, ...] = ()) -> Structure:
    modules = tuple(ModuleInfo(layer.name, layer.type, i) for i, layer in enumerate(layers))
    return Structure(modules=modules + extra)


def run(layers: list[LayerStats], loss: float = 1.0, **kwargs: object) -> tuple[list, list[str]]:
    settings = resolve([("test", kwargs)]) if kwargs else Settings()
    return find_problems(layers, structure(layers), loss, settings)


def kinds(problems: list) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for p in problems:
        found.setdefault(p.kind, []).append(p.layer)
    return found


@given(st.lists(st.integers(-3, 3), min_size=2, max_size=30))
def test_depth_correlation_is_spearman_with_ties(values: list[int]) -> None:
    # Reference: Pearson correlation of the mean ranks (ties share their mean rank).
    def ranks(xs: list[float]) -> list[float]:
        return [sum(y < x for y in xs) + (sum(y == x for y in xs) - 1) / 2 for x in xs]

    ry, rx = ranks([float(v) for v in values]), [float(i) for i in range(len(values))]
    my, mx = sum(ry) / len(ry), sum(rx) / len(rx)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    norm = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    expected = cov / norm if norm else 0.0
    assert depth_correlation([float(v) for v in values]) == pytest.approx(expected)


def test_records_are_immutable_and_round_trip_exactly() -> None:
    fields = ("a.w", "a", (2, 3), "float32", 6, True, 1.5, 0.5, 0.25, 0, 0, 2.0)
    fast = ParamStats._make(fields)
    assert fast == ParamStats(*fields)
    assert hash(fast) == hash(ParamStats(*fields))
    unused = ParamStats("a.b", "a", (3,), "float32", 3, False, 0.0, 0.0, 1.0, 0, 0, 1.0)
    layer = LayerStats("a", "Linear", 4, (fast, unused))
    assert (layer.numel, layer.has_grad, layer.grad_norm, layer.zero_fraction) == (
        9,
        True,
        1.5,
        0.25,
    )
    assert layer.grad_rms == 1.5 / math.sqrt(6)  # over the parameters that got a gradient
    with pytest.raises(AttributeError):
        layer.grad_norm = 0.0  # type: ignore[misc]
    # Pickling (pytest-xdist) and copying keep every field as it is: no recomputing.
    given = layer._replace(grad_norm=7.0)
    assert pickle.loads(pickle.dumps(given)) == given
    assert copy.deepcopy(given) == given
    assert type(pickle.loads(pickle.dumps(given))) is LayerStats
    data = layer.to_dict()
    assert data["params"][0] == dict(zip(ParamStats._fields, fields, strict=True))
    assert data["grad_norm"] == 1.5


def test_role_strips_numeric_path_parts() -> None:
    assert role("encoder.layer.11.attention.self.query") == "encoder.layer.#.attention.self.query"
    assert role("0") == "#"
    assert role("h2.fc10") == "h2.fc10"


def test_geometric_decay_is_vanishing_in_the_early_layers() -> None:
    layers = stack([10.0 ** (-k) for k in range(8, -1, -1)])  # 1e-8 ... 1 toward the loss
    problems, notes = run(layers)
    found = kinds(problems)
    assert set(found) == {"vanishing"}
    # reference = median of the last third (1e-1); flagged below 1e-4 x reference
    assert found["vanishing"] == [f"layers.{i}" for i in range(3)]
    first = problems[0]
    assert first.value == pytest.approx(1e-7)
    assert first.limit == 1e-4
    assert "shrinking with depth" in first.message
    assert "shrink 10.0x per layer" in first.hint
    assert not notes


def test_geometric_growth_is_exploding() -> None:
    layers = stack([10.0**k for k in range(6, -1, -1)])
    found = kinds(run(layers)[0])
    assert found == {"exploding": ["layers.0", "layers.1", "layers.2"]}


def test_a_low_level_without_a_trend_is_not_vanishing() -> None:
    # Attention query/key, LayerScale: decades below their neighbours at every depth.
    layers: list[LayerStats] = []
    for block in range(6):
        for name, rms in (("query", 1e-7), ("value", 1e-1), ("fc", 1.0)):
            full = f"blocks.{block}.{name}"
            layers.append(LayerStats(full, "Linear", len(layers), (param(f"{full}.weight", rms),)))
    assert run(layers) == ([], [])


def test_contradicting_trends_are_explained_not_failed() -> None:
    layers: list[LayerStats] = []
    for block in range(5):
        for name, rms in (("key", 10.0 ** (2 * block - 14)), ("value", 10.0 ** (-block))):
            full = f"blocks.{block}.{name}"
            layers.append(LayerStats(full, "Linear", len(layers), (param(f"{full}.weight", rms),)))
    problems, notes = run(layers)
    assert problems == []
    assert len(notes) == 1
    assert "blocks.0.key" in notes[0]
    assert "blocks.0.value" in notes[0]


def test_ratio_settings_move_the_threshold() -> None:
    layers = stack([1e-3, 1e-2, 1e-1, 1.0])
    assert run(layers)[0] == []
    found = kinds(run(layers, vanishing_ratio=0.05)[0])
    assert found == {"vanishing": ["layers.0", "layers.1"]}
    assert run(layers, vanishing_ratio=0.05, relative=False)[0] == []


def test_uniformly_tiny_gradients_are_vanishing_everywhere() -> None:
    layers = stack([3e-12, 5e-12, 4e-12])
    problems = run(layers)[0]
    assert kinds(problems) == {"vanishing": ["layers.0", "layers.1", "layers.2"]}
    assert "every layer's gradient RMS is below 1e-09" in problems[0].message


def test_uniformly_huge_gradients_are_exploding() -> None:
    layers = stack([1e6, 2e6, 1e6])  # norms are 8x RMS here
    problems = run(layers)[0]
    assert kinds(problems) == {"exploding": ["layers.0", "layers.1", "layers.2"]}
    assert problems[0].limit == 1e6


def test_absolute_bounds() -> None:
    layers = stack([0.01, 1.0, 100.0])  # norms 0.08, 8, 800
    found = kinds(run(layers, min_norm=0.1, max_norm=100)[0])
    assert found == {"vanishing": ["layers.0"], "exploding": ["layers.2"]}


def test_nonfinite_loss_and_gradients() -> None:
    layers = stack([1.0, 1.0])
    layers[1] = LayerStats("layers.1", "Linear", 1, (param("layers.1.weight", 1.0, nan=3),))
    problems = run(layers, loss=math.nan)[0]
    assert [(p.kind, p.layer, p.param) for p in problems] == [
        ("nonfinite", "<loss>", None),
        ("nonfinite", "layers.1", "layers.1.weight"),
    ]
    assert problems[1].message == "3 NaN of 64 gradient values"


def test_unused_names_every_parameter() -> None:
    layers = stack([1.0, 1.0])
    layers.append(
        LayerStats(
            "head",
            "Linear",
            2,
            (param("head.weight", 0, has_grad=False), param("head.bias", 0, has_grad=False)),
        )
    )
    problems = run(layers)[0]
    assert [(p.kind, p.param) for p in problems] == [
        ("unused", "head.weight"),
        ("unused", "head.bias"),
    ]
    assert run(layers, unused=False)[0] == []


def test_dead_layer_and_the_zero_gate_explanation() -> None:
    dead = LayerStats(
        "branch.fc", "Linear", 1, (param("branch.fc.weight", 0.0, zero_fraction=1.0),)
    )
    layers = [*stack([1.0]), dead]
    problems, notes = run(layers)
    assert kinds(problems) == {"dead": ["branch.fc"]}
    assert "exactly zero" in problems[0].message
    assert "LeakyReLU" in problems[0].hint
    # The same zeros next to an all-zero gate that itself gets a gradient: ReZero / LoRA.
    gate = LayerStats("branch", "ReZero", 2, (param("branch.alpha", 1.0, 1, weight_norm=0.0),))
    problems, notes = run([*layers, gate])
    assert problems == []
    assert "branch.alpha" in notes[0]
    # A zero bias is not a gate.
    zero_bias = LayerStats("other", "Linear", 2, (param("other.bias", 1.0, weight_norm=0.0),))
    assert kinds(run([*layers, zero_bias])[0]) == {"dead": ["branch.fc"]}


def test_vanishing_hint_counts_saturating_activations_and_normalization() -> None:
    layers = stack([10.0 ** (-k) for k in range(8, -1, -1)])
    acts = tuple(ModuleInfo(f"act.{i}", "Sigmoid", 100 + i) for i in range(8))
    relu = (ModuleInfo("act.relu", "ReLU", 200),)
    problems, _ = find_problems(layers, structure(layers, acts + relu), 1.0, Settings())
    assert "8 of 9 activation modules are Sigmoid/Tanh-like" in problems[0].hint
    assert "no normalization layer" in problems[0].hint
    norm = (ModuleInfo("norm", "LayerNorm", 300),)
    problems, _ = find_problems(layers, structure(layers, acts + norm), 1.0, Settings())
    assert "no normalization layer" not in problems[0].hint


def test_exploding_hint_names_a_vanilla_rnn_radius() -> None:
    layers = stack([10.0**k for k in range(4, -1, -1)])
    rnn = (ModuleInfo("rnn", "RNN", 50, {"spectral_radius": 1.8}),)
    problems, _ = find_problems(layers, structure(layers, rnn), 1.0, Settings())
    assert "recurrent spectral radius 1.80" in problems[0].hint


@settings(max_examples=200, deadline=None)
@given(
    depth=st.integers(3, 40),
    level=st.floats(-6, 2),
    jitter=st.lists(st.floats(-1.5, 1.5), min_size=40, max_size=40),
)
def test_noisy_flat_profiles_are_never_flagged(
    depth: int, level: float, jitter: list[float]
) -> None:
    layers = stack([10.0 ** (level + jitter[i]) for i in range(depth)])
    assert run(layers)[0] == []


@settings(max_examples=200, deadline=None)
@given(
    depth=st.integers(6, 40),
    decades=st.floats(5.5, 30),
    jitter=st.lists(st.floats(-0.2, 0.2), min_size=40, max_size=40),
)
def test_steady_decay_over_many_decades_is_always_flagged(
    depth: int, decades: float, jitter: list[float]
) -> None:
    per_layer = decades / (depth - 1)
    rms = [10.0 ** (-decades + per_layer * i + jitter[i]) for i in range(depth)]
    found = kinds(run(stack(rms))[0])
    assert "layers.0" in found.get("vanishing", [])


def test_a_tiny_batch_for_batchnorm_leads_the_hint_of_vanishing_and_exploding() -> None:
    from pytest_gradcheck import Problem
    from pytest_gradcheck.verdict import small_batch_first

    def problem(kind: str) -> Problem:
        return Problem(kind, "stem", None, 2e3, 1e3, "gradient RMS is 2e3x ...", hint="clip")

    found = small_batch_first([problem("exploding"), problem("unused")], [("stages.3.bn", 2)])
    exploding, unused = found
    assert exploding.hint.startswith("first make the sample batch big enough: train-mode ")
    assert "stages.3.bn sees 2 value(s) per channel" in exploding.hint
    assert exploding.hint.endswith("mode='eval'; then: clip")
    assert unused.hint == "clip"
    assert small_batch_first([problem("exploding")], []) == [problem("exploding")]


def test_a_stem_beside_role_named_blocks_is_not_compared_with_them() -> None:
    """ResNet's full-resolution stem conv has a larger gradient than the last stage's convs
    by design: only layers that share a role are compared."""
    stem = LayerStats("stem.conv", "Conv2d", 0, (param("stem.conv.weight", 1e3),))
    blocks = [
        LayerStats(
            f"stages.{i}.conv",
            "Conv2d",
            i + 1,
            (param(f"stages.{i}.conv.weight", 0.1 - 0.015 * i),),
        )
        for i in range(6)
    ]
    layers = [stem, *blocks]
    problems, _ = find_problems(layers, structure(layers), 1.0, Settings())
    assert problems == []
    # the same stem among layers named one by one is compared with them by type
    flat = [
        LayerStats(f"conv{i}", "Conv2d", i, (param(f"conv{i}.weight", x.grad_rms),))
        for i, x in enumerate(layers)
    ]
    problems, _ = find_problems(flat, structure(flat), 1.0, Settings())
    assert [(p.kind, p.layer) for p in problems] == [("exploding", "conv0")]


def test_role_named_stages_of_different_widths_are_not_compared_by_type() -> None:
    """PP-LCNet, HGNet: each stage wider and at a lower resolution than the one before, so
    the gradient per weight of its downsampling conv falls from stage to stage by design."""

    def pyramid(widths: tuple[int, ...]) -> list[LayerStats]:
        layers = []
        for i, width in enumerate(widths):
            rms = 10.0 ** (1 - i)
            for name, numel, blocks in (
                ("downsample", 18 * width, 1),
                ("blocks.#.conv", 9 * width, 3),
            ):
                for b in range(blocks):
                    path = f"stages.{i}.{name.replace('#', str(b))}"
                    layers.append((path, rms, numel))
        return [
            LayerStats(path, "Conv2d", d, (param(f"{path}.weight", rms, numel=numel),))
            for d, (path, rms, numel) in enumerate(layers)
        ]

    widened = pyramid((16, 32, 64, 128, 256))
    problems, _ = find_problems(widened, structure(widened), 1.0, Settings())
    assert problems == []
    # the same decline over stages of one width is a depth-wise explosion
    flat = pyramid((64,) * 5)
    problems, _ = find_problems(flat, structure(flat), 1.0, Settings())
    assert ("exploding", "stages.0.downsample") in [(p.kind, p.layer) for p in problems]


def test_one_layer_apart_from_a_flat_group_is_a_step_not_a_trend() -> None:
    steps = stack([70.0, 1.0, 1.2, 1.1])
    problems, _ = find_problems(steps, structure(steps), 1.0, Settings(exploding_ratio=50.0))
    assert problems == []
    # a first layer built differently, 1000x above three within 2.1x (Conditional DETR)
    first = stack([6e-4, 3.5e-7, 5.9e-7, 2.8e-7])
    assert find_problems(first, structure(first), 1.0, Settings())[0] == []
    trend = stack([70.0, 10.0, 3.0, 1.0])  # a real rise toward the input
    problems, _ = find_problems(trend, structure(trend), 1.0, Settings(exploding_ratio=50.0))
    assert [(p.kind, p.layer) for p in problems] == [("exploding", "layers.0")]


def test_a_huge_gradient_on_all_zero_parameters_names_their_init() -> None:
    """YOLOS: detection tokens and position embeddings start at zero, and the LayerNorm
    (eps=1e-12) after them divides a constant by sqrt(eps)."""
    tokens = LayerStats(
        "embeddings", "Embeddings", 0, (param("embeddings.tokens", 3e5, weight_norm=0.0),)
    )
    rest = stack([1.0, 1.0, 1.0])
    layers = [tokens, *rest]
    problems, _ = find_problems(layers, structure(layers), 1.0, Settings())
    assert [(p.kind, p.layer) for p in problems] == [("exploding", "embeddings")]
    assert problems[0].hint.startswith("initialise embeddings with small random values")
