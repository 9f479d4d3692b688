"""The adaptive n-gram proposal length (shards/proposal_length.py): all the step allows at first, two more
after a verification that kept every proposal, one fewer after one that did not."""

from mixserve.shards.proposal_length import ProposalLength


def test_a_new_sequence_proposes_all_the_step_allows():
    assert ProposalLength().allowed(5) == 5
    assert ProposalLength().allowed(0) == 0


def test_misses_shrink_the_length_down_to_one_and_full_runs_grow_it_back():
    length = ProposalLength()
    length.on_verified(5, 5, 2)  # a miss: 5 -> 4
    assert length.allowed(5) == 4
    for _ in range(5):
        length.on_verified(5, length.allowed(5), 0)
    assert length.allowed(5) == 1
    length.on_verified(5, 1, 1)  # every proposal kept: 1 -> 3
    assert length.allowed(5) == 3
    length.on_verified(5, 3, 3)
    assert length.allowed(5) == 5  # 3 -> 5, never above what the step allows
    length.on_verified(5, 5, 5)
    assert length.allowed(5) == 5 and length.allowed(8) == 7


def test_a_lookup_that_found_fewer_than_the_length_moves_it_from_the_length():
    length = ProposalLength()
    length.on_verified(5, 2, 2)  # the lookup found 2 of the 5 allowed, both kept: 5 -> 7, capped by the step
    assert length.allowed(5) == 5
    length.on_verified(5, 2, 1)  # one of 2 kept: 5 -> 4
    assert length.allowed(5) == 4


def test_a_narrow_step_moves_the_length_little():
    # The end of a multi-step run allows 1: a miss there leaves 1, a kept proposal 3, not the stored length +- 1.
    length = ProposalLength()
    length.on_verified(1, 1, 0)
    assert length.allowed(5) == 1
    length = ProposalLength()
    length.on_verified(1, 1, 1)
    assert length.allowed(5) == 3
