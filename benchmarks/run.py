"""Overhead of a gradient check against a bare forward+backward, measured in one run.

    python benchmarks/run.py                 # GPT-2 small and the 200-layer narrow MLP
    python benchmarks/run.py --cases mlp     # one case
    python benchmarks/run.py --reps 5
    python benchmarks/run.py --examples      # the demo suite with -n 0 and -n 2
    python benchmarks/run.py --activations   # also check_gradients(..., activations=True),
                                             # and the bare step with its recording hooks only
    python benchmarks/run.py --cases steps,autocast  # a 5-step check; an fp16/bf16 check
    python benchmarks/run.py --floor         # also the least any correct check must do

``steps`` times ``check_gradients(steps=5, optimizer="adam")`` against 5 bare training steps
(``zero_grad``, forward, loss, backward, ``optimizer.step()``); ``autocast`` times
``check_gradients(precision=...)`` (bf16 on the CPU, fp16 on CUDA) against the same bare
pass under ``torch.autocast``. ``*-gpt2`` variants use GPT-2 small.

For each case it interleaves repetitions of the bare step (``zero_grad``, forward, loss,
backward) and of ``check_gradients`` on the same model, batch and loss, and prints the
median of each and their ratio, and the mean time per call Python's garbage collector ran
inside each. Peak memory is measured in a fresh subprocess per mode
(CUDA: ``max_memory_allocated``; CPU: the process's peak resident set size), so the two
modes do not share a high-water mark. Threads are pinned to 1 (2-core CI machines).
"""

from __future__ import annotations

import argparse
import gc
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
from pytest_gradcheck.measure import SMALL  # noqa: E402

torch.set_num_threads(int(os.environ.get("GRADCHECK_BENCH_THREADS", "1")))


def _gpt2() -> tuple[torch.nn.Module, Any, Callable[[Any], torch.Tensor] | None]:
    from fixtures.zoo import gpt2_small

    model, batch = gpt2_small()
    return model, batch, None


def _mlp() -> tuple[torch.nn.Module, Any, Callable[[Any], torch.Tensor] | None]:
    from fixtures.models import narrow_mlp

    model, batch = narrow_mlp(depth=100, width=16, batch=32)
    return model, batch, lambda out: out.square().mean()


CASES: dict[str, tuple[str, Callable[[], tuple[torch.nn.Module, Any, Any]], int]] = {
    "gpt2": ("GPT-2 small (124M params, batch 2x128 tokens)", _gpt2, 5),
    "mlp": ("narrow MLP (100 pre-LN blocks, 200 Linear(16,16))", _mlp, 40),
    "steps": ("narrow MLP: 5-step adam check vs 5 bare steps", _mlp, 20),
    "autocast": ("narrow MLP: autocast check vs bare autocast pass", _mlp, 40),
    "steps-gpt2": ("GPT-2 small: 5-step adam check vs 5 bare steps", _gpt2, 3),
    "autocast-gpt2": ("GPT-2 small: autocast check vs bare autocast", _gpt2, 5),
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


def check_step(model: torch.nn.Module, batch: Any, loss_fn: Any, **settings: Any) -> None:
    device = "cpu" if _cpu_only() else None
    check_gradients(model, batch, loss_fn=loss_fn, device=device, **settings)


def activations_step(model: torch.nn.Module, batch: Any, loss_fn: Any) -> None:
    check_step(model, batch, loss_fn, activations=True)


def recorded_step(model: torch.nn.Module, batch: Any, loss_fn: Any) -> None:
    """The bare step with only the recording hooks of ``activations=True`` on: their cost."""
    from pytest_gradcheck.measure import record_activation_grads

    with record_activation_grads(list(model.named_modules())) as recorder:
        model.zero_grad(set_to_none=True)
        loss = _loss(model, batch, loss_fn)
        recorder.before_backward()
        loss.backward()


def floor_step(model: torch.nn.Module, batch: Any, loss_fn: Any) -> list[tuple[Any, ...]]:
    """The least a correct check must do, and none of the checks: find every parameter and
    its name, keep ``.grad`` and the train flags aside, seed, run the bare pass, reduce each
    gradient (L2 norm, max-abs, exact non-zeros) and weight (L2 norm), small ones stacked by
    shape, bring them to the host in one transfer, make a record per parameter, give the
    model back. No module structure, layer records, closer look, checks or report: what a
    check costs above this is what those cost. Returns (name, gradient norm, max-abs,
    non-zeros, weight norm) per parameter, to compare with the check's figures."""
    modules = list(model.named_modules())
    names: list[str] = []
    params: list[torch.Tensor] = []
    seen: set[int] = set()
    for prefix, module in modules:
        for name, p in module._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                names.append(f"{prefix}.{name}" if prefix else name)
                params.append(p)
    saved = [p.grad for p in params]
    flags = [module.training for _, module in modules]
    cuda = [params[0].device.index or 0] if params and params[0].is_cuda else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(0)  # (torch.manual_seed seeds every backend)
        if cuda:
            torch.cuda.manual_seed(0)
        for p in params:
            p.grad = None
        _loss(model, batch, loss_fn).backward()
        with torch.no_grad():
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            groups: dict[tuple[Any, ...], list[int]] = {}
            order: list[int] = []  # the parameter of each column
            large: list[torch.Tensor] = []
            for i, p in enumerate(params):
                if p.numel() <= SMALL:  # the engine's bound for stacking
                    groups.setdefault((p.shape, p.dtype), []).append(i)
                else:
                    order.append(i)
                    low, high = torch.aminmax(grads[i])
                    large += [torch.linalg.vector_norm(grads[i]), torch.maximum(high, -low)]
                    large += [torch.count_nonzero(grads[i]), torch.linalg.vector_norm(p)]
            parts = [torch.stack([t.double() for t in large]).reshape(-1, 4).T] if large else []
            for indices in groups.values():
                order += indices
                g = torch.stack([grads[i] for i in indices]).flatten(1)
                w = torch.stack([params[i] for i in indices]).flatten(1)
                max_abs = torch.maximum(g.amax(dim=1), -g.amin(dim=1))
                columns = [torch.linalg.vector_norm(g, dim=1), max_abs, g.bool().sum(dim=1)]
                columns.append(torch.linalg.vector_norm(w, dim=1))
                parts.append(torch.stack([c.double() for c in columns]))
            host = torch.cat(parts, dim=1).T.tolist()
        records = [(names[i], *row) for i, row in zip(order, host, strict=True)]
    for p, grad in zip(params, saved, strict=True):
        p.grad = grad
    for (_, module), flag in zip(modules, flags, strict=True):
        if module.training != flag:
            module.training = flag
    return records


STEPS = 5
"""Optimizer steps of the ``steps`` cases."""
_TRAINERS: dict[int, torch.optim.Optimizer] = {}


def bare_train(model: torch.nn.Module, batch: Any, loss_fn: Any) -> None:
    """``STEPS`` plain training steps with one Adam optimizer per model (made once)."""
    optimizer = _TRAINERS.setdefault(id(model), torch.optim.Adam(model.parameters(), lr=1e-3))
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        _loss(model, batch, loss_fn).backward()
        optimizer.step()


def check_train(model: torch.nn.Module, batch: Any, loss_fn: Any) -> None:
    device = "cpu" if _cpu_only() else None
    report = check_gradients(
        model, batch, loss_fn=loss_fn, device=device, steps=STEPS, optimizer="adam", lr=1e-3
    )
    assert report.ok, report.format_failure()  # an early stop would time fewer steps


def _precision() -> tuple[str, torch.dtype, str]:
    """(setting, dtype, device type): fp16 on CUDA, bf16 on the CPU."""
    if torch.cuda.is_available() and not _cpu_only():
        return "fp16", torch.float16, "cuda"
    return "bf16", torch.bfloat16, "cpu"


def bare_autocast(model: torch.nn.Module, batch: Any, loss_fn: Any) -> None:
    _, dtype, device_type = _precision()
    model.zero_grad(set_to_none=True)
    with torch.autocast(device_type, dtype=dtype):
        loss = _loss(model, batch, loss_fn)
    loss.backward()


def check_autocast(model: torch.nn.Module, batch: Any, loss_fn: Any) -> None:
    check_step(model, batch, loss_fn, precision=_precision()[0])


#: The (bare, check) step of each case; the others use ``bare_step`` and ``check_step``.
MODES: dict[str, tuple[Callable[..., None], Callable[..., None]]] = {
    "steps": (bare_train, check_train),
    "steps-gpt2": (bare_train, check_train),
    "autocast": (bare_autocast, check_autocast),
    "autocast-gpt2": (bare_autocast, check_autocast),
}


def _cpu_only() -> bool:
    return os.environ.get("GRADCHECK_BENCH_DEVICE", "auto") == "cpu"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _CollectorTime:
    """Seconds Python's cyclic garbage collector runs inside the timed calls of each mode
    (``gc.callbacks``): collections are rare and long, so the mean per call is reported."""

    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}
        self.mode: int | None = None  # the mode being timed, or None between timed calls
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if self.mode is None:
            return
        if phase == "start":
            self._started = time.perf_counter()
        else:
            elapsed = time.perf_counter() - self._started
            self.seconds[self.mode] = self.seconds.get(self.mode, 0.0) + elapsed


def time_case(
    name: str, reps: int | None, activations: bool = False, floor: bool = False
) -> dict[str, Any]:
    title, build, default_reps = CASES[name]
    reps = reps or default_reps
    model, batch, loss_fn = build()
    device = torch.device("cuda") if torch.cuda.is_available() and not _cpu_only() else None
    if device is not None:
        model.to(device)
        batch = _to(batch, device)
    model.train()
    bare: list[float] = []
    check: list[float] = []
    act: list[float] = []
    hooks: list[float] = []
    least: list[float] = []
    bare_fn, check_fn = MODES.get(name, (bare_step, check_step))
    modes: list[tuple[Callable[..., object], list[float]]] = [(bare_fn, bare), (check_fn, check)]
    if activations:
        modes += [(activations_step, act), (recorded_step, hooks)]
    if floor:
        modes.append((floor_step, least))
    for _ in range(2):  # warm up every path
        for fn, _ in modes:
            fn(model, batch, loss_fn)
    collector = _CollectorTime()
    gc.callbacks.append(collector)
    try:
        for _ in range(reps):
            for mode, (fn, out) in enumerate(modes):
                # Start every mode from no gradients, as a fresh test does: a check keeps any
                # existing .grad aside (to restore it), which would double gradient memory.
                model.zero_grad(set_to_none=True)
                _sync()
                collector.mode = mode
                start = time.perf_counter()
                fn(model, batch, loss_fn)
                _sync()
                out.append(time.perf_counter() - start)
                collector.mode = None
    finally:
        gc.callbacks.remove(collector)
    b, c = statistics.median(bare), statistics.median(check)
    row = {"case": name, "title": title, "reps": reps, "bare_s": b, "check_s": c, "ratio": c / b}
    row["gc_bare_s"] = collector.seconds.get(0, 0.0) / reps
    row["gc_check_s"] = collector.seconds.get(1, 0.0) / reps
    if activations:
        a, h = statistics.median(act), statistics.median(hooks)
        row.update(act_s=a, act_ratio=a / b, act_vs_check=a / c, hooks_s=h, hooks_ratio=h / b)
    if floor:
        f = statistics.median(least)
        row.update(floor_s=f, floor_ratio=f / b)
    return row


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
    bare_fn, check_fn = MODES.get(name, (bare_step, check_step))
    step = bare_fn if mode == "bare" else check_fn
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


def time_examples(reps: int, workers: tuple[int, ...] = (0, 2)) -> dict[int, float]:
    """Wall time (s) of the demo suite, ``pytest examples -n W``, median of ``reps`` runs.

    Each run is a fresh process (torch import and xdist worker start-up included, as in CI);
    the worker counts are interleaved so that both see the same machine load. Threads: one
    per process (OMP_NUM_THREADS=1; under xdist ``--gradcheck-threads auto`` gives each
    worker cpu_count // workers), so the workers do not oversubscribe the cores.
    """
    times: dict[int, list[float]] = {w: [] for w in workers}
    command = [sys.executable, "-m", "pytest", "examples", "-q", "-p", "no:cacheprovider"]
    for _ in range(reps):
        for w in workers:
            start = time.perf_counter()
            subprocess.run(
                [*command, "-n", str(w)], cwd=ROOT, check=True, capture_output=True, text=True
            )
            times[w].append(time.perf_counter() - start)
    return {w: statistics.median(t) for w, t in times.items()}


def _print_examples(reps: int) -> int:
    seconds = time_examples(reps)
    print(f"pytest examples, wall time, median of {reps} fresh runs ({os.cpu_count()} cores):")
    for workers, value in seconds.items():
        print(f"  -n {workers}: {value:6.2f} s")
    print(f"speed-up of -n 2 over -n 0: {seconds[0] / seconds[2]:.2f}x")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="gpt2,mlp", help=f"comma-separated: {', '.join(CASES)}")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument(
        "--activations",
        action="store_true",
        help="also time check_gradients(..., activations=True) and a bare step with only its "
        "activation-gradient recording hooks",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also time the least any correct check must do (benchmarks/run.py floor_step)",
    )
    parser.add_argument(
        "--examples",
        action="store_true",
        help="instead, time the demo suite (pytest examples) with -n 0 and -n 2",
    )
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        _memory_child(*args.memory_child)
        return 0
    if args.examples:
        return _print_examples(args.reps or 3)
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    if args.floor and any(name in MODES for name in names):
        parser.error(f"--floor times the plain check only; drop {', '.join(MODES)} from --cases")
    device = "cuda" if torch.cuda.is_available() and not _cpu_only() else "cpu"
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    print(f"{'case':<48} {'reps':>4} {'bare ms':>9} {'check ms':>9} {'ratio':>6} {'mem':>6}")
    for name in names:
        row = time_case(name, args.reps, args.activations, args.floor)
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
        print(
            f"  garbage collection per call (mean): bare {row['gc_bare_s'] * 1e3:.2f} ms, "
            f"check {row['gc_check_s'] * 1e3:.2f} ms"
        )
        if args.activations:
            print(
                f"{'  with activations=True':<48} {row['reps']:>4} {'':>9} "
                f"{row['act_s'] * 1e3:>9.1f} {row['act_ratio']:>6.3f}  "
                f"({row['act_vs_check']:.3f}x the check without)"
            )
            print(
                f"{'  bare step with the recording hooks only':<48} {row['reps']:>4} {'':>9} "
                f"{row['hooks_s'] * 1e3:>9.1f} {row['hooks_ratio']:>6.3f}"
            )
        if args.floor:
            print(
                f"{'  the floor: pass, reduce, give back, no checks':<48} {row['reps']:>4} "
                f"{'':>9} {row['floor_s'] * 1e3:>9.1f} {row['floor_ratio']:>6.3f}"
            )
    print("ratio = median check_gradients time / median bare zero_grad+forward+loss+backward")
    if any(name in MODES for name in names):
        print(
            f"  steps: bare = {STEPS} x (zero_grad+forward+loss+backward+adam step); "
            f"autocast: bare = the same pass under torch.autocast ({_precision()[0]})"
        )
    print("mem = peak memory of check / bare (fresh process each)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
