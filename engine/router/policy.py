"""Which replica serves a request: round robin, or cache-aware with a load-balance fallback.

A policy sees the routing key (what the prompt starts with) and the load of each live
replica (requests in flight through the router), and returns a replica index.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from engine.router.tree import ApproxPrefixTree, Key


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    cache_threshold: float = 0.5
    """Send a request to the replica with the longest cached prefix only if that prefix is
    at least this fraction of its key; otherwise to the replica with the smallest tree."""
    balance_abs_threshold: int = 32
    """Loads count as imbalanced when max - min exceeds this ..."""
    balance_rel_threshold: float = 1.5
    """... and max exceeds this times min; then the least-loaded replica gets the request."""
    max_tree_size: int = 1 << 22
    """Key elements (characters or tokens) the tree keeps per replica; LRU beyond."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ValueError(f"{self.cache_threshold=} must be in [0, 1]")
        if self.balance_abs_threshold < 0 or self.balance_rel_threshold < 1.0:
            raise ValueError(f"{self.balance_abs_threshold=} must be >= 0 and "
                             f"{self.balance_rel_threshold=} >= 1")
        if self.max_tree_size < 1:
            raise ValueError(f"{self.max_tree_size=} must be >= 1")


class Policy(Protocol):
    def choose(self, key: Key, loads: Mapping[int, int]) -> int:
        """The replica for a request; `loads` maps each live replica to its load."""
        ...

    def forget(self, replica: int) -> None:
        """The replica died: drop what is known about it."""
        ...


def least_loaded(loads: Mapping[int, int]) -> int:
    return min(loads, key=lambda r: (loads[r], r))


class RoundRobin:
    def __init__(self, config: RouterConfig | None = None) -> None:
        self._next = 0

    def choose(self, key: Key, loads: Mapping[int, int]) -> int:
        live = sorted(loads)
        if not live:
            raise ValueError("no live replica")
        # The first live replica at or after the cursor (dead ones are skipped).
        r = next((r for r in live if r >= self._next), live[0])
        self._next = r + 1
        return r

    def forget(self, replica: int) -> None:
        pass


class CacheAware:
    """SGLang-router style: prefix affinity while loads are balanced, least load when not."""

    def __init__(self, config: RouterConfig | None = None) -> None:
        self.config = config or RouterConfig()
        self.tree = ApproxPrefixTree()

    def imbalanced(self, loads: Mapping[int, int]) -> bool:
        hi, lo = max(loads.values()), min(loads.values())
        c = self.config
        return hi - lo > c.balance_abs_threshold and hi > c.balance_rel_threshold * lo

    def choose(self, key: Key, loads: Mapping[int, int]) -> int:
        if not loads:
            raise ValueError("no live replica")
        if self.imbalanced(loads):
            r = least_loaded(loads)
        else:
            matched = {r: n for r, n in self.tree.match(key).items() if r in loads}
            best = max(matched, key=lambda r: (matched[r], -loads[r], -r), default=None)
            if best is not None and matched[best] >= self.config.cache_threshold * len(key):
                r = best
            else:  # no good match: the replica that caches least, then the least loaded
                r = min(loads, key=lambda r: (self.tree.size(r), loads[r], r))
        self.tree.insert(key, r)
        self.tree.evict(r, self.config.max_tree_size)
        return r

    def forget(self, replica: int) -> None:
        self.tree.remove_replica(replica)


POLICIES: dict[str, Callable[[RouterConfig], Policy]] = {
    "cache_aware": CacheAware,
    "round_robin": RoundRobin,
}


def routing_key(path: str, body: Any) -> Key:
    """What the prompt starts with: text for text prompts, a tuple of ids for token prompts,
    the messages rendered role by role for chat. The first prompt of a batch stands for it."""
    if not isinstance(body, dict):
        return ""
    if path.endswith("/chat/completions"):
        messages = body.get("messages")
        return "".join(_render(m) for m in messages) if isinstance(messages, list) else ""
    prompt = body.get("prompt") if path.endswith("/completions") else \
        body.get("text", body.get("input_ids"))
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return tuple(prompt)
    return ""


def _render(message: Any) -> str:
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, list):  # content parts: their text, in order
        content = "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return f"<{message.get('role', '')}>{content or ''}\n"
