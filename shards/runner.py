"""The model runner: turns a batch of per-sequence steps into one forward over the paged cache,
samples the next tokens, and keeps each live sequence's sampling state.

Every rank of the group runs the same calls in the same order; validation is a pure function of
the request, so a malformed step is refused by every rank before any collective starts.
A speculating sequence (num_proposed > 0) gets logits at every position of its chunk and keeps the
proposals its own sampler agrees with (shards/speculative.py). A step marked `draft` has its proposals
made here first: by the draft model (shards/draft.py) where the shard has one, else by n-gram lookup in
the sequence's own tokens (shards/ngram.py), which may find none (the step is then a plain decode).
The forward's inputs are built in shards/step_inputs.py; prompt scoring and the sampling of the
step's rows live in shards/step_rows.py.
Legend: T tokens in the step, B sequences, R sequences that sample, L logits rows (one per sequence,
plus one per proposed token), V vocab size.
"""

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from mixserve.shards import decode_graph, ngram, ops
from mixserve.shards.config import ModelConfig, ParallelConfig
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.grammar import GrammarError, GrammarMatchers, SequenceGrammar
from mixserve.shards.kv_cache import KVCache
from mixserve.shards.model import MixtralForCausalLM
from mixserve.shards.parallel_greedy import is_plain_greedy, parallel_greedy
from mixserve.shards.sampling import SamplingParams, TokenHistory, apply_logit_bias
from mixserve.shards.speculative import VerifiedToken, greedy_runs
from mixserve.shards.step_inputs import step_inputs
from mixserve.shards.step_rows import SequenceState, consecutive, sample_rows, score_prompts, span_rows

if TYPE_CHECKING:
    from mixserve.shards.draft import DraftModel


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
    # With SequenceStep.prompt_logprobs: one per token of the step, NaN at position 0.
    prompt_logprobs: list[float] = field(default_factory=list)
    # A verification step's further tokens: accepted proposals after token_id, then the last one sampled.
    next_tokens: list[VerifiedToken] = field(default_factory=list)
    # After a draft step: the proposals made here (at most the step's num_proposed).
    num_drafted: int = 0


class ModelRunner:
    """Owns the model, the KV cache and the live sequences of one shard."""

    def __init__(
        self,
        model: MixtralForCausalLM,
        parallel: ParallelConfig,
        group: TensorParallelGroup,
        device: torch.device,
        dtype: torch.dtype,
        block_size: int = 16,
        cuda_graphs: str = "auto",
        max_graph_batch: int = 0,
        grammars: GrammarMatchers | None = None,
        draft: "DraftModel | None" = None,
        ngram_history_tokens: int = 0,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block size must be positive, got {block_size}")
        if max_graph_batch < 0:
            raise ValueError(f"max graph batch must be >= 0, got {max_graph_batch}")
        self.graphs_wanted = decode_graph.wanted(cuda_graphs, device, model.quantization is not None)
        self.capture_graphs = cuda_graphs == "auto"
        self.max_graph_batch = max_graph_batch
        self.decode_graphs: decode_graph.DecodeGraphRunner | None = None
        self.model = model
        self.config: ModelConfig = model.config
        self.parallel = parallel
        self.group = group
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.kv_cache: KVCache | None = None
        self.sequences: dict[int, SequenceState] = {}
        self.grammars = grammars
        self.draft = draft
        # n-gram speculation's second place to look: finished sequences' tokens (--speculate-history-tokens).
        self.ngram_history = ngram.HistoryIndex(ngram_history_tokens) if ngram_history_tokens else None
        if draft is not None and draft.vocab_size != self.config.vocab_size:
            raise ValueError(
                f"the draft model's vocab_size {draft.vocab_size} differs from the model's {self.config.vocab_size}"
            )

    # -- cache ---------------------------------------------------------------------------------

    @property
    def num_kv_heads(self) -> int:
        return self.config.num_key_value_heads // self.parallel.world_size

    def bytes_per_block(self) -> int:
        """Bytes of one block over every layer, keys and values (the draft model's included)."""
        own = KVCache.bytes_per_block(
            self.config.num_hidden_layers, self.block_size, self.num_kv_heads, self.config.head_dim, self.dtype
        )
        return own + (self.draft.bytes_per_block() if self.draft is not None else 0)

    def allocate_cache(self, num_blocks: int, reserved_blocks: int = 0) -> None:
        """(Re)create the KV pool with `num_blocks` blocks for the router (and `reserved_blocks` of the
        shard's own), and the draft model's beside it; forgets every sequence and the decode graphs."""
        self.kv_cache = None
        self.decode_graphs = None
        self.sequences.clear()
        if self.draft is not None:
            self.draft.allocate_cache(num_blocks)
        self.kv_cache = KVCache(
            self.config.num_hidden_layers,
            num_blocks,
            self.block_size,
            self.num_kv_heads,
            self.config.head_dim,
            self.dtype,
            self.device,
            reserved_blocks,
        )

    def prepare_decode_graphs(self, max_batch_size: int) -> None:
        """With decode graphs wanted, build their runner over the cache just allocated (which must hold
        a reserved scratch block) and, on CUDA, capture them: steps of up to max(max_batch_size,
        VERIFY_ROWS) tokens, at most `max_graph_batch` where that is set. The draft model, with one, gets
        its own."""
        if self.draft is not None:
            self.draft.prepare_decode_graphs(max_batch_size)
        if not self.graphs_wanted:
            return
        # Rows, not sequences: a verification step has several a sequence (decode_graph.VERIFY_ROWS).
        graph_rows = max(max_batch_size, decode_graph.VERIFY_ROWS)
        graph_rows = min(self.max_graph_batch or graph_rows, graph_rows)
        self.decode_graphs = decode_graph.DecodeGraphRunner(
            self.model, self.kv_cache, graph_rows, self.capture_graphs and self.device.type == "cuda"
        )

    # -- steps ---------------------------------------------------------------------------------

    def validate(self, steps: list[SequenceStep]) -> None:
        """Raise InvalidStep / OutOfCapacity for a step no rank should run."""
        if self.kv_cache is None:
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
                self._validate_draft(s)
            n = len(s.token_ids) + (s.num_proposed if s.draft else 0)  # positions
            if len(s.slot_mapping) != n:
                raise InvalidStep(f"{where} has {n} positions but {len(s.slot_mapping)} slots")
            end = s.start_position + n
            if end > self.config.max_position_embeddings:
                raise InvalidStep(
                    f"{where} reaches position {end}, past max_position_embeddings "
                    f"{self.config.max_position_embeddings}"
                )
            if max(s.token_ids) >= self.config.vocab_size:
                raise InvalidStep(f"{where} has token id {max(s.token_ids)} >= vocab size {self.config.vocab_size}")
            if s.prefix_token_ids and len(s.prefix_token_ids) != s.start_position:
                raise InvalidStep(
                    f"{where} starts at position {s.start_position} but has {len(s.prefix_token_ids)} prefix tokens"
                )
            if s.prefix_token_ids and max(s.prefix_token_ids) >= self.config.vocab_size:
                raise InvalidStep(f"{where} has a prefix token id >= vocab size {self.config.vocab_size}")
            needed = -(-end // self.block_size)
            if len(s.block_table) < needed:
                raise InvalidStep(
                    f"{where} needs {needed} blocks for {end} positions, block table has {len(s.block_table)}"
                )
            if max(s.block_table) >= self.kv_cache.num_blocks:
                raise OutOfCapacity(
                    f"{where} uses block {max(s.block_table)}; the cache has {self.kv_cache.num_blocks}"
                )
            if max(s.slot_mapping) >= self.kv_cache.num_slots:
                raise OutOfCapacity(f"{where} uses slot {max(s.slot_mapping)}; the cache has {self.kv_cache.num_slots}")
            if (
                s.sampling is not None
                and s.sampling.logit_bias
                and max(s.sampling.logit_bias) >= self.config.vocab_size
            ):
                raise InvalidStep(
                    f"{where} biases token id {max(s.sampling.logit_bias)} >= vocab size {self.config.vocab_size}"
                )
            if s.seq_id not in self.sequences and s.sampling is None:
                raise InvalidStep(f"{where} is new to this shard and its step carries no sampling parameters")
            if s.num_proposed:
                self._validate_proposals(s)
        # Plain Python: a decode checks one slot in about a microsecond, where building tensors for it
        # cost ~20 us per sequence (0.6 ms a step at batch 32).
        size = self.block_size
        for s in steps:
            table = s.block_table
            if any(
                table[p // size] * size + p % size != slot for p, slot in enumerate(s.slot_mapping, s.start_position)
            ):
                raise InvalidStep(f"sequence {s.seq_id}: slot_mapping does not match its block table")

    def _validate_draft(self, s: SequenceStep) -> None:
        where = f"sequence {s.seq_id}"
        if not s.num_proposed or len(s.token_ids) != 1:
            raise InvalidStep(
                f"{where} asks for draft proposals with {len(s.token_ids)} tokens and {s.num_proposed} proposals; "
                "a drafting step is one token and at least one proposal"
            )

    def _validate_proposals(self, s: SequenceStep) -> None:
        where = f"sequence {s.seq_id}"
        if not s.draft and s.num_proposed >= len(s.token_ids):
            raise InvalidStep(
                f"{where} proposes {s.num_proposed} of its {len(s.token_ids)} tokens; the first is its own"
            )
        if not s.sample:
            raise InvalidStep(f"{where} proposes tokens but does not sample")
        state = self.sequences.get(s.seq_id)
        params = s.sampling or (state.params if state is not None else None)
        if (params is not None and params.grammar) or (state is not None and state.grammar is not None):
            raise InvalidStep(f"{where} follows a grammar; grammar-constrained sequences do not speculate")

    @torch.inference_mode()
    def forward(self, steps: list[SequenceStep], gather_logits: bool = True, score: bool = False) -> torch.Tensor:
        """Logits [L, V] of the last token of each sequence, in the order given, a speculating sequence with a
        row for each of its last num_proposed + 1 tokens (with `gather_logits=False`, this rank's vocabulary
        slice [L, P] of them). With `score`, a sequence whose step asks for prompt_logprobs has a row for each
        of its tokens instead, in order."""
        assert self.kv_cache is not None
        if not score and self.decode_graphs is not None and self.decode_graphs.fits(steps):
            return self.decode_graphs.forward(steps, gather_logits)
        per_token_max = ops.current().decoder_layers_max_tokens
        inputs = step_inputs(steps, self.block_size, self.device, per_token_max, score)
        return self.model(
            inputs.token_ids, inputs.positions, self.kv_cache, inputs.meta, inputs.logits_indices, gather_logits
        )

    def step(self, steps: list[SequenceStep]) -> list[SequenceResult]:
        """Validate, run the forward, and sample for the sequences that ask (a speculating sequence
        verifies its proposals); results in input order."""
        self.validate(steps)
        matchers = self._new_grammars(steps)
        steps, drafted = self._drafted(steps)
        for s in steps:
            state = self.sequences.get(s.seq_id)
            if state is None:
                state = self.sequences[s.seq_id] = SequenceState(s.sampling, TokenHistory())
                state.grammar = matchers.get(s.seq_id)
            elif s.sampling is not None:
                state.params = s.sampling
            if state.seen_until < len(s.prefix_token_ids):
                # A prefix cache hit: other sequences computed these positions, this shard never saw them.
                state.history.add_prompt(s.prefix_token_ids[state.seen_until :])
                state.seen_until = len(s.prefix_token_ids)
            # Proposed tokens enter the history only once accepted, as outputs.
            own = len(s.token_ids) - s.num_proposed
            new_from = max(state.seen_until - s.start_position, 0)
            if new_from < own:
                state.history.add_prompt(s.token_ids[new_from:own])
                state.seen_until = s.start_position + own
        rows = [i for i, s in enumerate(steps) if s.sample]
        sampled = [steps[i] for i in rows]
        states = [self.sequences[s.seq_id] for s in sampled]
        score = any(s.prompt_logprobs for s in steps)
        # Every rank sees the same steps, so every rank takes the same branch. One rank takes it too (its
        # slice is the whole vocabulary): two C calls on the logits cost less than the general sampler's
        # dozen torch ops, a sizeable share of a small model's decode step.
        split = bool(rows) and not score and all(is_plain_greedy(st.params) for st in states)
        logits = self.forward(steps, gather_logits=not split, score=score)  # [L, V] or [L, P]
        scores: dict[int, list[float]] = {}
        if score:
            logits, scores = score_prompts(steps, logits, self.sequences)
        # Non-final prefill chunks that only scored their tokens.
        scored_only = [
            SequenceResult(s.seq_id, 0, 0.0, sampled=False, prompt_logprobs=scores[s.seq_id])
            for s in steps
            if s.prompt_logprobs and not s.sample
        ]
        if not rows:
            return scored_only
        step_spans = consecutive([1 + s.num_proposed for s in steps])  # each step's logits rows
        spans = [step_spans[i] for i in rows]
        tokens: list[list[VerifiedToken]] | None = None
        constrained = [j for j, st in enumerate(states) if st.grammar is not None]
        bitmask = torch.stack([states[j].grammar.mask() for j in constrained]) if constrained else None  # [C, W]
        biased = [j for j, st in enumerate(states) if st.params.logit_bias]
        biases = [states[j].params.logit_bias for j in biased]
        if split:
            head = self.model.lm_head
            flat = [row for span in spans for row in span]
            local = logits if len(flat) == logits.shape[0] else logits[flat]  # decode steps: every row samples
            # spans[j]'s rows, renumbered as positions in `local`. [R + proposals]
            local_spans = consecutive([len(span) for span in spans])
            if bitmask is not None:
                # Constrained sequences never speculate: one row each, at the start of their span.
                at = [local_spans[j][0] for j in constrained]
                local = ops.current().apply_token_bitmask(local, at, bitmask, head.vocab_start, self.config.vocab_size)
            if biased:
                at, each = span_rows(local_spans, biased, biases)
                local = apply_logit_bias(local, at, each, head.vocab_start, self.config.vocab_size)
            chosen = parallel_greedy(local, head.vocab_start, self.config.vocab_size, self.group)
            if chosen is None:  # NaN or infinity somewhere: gather and take the usual path
                logits = head.gather(logits)
            else:
                proposals = [s.token_ids[len(s.token_ids) - s.num_proposed :] for s in sampled]
                tokens = greedy_runs(chosen[0].tolist(), chosen[1].tolist(), proposals)
        if tokens is None:
            if biased:
                at, each = span_rows(spans, biased, biases)
                logits = apply_logit_bias(logits, at, each, 0, self.config.vocab_size)
            tokens = sample_rows(logits, sampled, states, spans, constrained, bitmask, self.config.vocab_size)
        for j in constrained:
            states[j].grammar.consume(tokens[j][0].token_id)
        results = []
        for s, st, run in zip(sampled, states, tokens, strict=True):
            if not s.num_proposed:
                st.history.add_output(run[0].token_id)
            elif split:
                st.history.add_output([t.token_id for t in run])
            st.seen_until = s.start_position + len(s.token_ids) - s.num_proposed + len(run)
            first = run[0]
            results.append(
                SequenceResult(
                    s.seq_id,
                    first.token_id,
                    first.logprob,
                    first.top_tokens,
                    prompt_logprobs=scores.get(s.seq_id, []),
                    next_tokens=run[1:],
                    num_drafted=s.num_proposed if s.seq_id in drafted else 0,
                )
            )
        return results + scored_only

    def _drafted(self, steps: list[SequenceStep]) -> tuple[list[SequenceStep], set[int]]:
        """`steps` with the proposals made here in place of each `draft` step's reserved positions (the slots
        of those not made dropped), and the ids of the sequences proposed for."""
        if self.draft is not None:
            self.draft.observe(steps)
        drafting = [i for i, s in enumerate(steps) if s.draft]
        if not drafting:
            return steps, set()
        if self.draft is not None:
            proposals = self.draft.propose([steps[i] for i in drafting])
        else:
            proposals = [self._ngram_proposals(steps[i]) for i in drafting]
        steps = list(steps)
        for i, proposed in zip(drafting, proposals, strict=True):
            s = steps[i]
            steps[i] = replace(
                s,
                token_ids=s.token_ids + proposed,
                slot_mapping=s.slot_mapping[: 1 + len(proposed)],
                num_proposed=len(proposed),
                draft=False,
            )
        return steps, {steps[i].seq_id for i in drafting}

    def _ngram_proposals(self, s: SequenceStep) -> list[int]:
        """Up to s.num_proposed tokens looked up in the sequence's own tokens, then in finished sequences' where
        this shard keeps them (none where it does not hold all of the sequence's tokens: its state was
        cleared since the sequence's prompt)."""
        state = self.sequences.get(s.seq_id)
        tokens = state.history.tokens if state is not None else []
        if len(tokens) != s.start_position + 1 or tokens[-1] != s.token_ids[0]:
            return []
        if state.ngrams is None:
            state.ngrams = ngram.NgramIndex()
        return state.ngrams.propose(tokens, s.num_proposed, self.ngram_history)

    def _new_grammars(self, steps: list[SequenceStep]) -> dict[int, SequenceGrammar]:
        """Matchers for the sequences new to this shard that carry a grammar, built before any state
        changes, so a grammar no matcher takes refuses the whole step on every rank."""
        matchers = {}
        for s in steps:
            if s.seq_id in self.sequences or s.sampling is None or not s.sampling.grammar:
                continue
            if self.grammars is None:
                raise InvalidStep(f"sequence {s.seq_id} carries a grammar; this shard has no tokenizer to apply it")
            try:
                matchers[s.seq_id] = self.grammars.matcher(s.sampling.grammar)
            except GrammarError as e:
                raise InvalidStep(f"sequence {s.seq_id}: {e}") from None
        return matchers

    def release(self, seq_ids: list[int]) -> None:
        """Forget finished sequences' sampling state (their blocks are the router's to reuse); their tokens go
        to the n-gram history where this shard keeps one."""
        for seq_id in seq_ids:
            state = self.sequences.pop(seq_id, None)
            if state is not None and self.ngram_history is not None:
                self.ngram_history.add(state.history.tokens)
        if self.draft is not None:
            self.draft.release(seq_ids)

    def clear(self) -> None:
        self.sequences.clear()
        if self.ngram_history is not None:
            self.ngram_history.clear()
        if self.draft is not None:
            self.draft.clear()
