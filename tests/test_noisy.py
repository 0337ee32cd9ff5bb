"""Parameters that get no gradient by the architecture's design read as such: one row per
subtree and cause (``pooler (2 parameters)``, ``layers.#.indexer``), a policy rule ready to
paste that accepts them (and does, once pasted), while a ``.detach()`` or a head nobody wired
still reads as a bug."""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from fixtures.zoo import case
from pytest_gradcheck import Report, check_gradients
from pytest_gradcheck.paths import policy_rule, subtrees
from pytest_gradcheck.policy import load_policy
from pytest_gradcheck.settings import LayerRule

pytestmark = pytest.mark.usefixtures("inner_environment")  # runs pytest in-process

HERE = os.path.relpath(__file__)


class Indexer(nn.Module):
    """A top-k selector as sparse-attention models have one: no gradient reaches it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.wq = nn.Linear(width, width)
        self.wk = nn.Linear(width, width, bias=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.wq(x) @ self.wk(x).transpose(-1, -2)
        return scores.topk(2, dim=-1).indices  # the selection


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.indexer = Indexer(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = self.indexer(x)
        mask = torch.full((*x.shape[:-1], x.shape[-2]), float("-inf")).scatter(-1, keep, 0.0)
        attention = torch.softmax(x @ x.transpose(-1, -2) + mask, dim=-1)
        return x + self.proj(attention @ x)


class Sparse(nn.Module):
    """Three blocks with an indexer each, a pooler whose output is computed and dropped (a
    token-level head), and the head."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(width) for _ in range(3))
        self.pooler = nn.Sequential(nn.Linear(width, width), nn.Tanh())
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        self.pooled = self.pooler(x[:, 0])  # kept for a caller; not part of this loss
        return self.head(x)


def sparse_check() -> tuple[Report, str]:
    torch.manual_seed(0)
    report = check_gradients(Sparse(), torch.randn(2, 5, 8))
    return report, report.format_failure()


def _line(marker: str) -> int:
    text = Path(__file__).read_text().splitlines()
    return next(n for n, line in enumerate(text, 1) if line.rstrip().endswith(marker))


def _rules(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.startswith("  - {match: ")]


def test_one_row_per_subtree_and_cause_and_one_problem_per_parameter() -> None:
    report, text = sparse_check()
    # Problem objects stay per parameter: JUnit's gradcheck.problems and report.problems
    assert len(report.problems) == 3 * 3 + 2
    assert {p.kind for p in report.problems} == {"unused"}
    assert "unused:layers.0.indexer.wq" in report.problem_summary()
    rows = [line for line in text.splitlines()[2:] if re.match(r"  \S.*  unused  ", line)]
    assert len(rows) == 2, text
    where = f"{HERE}:{_line('# the selection')}"
    indexer = next(row for row in rows if row.startswith("  layers.#.indexer (9 parameters) "))
    assert indexer.endswith(
        f"received no gradient: reaches the loss only through topk indices ({where})"
    )
    pooler = next(row for row in rows if row.startswith("  pooler (2 parameters) "))
    assert pooler.endswith("received no gradient: ran, but its output does not reach the loss")
    assert "hint (unused): by design for a selector" in text
    assert "hint (unused): by design when this head does not use that module" in text
    assert len(text.splitlines()) <= 9, text


def test_the_policy_rules_are_ready_to_paste() -> None:
    _, text = sparse_check()
    assert _rules(text) == [
        '- {match: "layers.*.indexer.*", ignore_kinds: [unused], reason: '
        f'"reaches the loss only through topk indices ({HERE}:{_line("# the selection")})"}}',
        '- {match: "pooler.*", ignore_kinds: [unused], reason: '
        '"ran, but its output does not reach the loss"}',
    ]


def test_pasting_the_rules_into_a_policy_makes_the_check_pass(tmp_path: Path) -> None:
    _, text = sparse_check()
    path = tmp_path / "team.yaml"
    path.write_text("rules:\n" + "".join(f"  {rule}\n" for rule in _rules(text)))
    torch.manual_seed(0)
    settings = load_policy(path).to_settings()
    report = check_gradients(Sparse(), torch.randn(2, 5, 8), settings=settings)
    assert report.ok, report.format_failure()
    assert any("ignored 9 problem(s)" in note for note in report.notes)
    assert any("ignored 2 problem(s)" in note for note in report.notes)


def test_a_real_bug_still_reads_as_one() -> None:
    for name, cause, remedy in [
        ("branch_detached", "its path to the loss is cut by .detach()", "remove the cut"),
        ("branch_no_grad", "under torch.no_grad()", "remove the cut"),
        ("unused_head", "its module never ran in the forward", "call the module in the forward"),
    ]:
        model, batch = case(name).build()
        text = check_gradients(model, batch).format_failure()
        [row] = [line for line in text.splitlines() if "  unused  " in line]
        assert " parameters)  " in row, (name, text)
        assert cause in row, (name, text)
        first = next(line for line in text.splitlines() if line.startswith("hint (unused)"))
        assert remedy in first, (name, text)
        assert "by design" not in first, (name, text)


class ClsHead(nn.Module):
    """A last layer whose query feeds only the spatial positions, and a head that reads only
    the CLS token (CvT): the query's gradient is exactly zero by design."""

    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.embed = nn.Linear(8, 8)
        self.query = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        cls = self.cls.expand(x.shape[0], -1, -1)
        query = torch.cat((cls, self.query(h)), dim=1)  # the CLS token joins
        return self.head((query + self.cls)[:, 0])


def test_a_layer_that_feeds_only_positions_the_head_discards_says_so() -> None:
    torch.manual_seed(0)
    report = check_gradients(ClsHead(), torch.randn(2, 5, 8))
    # embed feeds only the spatial positions too (through the query)
    assert [(p.kind, p.layer) for p in report.problems] == [("dead", "embed"), ("dead", "query")]
    hint = report.problems[0].hint
    assert hint.startswith("by design when the head reads only some positions"), hint
    assert f"reaches cat at {HERE}:{_line('# the CLS token joins')} but" in hint


def test_the_row_limit_counts_rows_not_parameters() -> None:
    _, text = sparse_check()
    torch.manual_seed(0)
    report = check_gradients(Sparse(), torch.randn(2, 5, 8))
    capped = report.format_failure(max_rows=1)
    assert capped.count("  unused  ") == 1
    assert len(_rules(capped)) == 1
    assert capped.count("  ... and 1 more (all of them with -v)") == 2  # a row, a rule
    assert text == report.format_failure(max_rows=None)


@pytest.mark.parametrize("xdist", [[], ["-n", "2"]], ids=["plain", "n2"])
def test_a_pytest_run_passes_with_the_rules_it_printed(
    pytester: pytest.Pytester, xdist: list[str]
) -> None:
    source = Path(__file__).read_text()
    models = source[source.index("class Indexer") : source.index("def sparse_check")]
    pytester.makepyfile(
        noisy_models="import torch\nfrom torch import nn\n\n\n" + models,
        test_noisy_inner=textwrap.dedent(
            """
            import torch
            from noisy_models import Sparse


            def test_sparse(gradcheck):
                torch.manual_seed(0)
                gradcheck(Sparse(), torch.randn(2, 5, 8))
            """
        ),
    )
    pytester.makeini(
        "[pytest]\naddopts = -p no:benchmark -p no:cacheprovider\nfilterwarnings = error\n"
        "gradcheck_device = cpu\n"
    )
    run = pytester.runpytest_subprocess if xdist else pytester.runpytest
    failed = run(*xdist)
    failed.assert_outcomes(failed=1)
    failed.stdout.fnmatch_lines(["*layers.#.indexer (9 parameters)*unused*topk indices*"])
    # Each rule once: with CI set, pytest's short summary repeats the whole failure text.
    rules = list(
        dict.fromkeys(
            line[line.index("- {match:") :]
            for line in failed.stdout.lines
            if "- {match:" in line and "ignore_kinds" in line
        )
    )
    assert len(rules) == 2, failed.stdout.str()
    pytester.makefile(".yaml", team="rules:\n" + "".join(f"  {rule}\n" for rule in rules))
    passed = run(*xdist, "--gradcheck-policy=team.yaml")
    passed.assert_outcomes(passed=1)


# -- the helpers: subtrees and the rule that matches one -------------------------------------


def test_subtrees_merge_a_role_that_repeats_and_keep_a_lone_one_as_it_is() -> None:
    everything = [
        "layers.0.attn.weight",
        "layers.0.indexer.weight",
        "layers.1.attn.weight",
        "layers.1.indexer.weight",
        "layers.1.indexer.bias",
        "heads.3.weight",
        "heads.4.weight",
    ]
    names = ["layers.0.indexer.weight", "layers.1.indexer.weight", "layers.1.indexer.bias"]
    assert subtrees(names, everything) == [("layers.#.indexer", names)]
    assert subtrees(["heads.3.weight"], everything) == [("heads.3", ["heads.3.weight"])]
    assert subtrees(["layers.0.attn.weight"], everything) == [
        ("layers.0.attn", ["layers.0.attn.weight"])
    ]


def test_a_rule_for_a_parameter_the_module_shares_matches_its_module() -> None:
    rule = policy_rule("body.mask_token", ["body"], "x")
    assert rule.startswith('- {match: "body", ')
    assert policy_rule("cls", ["<root>"], "x").startswith('- {match: "<root>", ')
    assert policy_rule("head", ["head"], "x").startswith('- {match: "head", ')
    assert policy_rule("head", ["head", "head.ln"], "x").startswith('- {match: "head*", ')


_PART = st.sampled_from(["layers", "0", "1", "2", "attn", "indexer", "wq", "h[1]", "a*b"])


@given(
    st.lists(st.lists(_PART, min_size=1, max_size=4), min_size=1, max_size=12, unique_by=tuple),
    st.data(),
)
def test_subtrees_partition_the_names_and_each_rule_matches_its_layers(
    modules: list[list[str]], data: st.DataObject
) -> None:
    everything = [".".join([*parts, "weight"]) for parts in modules]
    names = data.draw(st.lists(st.sampled_from(everything), min_size=1, unique=True))
    groups = subtrees(names, everything)
    assert sorted(n for _, members in groups for n in members) == sorted(names)
    for label, members in groups:
        owners = [name.rpartition(".")[0] for name in members]
        pattern = re.search(r'match: "([^"]*)"', policy_rule(label, owners, "r"))
        assert pattern is not None
        rule = LayerRule(pattern.group(1), "p:1", ignore_kinds=("unused",))
        assert all(rule.matches(owner) for owner in owners), (label, owners, pattern.group(1))
