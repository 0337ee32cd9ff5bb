"""Shared test setup: pin torch to one thread (2-core CI machines; see README, "Threads")."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch

# pytester's in-process runs restore sys.modules afterwards, dropping modules that a run
# imported first; torch's C++ operator registrations survive that, so importing such a module
# again fails ("Only a single TORCH_LIBRARY can be used to register the namespace symm_mem")
# and takes transformers' model imports down with it. Import it once, up front.
import torch.distributed._symmetric_memory

torch.set_num_threads(1)
