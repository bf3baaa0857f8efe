"""The acceptance rule of speculative decoding, for drafts that are point masses.

The target's step samples one token after each of the k + 1 positions (the decode's last
token and its k drafts), each row with the noise a step without drafts would use for that
output index (engine.sampler: fold_in(seed, step)). Draft i is accepted when every draft
before it was and it equals the target's token at its position; the tokens appended are the
accepted drafts and then the target's token after the last of them.

Why this keeps the target's distribution exactly: by induction, while drafts are accepted the
context is the one the target itself would have produced, and the target's token at the next
position is its own sample there. For a deterministic draft d this is rejection sampling:
the draft is accepted with probability p(d), and on rejection the token is the target's
sample conditioned on not being d (p with d removed, renormalised). Greedy rows are the
special case "the longest prefix equal to the target's argmax". A seeded request yields the
same tokens with and without speculation.
"""

from __future__ import annotations

from collections.abc import Sequence


def num_accepted(drafts: Sequence[int], targets: Sequence[int]) -> int:
    """How many leading drafts the target accepts. targets[i] is the target's token after
    the first i drafts (len(targets) == len(drafts) + 1)."""
    if len(targets) != len(drafts) + 1:
        raise ValueError(f"need one target token per draft and one more, got "
                         f"{len(drafts)=} and {len(targets)=}")
    n = 0
    while n < len(drafts) and drafts[n] == targets[n]:
        n += 1
    return n
