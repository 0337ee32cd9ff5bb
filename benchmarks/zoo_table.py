"""Run the reference zoo with default settings and print the README's Markdown table.

python benchmarks/zoo_table.py            # every case (needs transformers for the slow ones)
python benchmarks/zoo_table.py --fast     # skip the transformers architectures
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from fixtures import nonfinite
from fixtures.zoo import CASES
from pytest_gradcheck import check_gradients

torch.set_num_threads(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="skip transformers architectures")
    args = parser.parse_args(argv)
    print("| case | label | verdict | kinds found | min / max layer grad norm | source |")
    print("|---|---|---|---|---|---|")
    right = total = 0
    for case in CASES:
        if case.slow and args.fast:
            continue
        model, batch = case.build()
        report = check_gradients(model, batch, loss_fn=case.loss_fn)
        kinds = sorted({p.kind for p in report.problems})
        ok = (case.label == "healthy" and report.ok) or case.label in kinds
        right += ok
        total += 1
        mark = "✅" if ok else "❌"
        norms = f"{report.min_grad_norm:.2g} / {report.max_grad_norm:.2g}"
        source = case.source.replace("|", "/")
        print(
            f"| `{case.name}` | {case.label} | {mark} {report.verdict} | "
            f"{', '.join(kinds) or '-'} | {norms} | {source} |"
        )
    for nan_case in nonfinite.CASES:
        for fixed in (False, True):
            model, batch = nan_case.build_healthy() if fixed else nan_case.build()
            loss_fn = nan_case.fixed_loss_fn if fixed else nan_case.loss_fn
            report = check_gradients(model, batch, loss_fn=loss_fn)
            label = "healthy" if fixed else "nonfinite"
            kinds = sorted({p.kind for p in report.problems})
            ok = (fixed and report.ok) or (not fixed and "nonfinite" in kinds)
            right += ok
            total += 1
            what = "the fix" if fixed else (report.diagnosis[0] if report.diagnosis else "")
            print(
                f"| `{nan_case.name}{'_fixed' if fixed else ''}` | {label} | "
                f"{'✅' if ok else '❌'} {report.verdict} | {', '.join(kinds) or '-'} | - | "
                f"{'fix for: ' + nan_case.description if fixed else what} |"
            )
    print(f"\n{right} of {total} cases get the expected verdict with default settings.")
    return 0 if right == total else 1


if __name__ == "__main__":
    raise SystemExit(main())
