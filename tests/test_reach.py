"""Parameters without a gradient: not exercised by the batch, skipped by randomness, or unused.

A check must tell a parameter the sample batch never reached (a vision tower in a text-only
test), one that randomness skipped under the check's seed (LayerDrop), and a real bug (a
head nobody wired) apart, and fail only on the last."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from fixtures.models import LayerDropMLP, TextImageModel
from fixtures.zoo import case
from pytest_gradcheck import check_gradients


def test_a_text_only_batch_leaves_the_vision_tower_not_exercised_grouped_by_subtree() -> None:
    model, batch = case("text_only_batch").build()
    report = check_gradients(model, batch)
    assert report.ok
    [note] = [n for n in report.notes if n.startswith("not exercised by this batch")]
    assert "vision_tower (4)" in note
    assert "projector (2)" in note
    assert "mask_token (1)" in note
    assert "pixel_values, bool_masked_pos were not given" in note


def test_the_same_model_given_every_input_is_checked_whole() -> None:
    torch.manual_seed(0)
    model = TextImageModel()
    batch = {
        "input_ids": torch.randint(0, 64, (4, 8)),
        "pixel_values": torch.randn(4, 3, 12),
        "bool_masked_pos": torch.rand(4, 8) < 0.5,
    }
    report = check_gradients(model, batch)
    assert report.ok
    assert all(p.has_grad for layer in report.layers for p in layer.params)
    assert not any("not exercised" in n for n in report.notes)


def test_asking_a_weight_its_dtype_does_not_exercise_it() -> None:
    """A multimodal forward that casts with the vision tower's dtype (a metadata look, not a
    read of its values) leaves that tower not exercised by a text-only batch."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(16, 8)
            self.vision = nn.Linear(12, 8)
            self.head = nn.Linear(8, 4)

        def forward(
            self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None
        ) -> torch.Tensor:
            h = self.embed(input_ids).to(self.vision.weight.dtype)
            assert self.vision.weight.shape[-1] == 12
            assert self.vision.weight.device == h.device
            if pixel_values is not None:
                h = h + self.vision(pixel_values).unsqueeze(1)
            return self.head(h)

    torch.manual_seed(0)
    report = check_gradients(Model(), {"input_ids": torch.randint(0, 16, (2, 5))})
    assert report.ok, report.format_failure()
    [note] = [n for n in report.notes if n.startswith("not exercised by this batch")]
    assert "vision (2)" in note
    assert "pixel_values" in note


def test_a_parameter_its_running_module_never_reads_says_so() -> None:
    """A token registered beside the embedding and read by no forward (every input given):
    unused, and the message says the module ran but nothing read it."""

    class Embed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.mask_token = nn.Parameter(torch.zeros(8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embeddings = Embed()
            self.head = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.embeddings(x)))

    torch.manual_seed(0)
    report = check_gradients(Model(), torch.randn(4, 8))
    [problem] = report.problems
    assert (problem.kind, problem.param) == ("unused", "embeddings.mask_token")
    assert problem.message.endswith("its module ran, but no op in the forward read it")
    assert problem.hint.startswith("use the parameter in the forward if it is meant to train")


def test_a_head_nobody_wired_stays_unused_and_says_its_module_never_ran() -> None:
    class Aux(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(8, 8)
            self.aux = nn.Linear(8, 2)
            self.head = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.body(x)))

    report = check_gradients(Aux(), torch.randn(4, 8))
    assert {(p.kind, p.param) for p in report.problems} == {
        ("unused", "aux.weight"),
        ("unused", "aux.bias"),
    }
    assert all("its module never ran" in p.message for p in report.problems)


class _Cut(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "detach":
            return self.a(x) + self.b(x).detach()  # cut: detach
        if self.how == "no_grad":
            with torch.no_grad():
                y = self.b(x)  # cut: no_grad
            return self.a(x) + y
        if self.how == "item":
            return self.a(x) * self.b(x).sum().item()  # cut: item
        return self.a(x) + self.b(x).argmax(-1, keepdim=True).float()  # cut: argmax


@pytest.mark.parametrize(
    ("how", "cut"),
    [
        ("detach", ".detach()"),
        ("no_grad", "linear under torch.no_grad()"),
        ("item", ".item()"),
    ],
)
def test_an_unused_parameter_names_where_its_path_to_the_loss_is_cut(how: str, cut: str) -> None:
    report = check_gradients(_Cut(how), torch.randn(3, 4))
    line = next(
        number
        for number, text in enumerate(Path(__file__).read_text().splitlines(), 1)
        if text.rstrip().endswith(f"# cut: {how}")
    )
    assert {(p.kind, p.param) for p in report.problems} == {
        ("unused", "b.weight"),
        ("unused", "b.bias"),
    }
    for problem in report.problems:
        where = f"{os.path.relpath(__file__)}:{line}"
        assert problem.message.endswith(f"cut by {cut} at {where}")
        assert problem.hint.startswith("if this branch is meant to train, remove the cut")


def test_a_parameter_that_reaches_the_loss_only_through_indices_says_so() -> None:
    report = check_gradients(_Cut("argmax"), torch.randn(3, 4))
    line = next(
        number
        for number, text in enumerate(Path(__file__).read_text().splitlines(), 1)
        if text.rstrip().endswith("# cut: argmax")
    )
    assert {(p.kind, p.param) for p in report.problems} == {
        ("unused", "b.weight"),
        ("unused", "b.bias"),
    }
    where = f"{os.path.relpath(__file__)}:{line}"
    for problem in report.problems:
        assert problem.message.endswith(f"only through argmax indices ({where})")
        assert problem.hint.startswith("by design for a selector")


def test_layerdrop_skips_blocks_under_one_seed_and_is_not_unused() -> None:
    torch.manual_seed(0)
    model = LayerDropMLP()
    report = check_gradients(model, torch.randn(8, 32), seed=0)
    skipped = [layer.name for layer in report.layers if not layer.has_grad]
    assert skipped, "seed 0 skips a block: the case tests something"
    assert report.ok
    assert any("under another" in note for note in report.notes)
    assert all(p.grad is None for p in model.parameters()), "the extra passes left no .grad"


class _OneExpertMoE(nn.Module):
    """A mixture of experts with one expert: the router's softmax runs over one element."""

    def __init__(self, experts: int = 1) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.router = nn.Linear(8, experts)
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(experts))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        weights = torch.softmax(self.router(h), dim=-1)
        mixed = sum(weights[:, i : i + 1] * e(h) for i, e in enumerate(self.experts))
        return self.head(h + mixed)


class _ZeroQueries(nn.Module):
    """DETR's first decoder layer: the queries start at zero, so every key's value is the
    same and the attention weights change nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(5, 8))
        self.q = nn.Linear(8, 8)
        self.k = nn.Linear(8, 8)
        self.v = nn.Linear(8, 8)
        nn.init.zeros_(self.v.bias)  # as transformers initialises every bias
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        target = torch.zeros(x.shape[0], 5, 8)
        queries = target + self.pos
        weights = torch.softmax(self.q(queries) @ self.k(queries).transpose(1, 2), dim=-1)
        mixed = weights @ self.v(target)
        return self.head(mixed + queries + x[:, None, :]).mean(1)


def test_a_router_over_one_expert_is_explained_not_dead() -> None:
    torch.manual_seed(0)
    report = check_gradients(_OneExpertMoE(), torch.randn(4, 8))
    assert report.layer("router").grad_max_abs == 0.0, "the case tests something"
    assert report.ok, report.problems
    (note,) = [n for n in report.notes if n.startswith("router")]
    assert "softmax with one element per row at " in note
    assert "not a failure" in note
    torch.manual_seed(0)
    assert check_gradients(_OneExpertMoE(experts=2), torch.randn(4, 8)).ok  # the twin


def test_attention_over_identical_values_is_explained_not_dead() -> None:
    torch.manual_seed(0)
    report = check_gradients(_ZeroQueries(), torch.randn(4, 8))
    assert report.layer("q").grad_max_abs == 0.0 == report.layer("k").grad_max_abs
    assert report.ok, report.problems
    assert any("attention over identical values" in n for n in report.notes)


def test_a_softmax_over_one_output_that_kills_every_gradient_stays_dead() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1), nn.Softmax(dim=-1))
    report = check_gradients(
        model, torch.randn(4, 8), loss_fn=lambda out: (out - 0.5).pow(2).mean()
    )
    assert {p.kind for p in report.problems} == {"dead"}
    assert report.problems[0].hint.startswith("make the softmax at ")


class _Tagged(nn.Module):
    """A text model with an optional ``shape_ids`` input it fills with padding when not
    given (RoCBert's shape and pronunciation embeddings)."""

    def __init__(self) -> None:
        super().__init__()
        self.word_embed = nn.Embedding(16, 8)
        self.shape_embed = nn.Embedding(4, 8, padding_idx=0)
        self.head = nn.Linear(8, 4)

    def forward(
        self, input_ids: torch.Tensor, shape_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        if shape_ids is None:
            shape_ids = torch.zeros_like(input_ids)
        return self.head(self.word_embed(input_ids) + self.shape_embed(shape_ids))


def test_a_dead_layer_serving_an_input_the_batch_left_out_is_not_exercised() -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 16, (2, 5))
    report = check_gradients(_Tagged(), {"input_ids": ids})
    assert report.layer("shape_embed").grad_max_abs == 0.0, "the case tests something"
    assert report.ok, report.problems
    assert any(n.startswith("not exercised by this batch: shape_embed") for n in report.notes)
    given = {"input_ids": ids, "shape_ids": torch.randint(1, 4, (2, 5))}
    assert check_gradients(_Tagged(), given).ok  # given the input, it trains


class _AlikeBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bottleneck = nn.Linear(8, 6)  # shapes unlike the value's, as in MobileBERT
        self.q = nn.Linear(6, 4)
        self.k = nn.Linear(6, 4)
        self.v = nn.Linear(8, 8)
        for layer in (self.bottleneck, self.q, self.k):
            nn.init.normal_(layer.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.bottleneck(x)
        weights = torch.softmax(self.q(shared) @ self.k(shared).transpose(1, 2), dim=-1)
        return x + weights @ self.v(x)


class _AlikeAttention(nn.Module):
    """MobileBERT at initialisation: no normalization, so every position carries the same
    large component; the attention weights barely matter, and the query and key projections
    (and the bottleneck that feeds only them) get gradients decades below the rest, in
    every block alike."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(_AlikeBlock() for _ in range(3)))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x + 100.0)).mean(1)  # + 100: alike positions


def test_layers_that_only_compute_attention_weights_sit_low_as_a_level() -> None:
    torch.manual_seed(0)
    report = check_gradients(_AlikeAttention(), 0.01 * torch.randn(2, 6, 8))
    low = report.layer("head").grad_rms * 1e-4
    assert report.layer("blocks.0.q").grad_rms < low
    assert report.layer("blocks.2.bottleneck").grad_rms < low
    assert report.ok, report.problems
    assert any("only compute attention or routing weights" in n for n in report.notes)
