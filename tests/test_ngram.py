"""The shards' n-gram proposer: the lookup's definition, and the incremental index that live sequences use."""

import random

import pytest

from mixserve.shards.ngram import NgramIndex, propose


def test_propose_continues_the_latest_occurrence_of_the_longest_suffix():
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    # "2 3" last occurred before 7 8 (the 3-gram "5 2 3" never did).
    assert propose(tokens, 2) == [7, 8]
    assert propose(tokens, 5) == [7, 8, 5, 2, 3]
    assert propose([4, 5, 6, 4, 5], 3) == [6, 4, 5]  # a 2-gram
    assert propose([4, 5, 6, 4], 3) == []  # a 1-gram is too short a match
    assert propose([4, 5, 6, 4], 3, min_ngram=1) == [5, 6, 4]
    assert propose([4, 5, 6], 3) == []
    assert propose([4, 4, 4], 3) == [4]
    assert propose([1, 2, 1], 0) == []


@pytest.mark.parametrize("seed", range(6))
def test_the_index_proposes_what_the_scan_does_at_every_length(seed):
    """Tokens arriving one to several at a time, from a small vocabulary (many repeats): the index's
    proposal equals the full scan's after every arrival, for every k."""
    rng = random.Random(seed)
    vocab = rng.choice([3, 5, 12])
    tokens = [rng.randrange(vocab) for _ in range(rng.randrange(0, 6))]
    index = NgramIndex()
    for _ in range(60):
        k = rng.randrange(0, 6)
        assert index.propose(tokens, k) == propose(tokens, k)
        tokens.extend(rng.randrange(vocab) for _ in range(rng.randrange(1, 4)))


def test_the_index_refuses_a_list_that_shrank():
    index = NgramIndex()
    index.propose([1, 2, 1, 2], 2)
    with pytest.raises(ValueError, match="shrank"):
        index.propose([1, 2], 2)
