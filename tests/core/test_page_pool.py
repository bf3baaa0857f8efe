"""PagePool: a fixed set of refcounted pages; a page is free exactly when its count is 0."""

import pytest

from engine.core.page_pool import OutOfPagesError, PagePool


def test_alloc_hands_out_distinct_pages_with_one_reference() -> None:
    pool = PagePool(num_pages=8, page_size=4)
    a, b = pool.alloc(3), pool.alloc(5)
    assert len(set(a + b)) == 8 and set(a + b) == set(range(8))
    assert pool.num_free == 0
    assert all(pool.refcount(p) == 1 for p in a + b)
    assert (pool.num_pages, pool.page_size) == (8, 4)


def test_alloc_more_than_free_raises_and_changes_nothing() -> None:
    pool = PagePool(num_pages=4, page_size=1)
    held = pool.alloc(3)
    with pytest.raises(OutOfPagesError, match="asked for 2 pages, only 1 free"):
        pool.alloc(2)
    assert pool.num_free == 1
    assert all(pool.refcount(p) == 1 for p in held)
    assert pool.alloc(0) == []


def test_page_returns_to_free_only_when_last_reference_drops() -> None:
    pool = PagePool(num_pages=2, page_size=2)
    [p] = pool.alloc(1)
    pool.incref([p])
    pool.decref([p])
    assert pool.num_free == 1 and pool.refcount(p) == 1
    pool.decref([p])
    assert pool.num_free == 2 and pool.refcount(p) == 0
    assert p in pool.alloc(2)


def test_refcounts_never_go_negative_and_free_pages_gain_no_holders() -> None:
    pool = PagePool(num_pages=3, page_size=2)
    [p] = pool.alloc(1)
    with pytest.raises(ValueError, match="decref"):
        pool.decref([p, p])  # one reference, two drops: rejected as a whole
    assert pool.refcount(p) == 1
    pool.decref([p])
    with pytest.raises(ValueError, match="decref"):
        pool.decref([p])
    with pytest.raises(ValueError, match="incref of free page"):
        pool.incref([p])
    assert pool.refcount(p) == 0 and pool.num_free == 3


@pytest.mark.parametrize("num_pages, page_size", [(0, 4), (4, 0)])
def test_sizes_must_be_positive(num_pages: int, page_size: int) -> None:
    with pytest.raises(ValueError, match="must be at least 1, got 0"):
        PagePool(num_pages, page_size)
