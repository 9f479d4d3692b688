"""One shard step as the engine plans and reads it, in plain data: what each sequence runs and how
it samples, and the tokens sampled. router/shard_client.py alone turns these into the shard wire
format (proto/shard.proto) and back."""

from dataclasses import dataclass, field


@dataclass(slots=True, frozen=True)
class Sampling:
    """How a sequence samples; sent on its first step, kept by the shards until it is released."""

    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    frequency_penalty: float
    presence_penalty: float
    seed: int
    top_n_tokens: int
    grammar: str = ""  # llguidance's serialized grammar; empty for free text
    typical_p: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_p: float = 0.0
    allowed_token_ids: list[int] = field(default_factory=list)  # vLLM's: only these are sampled; empty: all
    bad_words: list[list[int]] = field(default_factory=list)  # vLLM's bad_words, as token ids
    prediction_token_ids: list[int] = field(default_factory=list)  # OpenAI's prediction, the proposals' source


@dataclass(slots=True)
class SequenceStep:
    """What one sequence runs in a step (the scheduler's ScheduledSequence, addressed by id)."""

    seq_id: int
    token_ids: list[int]
    start_position: int
    slot_mapping: list[int]
    block_table: list[int]
    sample: bool
    prefix_token_ids: list[int]
    sampling: Sampling | None = None  # set on the sequence's first (prefill) step
    prompt_logprobs: bool = False  # score the step's tokens (prefill steps of a request that asks)
    # Speculative decoding: the last num_proposed of token_ids are proposals the shards verify; with
    # `draft`, the shards' draft model makes them (token_ids is the last token, slot_mapping covers them).
    num_proposed: int = 0
    draft: bool = False
    # In a multi-step run: the most tokens the shards propose before each step (0: none), and the most
    # tokens the sequence gains in the run (0: the run's num_steps).
    speculate: int = 0
    run_tokens: int = 0


@dataclass(slots=True)
class Step:
    """One step of every scheduled sequence, after releasing the finished ones' sampling state; with
    `num_steps` > 1, a multi-step decode run identified by `run_id`, whose steps the shards send at most
    once per `stream_interval_us` (the steps finished meanwhile together)."""

    sequences: list[SequenceStep]
    release_seq_ids: list[int] = field(default_factory=list)
    num_steps: int = 1
    run_id: int = 0
    stream_interval_us: int = 0


@dataclass(slots=True)
class SampledToken:
    """The token one sequence sampled, its logprob and the top alternatives asked for; a prefill chunk that
    only scored its tokens is `sampled=False`, with `prompt_logprobs` (one per token of the step, NaN at 0);
    after a verification step, the tokens that follow it (accepted proposals, then the last token sampled)."""

    seq_id: int
    token_id: int
    logprob: float
    top_tokens: list[tuple[int, float]]
    sampled: bool = True
    prompt_logprobs: list[float] = field(default_factory=list)
    # With prompt_logprobs and top_n_tokens: each scored token's position's top alternatives (none at 0).
    prompt_top_tokens: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_ranks: list[int] = field(default_factory=list)  # each scored token's rank at its position
    next_tokens: list["SampledToken"] = field(default_factory=list)
    num_drafted: int = 0  # after a draft or speculating-run step: the proposals the shards made


@dataclass(slots=True)
class StepResult:
    """A step's sampled tokens and the time the shard spent on it."""

    tokens: list[SampledToken]
    forward_us: int
