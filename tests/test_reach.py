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
