"""Sharded and compiled models: FSDP2 (``fully_shard``) checks equal the unsharded check, in
each rank of the user's own process group and with ``distributed_strategy="fsdp"``; the
strategy setting; the device each rank gets; ``torch.compile``'d models.

Every test that starts processes has two hard limits, as in ``test_distributed.py``: the
check's own ``distributed_timeout`` and a faulthandler watchdog that ends a blocked test.
"""

from __future__ import annotations

import contextlib
import faulthandler
import multiprocessing
import os
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

from fixtures import models, training
from pytest_gradcheck import GradcheckError, Report, check_gradients
from pytest_gradcheck.settings import Settings, resolve

TIMEOUT = 60.0
WATCHDOG = 150.0
RTOL = 1e-4
"""Per-layer norms of the unsharded, DDP and FSDP checks agree to fp32 reduction order."""


def _cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _fsdp() -> bool:
    import torch.distributed as dist

    from pytest_gradcheck.sharded import fully_shard_function

    return dist.is_available() and dist.is_gloo_available() and fully_shard_function() is not None


needs_ranks = pytest.mark.skipif(
    not _fsdp() or _cpus() < 2,
    reason=f"needs gloo, FSDP2's fully_shard and 2 CPUs (this machine has {_cpus()})",
)


@pytest.fixture
def watchdog() -> Iterator[None]:
    faulthandler.dump_traceback_later(WATCHDOG, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert multiprocessing.active_children() == []  # every rank was reaped


def mean_square(output: torch.Tensor) -> torch.Tensor:
    """A per-sample mean: the loss whose gradient DDP and FSDP average across the ranks (the
    default loss is a random projection of each rank's own output)."""
    return output.pow(2).mean()


def _vanishing() -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    model = models.mlp(12, 16, "sigmoid", out_features=3)
    return model, torch.randn(16, 16)


def _healthy() -> tuple[nn.Module, Any]:
    return training.regression()


CASES = {"healthy": _healthy, "vanishing": _vanishing}


def _settings(case: str) -> dict[str, Any]:
    return {} if case == "healthy" else {"loss_fn": mean_square}


def _worst(report: Report, reference: Report) -> float:
    """The largest relative difference of a layer's gradient norm from the reference's."""
    assert [layer.name for layer in report.layers] == [layer.name for layer in reference.layers]
    return max(
        abs(a.grad_norm - b.grad_norm) / b.grad_norm
        for a, b in zip(report.layers, reference.layers, strict=True)
    )


def _verdict(report: Report) -> list[tuple[str, str, str | None, str, str]]:
    return [(p.kind, p.layer, p.param, p.message, p.hint) for p in report.problems]


# -- the user's own process group: check_gradients in every rank -----------------------------


def _in_ranks(body: Callable[[int, int], Any], world: int = 2) -> list[Any]:
    """Run ``body(rank, world)`` in ``world`` forked processes of one gloo group (as torchrun
    would start them); return each rank's result, or fail with a rank's traceback."""
    if "fork" not in multiprocessing.get_all_start_methods() or not sys.platform.startswith(
        "linux"
    ):
        pytest.skip("the in-rank tests fork their ranks (Linux)")
    import torch._dynamo  # noqa: F401  (imported once here, not in every rank)

    from pytest_gradcheck.sharded import fully_shard_function

    fully_shard_function()
    context: Any = multiprocessing.get_context("fork")
    store = tempfile.mkdtemp(prefix="gradcheck-test-")
    procs, conns = [], []
    for rank in range(world):
        receive, send = context.Pipe(duplex=False)
        proc = context.Process(
            target=_rank, args=(body, rank, world, f"file://{store}/store", send), daemon=True
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*fork\(\) may lead to deadlocks")
            proc.start()
        send.close()
        procs.append(proc)
        conns.append(receive)
    results = []
    try:
        for rank, conn in enumerate(conns):
            assert conn.poll(TIMEOUT), f"rank {rank} sent nothing within {TIMEOUT} s"
            kind, value = conn.recv()
            assert kind == "ok", f"rank {rank} failed:\n{value}"
            results.append(value)
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return results


def _rank(body: Callable[[int, int], Any], rank: int, world: int, init: str, conn: Any) -> None:
    import torch.distributed as dist

    code = 0
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        try:
            conn.send(("ok", body(rank, world)))
        except BaseException as exc:
            conn.send(("error", "".join(traceback.format_exception(exc))))
        finally:
            dist.barrier()
            dist.destroy_process_group()
    except BaseException:
        code = 1
    finally:
        conn.close()
        os._exit(code)  # never the parent's (pytest's) atexit handlers in a fork


def _sharded(model: nn.Module) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh

    from pytest_gradcheck.sharded import shard

    shard(model, init_device_mesh("cpu", (dist_world(),)))
    return model


def dist_world() -> int:
    import torch.distributed as dist

    return dist.get_world_size()


@contextlib.contextmanager
def _counting() -> Iterator[list[int]]:
    """Count the collectives torch.distributed runs in the block."""
    import torch.distributed as dist

    count = [0]
    names = ["all_gather_single", "reduce_scatter_single", "all_reduce", "all_gather_object"]
    saved = {name: getattr(dist, name) for name in names if hasattr(dist, name)}

    def counted(function: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            count[0] += 1
            return function(*args, **kwargs)

        return call

    for name, function in saved.items():
        setattr(dist, name, counted(function))
    try:
        yield count
    finally:
        for name, function in saved.items():
            setattr(dist, name, function)


def _check_in_rank(case: str) -> Callable[[int, int], dict[str, Any]]:
    def body(rank: int, world: int) -> dict[str, Any]:
        model, batch = CASES[case]()
        _sharded(model)
        shard = _cut(batch, world, rank)
        first = next(model.parameters())
        kept = torch.zeros_like(first)  # a .grad the user had: the check leaves it
        first.grad = kept
        before = [p.detach().to_local().clone() for p in model.parameters()]
        with _counting() as bare:
            model.zero_grad()
            out = model(*shard) if isinstance(shard, tuple) else model(shard)
            (out if case == "healthy" else mean_square(out)).backward()
        model.zero_grad()
        first.grad = kept
        with _counting() as checked:
            report = check_gradients(model, shard, device="cpu", **_settings(case))
        # Optimizer steps run on the sharded parameters and are written back, bit for bit.
        check_gradients(model, shard, device="cpu", steps=2, optimizer="sgd", **_settings(case))
        after = list(model.parameters())
        return {
            "report": report,
            "added": checked[0] - bare[0],
            "restored": all(
                type(p).__name__ == "DTensor" and torch.equal(p.detach().to_local(), b)
                for p, b in zip(after, before, strict=True)
            ),
            "grad_kept": first.grad is kept,
        }

    return body


def _cut(batch: Any, world: int, rank: int) -> Any:
    if isinstance(batch, tuple):
        return tuple(torch.tensor_split(t, world)[rank] for t in batch)
    return torch.tensor_split(batch, world)[rank]


@pytest.mark.usefixtures("watchdog")
@pytest.mark.parametrize("case", ["healthy", "vanishing"])
@needs_ranks
def test_a_model_sharded_in_every_rank_is_checked_like_the_unsharded_one(
    case: str,
) -> None:
    model, batch = CASES[case]()
    reference = check_gradients(model, batch, device="cpu", **_settings(case))
    ranks = _in_ranks(_check_in_rank(case))
    for result in ranks:
        report = result["report"]
        assert _worst(report, reference) < RTOL
        assert report.ok is reference.ok
        assert _verdict(report) == _verdict(reference)  # hints too: the graph walk sees FSDP's
        assert [p.name for layer in report.layers for p in layer.params] == [
            p.name for layer in reference.layers for p in layer.params
        ]
        assert report.loss == pytest.approx(reference.loss, rel=RTOL)
        assert result["restored"]
        assert result["grad_kept"]
        assert result["added"] == 3  # batch agreement, statistics, loss: not one per parameter
    first, second = (r["report"] for r in ranks)
    assert [layer.grad_norm for layer in first.layers] == [
        layer.grad_norm for layer in second.layers
    ]  # every rank combines the same figures in the same order: bit-identical
    assert reference.ok is (case == "healthy")


def _mismatched(rank: int, world: int) -> str:
    model, _ = training.regression()
    _sharded(model)
    features = 8 if rank == 0 else 5  # rank 1 passes the wrong batch
    batch = (torch.randn(4, features), torch.randn(4, 4))
    with pytest.raises(GradcheckError) as caught:
        check_gradients(model, batch, device="cpu")
    return str(caught.value)


@pytest.mark.usefixtures("watchdog")
@needs_ranks
def test_mismatched_batches_fail_on_every_rank_naming_the_rank() -> None:
    messages = _in_ranks(_mismatched)
    assert messages[0] == messages[1]
    expected = "the sample batch differs across ranks of the sharded model: rank 1 passed"
    assert expected in messages[0]
    assert "[0]: float32 [N, 5]" in messages[0]
    assert "[0]: float32 [N, 8]" in messages[0]


# -- distributed=N, distributed_strategy="fsdp" ------------------------------------------------


@pytest.mark.usefixtures("watchdog")
@pytest.mark.parametrize("case", ["healthy", "vanishing"])
@needs_ranks
def test_fsdp_and_ddp_checks_equal_the_unsharded_check(case: str) -> None:
    model, batch = CASES[case]()
    settings = {**_settings(case), "distributed_timeout": TIMEOUT}
    reference = check_gradients(model, batch, device="cpu", activations=True, **_settings(case))
    ddp = check_gradients(model, batch, distributed=2, **settings)
    fsdp = check_gradients(
        model, batch, distributed=2, distributed_strategy="fsdp", activations=True, **settings
    )
    for report in (ddp, fsdp):
        assert _worst(report, reference) < RTOL
        assert report.ok is reference.ok is (case == "healthy")
        assert [(p.kind, p.layer) for p in report.problems] == [
            (p.kind, p.layer) for p in reference.problems
        ]
    assert _verdict(fsdp) == _verdict(reference)
    # Activation gradients of the whole batch, from every rank's share of it.
    assert [name for name, _ in fsdp.activation_grads] == [
        name for name, _ in reference.activation_grads
    ]
    for (_, mine), (_, theirs) in zip(
        fsdp.activation_grads, reference.activation_grads, strict=True
    ):
        assert mine == pytest.approx(theirs, rel=RTOL)
    assert fsdp.device == "cpu x2 (FSDP2, gloo)"
    half = len(batch[0] if isinstance(batch, tuple) else batch) // 2
    assert "FSDP2 in 2 processes" in fsdp.notes[0]
    assert f"samples per rank: {half}, {half}" in fsdp.notes[0]
    assert fsdp.settings["distributed_strategy"] == "fsdp"
    assert all(type(p) is nn.Parameter and p.grad is None for p in model.parameters())


class _Raises(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if dist.get_rank() == 1:
            raise ValueError("the model refuses rank 1")
        return self.fc(x)


@pytest.mark.usefixtures("watchdog")
@needs_ranks
def test_a_rank_that_raises_is_named() -> None:
    with pytest.raises(
        GradcheckError,
        match=r"rank 1 of 2 failed during the gradient check of the sharded model.*refuses",
    ):
        check_gradients(
            _Raises(),
            torch.randn(8, 4),
            distributed=2,
            distributed_strategy="fsdp",
            distributed_timeout=TIMEOUT,
        )


# -- the setting and the device of each rank ---------------------------------------------------


def test_the_strategy_setting_is_validated_with_its_origin() -> None:
    assert Settings().distributed_strategy == "ddp"
    assert resolve([("x", {"distributed_strategy": " FSDP "})]).distributed_strategy == "fsdp"
    with pytest.raises(GradcheckError) as caught:
        resolve([("the gradient_health marker on test_x", {"distributed_strategy": "fsd"})])
    message = str(caught.value)
    assert "distributed_strategy='fsd' from the gradient_health marker on test_x" in message
    assert "must be one of ddp, fsdp" in message
    assert "did you mean 'fsdp'?" in message


def test_the_strategy_is_an_option_and_an_ini_key(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ngradcheck_distributed_strategy = fsdp\n")
    pytester.makepyfile(
        """
        def test_settings(request):
            assert request.config.getini("gradcheck_distributed_strategy") == "fsdp"
        """
    )
    pytester.runpytest().assert_outcomes(passed=1)
    bad = pytester.runpytest("--gradcheck-distributed-strategy=fdsp")
    assert bad.ret != 0
    bad.stderr.fnmatch_lines(["*distributed_strategy must be one of ddp, fsdp*fsdp*"])
    pytester.runpytest("--help").stdout.fnmatch_lines(
        ["*--gradcheck-distributed-strategy*", "*ddp or fsdp*"]
    )


@pytest.mark.parametrize(
    ("device", "gpus", "nccl", "expected"),
    [
        (None, 2, True, ["cuda:0", "cuda:1"]),  # one GPU per rank
        (None, 4, True, ["cuda:0", "cuda:1"]),
        (None, 1, True, ["cpu", "cpu"]),  # too few GPUs: gloo on the CPU
        (None, 2, False, ["cpu", "cpu"]),  # no NCCL
        ("cpu", 2, True, ["cpu", "cpu"]),
        ("cuda", 2, True, ["cuda:0", "cuda:1"]),
        ("cuda", 1, True, "needs one CUDA device per process and NCCL, this machine has 1"),
        ("cuda", 2, False, "has 2 CUDA device\\(s\\) and no NCCL"),
        ("cuda:1", 2, True, "puts rank r on cuda:r; device='cuda:1'"),
        ("mps", 0, False, "drop device='mps' \\(from x\\)"),
    ],
)
def test_each_rank_gets_a_gpu_only_when_there_is_one_per_rank(
    device: str | None, gpus: int, nccl: bool, expected: list[str] | str
) -> None:
    from pytest_gradcheck.distributed import _placement

    settings = resolve([("x", {"device": device, "distributed": 2})])
    if isinstance(expected, list):
        assert _placement(2, settings, gpus, nccl) == expected
    else:
        with pytest.raises(GradcheckError, match=expected):
            _placement(2, settings, gpus, nccl)


def test_blocks_are_the_children_holding_parameters_and_the_entries_of_lists() -> None:
    from pytest_gradcheck.sharded import blocks

    model = models.mlp(3, 4)  # layers: a ModuleList (no forward of its own)
    assert [name for name, _ in blocks(model)] == ["layers.0", "layers.1", "layers.2"]
    model2 = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Sequential(nn.Linear(2, 2)))
    assert [name for name, _ in blocks(model2)] == ["0", "2"]


def test_an_unsharded_model_costs_no_sharded_machinery() -> None:
    from pytest_gradcheck.sharded import sharded_stats

    assert sharded_stats(list(nn.Linear(2, 2).parameters())) is None


# -- torch.compile -----------------------------------------------------------------------------


def _compiled(model: nn.Module, backend: str = "eager") -> nn.Module:
    compiled = torch.compile(model, backend=backend)
    assert isinstance(compiled, nn.Module)
    return compiled


def test_a_compiled_model_is_reported_under_its_own_names() -> None:
    model, batch = training.regression()
    reference = check_gradients(model, batch, device="cpu")
    report = check_gradients(_compiled(model), batch, device="cpu")
    assert [layer.name for layer in report.layers] == ["fc1", "fc2", "head"]
    assert [p.name for p in report.layers[0].params] == ["fc1.weight", "fc1.bias"]
    assert _worst(report, reference) < RTOL
    assert report.ok
    assert report.notes == ()
    assert all(p.grad is None for p in model.parameters())


def test_what_compiled_code_cannot_give_is_a_note() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.BatchNorm1d(8), nn.Linear(8, 2))
    report = check_gradients(_compiled(model), torch.randn(6, 4), device="cpu", activations=True)
    assert report.activation_grads == ()
    assert any(
        note.startswith("activations=True: no activation gradient was recorded")
        and "model._orig_mod" in note
        for note in report.notes
    )
    assert any("BatchNorm's values per channel were not counted" in n for n in report.notes)


class _Log(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.log(self.a(x) - 100))  # log of a negative number: NaN


def test_the_nan_origin_of_a_compiled_model_is_found_eagerly() -> None:
    torch.manual_seed(0)
    report = check_gradients(_compiled(_Log(), "aot_eager"), torch.randn(4, 4), device="cpu")
    assert {p.kind for p in report.problems} == {"nonfinite"}
    assert "NaN first appears" in report.diagnosis[0]
    assert "LogBackward0" in report.diagnosis[0]
    assert "the NaN/Inf origin search re-ran the uncompiled module eagerly" in report.notes
