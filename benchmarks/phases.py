"""Where a check's own time goes: each phase of ``check_gradients`` timed alone, cold and hot.

    python benchmarks/phases.py               # the 200-layer narrow MLP, 100 repetitions
    python benchmarks/phases.py --reps 300

Cold: the phase runs right after a bare forward+backward, as it does inside a check, when
the pass has pushed the model's modules, parameters and gradients out of the CPU caches.
Hot: the same phase run again at once. Phases run in a shuffled order each repetition and
the medians are printed next to the bare step's, with the cold sum as a fraction of it.

The phases call the engine's private functions, so this script follows the engine; the
headline figure is ``benchmarks/run.py``'s ratio, which times ``check_gradients`` whole.
Threads are pinned to 1 (2-core CI machines).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from pytest_gradcheck import engine, measure, verdict
from pytest_gradcheck.settings import resolve

torch.set_num_threads(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=100)
    args = parser.parse_args()

    from fixtures.models import narrow_mlp

    model, batch = narrow_mlp(depth=100, width=16, batch=32)

    def loss_fn(out: torch.Tensor) -> torch.Tensor:
        return out.square().mean()

    def bare() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(batch)).backward()

    settings = resolve([("benchmarks/phases.py", {"loss_fn": loss_fn, "device": "cpu"})])
    device = torch.device("cpu")
    bare()
    modules = list(model.named_modules())
    names, params, structure = measure.walk_modules(modules)
    table = measure.ParamTable(names, params, structure)
    layers = table.measure()

    def borrow() -> None:  # take the model and give it back, with nothing in between
        with engine._borrowed(model, modules, params, batch, device, settings):
            pass

    phases: dict[str, Callable[[], object]] = {
        "named_modules": lambda: list(model.named_modules()),
        "walk (parameters, modules)": lambda: measure.walk_modules(modules),
        "borrow and restore": borrow,
        "parameter table": lambda: measure.ParamTable(names, params, structure),
        "measure (reduce, records)": table.measure,
        "checks": lambda: verdict.evaluate(layers, structure, 1.0, settings),
    }
    cold: dict[str, list[float]] = {name: [] for name in phases}
    hot: dict[str, list[float]] = {name: [] for name in phases}
    steps: list[float] = []
    order = list(phases)
    rng = random.Random(0)
    for _ in range(args.reps):
        rng.shuffle(order)
        for name in order:
            start = time.perf_counter()
            bare()
            steps.append(time.perf_counter() - start)
            for out in (cold, hot):
                start = time.perf_counter()
                phases[name]()
                out[name].append(time.perf_counter() - start)

    step = statistics.median(steps) * 1e3
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, reps {args.reps}")
    print(f"narrow MLP: {len(modules)} modules, {len(params)} parameters")
    print(f"bare zero_grad+forward+loss+backward: {step:.2f} ms (median)")
    print(f"{'phase':28} {'cold ms':>8} {'hot ms':>8}")
    total = 0.0
    for name in phases:
        c, h = statistics.median(cold[name]) * 1e3, statistics.median(hot[name]) * 1e3
        total += c
        print(f"{name:28} {c:8.3f} {h:8.3f}")
    print(f"{'sum of cold phases':28} {total:8.3f}  ({total / step:.2f} of a bare step)")


if __name__ == "__main__":
    main()
