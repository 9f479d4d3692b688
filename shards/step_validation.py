"""Step validation: a pure function of the request and the shard's state, so a malformed step is
refused by every rank of the group before any collective starts.
"""

from mixserve.shards.config import ModelConfig
from mixserve.shards.kv_cache import KVCache
from mixserve.shards.sampling_params import SamplingParams
from mixserve.shards.sequence_step import InvalidStep, OutOfCapacity, SequenceStep
from mixserve.shards.step_rows import SequenceState


def validate_steps(
    steps: list[SequenceStep],
    config: ModelConfig,
    block_size: int,
    kv_cache: KVCache | None,
    sequences: dict[int, SequenceState],
) -> None:
    """Raise InvalidStep / OutOfCapacity for a step no rank should run."""
    if kv_cache is None:
        raise InvalidStep("the KV cache is not allocated: call Warmup first")
    if not steps:
        raise InvalidStep("the step has no sequences")
    seen: set[int] = set()
    for s in steps:
        where = f"sequence {s.seq_id}"
        if s.seq_id in seen:
            raise InvalidStep(f"{where} appears twice in one step")
        seen.add(s.seq_id)
        if not s.token_ids:
            raise InvalidStep(f"{where} has no tokens")
        if s.draft:
            _validate_draft(s)
        n = len(s.token_ids) + (s.num_proposed if s.draft else 0)  # positions
        if len(s.slot_mapping) != n:
            raise InvalidStep(f"{where} has {n} positions but {len(s.slot_mapping)} slots")
        end = s.start_position + n
        if end > config.max_position_embeddings:
            raise InvalidStep(
                f"{where} reaches position {end}, past max_position_embeddings {config.max_position_embeddings}"
            )
        if max(s.token_ids) >= config.vocab_size:
            raise InvalidStep(f"{where} has token id {max(s.token_ids)} >= vocab size {config.vocab_size}")
        if s.prefix_token_ids and len(s.prefix_token_ids) != s.start_position:
            raise InvalidStep(
                f"{where} starts at position {s.start_position} but has {len(s.prefix_token_ids)} prefix tokens"
            )
        if s.prefix_token_ids and max(s.prefix_token_ids) >= config.vocab_size:
            raise InvalidStep(f"{where} has a prefix token id >= vocab size {config.vocab_size}")
        needed = -(-end // block_size)
        if len(s.block_table) < needed:
            raise InvalidStep(
                f"{where} needs {needed} blocks for {end} positions, block table has {len(s.block_table)}"
            )
        if max(s.block_table) >= kv_cache.num_blocks:
            raise OutOfCapacity(f"{where} uses block {max(s.block_table)}; the cache has {kv_cache.num_blocks}")
        if max(s.slot_mapping) >= kv_cache.num_slots:
            raise OutOfCapacity(f"{where} uses slot {max(s.slot_mapping)}; the cache has {kv_cache.num_slots}")
        if s.sampling is not None:
            _validate_sampled_ids(s.sampling, where, config.vocab_size)
        if s.seq_id not in sequences and s.sampling is None:
            raise InvalidStep(f"{where} is new to this shard and its step carries no sampling parameters")
        if s.num_proposed:
            _validate_proposals(s)
    # Plain Python: a decode checks one slot in about a microsecond, where building tensors for it
    # cost ~20 us per sequence (0.6 ms a step at batch 32).
    size = block_size
    for s in steps:
        table = s.block_table
        if any(table[p // size] * size + p % size != slot for p, slot in enumerate(s.slot_mapping, s.start_position)):
            raise InvalidStep(f"sequence {s.seq_id}: slot_mapping does not match its block table")


def _validate_sampled_ids(sampling: SamplingParams, where: str, vocab_size: int) -> None:
    """The token ids a sequence's sampling settings name (logit_bias, allowed_token_ids, bad_words, the
    prediction) are in the vocabulary."""
    named = (
        ("biases", sampling.logit_bias),
        ("allows", sampling.allowed_token_ids),
        ("bans", [t for word in sampling.bad_words for t in word]),
        ("predicts", sampling.prediction_token_ids),
    )
    for verb, ids in named:
        if ids and max(ids) >= vocab_size:
            raise InvalidStep(f"{where} {verb} token id {max(ids)} >= vocab size {vocab_size}")


def _validate_draft(s: SequenceStep) -> None:
    where = f"sequence {s.seq_id}"
    if not s.num_proposed or len(s.token_ids) != 1:
        raise InvalidStep(
            f"{where} asks for draft proposals with {len(s.token_ids)} tokens and {s.num_proposed} proposals; "
            "a drafting step is one token and at least one proposal"
        )


def _validate_proposals(s: SequenceStep) -> None:
    where = f"sequence {s.seq_id}"
    if not s.draft and s.num_proposed >= len(s.token_ids):
        raise InvalidStep(f"{where} proposes {s.num_proposed} of its {len(s.token_ids)} tokens; the first is its own")
    if not s.sample:
        raise InvalidStep(f"{where} proposes tokens but does not sample")
