"""Distributed checks: N local processes, one shard of the batch each, under DDP or FSDP2.

``check_gradients(model, batch, distributed=N)`` calls :func:`check_distributed`. It starts N
processes on this machine, each of which joins a gloo process group, wraps its copy of the
model in ``DistributedDataParallel`` and runs, on its own shard of the sample batch:

1. a DDP pass: forward, the parameters the loss reaches (so unused ones can be named on
   every rank), backward with DDP's all-reduce; then every rank compares its parameters and
   its all-reduced gradients with rank 0's;
2. a pass of the bare module on the same input on every rank (shard 0): a forward that
   depends on the rank, or on state DDP does not broadcast, gives different gradients;
3. the ordinary check (:func:`~pytest_gradcheck.engine.run_check`) of the DDP model,
   with every setting (``steps``, ``precision``, ...): every rank's gradients must be healthy.

With ``distributed_strategy="fsdp"`` each rank instead shards its copy of the model with
FSDP2's ``fully_shard`` (each child block holding parameters, then the root) over all the
ranks, gloo on the CPU or NCCL with one GPU per rank where there are enough
(:func:`_placement`), and runs the ordinary check on its shard of the batch: the gradient
statistics are gathered across the ranks (:mod:`pytest_gradcheck.sharded`), so every rank
reaches the same report.

Each rank sends plain numbers back through a pipe; this process builds one
:class:`~pytest_gradcheck.results.Report`, with module paths as in the bare model (the
report hooks run once on it, in :func:`pytest_gradcheck.api.check_gradients`).

Processes start with ``fork`` where the platform has it: a forked child shares the torch
this process already imported, so a 2-process check starts in well under a second instead
of 10-18 s under ``spawn``. DDP imports ``torch._dynamo`` lazily, which costs seconds in
every child; it is imported here once before forking. Every run has a hard timeout
(``distributed_timeout``, or the check's ``timeout`` where it is shorter: the ranks run
without one of their own, and this process stops them all alike): a rank stuck in a
collective becomes a clear failure naming where each rank was, and the processes are
stopped. Teardown is ``del ddp``, ``dist.barrier()``, ``dist.destroy_process_group()``: a bare
``destroy_process_group()`` after fork hung in 5 of 6 measured sessions, this sequence in none
of 26.

Imports torch, the engine (in the ranks), the sharded-parameter helpers and the tensor walker
below it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import pickle
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Sequence
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
from torch import nn

from .results import GradcheckError, GradcheckTimeout, Problem, Report
from .settings import Settings
from .sharded import fully_shard_function, shard, sharded_stats
from .tensors import map_tensors, tensors

__all__ = ["check_distributed"]

_TOLERANCE = 1e-5
"""Ranks differ when a tensor's largest difference from rank 0 exceeds this fraction of
rank 0's largest magnitude (after an all-reduce, or on the same input, CPU results are
bit-identical; the tolerance only absorbs reduction-order rounding)."""
_TEARDOWN_GRACE = 10.0
"""Seconds a rank may take to shut down after it sent its results."""
_NOISE = "find_unused_parameters=True was specified in DDP constructor"
"""DDP's warning when a pass used every parameter: left out of the stderr shown on failure."""

_UNUSED_HINT = (
    "DDP's default (find_unused_parameters=False) fails on these with \"Expected to have "
    'finished reduction in the prior iteration" and does not name them: use them in every '
    "forward on every rank, freeze them (requires_grad=False) or remove them, or pass "
    "find_unused_parameters=True to DDP (slower)"
)
_MISMATCH_HINT = (
    "make every rank compute the same function: keep state in registered buffers (DDP "
    "broadcasts them from rank 0), not plain tensor attributes; branch and seed on the rank "
    "only for data; initialise data-dependent parameters before wrapping in DDP"
)


def check_distributed(model: nn.Module, batch: Any, settings: Settings) -> Report:
    """Check ``model`` under DDP or FSDP2 (``distributed_strategy``) in
    ``settings.distributed`` local processes (see module doc)."""
    __tracebackhide__ = True
    world = settings.distributed
    _check_can_run(model, settings)
    devices = ["cpu"] * world
    if settings.distributed_strategy == "fsdp":
        devices = _placement(world, settings, torch.cuda.device_count(), _nccl())
    shards = _shards(batch, world)
    started = time.perf_counter()
    method = _start_method() if devices[0] == "cpu" else "spawn"  # CUDA ranks: never fork
    results = _launch(model, shards, settings, method, devices)
    if settings.distributed_strategy == "fsdp":
        return _merge_sharded(results, settings, method, devices, time.perf_counter() - started)
    return _merge(results, settings, method, time.perf_counter() - started)


# -- preconditions and shards ---------------------------------------------------------------


def _check_can_run(model: nn.Module, settings: Settings) -> None:
    import torch.distributed as dist

    world = settings.distributed
    if not dist.is_available() or not dist.is_gloo_available():
        raise GradcheckError(
            f"distributed={world} needs torch.distributed with the gloo backend, which this "
            f"torch ({torch.__version__}) does not have; run the check with distributed=1"
        )
    fsdp = settings.distributed_strategy == "fsdp"
    if dist.is_initialized():
        instead = (
            "shard the model with fully_shard and call check_gradients on every rank instead"
            if fsdp
            else "wrap the model in DistributedDataParallel and call check_gradients on every "
            "rank instead (module paths are reported without 'module.')"
        )
        raise GradcheckError(
            f"distributed={world} starts its own process group, but this process is already "
            f"in one: {instead}"
        )
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise GradcheckError(
            f"distributed={world} wraps the model in "
            f"{'FSDP2' if fsdp else 'DistributedDataParallel'} itself: pass the bare module "
            f"(model.module), not the {type(model).__name__}"
        )
    if fsdp:
        _check_can_shard(model, world)
        return
    if settings.device is not None and torch.device(settings.device).type != "cpu":
        raise GradcheckError(
            f"distributed={world} runs on CPU with gloo; drop device={settings.device!r} "
            f"(from {settings.origins.get('device', 'the settings')})"
        )
    devices = {t.device.type for t in [*model.parameters(), *model.buffers()]}
    if devices - {"cpu"}:
        raise GradcheckError(
            f"distributed={world} runs on CPU with gloo, but the model has tensors on "
            f"{', '.join(sorted(devices - {'cpu'}))}: move it to the CPU first"
        )


def _check_can_shard(model: nn.Module, world: int) -> None:
    if fully_shard_function() is None:
        raise GradcheckError(
            f"distributed={world}, distributed_strategy='fsdp' needs FSDP2's fully_shard "
            f"(torch >= 2.4), which torch {torch.__version__} does not have; use "
            "distributed_strategy='ddp'"
        )
    if sharded_stats(list(model.parameters())) is not None:
        raise GradcheckError(
            f"distributed={world}, distributed_strategy='fsdp' shards the model itself, but "
            f"{type(model).__name__} is sharded already: pass the unsharded module, or call "
            "check_gradients(model, batch) on every rank of your own process group"
        )


def _nccl() -> bool:
    import torch.distributed as dist

    return bool(dist.is_nccl_available())


def _placement(world: int, settings: Settings, cuda_devices: int, nccl: bool) -> list[str]:
    """The device of each rank of a sharded check: one GPU per rank with NCCL where this
    machine has ``world`` of them (or ``device='cuda'`` asks for them), else the CPU, gloo."""
    requested = settings.device
    chosen = torch.device(requested) if requested is not None else None
    kind = chosen.type if chosen is not None else None
    origin = settings.origins.get("device", "the settings")
    enough = cuda_devices >= world and nccl
    if kind is None and enough:
        return [f"cuda:{rank}" for rank in range(world)]
    if kind is None or kind == "cpu":
        return ["cpu"] * world
    if kind != "cuda":
        raise GradcheckError(
            f"distributed={world}, distributed_strategy='fsdp' runs on the CPU (gloo) or on "
            f"one CUDA device per process (NCCL); drop device={requested!r} (from {origin})"
        )
    if chosen is not None and chosen.index is not None:
        raise GradcheckError(
            f"distributed={world}, distributed_strategy='fsdp' puts rank r on cuda:r; "
            f"device={requested!r} (from {origin}) names one device: use device='cuda'"
        )
    if not enough:
        have = f"{cuda_devices} CUDA device(s)" + ("" if nccl else " and no NCCL")
        raise GradcheckError(
            f"distributed={world}, distributed_strategy='fsdp' with device='cuda' (from "
            f"{origin}) needs one CUDA device per process and NCCL, this machine has {have}; "
            f"use distributed={max(1, cuda_devices)} or device='cpu' (gloo)"
        )
    return [f"cuda:{rank}" for rank in range(world)]


def _batch_size(batch: Any) -> int | None:
    """The first dimension of the batch's first tensor that has one."""
    return next((int(t.shape[0]) for t in tensors(batch) if t.dim() > 0), None)


def _shards(batch: Any, world: int) -> list[Any]:
    """Split every tensor whose first dimension is the batch size into ``world`` shards."""
    size = _batch_size(batch)
    if size is None:
        raise GradcheckError(
            f"distributed={world} splits the sample batch along its first dimension, but the "
            "batch holds no tensor with one"
        )
    if size < world:
        raise GradcheckError(
            f"the sample batch has {size} sample(s), but distributed={world} needs at least "
            "one per process: use a larger batch or fewer processes"
        )

    def shard(rank: int) -> Any:
        def cut(value: torch.Tensor) -> torch.Tensor:
            if value.dim() > 0 and value.shape[0] == size:
                return torch.tensor_split(value, world)[rank].clone()
            return value

        return map_tensors(batch, cut)

    return [shard(rank) for rank in range(world)]


# -- processes ------------------------------------------------------------------------------


def _start_method() -> str:
    """fork on Linux (fast, see the module doc); spawn elsewhere, and once CUDA is initialised
    here: after a backward pass on a GPU, autograd's device threads make a forked child's
    backward fail ("Unable to handle autograd's threading in combination with fork-based
    multiprocessing"), even on the CPU."""
    cuda = torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
    methods = multiprocessing.get_all_start_methods()
    if sys.platform.startswith("linux") and "fork" in methods and not cuda:
        return "fork"
    return "spawn"


def _launch(
    model: nn.Module,
    shards: list[Any],
    settings: Settings,
    method: str,
    devices: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Run :func:`_rank_main` in ``len(shards)`` processes (rank r on ``devices[r]``, the CPU
    by default); return each rank's results."""
    __tracebackhide__ = True
    world = len(shards)
    context: Any = multiprocessing.get_context(method)
    devices = list(devices or ["cpu"] * world)
    if method == "fork":
        import torch._dynamo  # noqa: F401  (DDP's lazy import: once here, not in every child)

        if settings.distributed_strategy == "fsdp":
            fully_shard_function()  # FSDP2's modules: imported once here too
    store = tempfile.mkdtemp(prefix="gradcheck-ddp-")
    init_method = "file://" + os.path.join(store, "store")
    logs = [os.path.join(store, f"rank{rank}.stderr") for rank in range(world)]
    # A forked child gets private copy-on-write memory. Under spawn, multiprocessing's pickler
    # would move every tensor to shared memory, which the ranks (and this process) would then
    # write together; the standard pickler copies them.
    work: Any = (model, shards, settings)
    if method != "fork":
        try:
            work = pickle.dumps(work)
        except Exception as exc:
            raise GradcheckError(
                f"distributed={world} with the spawn start method pickles the model, the batch "
                f"and the settings: {type(exc).__name__}: {exc} (a lambda loss_fn or optimizer "
                "cannot be pickled: use a module-level function)"
            ) from None
    procs: list[Any] = []
    conns: list[Connection] = []
    try:
        for rank in range(world):
            receive, send = context.Pipe(duplex=False)
            proc = context.Process(
                target=_rank_main,
                args=(rank, world, init_method, work, send, logs[rank], devices[rank]),
                name=f"gradcheck-rank{rank}",
                daemon=True,
            )
            with warnings.catch_warnings():
                # Python >= 3.12 warns that fork() in a multi-threaded process may deadlock
                # the child; the children run torch only, and a hard timeout guards them.
                warnings.filterwarnings(
                    "ignore",
                    message=r".*fork\(\) may lead to deadlocks",
                    category=DeprecationWarning,
                )
                try:
                    proc.start()
                except Exception as exc:
                    raise GradcheckError(
                        f"could not start process {rank} of {world} with {method}: "
                        f"{type(exc).__name__}: {exc}"
                    ) from None
            send.close()
            procs.append(proc)
            conns.append(receive)
        return _collect(procs, conns, _limit(settings), method, logs)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join(5)
        for conn in conns:
            conn.close()
        shutil.rmtree(store, ignore_errors=True)


def _limit(settings: Settings) -> tuple[float, str, str]:
    """The hard limit of the processes in seconds, the setting it is and where that came
    from: ``timeout`` (one check's limit) where it is set and shorter than
    ``distributed_timeout``."""
    name = "distributed_timeout"
    if settings.timeout is not None and settings.timeout < settings.distributed_timeout:
        name = "timeout"
    return getattr(settings, name), name, settings.origins.get(name, "the defaults")


def _collect(
    procs: Sequence[Any],
    conns: Sequence[Connection],
    limit: tuple[float, str, str],
    method: str,
    logs: Sequence[str],
) -> list[dict[str, Any]]:
    """Read every rank's messages until all are done, one fails, or the time is up."""
    __tracebackhide__ = True
    world = len(procs)
    phase = ["starting"] * world
    results: list[dict[str, Any] | None] = [None] * world
    done = [False] * world
    timeout, setting, origin = limit
    deadline = time.monotonic() + timeout
    grace: float | None = None
    rank_of = {id(conn): rank for rank, conn in enumerate(conns)}
    while not all(done):
        now = time.monotonic()
        if all(r is not None for r in results):
            grace = grace if grace is not None else now + _TEARDOWN_GRACE
            if now > grace:  # the results are in; a stuck teardown is stopped, not fatal
                for rank in range(world):
                    if not done[rank]:
                        results[rank]["notes"].append(  # type: ignore[index]
                            f"rank {rank} did not shut down within {_TEARDOWN_GRACE:g} s of "
                            "sending its results and was stopped"
                        )
                break
        if now > deadline:
            where = "; ".join(
                f"rank {rank}: {'done' if done[rank] else phase[rank]}" for rank in range(world)
            )
            raise GradcheckTimeout(
                f"the distributed check ({world} processes, {method}) did not finish within "
                f"{timeout:g} s ({setting}) and was stopped; {where}. A rank blocked "
                "in a collective that another rank never joined (a rank-dependent number of "
                "forward passes or collectives, or a rank that died) hangs DDP; raise "
                f"{setting} (from {origin}) if the machine is just slow" + _stderr(logs)
            )
        pending = [conn for rank, conn in enumerate(conns) if not done[rank]]
        for conn in wait(pending, timeout=min(0.5, max(0.0, deadline - now))):
            assert isinstance(conn, Connection)
            rank = rank_of[id(conn)]
            try:
                message = conn.recv()
            except EOFError:
                procs[rank].join(5)
                if results[rank] is not None:
                    done[rank] = True  # exited after its results: nothing is lost
                    continue
                raise GradcheckError(
                    f"rank {rank} of {world} exited (code {procs[rank].exitcode}) during "
                    f"{phase[rank]} without a result" + _stderr(logs[rank : rank + 1], rank)
                ) from None
            kind = message[0]
            if kind == "phase":
                phase[rank] = message[1]
            elif kind == "result":
                results[rank] = message[1]
            elif kind == "done":
                done[rank] = True
            elif kind == "error":
                raise GradcheckError(
                    f"rank {rank} of {world} failed during {phase[rank]}: {message[1]}"
                )
    for proc in procs:
        proc.join(5)
    return [r for r in results if r is not None]


def _stderr(logs: Sequence[str], first: int = 0, lines: int = 12) -> str:
    """The last lines each rank wrote to its standard error (kept in a file, see
    :func:`_rank_main`), for a failure message."""
    parts: list[str] = []
    for rank, path in enumerate(logs, start=first):
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                tail = [line for line in handle.read().splitlines() if _NOISE not in line]
                tail = tail[-lines:]
        except OSError:
            continue
        if tail:
            parts.append(f"\nrank {rank} stderr (last {len(tail)} lines):\n  " + "\n  ".join(tail))
    return "".join(parts)


# -- one rank -------------------------------------------------------------------------------


def _rank_main(
    rank: int,
    world: int,
    init_method: str,
    work: tuple[nn.Module, list[Any], Settings] | bytes,
    conn: Connection,
    log: str,
    device: str = "cpu",
) -> None:
    """The body of one process: run the rank's passes, send plain results, shut down.

    Its standard error goes to ``log`` (DDP and gloo log there, e.g. a warning about
    ``find_unused_parameters``); the parent shows the end of it when the rank fails."""
    code = 0
    try:
        handle = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(handle, 2)
        os.close(handle)
        torch.set_num_threads(max(1, torch.get_num_threads() // world))
        # Our own bytes from the parent (spawn), never data from elsewhere.
        model, shards, settings = pickle.loads(work) if isinstance(work, bytes) else work
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # the parent's filters (pytest's "error") stay there
            if settings.distributed_strategy == "fsdp":
                payload = _sharded_rank_work(
                    rank, world, init_method, model, shards, settings, conn, device
                )
            else:
                payload = _rank_work(rank, world, init_method, model, shards, settings, conn)
        payload["notes"] = sorted(
            {str(w.message) for w in caught if w.category.__name__ == "GradcheckWarning"}
        )
        conn.send(("result", payload))
        conn.send(("phase", "teardown"))
        _teardown()
        conn.send(("done",))
    except BaseException as exc:
        code = 1
        text = str(exc) if isinstance(exc, GradcheckError) else _describe_error(exc)
        with contextlib.suppress(OSError):
            conn.send(("error", text))
    finally:
        try:
            conn.close()
        finally:
            os._exit(code)  # never run the parent's atexit handlers (pytest's) in a fork


def _describe_error(exc: BaseException) -> str:
    frames = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return f"{type(exc).__name__}: {exc}\n" + "".join(frames[-6:])


_DDP: list[Any] = []
"""The rank's DDP wrapper, kept for :func:`_teardown` (one per process)."""


def _teardown() -> None:
    import torch.distributed as dist

    _DDP.clear()  # ``del ddp``: its reducer must go before the process group
    dist.barrier()
    dist.destroy_process_group()


def _rank_work(
    rank: int,
    world: int,
    init_method: str,
    model: nn.Module,
    shards: list[Any],
    settings: Settings,
    conn: Connection,
) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from .engine import run_check
    from .passes import call, compute_loss

    conn.send(("phase", "init_process_group (gloo)"))
    dist.init_process_group(
        "gloo",
        init_method=init_method,
        rank=rank,
        world_size=world,
        # Longer than the parent's deadline: the parent, which sees every rank, reports a hang.
        timeout=timedelta(seconds=settings.distributed_timeout + 30),
    )
    local = dataclasses.replace(settings, distributed=1, device="cpu", timeout=None)
    shard = shards[rank]
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    model.train(settings.mode == "train")
    conn.send(("phase", "wrapping the model in DistributedDataParallel"))
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    _DDP.append(ddp)

    # 1. DDP pass on the rank's shard: used parameters, all-reduced gradients, parameters.
    conn.send(("phase", "the DDP pass on its shard"))
    model.zero_grad(set_to_none=True)
    torch.manual_seed(settings.seed)
    with torch.enable_grad():
        loss = compute_loss(call(ddp, shard), local, model)
        reached = _reached(loss)
        loss.backward()  # type: ignore[no-untyped-call]
    used = [name for name, p in named if id(p) in reached]
    grads = _differences([(p.grad, p.numel()) for _, p in named])
    params = _differences([(p.detach(), p.numel()) for _, p in named])

    # 2. The bare module on the same input on every rank (no DDP hooks outside its forward).
    conn.send(("phase", "the same-input pass"))
    model.zero_grad(set_to_none=True)
    torch.manual_seed(settings.seed)
    with torch.enable_grad():
        probe_loss = compute_loss(call(model, shards[0]), local, model)
        probe_loss.backward()  # type: ignore[no-untyped-call]
    probe = _differences([(p.grad, p.numel()) for _, p in named])
    model.zero_grad(set_to_none=True)

    # 3. The ordinary check of the DDP model: every rank's gradients must be healthy.
    conn.send(("phase", "the gradient check of the DDP model"))
    report = run_check(ddp, shard, local)
    return {
        "rank": rank,
        "report": report,
        "names": [name for name, _ in named],
        "used": used,
        "loss": float(loss.detach()),
        "grads": grads,
        "params": params,
        "probe": probe,
        "shard": _batch_size(shard),
    }


def _sharded_rank_work(
    rank: int,
    world: int,
    init_method: str,
    model: nn.Module,
    shards: list[Any],
    settings: Settings,
    conn: Connection,
    device_name: str,
) -> dict[str, Any]:
    """One rank of ``distributed_strategy="fsdp"``: shard the model over every rank, run
    the ordinary check on the rank's shard of the batch (the statistics are gathered across
    the ranks, so every rank reaches the same report)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from .engine import run_check

    device = torch.device(device_name)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    conn.send(("phase", f"init_process_group ({backend})"))
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=settings.distributed_timeout + 30),
    )
    mesh = init_device_mesh(device.type, (world,))
    conn.send(("phase", "sharding the model (fully_shard)"))
    model.to(device)
    sharded = shard(model, mesh)
    conn.send(("phase", "the gradient check of the sharded model"))
    shard_of_batch = shards[rank]
    report = run_check(
        model,
        shard_of_batch,
        # the parent holds the time limit: it stops every rank alike
        dataclasses.replace(settings, distributed=1, device=device_name, timeout=None),
    )
    return {
        "rank": rank,
        "report": report,
        "blocks": sharded,
        "shard": _batch_size(shard_of_batch),
    }


def _reached(loss: torch.Tensor) -> set[int]:
    """The ids of the leaf tensors (parameters) the loss's autograd graph reaches."""
    found: set[int] = set()
    seen: set[Any] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            found.add(id(variable))
        stack.extend(child for child, _ in node.next_functions)
    return found


def _differences(tensors: Sequence[tuple[torch.Tensor | None, int]]) -> list[float]:
    """Per tensor, this rank's largest difference from rank 0's values, relative to rank 0's
    largest magnitude (inf when only one of the two has a tensor). One broadcast in all."""
    import torch.distributed as dist

    present = torch.tensor([t is not None for t, _ in tensors], dtype=torch.float32)
    flat = torch.cat(
        [
            (t.to_dense() if t.is_sparse else t).detach().reshape(-1).float()
            if t is not None
            else torch.zeros(numel)
            for t, numel in tensors
        ]
    )
    mine = torch.cat([present, flat])
    theirs = mine.clone()
    dist.broadcast(theirs, src=0)
    count = len(tensors)
    differences: list[float] = []
    offset = count
    for index, (_, numel) in enumerate(tensors):
        if bool(mine[index] != theirs[index]):
            differences.append(float("inf"))
        elif numel == 0 or not bool(mine[index]):
            differences.append(0.0)
        else:
            a = mine[offset : offset + numel]
            b = theirs[offset : offset + numel]
            scale = float(b.abs().max())
            gap = float((a - b).abs().max())
            differences.append(gap / scale if scale > 0 else gap)
        offset += numel
    return differences


# -- one report -----------------------------------------------------------------------------


def _layer(name: str) -> str:
    return name.rpartition(".")[0] or "<root>"


def _ranks(ranks: Sequence[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)


def _merge(
    results: Sequence[dict[str, Any]], settings: Settings, method: str, seconds: float
) -> Report:
    """One report from every rank's: health per rank, unused per rank, rank mismatches."""
    world = len(results)
    base: Report = results[0]["report"]
    names: list[str] = results[0]["names"]
    numel = {p.name: p.numel for layer in base.layers for p in layer.params}
    # Every rank's own check (unused parameters come from the per-rank graph below).
    problems = _every_ranks(results, skip="unused")

    if settings.unused:
        for name in names:
            missing = [r["rank"] for r in results if name not in r["used"]]
            if not missing:
                continue
            if len(missing) == world:
                where = f"on every rank ({world} of {world})"
            else:
                users = [r["rank"] for r in results if name in r["used"]]
                where = f"on {_ranks(missing)} (used on {_ranks(users)})"
            problems.append(
                Problem(
                    kind="unused",
                    layer=_layer(name),
                    param=name,
                    value=float(numel.get(name, 0)),
                    limit=None,
                    message=f"trainable parameter received no gradient {where}",
                    hint=_UNUSED_HINT,
                )
            )

    problems += _mismatches(results, names)
    problems.sort(key=Problem.sort_key)
    losses = ", ".join(f"{r['loss']:.4g}" for r in results)
    shards = ", ".join(str(r["shard"]) for r in results)
    headline = (
        f"DistributedDataParallel in {world} processes ({method}, gloo); samples per rank: "
        f"{shards}; loss per rank: {losses}"
    )
    return _merged(
        base, results, problems, headline, f"cpu x{world} (DDP, gloo)", seconds, settings
    )


def _merged(
    base: Report,
    results: Sequence[dict[str, Any]],
    problems: Sequence[Problem],
    headline: str,
    device: str,
    seconds: float,
    settings: Settings,
) -> Report:
    """The parent's report: ``base`` with every rank's problems and notes (each once, a
    rank's own notes named by rank) after ``headline``."""
    notes = [headline]
    for result in results:
        notes += [note for note in result["report"].notes if note not in notes]
        notes += [f"rank {result['rank']}: {note}" for note in result["notes"]]
    return dataclasses.replace(
        base,
        problems=tuple(problems),
        notes=tuple(notes),
        device=device,
        seconds=seconds,
        settings=settings.to_dict(),
    )


def _every_ranks(results: Sequence[dict[str, Any]], skip: str = "") -> list[Problem]:
    """The problems of every rank's own check, once each; one that only some ranks found
    says on which."""
    world = len(results)
    found: dict[tuple[str, str, str | None], tuple[Problem, list[int]]] = {}
    for result in results:
        for problem in result["report"].problems:
            if problem.kind == skip:
                continue
            key = (problem.kind, problem.layer, problem.param)
            found.setdefault(key, (problem, []))[1].append(result["rank"])
    problems: list[Problem] = []
    for problem, ranks in found.values():
        if len(ranks) < world:
            problem = dataclasses.replace(
                problem, message=f"{problem.message} (on {_ranks(ranks)})"
            )
        problems.append(problem)
    return problems


def _merge_sharded(
    results: Sequence[dict[str, Any]],
    settings: Settings,
    method: str,
    devices: Sequence[str],
    seconds: float,
) -> Report:
    """One report from every rank's check of the sharded model (the same on every rank but
    for a problem the ranks see differently, which says on which)."""
    world = len(results)
    base: Report = results[0]["report"]
    problems = _every_ranks(results)
    problems.sort(key=Problem.sort_key)
    kind = torch.device(devices[0]).type
    backend = "nccl" if kind == "cuda" else "gloo"
    blocks: list[str] = results[0]["blocks"]
    shards = ", ".join(str(r["shard"]) for r in results)
    headline = (
        f"FSDP2 in {world} processes ({method}, {backend}): fully_shard on {len(blocks)} "
        f"block(s), then the root; samples per rank: {shards}; loss (the mean over the "
        f"ranks): {base.loss:.4g}"
    )
    device = f"{kind} x{world} (FSDP2, {backend})"
    return _merged(base, results, problems, headline, device, seconds, settings)


def _mismatches(results: Sequence[dict[str, Any]], names: Sequence[str]) -> list[Problem]:
    """rank_mismatch problems, one per layer: parameters, all-reduced gradients, gradients on
    the same input. Different parameters explain the same-input differences, which are then
    left out."""
    checks = [
        (
            "params",
            "the values of {params} on {ranks} differ from rank 0's after one forward ({gap}): "
            "the forward writes them in place on each rank (data-dependent initialisation?), "
            "after DDP's start-up broadcast",
        ),
        (
            "grads",
            "the gradients of {params} on {ranks} differ from rank 0's after DDP's all-reduce "
            "({gap}): DDP did not synchronise them (a parameter DDP ignores, no_sync(), or a "
            "communication hook)",
        ),
        (
            "probe",
            "with the same input on every rank, the gradients of {params} on {ranks} differ "
            "from rank 0's ({gap}): the forward depends on the rank or on state DDP does not "
            "synchronise (a plain tensor attribute, a rank-dependent branch or seed)",
        ),
    ]
    problems: list[Problem] = []
    for key, template in checks:
        if key == "probe" and any(p.message.startswith("the values of") for p in problems):
            continue
        layers: dict[str, list[tuple[str, int, float]]] = {}
        for index, name in enumerate(names):
            for result in results:
                gap = result[key][index]
                if gap > _TOLERANCE:
                    layers.setdefault(_layer(name), []).append((name, result["rank"], gap))
        for layer, found in layers.items():
            params = sorted({name for name, _, _ in found}, key=names.index)
            worst = max(gap for _, _, gap in found)
            problems.append(
                Problem(
                    kind="rank_mismatch",
                    layer=layer,
                    param=None,
                    value=worst,
                    limit=_TOLERANCE,
                    message=template.format(
                        params=", ".join(params),
                        ranks=_ranks(sorted({rank for _, rank, _ in found})),
                        gap=(
                            "present on one rank, missing on the other"
                            if worst == float("inf")
                            else f"by up to {worst:.2g} of rank 0's largest value"
                        ),
                    ),
                    hint=_MISMATCH_HINT,
                )
            )
    return problems
