"""Overhead of a gradient check against a bare forward+backward, measured in one run.

    python benchmarks/run.py                 # GPT-2 small and the 200-layer narrow MLP
    python benchmarks/run.py --cases mlp     # one case
    python benchmarks/run.py --reps 5

For each case it interleaves repetitions of the bare step (``zero_grad``, forward, loss,
backward) and of ``check_gradients`` on the same model, batch and loss, and prints the
median of each and their ratio. Peak memory is measured in a fresh subprocess per mode
(CUDA: ``max_memory_allocated``; CPU: the process's peak resident set size), so the two
modes do not share a high-water mark. Threads are pinned to 1 (2-core CI machines).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pytest_gradcheck import check_gradients  # noqa: E402

torch.set_num_threads(int(os.environ.get("GRADCHECK_BENCH_THREADS", "1")))


def _gpt2() -> tuple[torch.nn.Module, Any, Callable[[Any], torch.Tensor] | None]:
    from fixtures.models import gpt2_small

    model, batch = gpt2_small()
    return model, batch, None


def _mlp() -> tuple[torch.nn.Module, Any, Callable[[Any], torch.Tensor] | None]:
    from fixtures.models import narrow_mlp

    model, batch = narrow_mlp(depth=100, width=16, batch=32)
    return model, batch, lambda out: out.square().mean()


CASES: dict[str, tuple[str, Callable[[], tuple[torch.nn.Module, Any, Any]], int]] = {
    "gpt2": ("GPT-2 small (124M params, batch 2x128 tokens)", _gpt2, 5),
    "mlp": ("narrow MLP (100 pre-LN blocks, 200 Linear(16,16))", _mlp, 40),
}


def _loss(model: torch.nn.Module, batch: Any, loss_fn: Any) -> torch.Tensor:
    if isinstance(batch, dict):
        out = model(**batch)
    elif isinstance(batch, (tuple, list)):
        out = model(*batch)
    else:
        out = model(batch)
    if loss_fn is not None:
        return loss_fn(out)  # type: ignore[no-any-return]
    return out.loss  # type: ignore[no-any-return]


def bare_step(model: torch.nn.Module, batch: Any, loss_fn: Any) -> None:
    model.zero_grad(set_to_none=True)
    _loss(model, batch, loss_fn).backward()


def check_step(model: torch.nn.Module, batch: Any, loss_fn: Any) -> None:
    check_gradients(model, batch, loss_fn=loss_fn, device="cpu" if _cpu_only() else None)


def _cpu_only() -> bool:
    return os.environ.get("GRADCHECK_BENCH_DEVICE", "auto") == "cpu"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_case(name: str, reps: int | None) -> dict[str, Any]:
    title, build, default_reps = CASES[name]
    reps = reps or default_reps
    model, batch, loss_fn = build()
    device = torch.device("cuda") if torch.cuda.is_available() and not _cpu_only() else None
    if device is not None:
        model.to(device)
        batch = _to(batch, device)
    model.train()
    for _ in range(2):  # warm up both paths
        bare_step(model, batch, loss_fn)
        check_step(model, batch, loss_fn)
    bare: list[float] = []
    check: list[float] = []
    for _ in range(reps):
        for fn, out in ((bare_step, bare), (check_step, check)):
            _sync()
            start = time.perf_counter()
            fn(model, batch, loss_fn)
            _sync()
            out.append(time.perf_counter() - start)
    b, c = statistics.median(bare), statistics.median(check)
    return {"case": name, "title": title, "reps": reps, "bare_s": b, "check_s": c, "ratio": c / b}


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def peak_memory(name: str, mode: str) -> float:
    """Peak memory (MiB) of two steps of ``mode`` in a fresh process."""
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", name, mode],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"])


def _memory_child(name: str, mode: str) -> None:
    _, build, _ = CASES[name]
    model, batch, loss_fn = build()
    step = bare_step if mode == "bare" else check_step
    if torch.cuda.is_available() and not _cpu_only():
        model.cuda()
        batch = _to(batch, torch.device("cuda"))
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            step(model, batch, loss_fn)
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        for _ in range(2):
            step(model, batch, loss_fn)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mib": peak}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="gpt2,mlp", help="comma-separated: gpt2, mlp")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        _memory_child(*args.memory_child)
        return 0
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    device = "cuda" if torch.cuda.is_available() and not _cpu_only() else "cpu"
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    print(f"{'case':<48} {'reps':>4} {'bare ms':>9} {'check ms':>9} {'ratio':>6} {'mem':>6}")
    for name in names:
        row = time_case(name, args.reps)
        mem = ""
        if not args.no_memory:
            bare_peak = peak_memory(name, "bare")
            check_peak = peak_memory(name, "check")
            mem = f"{check_peak / bare_peak:.3f}"
            row["peak_mib"] = {"bare": bare_peak, "check": check_peak}
        print(
            f"{row['title']:<48} {row['reps']:>4} {row['bare_s'] * 1e3:>9.1f} "
            f"{row['check_s'] * 1e3:>9.1f} {row['ratio']:>6.3f} {mem:>6}"
        )
    print("ratio = median check_gradients time / median bare zero_grad+forward+loss+backward")
    print("mem = peak memory of check / bare (fresh process each)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
