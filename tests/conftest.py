"""Shared test setup: pin torch to one thread (2-core CI machines; see README, "Threads")."""

from __future__ import annotations

import contextlib
import importlib
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest
import torch

# pytester's in-process runs restore sys.modules afterwards, dropping modules that a run
# imported first; torch's C++ operator registrations survive that, so importing such a module
# again fails ("Only a single TORCH_LIBRARY can be used to register the namespace symm_mem")
# and takes transformers' model imports down with it. Import it once, up front.
import torch.distributed._symmetric_memory

# The same for matplotlib (the [plot] extra): a chart drawn first inside an in-process run
# drops the matplotlib modules afterwards, and a second copy of them fails in the outer test
# ("Single argument to subplot must be a three-digit integer, not GridSpec").
with contextlib.suppress(ImportError):  # the [plot] extra may not be installed
    importlib.import_module("matplotlib.figure")

import pytest_gradcheck

torch.set_num_threads(1)

# pytester's in-process runs mark the installed plugins for assertion rewriting again. For this
# editable install pytest finds the plugin's package through sys.path only, so a suite started
# as `pytest` (not `python -m pytest`, not an xdist worker: both put the repository on sys.path
# first) imports pytest_gradcheck unrewritten, while each inner run, with the repository now on
# sys.path (`pythonpath`), warns "Module already imported so cannot be rewritten;
# pytest_gradcheck": an error under the inner runs' `filterwarnings = error`. pytest skips that
# warning for a module whose docstring carries its opt-out marker (its __init__ has no asserts).
pytest_gradcheck.__doc__ = f"{pytest_gradcheck.__doc__ or ''}\nPYTEST_DONT_REWRITE\n"


@pytest.fixture
def inner_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """For modules that run pytest in-process (``pytestmark = usefixtures(...)``): one torch
    thread, and no xdist identity, addopts, GitHub environment or test scale from the outer
    run leaking into the inner runs."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    for name in (
        "PYTEST_XDIST_WORKER",
        "PYTEST_XDIST_WORKER_COUNT",
        "PYTEST_ADDOPTS",
        "GITHUB_ACTIONS",
        "GITHUB_STEP_SUMMARY",
        "GRADCHECK_TEST_SCALE",
    ):
        monkeypatch.delenv(name, raising=False)
