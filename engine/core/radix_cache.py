"""Prefix cache: a radix tree over token ids at page granularity.

Pure Python: no jax, nothing from backends/.

Every edge holds a whole number of pages: `len(node.key) == len(node.pages) * page_size`,
and page `node.pages[i]` holds the K/V of tokens `node.key[i*ps:(i+1)*ps]` at the
positions the path from the root gives them. Children are keyed by the tokens of
their first page, so siblings never share a first page.

Page ownership: the cache holds exactly one pool reference to each page it stores.
`insert` increfs the pages it newly stores and never takes or drops a caller's
reference; `evict`/`flush` decref the pages they drop. A caller that uses pages from
`match` increfs them itself and must `lock` the matched node, so that every page a
request uses is on a locked path. Hence an unlocked page is held by the cache alone,
and evicting it frees it: free + evictable + in_use == total pages.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

from engine.core.page_pool import PagePool


class Node:
    """One edge of the tree; `lock_ref` counts locks on this node or any descendant."""

    __slots__ = ("key", "pages", "children", "parent", "lock_ref", "last_access", "hits", "uid")

    def __init__(self, key: list[int], pages: list[int], parent: Node | None, uid: int) -> None:
        self.key = key
        self.pages = pages
        self.children: dict[tuple[int, ...], Node] = {}
        self.parent = parent
        self.lock_ref = 0
        self.last_access = 0
        self.hits = 0
        self.uid = uid


# Eviction order: the smallest key goes first; uid breaks ties deterministically.
EVICTION_POLICIES: dict[str, Callable[[Node], tuple[int, ...]]] = {
    "lru": lambda n: (n.last_access, n.uid),
    "lfu": lambda n: (n.hits, n.last_access, n.uid),
}


class RadixCache:
    """Shares K/V pages between requests with a common whole-page prefix.

    `disabled=True` (for disable_radix_cache) keeps the API but stores nothing:
    `match` finds nothing and `insert` reports 0 pages present and takes no reference.
    """

    def __init__(self, pool: PagePool, eviction: str = "lru", disabled: bool = False) -> None:
        if eviction not in EVICTION_POLICIES:
            raise ValueError(
                f"eviction must be one of {sorted(EVICTION_POLICIES)}, got {eviction!r}")
        self.pool = pool
        self.page_size = pool.page_size
        self.disabled = disabled
        self._order = EVICTION_POLICIES[eviction]
        self._uids = itertools.count(1)
        self._clock = 0
        self.root = Node([], [], None, 0)
        self._cached = 0
        self._evictable = 0

    @property
    def cached_pages(self) -> int:
        return self._cached

    @property
    def evictable_pages(self) -> int:
        """Cached pages on no locked path: the cache holds their only reference."""
        return self._evictable

    def match(self, token_ids: list[int]) -> tuple[list[int], Node]:
        """Pages of the longest cached whole-page prefix of `token_ids`, and its end node.

        The returned node's path is exactly the match (an edge is split if need be),
        so `lock(node)` protects these pages and nothing more. Touches the path for
        LRU/LFU. The caller gets no reference: incref the pages to use them.
        """
        if self.disabled:
            return [], self.root
        self._clock += 1
        return self._walk(token_ids, split=True)

    def peek(self, token_ids: list[int]) -> int:
        """Number of whole pages `match` would return; changes nothing."""
        if self.disabled:
            return 0
        return len(self._walk(token_ids, split=False)[0])

    def _walk(self, tokens: list[int], split: bool) -> tuple[list[int], Node]:
        ps = self.page_size
        end = len(tokens) // ps * ps
        node, pos, pages = self.root, 0, []
        while pos < end:
            child = node.children.get(tuple(tokens[pos : pos + ps]))
            if child is None:
                break
            m = self._common_pages(child.key, tokens, pos, end)
            partial = m < len(child.pages)
            if partial and not split:
                pages.extend(child.pages[:m])
                break
            if partial:
                child = self._split(child, m)
            if split:  # only a real match counts as an access
                child.last_access = self._clock
                child.hits += 1
            pages.extend(child.pages)
            pos += m * ps
            node = child
            if partial:
                break
        return pages, node

    def _common_pages(self, key: list[int], tokens: list[int], start: int, end: int) -> int:
        limit = min(len(key), end - start)
        j = 0
        while j < limit and key[j] == tokens[start + j]:
            j += 1
        return j // self.page_size

    def _split(self, child: Node, m: int) -> Node:
        """Cut `child` after `m` pages; the head becomes a new parent. Returns the head.

        `child` keeps its identity as the tail, so a caller's lock on it stays valid;
        the head inherits its lock count because it is an ancestor of every lock below.
        """
        ps = self.page_size
        parent = child.parent
        assert parent is not None
        head = Node(child.key[: m * ps], child.pages[:m], parent, next(self._uids))
        head.lock_ref, head.last_access, head.hits = child.lock_ref, child.last_access, child.hits
        parent.children[tuple(head.key[:ps])] = head
        child.key, child.pages, child.parent = child.key[m * ps :], child.pages[m:], head
        head.children[tuple(child.key[:ps])] = child
        return head

    def insert(self, token_ids: list[int], pages: list[int]) -> int:
        """Store the whole-page prefix of `token_ids`, whose K/V are in `pages`.

        Returns how many leading pages were already cached. Those given pages are not
        stored and no reference to them is taken: if they differ from the cached ones
        they are duplicates, still owned by the caller, who releases them (or swaps to
        the cached pages from `match`). Each page stored anew gets one cache reference.
        The caller's references are never consumed.
        """
        ps = self.page_size
        num = len(token_ids) // ps
        if len(pages) < num:
            raise ValueError(f"{len(token_ids)} tokens need {num} pages, got {len(pages)}")
        if self.disabled:
            return 0
        self._clock += 1
        node, i = self.root, 0
        while i < num:
            child = node.children.get(tuple(token_ids[i * ps : (i + 1) * ps]))
            if child is None:
                new = Node(list(token_ids[i * ps : num * ps]), list(pages[i:num]), node,
                           next(self._uids))
                new.last_access = self._clock
                node.children[tuple(new.key[:ps])] = new
                self.pool.incref(new.pages)
                self._cached += len(new.pages)
                self._evictable += len(new.pages)
                return i
            m = self._common_pages(child.key, token_ids, i * ps, num * ps)
            if m < len(child.pages):
                child = self._split(child, m)
            child.last_access = self._clock
            node, i = child, i + m
        return num

    def lock(self, node: Node) -> None:
        """Protect the path root..node from eviction (counted: lock twice, unlock twice)."""
        while node is not self.root:
            if node.lock_ref == 0:
                self._evictable -= len(node.pages)
            node.lock_ref += 1
            assert node.parent is not None
            node = node.parent

    def unlock(self, node: Node) -> None:
        while node is not self.root:
            if node.lock_ref <= 0:
                raise ValueError("unlock of a node that is not locked")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._evictable += len(node.pages)
            assert node.parent is not None
            node = node.parent

    def evict(self, num_pages: int) -> int:
        """Drop up to `num_pages` unlocked pages, leaves first, in eviction order.

        A leaf is trimmed from its tail when fewer pages than it holds are wanted, so
        no more than asked is dropped. Returns the number of pages dropped.
        """
        if num_pages <= 0 or self._evictable == 0:
            return 0
        heap = [(self._order(n), n) for n in self._nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(heap)
        dropped = 0
        while dropped < num_pages and heap:
            _, leaf = heapq.heappop(heap)
            take = min(len(leaf.pages), num_pages - dropped)
            gone = leaf.pages[len(leaf.pages) - take :]
            if take < len(leaf.pages):
                leaf.pages = leaf.pages[: len(leaf.pages) - take]
                leaf.key = leaf.key[: len(leaf.pages) * self.page_size]
            else:
                parent = leaf.parent
                assert parent is not None
                del parent.children[tuple(leaf.key[: self.page_size])]
                if parent is not self.root and not parent.children and parent.lock_ref == 0:
                    heapq.heappush(heap, (self._order(parent), parent))
            self.pool.decref(gone)
            self._cached -= take
            self._evictable -= take
            dropped += take
        return dropped

    def flush(self) -> int:
        """Drop every unlocked page; returns how many."""
        return self.evict(self._evictable)

    def cached_page_ids(self) -> list[int]:
        return [p for n in self._nodes() for p in n.pages]

    def evictable_page_ids(self) -> list[int]:
        return [p for n in self._nodes() if n.lock_ref == 0 for p in n.pages]

    def _nodes(self) -> list[Node]:
        out, stack = [], list(self.root.children.values())
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(n.children.values())
        return out
