"""Shared setup for the demo gate over ``examples/``.

Threads are pinned to one: on small CPU machines torch's intra-op threads slow tiny
models down, and pytest-xdist workers would oversubscribe the cores.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the shared fixtures/

import torch

torch.set_num_threads(1)
