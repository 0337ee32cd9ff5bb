"""The depth trend of a group of layers: Spearman's rank correlation of their gradients with
their position, which the relative rule of :mod:`pytest_gradcheck.checks` asks of every group.

Pure arithmetic on plain floats; imports nothing of the package, no torch, no pytest.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

__all__ = ["depth_correlation"]


def depth_correlation(values: Sequence[float]) -> float:
    """Spearman's rank correlation of ``values`` with their position (0, 1, 2, ...).

    The positions have no ties, so their ranks are the positions themselves and the
    correlation is the Pearson correlation of ``range(n)`` with the ranks of ``values``.
    Both rank lists sum to ``n * mean``, and ranks are whole or half numbers, so the sums
    below are exact.
    """
    n = len(values)
    if n < 2:
        return 0.0
    mean = (n - 1) / 2
    ranks = _ranks(values)
    cov = sum(map(operator.mul, range(n), ranks)) - n * mean * mean
    vy = sum(map(operator.mul, ranks, ranks)) - n * mean * mean
    vx = n * (n * n - 1) / 12  # the sum of (i - mean)**2 over 0..n-1
    return cov / math.sqrt(vx * vy) if vy > 0 else 0.0


def _ranks(values: Sequence[float]) -> list[float]:
    """The rank of each value (from 0; ties share their mean rank)."""
    n = len(values)
    order = sorted(range(n), key=values.__getitem__)
    ranks = [0.0] * n
    for rank, index in enumerate(order):
        ranks[index] = rank
    if len(set(values)) == n:
        return ranks
    i = 0
    while i < n:  # give each run of equal values its mean rank
        j = i
        value = values[order[i]]
        while j + 1 < n and values[order[j + 1]] == value:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks
