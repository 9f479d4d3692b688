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
"""

from collections.abc import Callable, Iterator

from mixserve.shards.runner import InvalidStep, ModelRunner, SequenceResult, SequenceStep


def check_multi_step(steps: list[SequenceStep], num_steps: int, block_size: int) -> None:
    """Raise InvalidStep unless `steps` can run `num_steps` decode steps in a row."""
    if num_steps < 1:
        raise InvalidStep(f"num_steps must be >= 1, got {num_steps}")
    for s in steps:
        if len(s.token_ids) != 1 or not s.sample:
            raise InvalidStep(f"sequence {s.seq_id}: a multi-step run takes one sampled decode token per sequence")
        last_position = s.start_position + num_steps - 1
        if len(s.block_table) * block_size <= last_position:
            raise InvalidStep(
                f"sequence {s.seq_id}: its block table ({len(s.block_table)} blocks of {block_size}) does not "
                f"cover position {last_position}, the last of {num_steps} steps"
            )


def next_steps(steps: list[SequenceStep], results: list[SequenceResult], block_size: int) -> list[SequenceStep]:
    """The decode step after `steps`: each sequence's sampled token at the next position."""
    tokens = {r.seq_id: r.token_id for r in results}
    following = []
    for s in steps:
        position = s.start_position + 1
        slot = s.block_table[position // block_size] * block_size + position % block_size
        following.append(SequenceStep(s.seq_id, [tokens[s.seq_id]], position, [slot], s.block_table, True, None))
    return following


def decode_steps(
    runner: ModelRunner, steps: list[SequenceStep], num_steps: int, agree_to_stop: Callable[[], bool]
) -> Iterator[list[SequenceResult]]:
    """Run up to `num_steps` decode steps from `steps`, yielding each step's results.

    `agree_to_stop` is called on every rank before every step after the first and must return the
    same answer on all of them (a collective over the ranks' interrupt flags).
    """
    check_multi_step(steps, num_steps, runner.block_size)
    results: list[SequenceResult] = []
    for index in range(num_steps):
        if index:
            if agree_to_stop():
                return
            steps = next_steps(steps, results, runner.block_size)
        results = runner.step(steps)
        yield results
