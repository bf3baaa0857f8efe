"""RadixCache: whole-page prefix sharing, locking, eviction order, disabled mode."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.page_pool import PagePool
from engine.core.radix_cache import RadixCache


def cache_with(num_pages: int = 16, page_size: int = 2, eviction: str = "lru") -> RadixCache:
    return RadixCache(PagePool(num_pages, page_size), eviction)


def store(cache: RadixCache, tokens: list[int]) -> list[int]:
    """Compute `tokens` into fresh pages, cache them, drop the writer's references."""
    pages = cache.pool.alloc(len(tokens) // cache.page_size)
    cache.insert(tokens, pages)
    cache.pool.decref(pages)
    return pages


def test_empty_cache_matches_nothing() -> None:
    cache = cache_with()
    assert cache.match([1, 2, 3, 4]) == ([], cache.root)
    assert (cache.cached_pages, cache.evictable_pages) == (0, 0)


def test_match_is_the_longest_whole_page_prefix() -> None:
    cache = cache_with(page_size=2)
    a, b, c = store(cache, [1, 2, 3, 4, 5, 6])
    assert cache.match([1, 2, 3, 4, 5, 6, 7])[0] == [a, b, c]
    assert cache.match([1, 2, 3, 9])[0] == [a]  # diverges inside the second page
    assert cache.match([1, 2, 3])[0] == [a]  # a partial page never matches
    assert cache.match([1])[0] == []
    assert cache.match([9, 9])[0] == []
    # The splits those matches made change no answer and no count.
    assert cache.match([1, 2, 3, 4, 5, 6])[0] == [a, b, c]
    assert cache.cached_pages == 3


def test_page_size_one() -> None:
    cache = cache_with(page_size=1)
    p5, p6, _ = store(cache, [5, 6, 7])
    assert cache.match([5, 6, 8])[0] == [p5, p6]
    assert cache.peek([5, 6, 7, 8]) == 3


def test_insert_takes_one_reference_and_reports_pages_already_cached() -> None:
    cache = cache_with(num_pages=8, page_size=2)
    pool = cache.pool
    first = pool.alloc(2)
    assert cache.insert([1, 2, 3, 4, 99], first) == 0  # the tail token is not a whole page
    assert [pool.refcount(p) for p in first] == [2, 2]
    pool.decref(first)
    assert pool.num_free == 6  # still held by the cache
    dup = pool.alloc(3)
    assert cache.insert([1, 2, 3, 4, 5, 6], dup) == 2
    # The two duplicates were not taken: the caller still owns them alone.
    assert [pool.refcount(p) for p in dup] == [1, 1, 2]
    assert cache.match([1, 2, 3, 4, 5, 6])[0] == first + dup[2:]
    pool.decref(dup)
    assert pool.num_free == 5 and cache.cached_pages == 3
    with pytest.raises(ValueError, match="4 tokens need 2 pages, got 1"):
        cache.insert([1, 2, 3, 4], dup[:1])


def test_a_locked_path_is_not_evictable() -> None:
    cache = cache_with(num_pages=8, page_size=2)
    store(cache, [1, 2, 3, 4])
    store(cache, [1, 2, 5, 6])  # shares the first page
    assert cache.evictable_pages == 3
    pages, node = cache.match([1, 2, 3, 4])
    cache.lock(node)
    cache.lock(node)
    assert cache.evictable_pages == 1  # only [5, 6] is on no locked path
    assert cache.evict(10) == 1
    assert cache.peek([1, 2, 5, 6]) == 1 and cache.match([1, 2, 3, 4])[0] == pages
    cache.unlock(node)
    assert cache.evict(10) == 0  # locks are counted: one is left
    cache.unlock(node)
    assert cache.evictable_pages == 2
    with pytest.raises(ValueError, match="not locked"):
        cache.unlock(node)
    assert cache.evict(10) == 2
    assert cache.pool.num_free == 8 and cache.cached_pages == 0


def test_evict_takes_leaves_first_and_no_more_than_asked() -> None:
    cache = cache_with(num_pages=8, page_size=2)
    store(cache, [1, 2, 3, 4, 5, 6])
    store(cache, [1, 2, 7, 8])
    assert cache.evict(1) == 1
    assert cache.pool.num_free == 5 and cache.cached_pages == 3  # 4 distinct pages were cached
    assert cache.evict(2) == 2
    assert cache.peek([1, 2, 3, 4, 5, 6]) == 1  # the shared first page goes last
    assert cache.peek([1, 2, 7, 8]) == 1


@pytest.mark.parametrize("eviction, first_victim", [("lru", "x"), ("lfu", "y")])
def test_eviction_order(eviction: str, first_victim: str) -> None:
    cache = cache_with(eviction=eviction, page_size=2)
    seqs = {"x": [1, 1, 1, 1], "y": [2, 2, 2, 2], "z": [3, 3, 3, 3]}
    for s in seqs.values():
        store(cache, s)
    # x: most hits but least recent; y: fewest hits but most recent.
    for name, times in (("x", 3), ("z", 2), ("y", 1)):
        for _ in range(times):
            cache.match(seqs[name])
    assert cache.evict(2) == 2
    assert {n: cache.peek(s) for n, s in seqs.items()} == {
        n: 0 if n == first_victim else 2 for n in seqs
    }


def test_flush_drops_everything_unlocked() -> None:
    cache = cache_with(num_pages=8, page_size=2)
    store(cache, [1, 2, 3, 4])
    store(cache, [5, 6, 7, 8])
    kept, node = cache.match([5, 6, 7, 8])
    cache.lock(node)
    assert cache.flush() == 2
    assert cache.match([5, 6, 7, 8])[0] == kept and cache.peek([1, 2]) == 0
    cache.unlock(node)
    assert cache.flush() == 2 and cache.pool.num_free == 8


def test_disabled_cache_stores_nothing_and_takes_no_reference() -> None:
    pool = PagePool(4, 2)
    cache = RadixCache(pool, disabled=True)
    pages = pool.alloc(2)
    assert cache.insert([1, 2, 3, 4], pages) == 0
    assert [pool.refcount(p) for p in pages] == [1, 1]
    assert cache.match([1, 2, 3, 4]) == ([], cache.root) and cache.peek([1, 2, 3, 4]) == 0
    cache.lock(cache.root)
    cache.unlock(cache.root)
    assert (cache.cached_pages, cache.evictable_pages, cache.evict(4), cache.flush()) == (0,) * 4


def test_unknown_eviction_policy() -> None:
    with pytest.raises(ValueError, match="'mru'"):
        cache_with(eviction="mru")


@settings(max_examples=60, deadline=None)
@given(page_size=st.sampled_from([1, 2, 3]),
       seqs=st.lists(st.lists(st.integers(1, 2), max_size=8), max_size=6),
       probe=st.lists(st.integers(1, 2), max_size=8))
def test_tree_agrees_with_a_set_of_page_prefixes(page_size: int, seqs: list[list[int]],
                                                 probe: list[int]) -> None:
    """Model: the cache holds one page per distinct whole-page prefix ever inserted."""
    ps = page_size
    cache = cache_with(num_pages=64, page_size=ps)
    prefixes: set[tuple[int, ...]] = set()
    for s in seqs:
        store(cache, s)
        prefixes |= {tuple(s[: k * ps]) for k in range(1, len(s) // ps + 1)}
        assert cache.cached_pages == cache.evictable_pages == len(prefixes)
        assert cache.pool.num_free == 64 - len(prefixes)
    expected = max((k for k in range(len(probe) // ps + 1)
                    if k == 0 or tuple(probe[: k * ps]) in prefixes), default=0)
    assert cache.peek(probe) == expected
    pages = cache.match(probe)[0]
    assert len(pages) == expected and len(set(pages)) == expected
    assert cache.flush() == len(prefixes) and cache.pool.num_free == 64
