"""Distributed data parallel checks: ``distributed=2`` on the CPU with gloo, and a model
already wrapped in DistributedDataParallel.

Every test here starts processes, so each has two hard limits: the check's own
``distributed_timeout`` (the parent stops the ranks and fails with where each one was) and,
should the test process itself ever block, a faulthandler watchdog that dumps every thread's
stack and ends the process: a hang fails, it never stalls CI.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from fixtures import training
from pytest_gradcheck import GradcheckError, GradcheckTimeout, check_gradients

TIMEOUT = 60.0
"""distributed_timeout of every check here; a healthy 2-process check takes well under 1 s
once torch._dynamo is imported (about 2 s, once per process)."""
WATCHDOG = 150.0


def _cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _gloo() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


pytestmark = [
    pytest.mark.skipif(not _gloo(), reason="this torch has no torch.distributed with gloo"),
    pytest.mark.skipif(
        _cpus() < 2, reason=f"2 processes need 2 CPUs, this machine gives {_cpus()}"
    ),
]


@pytest.fixture(autouse=True)
def _watchdog() -> Iterator[None]:
    faulthandler.dump_traceback_later(WATCHDOG, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert multiprocessing.active_children() == []  # every rank was reaped


def test_identical_ranks_pass_and_paths_have_no_module_prefix() -> None:
    model, batch = training.regression()
    report = check_gradients(model, batch, distributed=2, distributed_timeout=TIMEOUT)
    assert report.ok, report.format_failure()
    assert [layer.name for layer in report.layers] == ["fc1", "fc2", "head"]
    assert [p.name for p in report.layers[0].params] == ["fc1.weight", "fc1.bias"]
    assert report.device == "cpu x2 (DDP, gloo)"
    assert "DistributedDataParallel in 2 processes" in report.notes[0]
    assert "samples per rank: 16, 16" in report.notes[0]
    assert report.settings["distributed"] == 2


def test_a_rank_dependent_forward_is_caught_and_named() -> None:
    model, batch = training.rank_scaled()
    report = check_gradients(model, batch, distributed=2, distributed_timeout=TIMEOUT)
    assert {p.kind for p in report.problems} == {"rank_mismatch"}
    assert [p.layer for p in report.problems] == ["fc1", "fc2", "head"]
    message = report.problems[0].message
    assert "with the same input on every rank" in message
    assert "fc1.weight, fc1.bias on rank 1" in message
    assert "registered buffers" in report.problems[0].hint


def test_state_that_ddp_does_not_broadcast_is_caught() -> None:
    model, batch = training.unsynced_stat()
    report = check_gradients(model, batch, distributed=2, distributed_timeout=TIMEOUT)
    assert {p.kind for p in report.problems} == {"rank_mismatch"}
    assert "fc1" in {p.layer for p in report.problems}


def test_data_dependent_initialisation_is_named_at_the_parameter() -> None:
    model, batch = training.data_init()
    report = check_gradients(model, batch, distributed=2, distributed_timeout=TIMEOUT)
    [problem] = report.problems
    assert problem.kind == "rank_mismatch"
    assert problem.layer == "<root>"
    assert "the values of gain on rank 1 differ from rank 0's after one forward" in (
        problem.message
    )


def test_an_unused_parameter_is_named_on_every_rank() -> None:
    model, batch = training.unused_head()
    report = check_gradients(model, batch, distributed=2, distributed_timeout=TIMEOUT)
    assert [(p.kind, p.param) for p in report.problems] == [
        ("unused", "aux_head.weight"),
        ("unused", "aux_head.bias"),
    ]
    assert "on every rank (2 of 2)" in report.problems[0].message
    assert "find_unused_parameters" in report.problems[0].hint


def test_a_parameter_unused_on_one_rank_names_that_rank() -> None:
    model, batch = training.rank_branch()
    report = check_gradients(model, batch, distributed=2, distributed_timeout=TIMEOUT)
    unused = {p.param: p.message for p in report.problems if p.kind == "unused"}
    assert set(unused) == {"head.weight", "head.bias", "head_b.weight", "head_b.bias"}
    assert unused["head.weight"].endswith("on rank 1 (used on rank 0)")
    assert unused["head_b.weight"].endswith("on rank 0 (used on rank 1)")
    assert "rank_mismatch" in {p.kind for p in report.problems}  # the branch is the rank's


def test_training_steps_run_under_ddp() -> None:
    model, batch = training.regression()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = check_gradients(
        model,
        batch,
        distributed=2,
        distributed_timeout=TIMEOUT,
        steps=3,
        optimizer="sgd",
        lr=0.1,
        expect_loss_decrease=True,
    )
    assert report.ok, report.format_failure()
    assert sum("checked 3 of 3" in note for note in report.notes) == 2  # one per rank
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])  # the ranks trained copies, in other processes


def test_every_ranks_gradients_must_be_healthy() -> None:
    model, batch = training.regression()
    report = check_gradients(
        model, batch, distributed=2, distributed_timeout=TIMEOUT, max_norm=1e-6
    )
    assert {p.kind for p in report.problems} == {"exploding"}
    assert {p.layer for p in report.problems} == {"fc1", "fc2", "head"}


# -- failures are clear, never hangs -------------------------------------------------------------


class Stuck(nn.Module):
    """Rank 1 never returns from its forward: rank 0 waits in the all-reduce."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if dist.get_rank() == 1:
            time.sleep(3600)
        return self.fc(x)


class Raises(Stuck):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if dist.get_rank() == 1:
            raise ValueError("the model refuses rank 1")
        return self.fc(x)


def test_a_hang_becomes_a_clear_failure_within_the_timeout() -> None:
    from pytest_gradcheck.distributed import _start_method

    timeout = 3 if _start_method() == "fork" else 45  # spawn: each rank re-imports torch
    started = time.monotonic()
    with pytest.raises(GradcheckError) as caught:
        check_gradients(Stuck(), torch.randn(8, 4), distributed=2, distributed_timeout=timeout)
    assert time.monotonic() - started < timeout + 25
    message = str(caught.value)
    assert f"did not finish within {timeout} s (distributed_timeout) and was stopped" in message
    assert "rank 0: the DDP pass on its shard; rank 1: the DDP pass on its shard" in message


def test_a_shorter_check_timeout_stops_the_processes_and_is_named() -> None:
    from pytest_gradcheck.distributed import _start_method

    timeout = 3 if _start_method() == "fork" else 45
    with pytest.raises(GradcheckTimeout) as caught:
        check_gradients(Stuck(), torch.randn(8, 4), distributed=2, timeout=timeout)
    message = str(caught.value)
    assert f"did not finish within {timeout} s (timeout) and was stopped" in message
    assert "raise timeout (from check_gradients() arguments) if the machine is just slow" in message


def test_an_error_on_one_rank_names_the_rank() -> None:
    with pytest.raises(GradcheckError, match=r"rank 1 of 2 failed during the DDP pass.*refuses"):
        check_gradients(Raises(), torch.randn(8, 4), distributed=2, distributed_timeout=TIMEOUT)


@pytest.mark.parametrize(
    ("batch", "settings", "message"),
    [
        (torch.randn(1, 4), {}, "has 1 sample.*needs at least one per process"),
        (torch.randn(8, 4), {"device": "cuda"}, "runs on CPU with gloo; drop device='cuda'"),
        (torch.tensor(1.0), {}, "holds no tensor with one"),
    ],
)
def test_bad_input_fails_before_starting_processes(
    batch: torch.Tensor, settings: dict[str, object], message: str
) -> None:
    with pytest.raises(GradcheckError, match=message):
        check_gradients(nn.Linear(4, 2), batch, distributed=2, **settings)


# -- a model the user wrapped ---------------------------------------------------------------------


def test_a_ddp_wrapped_model_is_checked_without_the_module_prefix(tmp_path: Path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model, batch = training.unused_head()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model, find_unused_parameters=True)
        report = check_gradients(ddp, batch, device="cpu")
        with pytest.raises(GradcheckError, match="already in one"):
            check_gradients(model, batch, distributed=2)
        del ddp
    finally:
        dist.barrier()
        dist.destroy_process_group()
    assert [layer.name for layer in report.layers] == ["fc1", "fc2", "head", "aux_head"]
    assert [p.param for p in report.problems] == ["aux_head.weight", "aux_head.bias"]
    assert all(p.grad is None for p in model.parameters())


def test_fork_is_the_start_method_on_linux_until_cuda_is_initialised() -> None:
    from pytest_gradcheck.distributed import _start_method

    fork = sys.platform.startswith("linux") and not torch.cuda.is_initialized()
    assert _start_method() == ("fork" if fork else "spawn")
