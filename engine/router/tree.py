"""The router's approximate prefix tree: which replica has probably cached which prompt prefix.

A radix tree over routing keys (the characters of a text prompt, the ids of a token prompt)
shared by all replicas. Each node records the replicas that own it and when each last used
it. It is approximate: the replicas' real caches evict on their own, and the router only
sees what it sent where.

Invariants: ownership is prefix-closed (a replica that owns a node owns every ancestor), so a
replica's match length is the depth of the deepest node it owns on the key's path; and
`size(r)` is the total edge length of the nodes r owns.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Sequence

Key = Sequence[Hashable]
"""A str (characters) or a tuple of token ids; elements are compared one by one."""


class _Node:
    __slots__ = ("edge", "parent", "children", "owners")

    def __init__(self, edge: Key, parent: _Node | None) -> None:
        self.edge = edge  # the key elements from the parent to this node
        self.parent = parent
        self.children: dict[Hashable, _Node] = {}  # by the first element of the child's edge
        self.owners: dict[int, int] = {}  # replica -> tick of its last use


def _common(a: Key, b: Key, start: int) -> int:
    """Length of the common prefix of a and b[start:]."""
    n = min(len(a), len(b) - start)
    i = 0
    while i < n and a[i] == b[start + i]:
        i += 1
    return i


class ApproxPrefixTree:
    def __init__(self) -> None:
        self.root = _Node((), None)
        self._tick = 0
        self._size: dict[int, int] = {}

    def size(self, replica: int) -> int:
        """Key elements (characters or tokens) the replica owns."""
        return self._size.get(replica, 0)

    def match(self, key: Key) -> dict[int, int]:
        """Replica -> length of the longest prefix of `key` it owns (replicas that own
        nothing on the path are absent)."""
        out: dict[int, int] = {}
        node, depth = self.root, 0
        while depth < len(key):
            child = node.children.get(key[depth])
            if child is None:
                break
            n = _common(child.edge, key, depth)
            for r in child.owners:
                out[r] = depth + n
            if n < len(child.edge):
                break
            node, depth = child, depth + n
        return out

    def insert(self, key: Key, replica: int) -> None:
        """Record that `replica` now caches `key` (and so every prefix of it)."""
        self._tick += 1
        node, depth = self.root, 0
        while depth < len(key):
            child = node.children.get(key[depth])
            if child is None:
                child = _Node(key[depth:], node)
                node.children[key[depth]] = child
            else:
                n = _common(child.edge, key, depth)
                if n < len(child.edge):
                    child = self._split(child, n)
            if replica not in child.owners:
                self._size[replica] = self.size(replica) + len(child.edge)
            child.owners[replica] = self._tick
            node, depth = child, depth + len(child.edge)

    def _split(self, child: _Node, n: int) -> _Node:
        """Cut child's edge after n elements; the new upper node keeps child's owners."""
        parent = child.parent
        assert parent is not None
        upper = _Node(child.edge[:n], parent)
        upper.owners = dict(child.owners)
        parent.children[child.edge[0]] = upper
        child.edge, child.parent = child.edge[n:], upper
        upper.children[child.edge[0]] = child
        return upper

    def evict(self, replica: int, max_size: int) -> None:
        """Drop the replica's least recently used leaves until it owns at most max_size."""
        if self.size(replica) <= max_size:
            return
        heap = [(n.owners[replica], id(n), n) for n in self._owned(replica)
                if not any(replica in c.owners for c in n.children.values())]
        heapq.heapify(heap)
        while heap and self.size(replica) > max_size:
            _, _, node = heapq.heappop(heap)
            del node.owners[replica]
            self._size[replica] -= len(node.edge)
            parent = node.parent
            assert parent is not None
            if not node.owners and not node.children:
                del parent.children[node.edge[0]]
            if parent is not self.root and not any(replica in c.owners
                                                   for c in parent.children.values()):
                heapq.heappush(heap, (parent.owners[replica], id(parent), parent))

    def remove_replica(self, replica: int) -> None:
        """Forget everything the replica owns (it died or was restarted)."""
        self.evict(replica, 0)
        self._size.pop(replica, None)

    def _owned(self, replica: int) -> list[_Node]:
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            for c in node.children.values():
                if replica in c.owners:
                    out.append(c)
                    stack.append(c)
        return out
