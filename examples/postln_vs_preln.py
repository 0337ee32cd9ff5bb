"""Reproduce Xiong et al. 2020, Figure 3: gradient norms of Post-LN against Pre-LN at init.

    python examples/postln_vs_preln.py                      # writes docs/postln_vs_preln.png
    python examples/postln_vs_preln.py --out /tmp/fig.png --d-model 128 --seed 1

"On Layer Normalization in the Transformer Architecture" (ICML 2020) shows that in the
original Post-LN Transformer the gradient of the FFN weights grows toward the output layers
at initialisation, while in Pre-LN it stays about the same at every depth, which is why
Post-LN needs a learning-rate warm-up and Pre-LN trains without one. This script builds both
variants of a 6+6-layer encoder-decoder (``fixtures/transformers_ln.py``: PyTorch's own
Transformer layers with ``norm_first`` off or on, the same Xavier init and the same batch),
runs one ``check_gradients`` on each with the model's cross-entropy loss, prints the gradient
norm of the second FFN weight (``linear2``) of every layer, and draws the two side by side
with :func:`pytest_gradcheck.plot.plot_comparison` (needs ``pytest-gradcheck[plot]``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the shared fixtures/

import torch  # noqa: E402

from fixtures.transformers_ln import build  # noqa: E402
from pytest_gradcheck import Report, check_gradients  # noqa: E402

LABELS = {"post_ln": "Post-LN", "pre_ln": "Pre-LN"}
MATCH = r"(encoder|decoder)\.layers\.\d+\.linear2$"
"""The second FFN weight ``W2`` of each layer, one panel per stack (the paper's Figure 3)."""


def run(d_model: int = 64, seed: int = 0) -> dict[str, Report]:
    """One gradient check per variant at initialisation; both see the same batch."""
    reports: dict[str, Report] = {}
    for variant, label in LABELS.items():
        model, batch = build(variant, d_model=d_model, batch=32, length=32, seed=seed)
        reports[label] = check_gradients(model, batch, device="cpu", seed=seed)
    return reports


def ffn_norms(report: Report, stack: str) -> list[float]:
    """The gradient norms of ``{stack}.layers.{i}.linear2`` in depth order."""
    prefix = f"{stack}.layers."
    return [
        layer.grad_norm
        for layer in report.layers
        if layer.name.startswith(prefix) and layer.name.endswith(".linear2")
    ]


def summary(reports: dict[str, Report]) -> list[str]:
    lines = []
    for label, report in reports.items():
        for stack in ("encoder", "decoder"):
            norms = ffn_norms(report, stack)
            values = " ".join(f"{v:.3f}" for v in norms)
            lines.append(
                f"{label:<8} {stack:<8} W2 grad norm by layer: {values}   "
                f"last/first {norms[-1] / norms[0]:.2f}"
            )
        lines.append(f"{label:<8} verdict: {report.verdict}, loss {report.loss:.3f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "postln_vs_preln.png"))
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from pytest_gradcheck.plot import plot_comparison

    reports = run(args.d_model, args.seed)
    for line in summary(reports):
        print(line)
    path = plot_comparison(
        reports,
        args.out,
        match=MATCH,
        title=(
            "Gradient norm of the FFN weight W2 per layer at initialisation "
            f"(6+6-layer encoder-decoder, d_model {args.d_model})"
        ),
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
