"""Module paths as reports name them: a path's role (its layer numbers as ``#``), the
subtrees that hold a set of parameters (one line for ``pooler``, not one per parameter),
and the policy rule that matches a subtree.

The checks group their notes with :func:`subtrees`; the failure text groups its rows with
it and offers :func:`policy_rule` for each group. Pure Python: imports nothing of the
package, nor torch or pytest.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence

__all__ = ["policy_rule", "role", "subtrees"]

_NUMBER = re.compile(r"(^|\.)\d+(?=\.|$)")
_GLOB_SPECIAL = re.compile(r"([*?\[])")


def role(name: str) -> str:
    """The module path with its numeric parts taken out: ``blocks.3.fc`` -> ``blocks.#.fc``."""
    return _NUMBER.sub(r"\1#", name) if any(c.isdigit() for c in name) else name


def subtrees(names: Sequence[str], everything: Iterable[str]) -> list[tuple[str, list[str]]]:
    """``names`` (parameter paths) grouped by the highest module all of whose parameters are
    among them, in the order of their first name: ``("pooler", [its 2 names])``.

    Subtrees that play the same role at different depths merge into one, named with ``#``
    for the layer numbers (``layers.#.self_attn.indexer``), when that role repeats. A name
    whose every enclosing module holds a parameter outside ``names`` stands for itself.
    """
    chosen = set(names)
    blocked: set[str] = set()  # module paths holding a parameter not in ``names``
    for name in everything:
        if name not in chosen:
            parts = name.split(".")[:-1]
            blocked.update(".".join(parts[:i]) for i in range(len(parts) + 1))
    groups: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")[:-1]
        root = next(
            (
                ".".join(parts[:i])
                for i in range(1, len(parts) + 1)
                if ".".join(parts[:i]) not in blocked
            ),
            name,
        )
        groups.setdefault(root, []).append(name)
    roles: dict[str, list[str]] = {}
    for root in groups:
        roles.setdefault(role(root), []).append(root)
    merged: dict[str, list[str]] = {}
    for root, members in groups.items():
        same = roles[role(root)]
        label = role(root) if len(same) > 1 else root
        merged.setdefault(label, []).extend(members)
    return list(merged.items())


def policy_rule(label: str, layers: Iterable[str], reason: str, kind: str = "unused") -> str:
    """A policy rule, as one line of YAML ready to paste under ``rules:``, that ignores
    ``kind`` on the subtree ``label`` (from :func:`subtrees`) whose problems name ``layers``
    (module paths, ``<root>`` for the root).

    The glob matches the subtree's module and the modules below it, ``*`` for each ``#``:
    ``- {match: "layers.*.indexer.*", ignore_kinds: [unused], reason: "..."}``. A label that
    names a parameter (no module holds only it) matches the module that owns it.
    """
    owners = sorted(set(layers))
    at = [o for o in owners if o == label or role(o) == label]
    under = [o for o in owners if o.startswith(label + ".") or role(o).startswith(label + ".")]
    if not at and not under and owners:  # the parameters' own modules, each a layer number
        pattern = _glob(owners[0] if len(owners) == 1 else role(owners[0]))
    elif not at:
        pattern = _glob(label) + ".*"
    elif not under:
        pattern = _glob(label)
    else:
        pattern = _glob(label) + "*"
    return (
        f"- {{match: {json.dumps(pattern)}, ignore_kinds: [{kind}], "
        f"reason: {json.dumps(reason, ensure_ascii=False)}}}"
    )


def _glob(path: str) -> str:
    """``path`` as a glob that matches it alone, each ``#`` part a wildcard."""
    parts = [_GLOB_SPECIAL.sub(r"[\1]", part) for part in path.split(".")]
    return ".".join("*" if part == "#" else part for part in parts)
