"""Overhead of a gradient check of an FSDP2-sharded model, against its bare sharded step.

    python benchmarks/sharded.py                      # 2 CPU ranks (gloo), 24 residual blocks
    python benchmarks/sharded.py --blocks 32 --reps 21 --width 256

Two processes join a gloo group; each builds the same model of ``--blocks`` residual MLP
blocks (LayerNorm, Linear, GELU, Linear), shards every block with ``fully_shard`` and then
the root, and takes its half of one global batch. Rank 0 then times, interleaved, the bare
sharded step (``zero_grad``, forward, mean-square loss, backward: FSDP's all-gathers and
reduce-scatters) and ``check_gradients`` of the same model on the same shard, and prints the
median of each and their ratio. It also counts the collectives each runs (by wrapping the
``torch.distributed`` functions FSDP and the check call) and prints what the check adds.
Threads are pinned to 1 per rank.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from pytest_gradcheck import check_gradients  # noqa: E402

torch.set_num_threads(1)

COLLECTIVES = (
    "all_gather_single",
    "all_gather_into_tensor",
    "reduce_scatter_single",
    "reduce_scatter_tensor",
    "all_reduce",
    "all_gather_object",
    "broadcast",
)


class Block(nn.Module):
    """``x + fc2(gelu(fc1(norm(x))))``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


def model_of(blocks: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[Block(width) for _ in range(blocks)], nn.Linear(width, 10))


def mean_square(output: torch.Tensor) -> torch.Tensor:
    return output.pow(2).mean()


@contextmanager
def counting() -> Iterator[collections.Counter[str]]:
    """Count the torch.distributed collectives called in the block, by name."""
    import torch.distributed as dist

    counts: collections.Counter[str] = collections.Counter()
    saved = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def counted(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return function(*args, **kwargs)

        return call

    for name, function in saved.items():
        setattr(dist, name, counted(name, function))
    try:
        yield counts
    finally:
        for name, function in saved.items():
            setattr(dist, name, function)


def rank_main(rank: int, world: int, init: str, args: argparse.Namespace, conn: Any) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from pytest_gradcheck.sharded import shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    model = model_of(args.blocks, args.width)
    params = sum(p.numel() for p in model.parameters())
    blocks = shard(model, init_device_mesh("cpu", (world,)))
    torch.manual_seed(1)
    x = torch.randn(args.batch * world, args.width).tensor_split(world)[rank].clone()

    def bare() -> None:
        model.zero_grad(set_to_none=True)
        mean_square(model(x)).backward()

    def check() -> None:
        check_gradients(model, x, device="cpu", loss_fn=mean_square)

    for _ in range(args.warmup):
        bare()
        check()
    with counting() as bare_counts:
        bare()
    with counting() as check_counts:
        check()
    times: dict[str, list[float]] = {"bare": [], "check": []}
    for _ in range(args.reps):
        for name, step in (("bare", bare), ("check", check)):
            dist.barrier()
            started = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - started)
    if rank == 0:
        conn.send(
            {
                "params": params,
                "blocks": len(blocks),
                "bare": statistics.median(times["bare"]),
                "check": statistics.median(times["check"]),
                "bare_counts": dict(bare_counts),
                "check_counts": dict(check_counts),
            }
        )
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=24, help="residual blocks (default 24)")
    parser.add_argument("--width", type=int, default=128, help="block width (default 128)")
    parser.add_argument("--batch", type=int, default=32, help="samples per rank (default 32)")
    parser.add_argument("--reps", type=int, default=15, help="interleaved repetitions")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions of each")
    args = parser.parse_args(argv)
    world = 2
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    context: Any = multiprocessing.get_context(method)
    store = tempfile.mkdtemp(prefix="gradcheck-bench-")
    receive, send = context.Pipe(duplex=False)
    procs = [
        context.Process(target=rank_main, args=(rank, world, f"file://{store}/store", args, send))
        for rank in range(world)
    ]
    for proc in procs:
        proc.start()
    send.close()
    result = receive.recv()
    for proc in procs:
        proc.join()
    bare, check = result["bare"], result["check"]
    added = collections.Counter(result["check_counts"])
    added.subtract(result["bare_counts"])
    print(
        f"FSDP2, {world} CPU ranks (gloo, {method}), 1 thread each: {result['blocks'] + 1} "
        f"fully_shard units ({result['blocks']} children holding parameters and the root), "
        f"{result['params'] / 1e6:.2f} M parameters, {args.batch} samples per rank"
    )
    print(f"median of {args.reps} interleaved repetitions")
    print(f"  bare sharded step  {bare * 1e3:9.2f} ms")
    print(f"  sharded check      {check * 1e3:9.2f} ms   ({check / bare:.2f}x the bare step)")

    def show(counts: dict[str, int]) -> str:
        return ", ".join(f"{name} {n}" for name, n in sorted(counts.items()) if n) or "none"

    print(
        f"collectives per bare step: {sum(result['bare_counts'].values())} "
        f"({show(result['bare_counts'])})"
    )
    print(
        f"collectives per check:     {sum(result['check_counts'].values())} "
        f"({show(result['check_counts'])})"
    )
    print(f"added by the check:        {sum(added.values())} ({show(dict(added))})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
