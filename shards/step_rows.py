"""What the runner does with a step's logits rows after the forward: score prompts, and sample (or, for a
speculating sequence, verify) each sampling sequence's rows, with its grammar mask applied.

Each live sequence's sampling state (SequenceState) is kept by the runner between steps; the functions
here read and update it. Rows follow the order of the step: one per sequence, plus one per proposed
token of a speculating sequence (`consecutive` gives each sequence's span of them).
Legend: L logits rows, R sequences sampled together, C constrained sequences, W bitmask words, V vocab size.
"""

import math
from dataclasses import dataclass, field

import torch

from mixserve.shards.grammar import SequenceGrammar
from mixserve.shards.logits_processors import banned_tokens
from mixserve.shards.ngram import NgramIndex
from mixserve.shards.prediction import PredictionIndex
from mixserve.shards.proposal_length import ProposalLength
from mixserve.shards.sampling import sample
from mixserve.shards.sampling_params import SamplingParams
from mixserve.shards.sequence_step import SequenceStep
from mixserve.shards.speculative import VerifiedToken, verified_tokens, verify
from mixserve.shards.token_history import TokenHistory


@dataclass(slots=True)
class SequenceState:
    """A live sequence's sampling state on this shard."""

    params: SamplingParams
    history: TokenHistory
    seen_until: int = 0  # positions below this are already in the history
    grammar: SequenceGrammar | None = None  # constrained decoding: the sequence's matcher
    ngrams: NgramIndex | None = None  # n-gram speculation: the history's n-grams, made at its first lookup
    prediction: PredictionIndex | None = None  # a predicted output's proposals, made at its first lookup
    proposal_length: ProposalLength = field(default_factory=ProposalLength)  # n-gram proposals it makes next
    # Scoring the prompt: log-softmax [V] of the previous chunk's last position, which scores this chunk's first token.
    prompt_row: torch.Tensor | None = None
    # allowed_token_ids as a bitmask [W] int32 (grammar.token_bitmask), made at the sequence's first sample.
    allowed: torch.Tensor | None = None


def consecutive(lengths: list[int]) -> list[range]:
    """Back-to-back row ranges of the given lengths, from row 0."""
    spans, start = [], 0
    for n in lengths:
        spans.append(range(start, start + n))
        start += n
    return spans


def row_biases(
    spans: list[range], sampled: list[SequenceStep], states: list[SequenceState], which: list[int]
) -> tuple[list[int], list[dict[int, float]]]:
    """Every logits row of the sampling sequences `which` (a speculating one has several) with what is added
    to it: the sequence's logit bias, and -inf on the tokens its bad_words ban after that row's output (the
    output so far, then the proposals before the row). A row may be listed twice; the additions sum."""
    at: list[int] = []
    each: list[dict[int, float]] = []
    for j in which:
        params, s = states[j].params, sampled[j]
        longest = max((len(word) for word in params.bad_words), default=1)
        past = states[j].history.output_tail(longest - 1)
        proposed = s.token_ids[len(s.token_ids) - s.num_proposed :]
        for r, row in enumerate(spans[j]):
            if params.logit_bias:
                at.append(row)
                each.append(params.logit_bias)
            banned = banned_tokens(params.bad_words, past + proposed[:r]) if params.bad_words else []
            if banned:
                at.append(row)
                each.append(dict.fromkeys(banned, -math.inf))
    return at, each


def grammar_masks(
    sampled: list[SequenceStep], states: list[SequenceState], constrained: list[int]
) -> torch.Tensor | None:
    """The grammar masks of the constrained sequences' rows, in order: one row for a decode, one per position
    for a verification (SequenceGrammar.row_masks). [C rows, W] int32; None without such sequences."""
    if not constrained:
        return None
    masks = []
    for j in constrained:
        s, grammar = sampled[j], states[j].grammar
        proposed = s.token_ids[len(s.token_ids) - s.num_proposed :]
        masks.append(grammar.row_masks(proposed) if proposed else grammar.mask()[None])
    return torch.cat(masks)


def span_masks(spans: list[range], which: list[int], masks: list[torch.Tensor]) -> tuple[list[int], list[torch.Tensor]]:
    """Every logits row of the sampling sequences `which` (a speculating one has several), each with its
    sequence's mask (`masks`, in the order of `which`)."""
    at: list[int] = []
    each: list[torch.Tensor] = []
    for j, mask in zip(which, masks, strict=True):
        at.extend(spans[j])
        each.extend([mask] * len(spans[j]))
    return at, each


@dataclass(slots=True)
class PromptScores:
    """A scoring step's prompt tokens: each one's log-probability given the tokens before it (NaN at
    position 0), and, where the sequence asks for top_n_tokens N, the N most likely tokens at each
    position (none at position 0)."""

    logprobs: list[float]
    top_tokens: list[list[tuple[int, float]]] = field(default_factory=list)
    # Each token's rank among its position's candidates (1: the most likely; 0 at position 0).
    ranks: list[int] = field(default_factory=list)


def score_prompts(
    steps: list[SequenceStep], logits: torch.Tensor, sequences: dict[int, SequenceState]
) -> tuple[torch.Tensor, dict[int, PromptScores]]:
    """From the logits of `ModelRunner.forward(score=True)` [rows, V]: the rows `forward` gives without
    scoring [L, V] (a scoring sequence's last token's; a speculating one's span), and for the steps asking
    prompt_logprobs, their PromptScores (a chunk's first token is scored by the previous chunk's last
    position, kept in its state's prompt_row)."""
    kept: list[int] = []
    scores: dict[int, PromptScores] = {}
    row = 0
    for s in steps:
        n = len(s.token_ids) if s.prompt_logprobs else 1 + s.num_proposed
        kept.extend([row + n - 1] if s.prompt_logprobs else range(row, row + n))
        if s.prompt_logprobs:
            state = sequences[s.seq_id]
            log_probs = logits[row : row + n].float().log_softmax(dim=-1)  # [n, V]
            ids = torch.tensor(s.token_ids[1:], device=logits.device)  # [n - 1]
            following = log_probs[:-1].gather(1, ids[:, None]).squeeze(1)  # [n - 1]
            before = state.prompt_row if s.start_position > 0 else None  # [V] or None
            first = math.nan if before is None else before[s.token_ids[0]].item()
            # Rank: 1 + how many tokens the position found more likely than the one that came.
            ranks = (log_probs[:-1] > following[:, None]).sum(dim=-1).add_(1).tolist()  # [n - 1]
            first_rank = 0 if before is None else int((before > first).sum().item()) + 1
            scored = PromptScores([first, *following.tolist()], ranks=[first_rank, *ranks])
            top_n = min(state.params.top_n_tokens, log_probs.shape[-1])
            if top_n:
                rows = log_probs[:-1] if before is None else torch.cat([before[None], log_probs[:-1]])
                top_logprobs, top_ids = rows.topk(top_n, dim=-1)  # [n or n - 1, N]
                pairs = zip(top_ids.tolist(), top_logprobs.tolist(), strict=True)
                tops = [list(zip(i, lp, strict=True)) for i, lp in pairs]
                scored.top_tokens = tops if before is not None else [[], *tops]
            scores[s.seq_id] = scored
            state.prompt_row = None if s.sample else log_probs[-1]
        row += n
    return logits[kept], scores


def sample_rows(
    logits: torch.Tensor,
    sampled: list[SequenceStep],
    states: list[SequenceState],
    spans: list[range],
) -> list[list[VerifiedToken]]:
    """Each sampling sequence's tokens from the full logits [L, V] (grammar masks and biases applied): one for
    an ordinary step (sampled together), the verified run for a speculating one (whose proposals the history
    does not hold yet; verify adds the run)."""
    plain = [j for j, s in enumerate(sampled) if not s.num_proposed]
    out: list[list[VerifiedToken]] = [[] for _ in sampled]
    if plain:
        rows_logits = logits[[spans[j][0] for j in plain]]  # [R, V]
        params = [states[j].params for j in plain]
        drawn = sample(
            rows_logits,
            params,
            [states[j].history for j in plain],
            [sampled[j].start_position + len(sampled[j].token_ids) for j in plain],
        )
        for j, token in zip(plain, verified_tokens(drawn, params), strict=True):
            out[j] = [token]
    for j, s in enumerate(sampled):
        if s.num_proposed:
            span = spans[j]
            first_key = s.start_position + len(s.token_ids) - s.num_proposed
            proposed = s.token_ids[-s.num_proposed :]
            out[j] = verify(logits[span.start : span.stop], proposed, states[j].params, states[j].history, first_key)
    return out
