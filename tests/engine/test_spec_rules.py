"""Speculative decoding's pieces without a model: the acceptance rule and the n-gram proposer."""

from __future__ import annotations

import pytest

from engine.spec.accept import num_accepted
from engine.spec.ngram import NgramProposer


@pytest.mark.parametrize("drafts,targets,n", [
    ([], [5], 0),
    ([1, 2, 3], [1, 2, 3, 4], 3),  # all accepted; 4 is the bonus token
    ([1, 2, 3], [1, 9, 3, 4], 1),  # the first mismatch ends it, a later match counts nothing
    ([1, 2, 3], [7, 2, 3, 4], 0),
])
def test_accepts_the_longest_prefix_equal_to_the_targets(drafts, targets, n) -> None:
    assert num_accepted(drafts, targets) == n


def test_needs_one_target_more_than_drafts() -> None:
    with pytest.raises(ValueError, match="one more"):
        num_accepted([1, 2], [1, 2])


def test_ngram_copies_what_followed_the_latest_match_of_the_longest_suffix() -> None:
    p = NgramProposer(min_n=1, max_n=3)
    # Suffix [7, 8, 9] occurs at 0 (then 1, 2) and at 5 (then 3, 4): the latest wins.
    assert p.lookup([7, 8, 9, 1, 2, 7, 8, 9, 3, 4, 0, 7, 8, 9], k=3) == [3, 4, 0]
    # [5, 9] never occurred before; [9] did, followed by 6.
    assert p.lookup([9, 6, 5, 9], k=2) == [6, 5]
    assert p.lookup([1, 2, 3, 4], k=2) == []  # nothing repeats
    assert p.lookup([4, 1, 4], k=5) == [1, 4]  # the draft stops at the end of the tokens


def test_ngram_min_size_is_respected() -> None:
    assert NgramProposer(min_n=2, max_n=3).lookup([9, 6, 5, 9], k=2) == []
    with pytest.raises(ValueError, match="min_n"):
        NgramProposer(min_n=3, max_n=2)


@pytest.mark.parametrize("options,match", [
    (dict(speculative_algorithm="medusa"), "must be one of ngram, draft, eagle"),
    (dict(speculative_algorithm="eagle3"), "speculative_draft_model=None goes with"),
    (dict(speculative_algorithm="draft"), "speculative_draft_model=None goes with"),
    (dict(speculative_draft_model="m.gguf"), "goes with speculative_algorithm draft"),
    (dict(speculative_algorithm="ngram", speculative_num_draft_tokens=0), "must be >= 1, got 0"),
    (dict(speculative_ngram_min=3, speculative_ngram_max=2), "speculative_ngram_min=3"),
])
def test_bad_speculative_options_are_clear_errors(options, match) -> None:
    from engine.config import EngineConfig

    with pytest.raises(ValueError, match=match):
        EngineConfig.build(**options)


def _lookup_reference(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """The rule spelled out: for n from max_n down, the latest earlier window equal to the
    last n tokens; the k tokens after it."""
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


def test_ngram_lookup_equals_the_rule_on_random_sequences() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(300):
        vocab, n_tok = int(rng.integers(2, 6)), int(rng.integers(1, 40))
        tokens = rng.integers(0, vocab, size=n_tok).tolist()
        lo = int(rng.integers(1, 4))
        hi = int(rng.integers(lo, 6))
        k = int(rng.integers(1, 6))
        assert NgramProposer(lo, hi).lookup(tokens, k) == _lookup_reference(tokens, k, lo, hi)
