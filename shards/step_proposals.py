"""The proposals a speculating step verifies, made on the shard before its forward.

A step whose sequences have positions reserved for proposals (`draft`: the router reserved the slots,
the shards fill them) gets them here: the draft model's (shards/draft.py), or n-gram lookup in the
sequence's own tokens and, with `--speculate-history-tokens`, finished sequences' (shards/ngram.py), as
many as the sequence's adaptive proposal length allows (shards/proposal_length.py). A sequence with a
predicted output (OpenAI's `prediction`) proposes from it instead (shards/prediction.py), with a draft
model or not. A grammar-constrained sequence proposes what its grammar forces next where it forces
anything, else the proposals above cut at the first token its grammar refuses (shards/grammar.py).
Every rank holds the same sequences' tokens and grammar states, so every rank proposes alike (the
draft's proposals travel from rank 0).
"""

from dataclasses import replace
from typing import TYPE_CHECKING

from mixserve.shards import ngram
from mixserve.shards.prediction import PredictionIndex
from mixserve.shards.sequence_step import SequenceStep
from mixserve.shards.step_rows import SequenceState

if TYPE_CHECKING:
    from mixserve.shards.draft import DraftModel
    from mixserve.shards.grammar import SequenceGrammar


class StepProposer:
    """Fills drafting steps with proposals, over the runner's live sequences."""

    def __init__(
        self,
        sequences: dict[int, SequenceState],
        draft: "DraftModel | None",
        adaptive_length: bool,
        ngram_history: ngram.HistoryIndex | None,
    ) -> None:
        """`sequences`: the runner's own dict (read, and each sequence's n-gram index made on first use);
        `adaptive_length`: n-gram proposals follow each sequence's ProposalLength."""
        self.sequences = sequences
        self.draft = draft
        self.adaptive_length = adaptive_length
        self.ngram_history = ngram_history

    def make(self, steps: list[SequenceStep]) -> tuple[list[SequenceStep], dict[int, int]]:
        """`steps` with the proposals made here in place of each `draft` step's reserved positions (the slots
        of those not made dropped), and the sequences proposed for: their ids, each with the positions its
        step reserved."""
        if self.draft is not None:
            self.draft.observe(steps)
        drafting = [i for i, s in enumerate(steps) if s.draft]
        if not drafting:
            return steps, {}
        if self.draft is not None:
            # The draft knows no grammar: a constrained sequence proposes what its grammar forces where it
            # forces anything (the same on every rank, so every rank asks the draft for the same sequences),
            # else the draft's tokens its grammar allows. A predicted sequence proposes its prediction's.
            forced = {i: self._forced(steps[i]) for i in drafting}
            predicted = {i: self._predicted(steps[i]) for i in drafting if not forced[i]}
            asked = [i for i in drafting if not forced[i] and predicted[i] is None]
            made = dict(zip(asked, self.draft.propose([steps[i] for i in asked]) if asked else [], strict=True))
            made.update((i, p) for i, p in predicted.items() if p is not None)
            proposals = [forced[i] or self._allowed(steps[i], made[i]) for i in drafting]
        else:
            proposals = [self._ngram_proposals(steps[i]) for i in drafting]
        reserved = {steps[i].seq_id: steps[i].num_proposed for i in drafting}
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
        return steps, reserved

    def _ngram_proposals(self, s: SequenceStep) -> list[int]:
        """Up to s.num_proposed tokens looked up in the sequence's own tokens, then in finished sequences' where
        this shard keeps them (none where it does not hold all of the sequence's tokens: its state was
        cleared since the sequence's prompt)."""
        state = self._held(s)
        if state is None:
            return []
        forced = self._forced(s)
        if forced:
            return forced
        k = self._length(state, s)
        if state.params.prediction_token_ids:
            return self._allowed(s, self._from_prediction(state, k))
        if state.ngrams is None:
            state.ngrams = ngram.NgramIndex()
        return self._allowed(s, state.ngrams.propose(state.history.tokens, k, self.ngram_history))

    def _predicted(self, s: SequenceStep) -> list[int] | None:
        """With a draft model: the sequence's prediction's tokens (`_from_prediction`, as many as its proposal
        length allows); None for a sequence without one, or where this shard does not hold all of its tokens."""
        state = self._held(s)
        if state is None or not state.params.prediction_token_ids:
            return None
        return self._from_prediction(state, self._length(state, s))

    def _length(self, state: SequenceState, s: SequenceStep) -> int:
        """The proposals s may make: its proposal length within what the step reserved (shards/proposal_length.py),
        or all of them with --speculate-length fixed."""
        return state.proposal_length.allowed(s.num_proposed) if self.adaptive_length else s.num_proposed

    def _held(self, s: SequenceStep) -> SequenceState | None:
        """s's state where this shard holds all of the sequence's tokens (None where its state was cleared
        since the sequence's prompt)."""
        state = self.sequences.get(s.seq_id)
        tokens = state.history.tokens if state is not None else []
        if len(tokens) != s.start_position + 1 or tokens[-1] != s.token_ids[0]:
            return None
        return state

    @staticmethod
    def _from_prediction(state: SequenceState, k: int) -> list[int]:
        """Up to `k` tokens of the sequence's predicted output where its output is in it (a prediction the
        output follows grows the adaptive length to all the step allows)."""
        if state.prediction is None:
            state.prediction = PredictionIndex(state.params.prediction_token_ids)
        return state.prediction.propose(state.history.tokens, state.history.generated, k)

    def _forced(self, s: SequenceStep) -> list[int]:
        """A constrained sequence's proposals where its grammar forces the next tokens: as many as reserved (the
        model's masked choice there has one candidate, or more only where the tokenizer can spell the text
        another way); [] for a free sequence or where the next token is the model's choice."""
        grammar = self._grammar(s)
        return grammar.forced(s.num_proposed) if grammar is not None else []

    def _allowed(self, s: SequenceStep, proposed: list[int]) -> list[int]:
        """`proposed` up to the first token s's grammar refuses (all of it for a free sequence)."""
        grammar = self._grammar(s)
        return grammar.valid_start(proposed) if grammar is not None else proposed

    def _grammar(self, s: SequenceStep) -> "SequenceGrammar | None":
        """s's grammar matcher on this shard; None for a free sequence."""
        state = self.sequences.get(s.seq_id)
        return state.grammar if state is not None else None
