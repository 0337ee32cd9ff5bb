"""Exact-zero gradients that are expected: the layers a dead finding leaves out, and why.

Pure functions of the statistics and the structure's facts (see :mod:`pytest_gradcheck.facts`),
called by the ``dead`` rule of :mod:`pytest_gradcheck.checks`: a layer whose exact zeros come
from a softmax or an attention with nothing to choose between, or that serves a forward input
the batch did not give, is explained in a note instead of failing, as long as the rest of
the model gets a gradient. Imports only results; no torch, no pytest.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .results import NOTHING_TO_MIX, LayerStats, Structure

__all__ = ["explained_dead"]


def explained_dead(
    dead: list[LayerStats], layers: Sequence[LayerStats], structure: Structure
) -> tuple[list[LayerStats], list[str]]:
    """Dead layers whose exact zeros are expected, while the rest of the model learns: the
    softmax or attention they compute weights for has nothing to choose between (one key or
    expert per row, identical values), or the batch did not feed the input they serve. The
    rest, and every dead layer of a model where nothing else gets a gradient, stay dead."""
    if not any(layer.grad_max_abs > 0 for layer in layers):
        return dead, []
    notes: list[str] = []
    mixing: dict[tuple[str, str], list[str]] = {}
    unfed: list[str] = []
    rest: list[LayerStats] = []
    for layer in dead:
        ops = {structure.zeroed.get(p.name) for p in layer.params}
        op = next(iter(ops)) if len(ops) == 1 else None
        if op is not None and op[0] in NOTHING_TO_MIX:
            mixing.setdefault(op, []).append(layer.display_name)
        elif _serves_missing_input(layer.name, structure.missing_inputs):
            unfed.append(layer.display_name)
        else:
            rest.append(layer)
    for (kind, where), names in mixing.items():
        at = f" at {where}" if where else ""
        notes.append(
            f"{_names(names, 6)} ({len(names)} layer(s)) got exactly zero gradients because the "
            f"{kind}{at} has nothing to choose between: its weights do not change the output, so "
            "what computes them cannot learn from this batch (a single key or expert per row, "
            "the others masked; or every key's value the same, as in the first decoder layer "
            "of a DETR-style model); expected, so not a failure. If that softmax runs over the "
            "wrong dimension, that is the bug"
        )
    if unfed:
        inputs = ", ".join(structure.missing_inputs[:4])
        notes.append(
            f"not exercised by this batch: {_names(unfed, 6)} ({len(unfed)} layer(s)) got "
            f"exactly zero gradients and serve the forward's inputs {inputs}, which the batch "
            "did not give (the forward fills them with zeros or padding); pass those inputs to "
            "check them"
        )
    return rest, notes


_COMMON_WORDS = frozenset(
    {
        *("input", "inputs", "ids", "mask", "values", "states", "hidden", "attention"),
        *("labels", "encoder", "decoder", "position", "token", "type", "past", "cache"),
        *("embeds", "output", "return", "head", "layer", "pixel", "features"),
    }
)
"""Words of input names too common to tie a layer to an input."""


def _serves_missing_input(layer: str, missing: Sequence[str]) -> bool:
    """Whether a layer's path names a distinctive word of a forward input the batch left out
    (``audio_mlp`` and ``audio_input_ids``, ``shape_embed`` and ``input_shape_ids``)."""
    parts = set(re.split(r"[._]", layer.lower()))
    for name in missing:
        words = set(name.lower().split("_")) - _COMMON_WORDS
        if any(len(word) > 3 and word in parts for word in words):
            return True
    return False


def _names(names: Sequence[str], most: int = 3) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")
