"""N-gram (prompt lookup) proposer: no model. The last n tokens of a request are looked up
earlier in its own prompt and output; the tokens that followed the most recent earlier
occurrence are the draft. Longer n-grams are tried first (a more specific match), from
max_n down to min_n."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from engine.core.request import Request


class NgramProposer:
    def __init__(self, min_n: int = 1, max_n: int = 4) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes need 1 <= {min_n=} <= {max_n=}")
        self.min_n, self.max_n = min_n, max_n

    def propose(self, requests: list[Request], k: int) -> list[list[int]]:
        return [self.lookup(r.all_token_ids, k) for r in requests]

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest suffix
        of `tokens` (of min_n..max_n tokens) that occurs earlier; [] when none does."""
        if k < 1 or len(tokens) < self.min_n + 1:
            return []
        ids = np.asarray(tokens, np.int64)  # [L]
        for n in range(min(self.max_n, len(ids) - 1), self.min_n - 1, -1):
            # Windows starting at 0 .. L-n-1: every n-gram but the suffix itself.
            windows = sliding_window_view(ids[:-1], n)  # [L - n, n]
            hits = np.flatnonzero((windows == ids[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n  # the token after the latest match
                return ids[start:start + k].tolist()
        return []
