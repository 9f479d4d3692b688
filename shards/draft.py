"""The draft model of speculative decoding (`--speculative-model`): a small model with the target's
vocabulary, run on every shard, proposing the tokens a verification step checks (shards/speculative.py).

Every rank holds the whole draft (replicated: no collectives of its own) and a paged KV cache of its
own with the target cache's block count and block size, addressed through the block tables and slot
mappings the router already sends: a sequence's draft K/V lives in the same slots as its target K/V,
and a rejected token's slot is overwritten later exactly as the target's is. The router's bookkeeping
does not change; it only reserves the slots of the proposals (SequenceStep.draft).

A drafting sequence's step: the draft computes the positions it has not seen yet (the prompt on the
first drafting step, afterwards the last accepted proposal and the token sampled after it) as chunks
ending at the sequence's last token, whose logits give the first proposal; up to k - 1 one-token
decodes give the rest. Every proposal is the draft's argmax; a sequence stops proposing after one
whose draft probability is below `MIN_CONFIDENCE` (as Hugging Face's assisted generation does), so
an unsure draft spends neither draft decodes nor verification width on tokens likely rejected; the
slots reserved for proposals not made are not written, and the router rolls them back as rejected.
Tokens are tracked per sequence from the steps themselves (the tokens at each step's positions, a
prefix cache hit's prefix tokens, the proposals), so nothing extra travels on the wire.

Why outputs do not change: the proposals only choose what the target verifies; the target's sampler
decides every token. Greedy proposals are deterministic, so the draft's distribution q is one-hot on
the proposal x, and the rule of shards/speculative.py (keep x with probability p(x), else draw from p
without x, renormalised) is exactly the standard rejection-sampling rule (keep with probability
min(1, p(x) / q(x)), else draw from norm(max(p - q, 0))): sampled requests keep their distribution and
seeded ones stay reproducible. The draft's K/V need not even be right: a stale slot costs acceptance,
never a token. Every rank uses rank 0's proposals (one small all-reduce), so the ranks verify the same
tokens even where devices round differently.

Legend: B drafting sequences, V vocab size.
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch

from mixserve.shards.config import ModelConfig, ParallelConfig
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.loader import load_model
from mixserve.shards.runner import ModelRunner
from mixserve.shards.sequence_step import SequenceStep
from mixserve.shards.speculative import num_accepted

# Most positions one draft forward computes for one sequence while it catches up (a long prompt runs
# as several chunks, so the draft's activations stay near a prefill chunk's).
CATCH_UP_CHUNK = 512
# A proposal whose draft probability is below this is the sequence's last in the step.
MIN_CONFIDENCE = 0.4
# Largest drafting batch with a decode graph of the draft's own: speculation runs at small batches
# (the router's --speculate-max-batch), and every bucket costs a capture at start-up.
DRAFT_GRAPH_BATCH = 32


@dataclass(slots=True)
class DraftSequence:
    """What the draft knows of one sequence: its tokens by position, and how many of the first of them
    have draft K/V in the sequence's slots."""

    tokens: list[int] = field(default_factory=list)
    cached: int = 0


def check_draft(draft_dir: str | Path, target: ModelConfig) -> ModelConfig:
    """The draft checkpoint's config; ValueError where it cannot load or its vocabulary is not the target's."""
    try:
        config = ModelConfig.from_pretrained(draft_dir)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--speculative-model {draft_dir}: its config does not load: {e}") from None
    if config.vocab_size != target.vocab_size:
        raise ValueError(
            f"--speculative-model {draft_dir}: vocab_size {config.vocab_size} differs from the model's "
            f"{target.vocab_size}; the draft must share the model's tokenizer"
        )
    return config


def load_draft(
    draft_dir: str | Path,
    target: ModelConfig,
    group: TensorParallelGroup,
    dtype: torch.dtype,
    device: torch.device,
    block_size: int,
    cuda_graphs: str = "off",
    load_format: str = "auto",
    seed: int = 0,
) -> "DraftModel":
    """The whole draft model on this rank (no tensor parallelism), ready for a runner of the target's
    `group`, its one-token decodes through decode graphs as `cuda_graphs` says (shards/decode_graph.py),
    its weights read as `load_format` says (shards/loader.py); ValueError as `check_draft` says."""
    check_draft(draft_dir, target)
    alone = ParallelConfig(0, 1, "tp")
    draft_group = TensorParallelGroup(alone, device=device)
    model = load_model(draft_dir, alone, draft_group, dtype, device, load_format=load_format, seed=seed)
    runner = ModelRunner(model, alone, draft_group, device, dtype, block_size, cuda_graphs, DRAFT_GRAPH_BATCH)
    return DraftModel(runner, group)


class DraftModel:
    """The draft model of one shard, its KV cache, and the sequences it has seen."""

    def __init__(self, runner: ModelRunner, group: TensorParallelGroup) -> None:
        """`runner`: the draft model's own runner (world size 1); `group`: the target's group, over which
        rank 0's proposals reach every rank."""
        self.runner = runner
        self.group = group
        self.sequences: dict[int, DraftSequence] = {}

    @property
    def vocab_size(self) -> int:
        return self.runner.config.vocab_size

    def bytes_per_block(self) -> int:
        """Bytes of the draft's K/V for one block (added to the target's when the cache is sized)."""
        return self.runner.bytes_per_block()

    def allocate_cache(self, num_blocks: int) -> None:
        """A draft cache of the target's `num_blocks` (and a scratch block of its own for its decode graphs);
        forgets every sequence."""
        self.sequences.clear()
        self.runner.allocate_cache(num_blocks, 1 if self.runner.graphs_wanted else 0)

    def prepare_decode_graphs(self, max_batch_size: int) -> None:
        """The draft's decode graphs over the cache just allocated (see ModelRunner.prepare_decode_graphs)."""
        self.runner.prepare_decode_graphs(max_batch_size)

    def observe(self, steps: list[SequenceStep]) -> None:
        """Record the tokens of a step's positions (every step, drafting or not), before it runs."""
        for s in steps:
            seq = self.sequences.get(s.seq_id)
            if seq is None:
                seq = self.sequences[s.seq_id] = DraftSequence()
            if s.prefix_token_ids:
                # A prefix cache hit: other sequences filled those blocks, with or without draft K/V.
                seq.tokens = list(s.prefix_token_ids)
                seq.cached = 0
            if len(seq.tokens) < s.start_position:
                # Positions whose tokens this shard never saw (its state was cleared mid-sequence): the
                # draft reads them as token 0, which costs acceptance only, and recomputes them.
                seq.tokens.extend([0] * (s.start_position - len(seq.tokens)))
                seq.cached = 0
            del seq.tokens[s.start_position :]
            seq.tokens.extend(s.token_ids[: len(s.token_ids) - (0 if s.draft else s.num_proposed)])
            seq.cached = min(seq.cached, s.start_position)

    @torch.inference_mode()
    def propose(self, steps: list[SequenceStep]) -> list[list[int]]:
        """Each drafting step's proposals (1 to its num_proposed tokens, greedy), the same on every rank;
        `observe` has seen the steps."""
        states = [self.sequences[s.seq_id] for s in steps]
        proposals: list[list[int]] = [[] for _ in steps]
        unsure: set[int] = set()  # sequences whose last proposal was below MIN_CONFIDENCE
        pending = list(range(len(steps)))
        while pending:
            chunks = [self._catch_up_chunk(steps[i], states[i]) for i in pending]
            picks, confidences = self._greedy(chunks)
            still = []
            for i, chunk, pick, confidence in zip(pending, chunks, picks, confidences, strict=True):
                states[i].cached += len(chunk.token_ids)
                if states[i].cached > steps[i].start_position:
                    proposals[i].append(pick)
                    if confidence < MIN_CONFIDENCE:
                        unsure.add(i)
                else:
                    still.append(i)
            pending = still
        for j in range(1, max(s.num_proposed for s in steps)):
            # Proposal j - 1 at position start + j, in the slot the router reserved for it.
            rows = [i for i, s in enumerate(steps) if s.num_proposed > j and i not in unsure]
            if not rows:
                break
            decodes = [
                SequenceStep(
                    steps[i].seq_id,
                    [proposals[i][-1]],
                    steps[i].start_position + j,
                    [steps[i].slot_mapping[j]],
                    steps[i].block_table,
                    sample=False,
                )
                for i in rows
            ]
            picks, confidences = self._greedy(decodes)
            for i, pick, confidence in zip(rows, picks, confidences, strict=True):
                states[i].cached += 1
                proposals[i].append(pick)
                if confidence < MIN_CONFIDENCE:
                    unsure.add(i)
        agreed = self._from_rank_zero(proposals)
        for s, state, own, proposed in zip(steps, states, proposals, agreed, strict=True):
            # Draft K/V past the first proposal where this rank differed from rank 0 holds other tokens.
            state.cached = min(state.cached, s.start_position + 1 + num_accepted(own, proposed))
            state.tokens.extend(proposed)
        return agreed

    def release(self, seq_ids: list[int]) -> None:
        """Forget finished sequences."""
        for seq_id in seq_ids:
            self.sequences.pop(seq_id, None)

    def clear(self) -> None:
        self.sequences.clear()

    def _catch_up_chunk(self, s: SequenceStep, seq: DraftSequence) -> SequenceStep:
        """The next positions the draft has not computed, up to the sequence's last token, as one chunk."""
        end = min(s.start_position + 1, seq.cached + CATCH_UP_CHUNK)
        size, table = self.runner.block_size, s.block_table
        slots = [table[p // size] * size + p % size for p in range(seq.cached, end)]
        return SequenceStep(s.seq_id, seq.tokens[seq.cached : end], seq.cached, slots, table, sample=False)

    def _greedy(self, steps: list[SequenceStep]) -> tuple[list[int], list[float]]:
        """The draft's argmax after each step's last token, and its probability."""
        logits = self.runner.forward(steps)  # [B, V]
        top = logits.softmax(dim=-1).max(dim=-1)
        return top.indices.tolist(), top.values.tolist()

    def _from_rank_zero(self, proposals: list[list[int]]) -> list[list[int]]:
        """Rank 0's proposals (their number included) on every rank."""
        if self.group.world_size == 1:
            return proposals
        width = max(len(p) for p in proposals)
        padded = [p + [-1] * (width - len(p)) for p in proposals]
        table = torch.tensor(padded, dtype=torch.int64, device=self.group.device)  # [B, K], -1 past the last
        if self.group.rank:
            table.zero_()
        rows = self.group.all_reduce(table).tolist()
        return [[t for t in row if t >= 0] for row in rows]
