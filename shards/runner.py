"""The model runner: turns a batch of per-sequence steps into one forward over the paged cache,
samples the next tokens, and keeps each live sequence's sampling state.

Every rank of the group runs the same calls in the same order; validation (shards/step_validation.py) is
a pure function of the request, so a malformed step is refused by every rank before any collective starts.
A speculating sequence (num_proposed > 0) gets logits at every position of its chunk and keeps the
proposals its own sampler agrees with (shards/speculative.py). A step marked `draft` has its proposals
made here first (shards/step_proposals.py: the draft model's, the grammar's forced tokens, or n-gram
lookup, which may find none: the step is then a plain decode).
The forward's inputs are built in shards/step_inputs.py; prompt scoring and the sampling of the
step's rows live in shards/step_rows.py.
Legend: T tokens in the step, B sequences, R sequences that sample, L logits rows (one per sequence,
plus one per proposed token), V vocab size.
"""

from typing import TYPE_CHECKING

import torch

from mixserve.shards import decode_graph, ngram, ops
from mixserve.shards.config import ModelConfig, ParallelConfig
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.grammar import GrammarError, GrammarMatchers, SequenceGrammar, token_bitmask
from mixserve.shards.kv_cache import KVCache
from mixserve.shards.logits_processors import apply_logit_bias
from mixserve.shards.model import MixtralForCausalLM
from mixserve.shards.parallel_greedy import greedy_choice, is_plain_greedy, slice_stats
from mixserve.shards.sequence_step import InvalidStep, SequenceResult, SequenceStep
from mixserve.shards.speculative import VerifiedToken, greedy_runs
from mixserve.shards.step_inputs import step_inputs
from mixserve.shards.step_proposals import StepProposer
from mixserve.shards.step_rows import (
    PromptScores,
    SequenceState,
    consecutive,
    grammar_masks,
    row_biases,
    sample_rows,
    score_prompts,
    span_masks,
)
from mixserve.shards.step_validation import validate_steps
from mixserve.shards.token_history import TokenHistory

if TYPE_CHECKING:
    from mixserve.shards.draft import DraftModel


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
        adaptive_length: bool = True,
        kv_dtype: torch.dtype | None = None,
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
        # The KV cache's dtype: the model's unless --kv-cache-dtype says otherwise (a bf16 cache under an fp32
        # model on CPU; the ops store K/V rounded to it and read them widened).
        self.kv_dtype = kv_dtype or dtype
        self.block_size = block_size
        self.kv_cache: KVCache | None = None
        self.sequences: dict[int, SequenceState] = {}
        self.grammars = grammars
        self.draft = draft
        # n-gram speculation's second place to look: finished sequences' tokens (--speculate-history-tokens).
        self.ngram_history = ngram.HistoryIndex(ngram_history_tokens) if ngram_history_tokens else None
        # n-gram proposals per step follow each sequence's verifications (shards/proposal_length.py), or stay
        # at what the step allows (--speculate-length fixed). A draft model stops on its own confidence instead.
        self.adaptive_length = adaptive_length and draft is None
        self.proposer = StepProposer(self.sequences, draft, self.adaptive_length, self.ngram_history)
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
            self.config.num_hidden_layers, self.block_size, self.num_kv_heads, self.config.head_dim, self.kv_dtype
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
            self.kv_dtype,
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
        validate_steps(steps, self.config, self.block_size, self.kv_cache, self.sequences)

    @torch.inference_mode()
    def forward(
        self,
        steps: list[SequenceStep],
        gather_logits: bool = True,
        score: bool = False,
        greedy_stats: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [L, V] of the last token of each sequence, in the order given, a speculating sequence with a
        row for each of its last num_proposed + 1 tokens (with `gather_logits=False`, this rank's vocabulary
        slice [L, P] of them). With `score`, a sequence whose step asks for prompt_logprobs has a row for each
        of its tokens instead, in order. With greedy_stats [L, 3] float64 (and gather_logits=False), also fills
        it with each row's greedy statistics over this rank's slice (parallel_greedy.slice_stats)."""
        assert self.kv_cache is not None
        if not score and self.decode_graphs is not None and self.decode_graphs.fits(steps):
            logits = self.decode_graphs.forward(steps, gather_logits)
            if greedy_stats is not None:
                head = self.model.lm_head
                greedy_stats.copy_(slice_stats(logits, head.vocab_start, head.vocab_size))
            return logits
        per_token_max = ops.current().per_token_max
        inputs = step_inputs(steps, self.block_size, self.device, per_token_max, score)
        return self.model(
            inputs.token_ids,
            inputs.positions,
            self.kv_cache,
            inputs.meta,
            inputs.logits_indices,
            gather_logits,
            greedy_stats,
        )

    def step(self, steps: list[SequenceStep]) -> list[SequenceResult]:
        """Validate, run the forward, and sample for the sequences that ask (a speculating sequence
        verifies its proposals); results in input order."""
        self.validate(steps)
        matchers = self._new_grammars(steps)
        steps, drafted = self.proposer.make(steps)
        for s in steps:
            state = self.sequences.get(s.seq_id)
            if state is None:
                state = self.sequences[s.seq_id] = SequenceState(s.sampling, TokenHistory())
                state.grammar = matchers.get(s.seq_id)
            elif s.sampling is not None:
                state.params, state.allowed = s.sampling, None
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
        constrained = [j for j, st in enumerate(states) if st.grammar is not None]
        biased = [j for j, st in enumerate(states) if st.params.logit_bias or st.params.bad_words]
        limited = [j for j, st in enumerate(states) if st.params.allowed_token_ids]
        # Split with no mask or bias to apply: the forward gives the greedy statistics too, computed beside
        # the logits (in the CPU's decoder stack, in its one C call).
        greedy_stats = None
        if split and not constrained and not biased and not limited:
            greedy_stats = torch.empty(sum(1 + s.num_proposed for s in steps), 3, dtype=torch.float64)
        logits = self.forward(
            steps, gather_logits=not split, score=score, greedy_stats=greedy_stats
        )  # [L, V] or [L, P]
        scores: dict[int, PromptScores] = {}
        if score:
            logits, scores = score_prompts(steps, logits, self.sequences)
        # Non-final prefill chunks that only scored their tokens.
        scored_only = [
            SequenceResult(
                s.seq_id,
                0,
                0.0,
                sampled=False,
                prompt_logprobs=scores[s.seq_id].logprobs,
                prompt_top_tokens=scores[s.seq_id].top_tokens,
                prompt_ranks=scores[s.seq_id].ranks,
            )
            for s in steps
            if s.prompt_logprobs and not s.sample
        ]
        if not rows:
            return scored_only
        step_spans = consecutive([1 + s.num_proposed for s in steps])  # each step's logits rows
        spans = [step_spans[i] for i in rows]
        tokens: list[list[VerifiedToken]] | None = None
        # Every row of each constrained sequence under its grammar's mask there (a speculating one's rows each
        # after the proposals before it). [C rows, W]
        masked_rows = [row for j in constrained for row in spans[j]]
        bitmask = grammar_masks(sampled, states, constrained)
        allowed = self._allowed_masks(states, limited)
        if split:
            head = self.model.lm_head
            flat = [row for span in spans for row in span]
            local = logits if len(flat) == logits.shape[0] else logits[flat]  # decode steps: every row samples
            # spans[j]'s rows, renumbered as positions in `local`. [R + proposals]
            local_spans = consecutive([len(span) for span in spans])
            if bitmask is not None:
                at = [row for j in constrained for row in local_spans[j]]
                local = ops.current().apply_token_bitmask(local, at, bitmask, head.vocab_start, self.config.vocab_size)
            if biased:
                at, each = row_biases(local_spans, sampled, states, biased)
                local = apply_logit_bias(local, at, each, head.vocab_start, self.config.vocab_size)
            if limited:
                at, each = span_masks(local_spans, limited, allowed)
                local = ops.current().apply_token_bitmask(
                    local, at, torch.stack(each), head.vocab_start, self.config.vocab_size
                )
            if greedy_stats is None:  # masked or biased rows: their statistics after the masks
                stats = slice_stats(local, head.vocab_start, self.config.vocab_size)
            else:
                stats = greedy_stats if len(flat) == greedy_stats.shape[0] else greedy_stats[flat]
            chosen = greedy_choice(stats, self.group)
            if chosen is None:  # NaN or infinity somewhere: gather and take the usual path
                logits = head.gather(logits)
            else:
                proposals = [s.token_ids[len(s.token_ids) - s.num_proposed :] for s in sampled]
                tokens = greedy_runs(*chosen, proposals)
        if tokens is None:
            if bitmask is not None:
                logits = ops.current().apply_token_bitmask(logits, masked_rows, bitmask, 0, self.config.vocab_size)
            if biased:
                at, each = row_biases(spans, sampled, states, biased)
                logits = apply_logit_bias(logits, at, each, 0, self.config.vocab_size)
            if limited:
                at, each = span_masks(spans, limited, allowed)
                logits = ops.current().apply_token_bitmask(logits, at, torch.stack(each), 0, self.config.vocab_size)
            tokens = sample_rows(logits, sampled, states, spans)
        for j in constrained:
            states[j].grammar.consume([t.token_id for t in tokens[j]])
        results = []
        for s, st, run in zip(sampled, states, tokens, strict=True):
            if not s.num_proposed:
                st.history.add_output(run[0].token_id)
            elif split:
                st.history.add_output([t.token_id for t in run])
            st.seen_until = s.start_position + len(s.token_ids) - s.num_proposed + len(run)
            if s.num_proposed and s.seq_id in drafted and self.adaptive_length:
                st.proposal_length.on_verified(drafted[s.seq_id], s.num_proposed, len(run) - 1)
            first = run[0]
            result = SequenceResult(
                s.seq_id,
                first.token_id,
                first.logprob,
                first.top_tokens,
                next_tokens=run[1:],
                num_drafted=s.num_proposed if s.seq_id in drafted else 0,
            )
            scored = scores.get(s.seq_id)  # the last chunk of a prompt that is scored
            if scored is not None:
                result.prompt_logprobs, result.prompt_top_tokens, result.prompt_ranks = (
                    scored.logprobs,
                    scored.top_tokens,
                    scored.ranks,
                )
            results.append(result)
        return results + scored_only

    def _allowed_masks(self, states: list[SequenceState], limited: list[int]) -> list[torch.Tensor]:
        """The allowed_token_ids bitmasks [W] of the sequences `limited` (as a grammar's, for the same
        `apply_token_bitmask`), each made once per sequence."""
        for j in limited:
            if states[j].allowed is None:
                states[j].allowed = token_bitmask(states[j].params.allowed_token_ids, self.config.vocab_size)
        return [states[j].allowed for j in limited]

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
