"""Multi-step decode: several decode steps per router call, each step's sampled tokens fed to the next.

The router sends one ordinary decode step (one token per sequence, each sampled, block tables
already covering the positions of every step it allows) and the most steps to run. The shard
answers each step as soon as it is sampled, so tokens still stream one step at a time, while the
router's own work for step n overlaps the shard's compute of step n + 1 and no round trip sits
between steps.

The router stops a run early (a request arrived, was cancelled, or finished) with an interrupt.
An interrupt reaches the ranks at different moments, so before every further step the ranks
agree, with one tiny collective, whether any of them was interrupted: they always run the same
steps, and their other collectives keep pairing up.

Speculating runs. A sequence with `speculate` k proposes up to k tokens before every step of the run
(shards/ngram.py, or the draft model), and the step verifies them (shards/speculative.py), so a step
may give it several tokens. The run's `num_steps`, or a sequence's own `run_tokens` (fewer: the tokens
it has left, which the router gives each speculating sequence), then bounds the tokens each sequence
gains, which is what the router's blocks cover: a step at position p proposes at most `last - p` tokens
(`last` the final position the run may write, start + its bound - 1). A sequence done with its own
run_tokens leaves the run (it has finished) and the others go on; the run ends once any sequence has
gained num_steps tokens, or none is left. Every rank gets the same tokens, so every rank
ends the run at the same step without a collective. Verification thus rides inside the run, with no
round trip per step, and a step whose lookup found nothing costs what a plain decode costs.
"""

from collections.abc import Callable, Iterator

from mixserve.shards.runner import ModelRunner
from mixserve.shards.sequence_step import InvalidStep, SequenceResult, SequenceStep


def last_positions(steps: list[SequenceStep], num_steps: int) -> list[int]:
    """The last position each sequence may write in a run of `num_steps`: its own run_tokens, else num_steps."""
    return [s.start_position + (s.run_tokens or num_steps) - 1 for s in steps]


def check_multi_step(steps: list[SequenceStep], num_steps: int, block_size: int) -> None:
    """Raise InvalidStep unless `steps` can run `num_steps` decode steps in a row (or, speculating, gain
    `num_steps` tokens each, or their own run_tokens)."""
    if num_steps < 1:
        raise InvalidStep(f"num_steps must be >= 1, got {num_steps}")
    for s, last_position in zip(steps, last_positions(steps, num_steps), strict=True):
        if len(s.token_ids) != 1 or not s.sample or s.num_proposed or s.draft:
            raise InvalidStep(f"sequence {s.seq_id}: a multi-step run takes one sampled decode token per sequence")
        if s.run_tokens > num_steps:
            raise InvalidStep(f"sequence {s.seq_id}: run_tokens {s.run_tokens} exceeds the run's {num_steps} steps")
        if len(s.block_table) * block_size <= last_position:
            raise InvalidStep(
                f"sequence {s.seq_id}: its block table ({len(s.block_table)} blocks of {block_size}) does not "
                f"cover position {last_position}, the last of its {s.run_tokens or num_steps} tokens in the run"
            )


def run_step(s: SequenceStep, token: int, position: int, last: int, block_size: int) -> SequenceStep:
    """`s`'s step of `token` at `position`: a decode, marked to have up to `s.speculate` proposals made (as
    many as positions up to `last` are left) when it speculates."""
    proposals = min(s.speculate, last - position)
    table = s.block_table
    slots = [table[p // block_size] * block_size + p % block_size for p in range(position, position + 1 + proposals)]
    # Built directly, not with dataclasses.replace (4x the cost, once per sequence and step): a run's decodes
    # carry no sampling settings and no prefix, which the shard already holds.
    return SequenceStep(
        s.seq_id, [token], position, slots, table, num_proposed=proposals, draft=proposals > 0, speculate=s.speculate
    )


def next_steps(
    steps: list[SequenceStep], results: list[SequenceResult], lasts: dict[int, int], leaves: set[int], block_size: int
) -> list[SequenceStep] | None:
    """The step after `steps`: each sequence's last token gained at its next position. A sequence that has
    gained every token its run allows (its next position is past its last) leaves the run where those are
    all it has left (`leaves`: its run_tokens below the run's steps); otherwise the run ends (None), as it
    does when no sequence is left."""
    by_id = {r.seq_id: r for r in results}
    following = []
    for s in steps:
        r = by_id[s.seq_id]
        position = s.start_position + 1 + len(r.next_tokens)
        last = lasts[s.seq_id]
        if position > last:
            if s.seq_id in leaves:
                continue
            return None
        token = r.next_tokens[-1].token_id if r.next_tokens else r.token_id
        following.append(run_step(s, token, position, last, block_size))
    return following or None


def decode_steps(
    runner: ModelRunner, steps: list[SequenceStep], num_steps: int, agree_to_stop: Callable[[], bool]
) -> Iterator[list[SequenceResult]]:
    """Run decode steps from `steps` until a sequence gained its `num_steps` tokens, yielding each step's
    results (one token a sequence a step unless it speculates). A sequence whose run_tokens are fewer
    leaves the run once it has gained them (what it had left), and the others go on.

    `agree_to_stop` is called on every rank before every step after the first and must return the
    same answer on all of them (a collective over the ranks' interrupt flags).
    """
    size = runner.block_size
    check_multi_step(steps, num_steps, size)
    lasts = dict(zip((s.seq_id for s in steps), last_positions(steps, num_steps), strict=True))
    leaves = {s.seq_id for s in steps if 0 < s.run_tokens < num_steps}
    current: list[SequenceStep] | None = [
        run_step(s, s.token_ids[0], s.start_position, lasts[s.seq_id], size) for s in steps
    ]
    while current is not None:
        results = runner.step(current)
        yield results
        current = next_steps(current, results, lasts, leaves, size)
        if current is not None and agree_to_stop():
            return
