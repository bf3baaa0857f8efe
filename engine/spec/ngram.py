"""N-gram (prompt lookup) proposer: no model. The last n tokens of a request are looked up
earlier in its own prompt and output; the tokens that followed the most recent earlier
occurrence are the draft. Longer n-grams are tried first (a more specific match), from
max_n down to min_n."""

from __future__ import annotations

import numpy as np

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
        last = len(ids) - 1
        # Every earlier occurrence of the last token (e <= L - 2) ends a candidate match; how
        # far each one extends backwards (up to max_n) decides the n-grams it matches. One
        # comparison over the tokens, then small ones over the hits: the whole-window search
        # of every n size was most of a speculative step's host time on long sequences.
        ends = np.flatnonzero(ids[:-1] == ids[-1])  # [H]
        if ends.size == 0:
            return []
        run = np.ones(ends.size, np.int64)  # [H]: matched suffix length at each end
        for j in range(1, min(self.max_n, last)):
            before = ends - j
            ok = (run == j) & (before >= 0)
            ok[ok] &= ids[before[ok]] == ids[last - j]
            run += ok
        for n in range(min(self.max_n, last), self.min_n - 1, -1):
            hits = ends[run >= n]
            if hits.size:
                start = int(hits[-1]) + 1  # the token after the latest match
                return ids[start:start + k].tolist()
        return []
