"""Routing policies: prefix affinity, the smallest-tree choice, the imbalance fallback, round
robin, and the routing key of each endpoint."""

from __future__ import annotations

import pytest

from engine.router.policy import CacheAware, RoundRobin, RouterConfig, routing_key

SYS_A = "You are a pirate. " * 8
SYS_B = "You are a lawyer. " * 8


def test_same_prefix_goes_to_the_same_replica_and_new_prefixes_spread() -> None:
    p = CacheAware()
    loads = {0: 0, 1: 0}
    a = p.choose(SYS_A + "q1", loads)
    b = p.choose(SYS_B + "q1", loads)  # no match: the replica with the smaller tree
    assert a != b
    assert p.choose(SYS_A + "another question", loads) == a
    assert p.choose(SYS_B + "q2", {0: 3, 1: 5}) == b  # small imbalance keeps affinity


def test_a_short_match_below_the_threshold_goes_to_the_smallest_tree() -> None:
    p = CacheAware(RouterConfig(cache_threshold=0.5))
    p.choose("x" * 100, {0: 0, 1: 0})  # replica 0 now owns 100 elements
    # 10 of 100 matched (0.1 < 0.5): the replica caching least wins, replica 1
    assert p.choose("x" * 10 + "y" * 90, {0: 0, 1: 0}) == 1


def test_imbalance_falls_back_to_the_least_loaded_replica() -> None:
    p = CacheAware(RouterConfig(balance_abs_threshold=4, balance_rel_threshold=2.0))
    owner = p.choose(SYS_A, {0: 0, 1: 0})
    other = 1 - owner
    # not imbalanced by the relative rule (10 <= 2 * 6): affinity stays
    assert p.choose(SYS_A + "q", {owner: 10, other: 6}) == owner
    # imbalanced: 10 - 1 > 4 and 10 > 2 * 1
    assert p.choose(SYS_A + "q", {owner: 10, other: 1}) == other


def test_dead_replicas_are_not_chosen_and_forget_drops_their_prefixes() -> None:
    p = CacheAware()
    owner = p.choose(SYS_A, {0: 0, 1: 0})
    p.forget(owner)
    assert p.tree.size(owner) == 0
    assert p.choose(SYS_A, {1 - owner: 0}) == 1 - owner


def test_round_robin_cycles_and_skips_dead_replicas() -> None:
    p = RoundRobin()
    assert [p.choose("k", {0: 9, 1: 0, 2: 0}) for _ in range(4)] == [0, 1, 2, 0]
    assert [p.choose("k", {0: 0, 2: 0}) for _ in range(3)] == [2, 0, 2]
    with pytest.raises(ValueError):
        p.choose("k", {})


@pytest.mark.parametrize(("path", "body", "key"), [
    ("/v1/completions", {"prompt": "hello"}, "hello"),
    ("/v1/completions", {"prompt": [5, 6, 7]}, (5, 6, 7)),
    ("/v1/completions", {"prompt": [[5, 6], [8]]}, (5, 6)),
    ("/v1/completions", {"prompt": ["first", "second"]}, "first"),
    ("/generate", {"text": "hi"}, "hi"),
    ("/generate", {"input_ids": [1, 2]}, (1, 2)),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "S"},
                                           {"role": "user", "content": [
                                               {"type": "text", "text": "U"}]}]},
     "<system>S\n<user>U\n"),
    ("/v1/completions", None, ""),
    ("/v1/chat/completions", {"messages": "not a list"}, ""),
])
def test_routing_key(path: str, body: object, key: object) -> None:
    assert routing_key(path, body) == key


def test_chat_keys_share_the_prefix_of_a_shared_conversation() -> None:
    system = {"role": "system", "content": SYS_A}
    k1 = routing_key("/v1/chat/completions", {"messages": [system, {"role": "user",
                                                                      "content": "a"}]})
    k2 = routing_key("/v1/chat/completions", {"messages": [system, {"role": "user",
                                                                      "content": "b"}]})
    assert k1[:len(SYS_A)] == k2[:len(SYS_A)] and k1 != k2
