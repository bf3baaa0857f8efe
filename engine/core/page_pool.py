"""A fixed pool of KV-cache pages with reference counts.

Pure Python: no jax, nothing from backends/. A page id indexes the backend's KV
arrays; this module only tracks who holds which page.

Ownership: every holder (a request's page table, the radix cache) owns exactly
one reference per page it lists. `alloc` hands out pages with refcount 1, owned
by the caller; `incref` adds a holder; `decref` drops one, and a page whose
count reaches 0 is free again. Invariant: a page is in the free list if and only
if its refcount is 0.
"""

from __future__ import annotations

from collections import Counter


class OutOfPagesError(RuntimeError):
    """`alloc` was asked for more pages than are free. The pool is left unchanged."""


class PagePool:
    """`num_pages` pages of `page_size` token slots each, refcounted."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages must be at least 1, got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, got {page_size}")
        self._num_pages = num_pages
        self._page_size = page_size
        self._refcount = [0] * num_pages
        # A stack: the most recently freed page is reused first, so a stale
        # page-table entry is overwritten soon and shows up in tests.
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def num_pages(self) -> int:
        return self._num_pages

    @property
    def page_size(self) -> int:
        return self._page_size

    @property
    def num_free(self) -> int:
        return len(self._free)

    def refcount(self, page: int) -> int:
        return self._refcount[page]

    def alloc(self, n: int) -> list[int]:
        """`n` free pages, each with refcount 1, owned by the caller.

        Raises OutOfPagesError (and allocates nothing) when fewer than `n` are
        free: callers check `num_free` first, so running short is a bug, not a
        condition to handle with a None.
        """
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of pages, got {n}")
        if n > len(self._free):
            raise OutOfPagesError(f"asked for {n} pages, only {len(self._free)} free")
        pages = self._free[len(self._free) - n :]
        del self._free[len(self._free) - n :]
        for p in pages:
            self._refcount[p] = 1
        return pages

    def incref(self, pages: list[int]) -> None:
        """One more holder for each page; a free page cannot gain holders."""
        for p in pages:
            if self._refcount[p] <= 0:
                raise ValueError(f"incref of free page {p}")
        for p in pages:
            self._refcount[p] += 1

    def decref(self, pages: list[int]) -> None:
        """One holder fewer for each page; pages reaching 0 return to the free list."""
        # Checked up front so a bad call changes nothing.
        for p, k in Counter(pages).items():
            if self._refcount[p] < k:
                raise ValueError(
                    f"decref of page {p} {k} time(s) with refcount {self._refcount[p]}"
                )
        for p in pages:
            self._refcount[p] -= 1
            if self._refcount[p] == 0:
                self._free.append(p)
