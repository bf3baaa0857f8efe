"""The router's approximate prefix tree: longest match per replica, and LRU eviction."""

from __future__ import annotations

from engine.router.tree import ApproxPrefixTree


def tree_with(*entries: tuple[str | tuple, int]) -> ApproxPrefixTree:
    t = ApproxPrefixTree()
    for key, replica in entries:
        t.insert(key, replica)
    return t


def test_match_is_the_longest_owned_prefix_per_replica() -> None:
    t = tree_with(("system: be brief. hello", 0), ("system: be verbose. hi", 1))
    assert t.match("system: be brief. bye") == {0: 18, 1: 11}
    assert t.match("system: be verbose. hi there") == {0: 11, 1: 22}
    assert t.match("user: x") == {}
    assert t.match("") == {}


def test_a_key_matches_its_own_prefix_and_splits_keep_ownership() -> None:
    t = tree_with(("abcdef", 0))
    t.insert("abcxyz", 1)  # splits the edge "abcdef" after "abc"
    assert t.match("abcdef") == {0: 6, 1: 3}
    assert t.match("abc") == {0: 3, 1: 3}
    assert t.match("ab") == {0: 2, 1: 2}
    assert t.size(0) == 6 and t.size(1) == 6


def test_token_keys_work_like_text() -> None:
    t = tree_with(((1, 2, 3, 4), 0), ((1, 2, 9), 1))
    assert t.match((1, 2, 3, 7)) == {0: 3, 1: 2}
    assert t.size(0) == 4 and t.size(1) == 3


def test_eviction_drops_the_least_recently_used_leaves_first() -> None:
    t = tree_with(("aaaa1111", 0), ("bbbb2222", 0), ("cccc3333", 0))
    t.insert("aaaa1111", 0)  # now "bbbb2222" is the oldest
    t.evict(0, 16)
    assert t.size(0) == 16
    assert t.match("bbbb2222") == {}
    assert t.match("aaaa1111") == {0: 8} and t.match("cccc3333") == {0: 8}


def test_eviction_shortens_a_path_leaf_first_and_spares_other_replicas() -> None:
    t = tree_with(("prefix-one", 0), ("prefix-two", 0), ("prefix-one", 1))
    t.insert("prefix-two", 0)  # "one" is replica 0's oldest leaf
    t.evict(0, 7)  # "prefix-" + "two" = 10 > 7: both leaves go, the shared "prefix-" stays
    assert t.size(0) == 7
    assert t.match("prefix-two") == {0: 7, 1: 7}
    assert t.match("prefix-one") == {0: 7, 1: 10}
    assert t.size(1) == 10


def test_removing_a_replica_forgets_it_everywhere() -> None:
    t = tree_with(("shared", 0), ("shared", 1), ("only0", 0))
    t.remove_replica(0)
    assert t.size(0) == 0
    assert t.match("shared") == {1: 6} and t.match("only0") == {}
    assert set(t.root.children) == {"s"}  # nodes nobody owns are gone
