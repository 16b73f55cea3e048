"""DVID's version DAG: which node a ``uuid=`` names, and whether that node is locked.

Why here and not left to DVID: DVID accepts a unique UUID prefix (``5f3b``) and
``PREFIX:BRANCH`` / ``:BRANCH`` (``5f3b:master``, ``:master~1``) in every request and resolves
them itself, each time anew — a branch name to the branch's *leaf*, which is usually an
unlocked child of the locked node the prefix names. An export must instead read one fixed
node, check the lock on that node, and be named by it. So the name is resolved once, before
planning, to the full node UUID, by DVID's own rules (``datastore.matchingUUID`` and
``dagT.getAncestryByBranch`` in janelia-flyem/dvid):

* ``PREFIX``: the one node whose UUID starts with it (DVID refuses an ambiguous prefix);
* ``PREFIX:NAME`` / ``:NAME`` (the repo of PREFIX, or the server's only repo): the leaf of
  branch NAME — the node of that branch with no child on the same branch; ``master`` (or an
  empty NAME) is DVID's unnamed branch ``""``;
* ``...:NAME~N``: the N-th ancestor of that leaf (the last parent at each step, as DVID).

One request (``GET /api/repo/<name>/info``: DVID finds the repo, and refuses names it cannot
resolve with its own message), then the DAG it returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from dvidetl.errors import UserError


@dataclass(frozen=True)
class DvidNode:
    """A resolved version: the full UUID, what was asked for, and DVID's state of the node."""

    uuid: str
    requested: str
    locked: bool | None
    branch: str = ""


def _dag(repo: Any) -> dict[str, dict]:
    nodes = ((repo or {}).get("DAG") or {}).get("Nodes") or {}
    return {str((n or {}).get("UUID") or k): (n or {}) for k, n in nodes.items()}


def resolve_node(get_json: Callable[[str], Any], requested: str, where: str) -> DvidNode:
    """The node ``requested`` names on the DVID at ``where`` (see the module docstring).
    ``get_json(path)`` answers DVID's JSON (its error answers raise)."""
    if requested.count(":") > 1:
        raise UserError(f"uuid={requested!r}: expected UUID, UUID:BRANCH or :BRANCH (one ':')")
    prefix, colon, branch = requested.partition(":")
    if not prefix and not colon:
        raise UserError("uuid= is empty: name a version UUID (a unique prefix is enough)")
    repo = get_json(f"/api/repo/{quote(requested, safe=':~')}/info")
    nodes = _dag(repo)
    if colon:
        full = _branch_node(nodes, branch, requested, where)
    else:
        hits = [u for u in nodes if u.startswith(prefix)]
        if len(hits) != 1:
            raise UserError(f"uuid={requested!r}: {len(hits)} nodes of the repo DVID found at "
                            f"{where} start with it ({', '.join(sorted(hits)[:4])}): give more "
                            "of the UUID")
        full = hits[0]
    node = nodes[full]
    locked = bool(node["Locked"]) if "Locked" in node else None
    return DvidNode(full, requested, locked, str(node.get("Branch") or ""))


def _branch_node(nodes: dict[str, dict], branch: str, requested: str, where: str) -> str:
    name, tilde, back = branch.partition("~")
    if tilde and not back.isdigit():
        raise UserError(f"uuid={requested!r}: '~' must be followed by a number of parents")
    want = "" if name in ("", "master") else name
    on = {u for u, n in nodes.items() if str(n.get("Branch") or "") == want}
    by_version = {n.get("VersionID"): u for u, n in nodes.items()}
    leaves = [u for u in on
              if not any(by_version.get(c) in on for c in (nodes[u].get("Children") or []))]
    if len(leaves) != 1:
        raise UserError(f"uuid={requested!r}: branch {name or 'master'!r} has "
                        f"{'no' if not leaves else len(leaves)} leaf node(s) in the repo at {where}")
    node = leaves[0]
    for _ in range(int(back or 0)):
        parents = nodes[node].get("Parents") or []
        if not parents or by_version.get(parents[-1]) is None:
            raise UserError(f"uuid={requested!r}: branch {name or 'master'!r} has fewer than "
                            f"{back} ancestors")
        node = by_version[parents[-1]]
    return node


__all__ = ["DvidNode", "resolve_node"]
