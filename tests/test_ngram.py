"""The shards' n-gram proposer: the lookup's definition, the incremental index that live sequences use, and
the index of finished sequences' tokens it looks in next (--speculate-history-tokens)."""

import random

import pytest

from mixserve.shards.ngram import MAX_NGRAM, MIN_NGRAM, HistoryIndex, NgramIndex, propose


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


def propose_with_history(tokens: list[int], k: int, lists: list[list[int]]) -> list[int]:
    """The definition with a history: at each suffix length, longest first, the sequence's own latest
    occurrence, else the latest occurrence in the newest of `lists` (oldest first) that holds one."""
    length = len(tokens)
    for n in range(min(MAX_NGRAM, length - 1), MIN_NGRAM - 1, -1):
        own = propose(tokens, k, max_ngram=n, min_ngram=n)
        if own:
            return own
        suffix = tokens[length - n :]
        for held in reversed(lists):
            for i in range(len(held) - n - 1, -1, -1):
                if held[i : i + n] == suffix:
                    return held[i + n : i + n + k]
    return []


def kept(lists: list[list[int]], budget: int) -> list[list[int]]:
    """The lists a history of `budget` tokens holds: each cut to its last `budget` tokens, the newest ones
    whose lengths sum to at most the budget."""
    out, total = [], 0
    for held in reversed([held[-budget:] for held in lists]):
        if total + len(held) > budget:
            break
        out.append(held)
        total += len(held)
    return out[::-1]


def test_the_history_is_looked_up_where_the_own_tokens_hold_no_suffix():
    history = HistoryIndex(100)
    history.add([5, 6, 7, 8, 9])
    history.add([1, 5, 6, 4, 4])  # newer: "5 6" is followed by 4 here
    assert not history.latest  # indexed at the first lookup, not as they come
    assert history.follow((5, 6), 3) == [4, 4]
    assert history.follow((6, 7), 2) == [8, 9]
    assert history.follow((8, 9), 2) == []  # nothing followed it
    index = NgramIndex()
    assert index.propose([3, 5, 6, 7], 2, history) == [8, 9]  # the 3-gram "5 6 7" is in the history
    assert index.propose([3, 5, 6, 7, 2, 6, 7], 2, history) == [2, 6]  # the own "6 7" before the history's
    assert NgramIndex().propose([0, 5, 6], 2, history) == [4, 4]
    assert NgramIndex().propose([0, 5, 6], 2) == []
    history.clear()
    assert NgramIndex().propose([0, 5, 6], 2, history) == [] and history.held == 0
    with pytest.raises(ValueError, match="at least 1 token"):
        HistoryIndex(0)


@pytest.mark.parametrize("seed", range(6))
def test_the_history_proposes_what_the_scan_does_as_lists_come_and_go(seed):
    """Finished lists added over a small budget (the oldest dropped, a long one cut to its end, some before
    a lookup indexed them), live token lists growing: the index with its history proposes what the scan
    over the kept lists does."""
    rng = random.Random(seed)
    vocab = rng.choice([4, 8, 16])
    budget = rng.choice([6, 20, 50])
    history, finished = HistoryIndex(budget), []
    for _ in range(25):
        for _ in range(rng.randrange(1, 4)):  # some dropped before any lookup indexes them
            done = [rng.randrange(vocab) for _ in range(rng.randrange(0, 2 * budget // 3 + 2))]
            history.add(done)
            finished.append(done)
            assert history.held == sum(map(len, kept(finished, budget))) <= budget
        tokens = [rng.randrange(vocab) for _ in range(rng.randrange(1, 4))]
        index = NgramIndex()
        for _ in range(8):
            k = rng.randrange(1, 5)
            assert index.propose(tokens, k, history) == propose_with_history(tokens, k, kept(finished, budget))
            tokens.append(rng.randrange(vocab))
