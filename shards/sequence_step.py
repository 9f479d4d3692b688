"""The plain types a step travels in, and the errors that refuse one: apart from the runner, so the
wire conversion (shards/step_proto.py) and the builders of a step's inputs and rows name them without
importing the model.
"""

from dataclasses import dataclass, field

from mixserve.shards.sampling_params import SamplingParams
from mixserve.shards.speculative import VerifiedToken


class InvalidStep(ValueError):
    """The step is malformed (gRPC INVALID_ARGUMENT)."""


class OutOfCapacity(ValueError):
    """The step addresses cache blocks or slots the shard does not have (gRPC RESOURCE_EXHAUSTED)."""


@dataclass(slots=True)
class SequenceStep:
    """One sequence's share of a step (the Python form of shard.proto's SequenceStep)."""

    seq_id: int
    token_ids: list[int]
    start_position: int
    slot_mapping: list[int]
    block_table: list[int]
    sample: bool = True
    sampling: SamplingParams | None = None
    # Tokens of positions [0, start_position) when the router admits the sequence past position 0
    # (a prefix cache hit); empty otherwise.
    prefix_token_ids: list[int] = field(default_factory=list)
    # Score the prompt: the result carries each of token_ids' log-probability given the tokens before it.
    prompt_logprobs: bool = False
    # The last num_proposed of token_ids are proposed tokens to verify (speculative decoding).
    num_proposed: int = 0
    # The shard makes the num_proposed proposals (draft model or n-gram lookup): token_ids is the last
    # token alone, slot_mapping covers it and the proposals.
    draft: bool = False
    # In a multi-step run: the most tokens proposed here before each step, and the most tokens the
    # sequence gains in the run (0: the run's num_steps) (shards/multi_step.py).
    speculate: int = 0
    run_tokens: int = 0


@dataclass(slots=True)
class SequenceResult:
    seq_id: int
    token_id: int
    logprob: float
    top_tokens: list[tuple[int, float]] = field(default_factory=list)
    sampled: bool = True  # False: a non-final prefill chunk that only scored its tokens
    # With SequenceStep.prompt_logprobs: one per token of the step, NaN at position 0; with top_n_tokens too,
    # each token's position's top alternatives (none at position 0).
    prompt_logprobs: list[float] = field(default_factory=list)
    prompt_top_tokens: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_ranks: list[int] = field(default_factory=list)  # each token's rank at its position (0 at 0)
    # A verification step's further tokens: accepted proposals after token_id, then the last one sampled.
    next_tokens: list[VerifiedToken] = field(default_factory=list)
    # After a draft step: the proposals made here (at most the step's num_proposed).
    num_drafted: int = 0
