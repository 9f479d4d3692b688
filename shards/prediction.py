"""Proposals from a request's predicted output (OpenAI's Predicted Outputs), made on the shard.

A client that knows most of the answer (a file to edit, a document to rewrite with small changes)
sends it as `prediction`; the output then repeats long runs of it, with edits between. The sequence's
proposals come from the prediction: where the output has followed it so far, the prediction's next
tokens; where the output left it (an edit), none until the output's last tokens occur in the
prediction again, at or after the place it left (the longest of `MAX_NGRAM` down to `MIN_NGRAM`
tokens; a run of `MIN_BACK_NGRAM` or more may also match earlier, where an edit repeats text). The
step verifies the proposals like any others (shards/speculative.py), so the output is the model's
whatever the prediction says.

An n-gram lookup in the sequence's own tokens (shards/ngram.py) would find the prediction's text too,
but at its latest occurrence: code and documents repeat short runs everywhere, and the place in the
prediction that the output has reached is what tells the right one. Every rank sees the same tokens,
so every rank proposes alike. Pure Python.
"""

from bisect import bisect_left

# The output suffixes looked up to find the output's place in the prediction again after an edit, and the
# shortest that may match behind the furthest place reached. One token would match too much: while the
# output writes text the prediction lacks, its common tokens (a space, a comma, `the`) occur everywhere.
MAX_NGRAM = 4
MIN_NGRAM = 2
MIN_BACK_NGRAM = 3


class PredictionIndex:
    """One sequence's predicted output and where its output has reached in it."""

    __slots__ = ("prediction", "starts", "cursor", "anchor", "seen", "found")

    def __init__(self, prediction: list[int]) -> None:
        self.prediction = list(prediction)
        # Every n-gram of the prediction (MIN_NGRAM to MAX_NGRAM tokens) with its starts, ascending; made at
        # the first search, since an output that follows its prediction to the end needs none (2-3 µs a token
        # of the prediction here, on the step's thread).
        self.starts: dict[tuple[int, ...], list[int]] | None = None
        self.cursor: int | None = 0  # where the output continues in the prediction; None: it left it
        self.anchor = 0  # the furthest place in the prediction the output has reached
        self.seen: int | None = None  # tokens of the sequence already followed (None: not yet called)
        self.found = 0  # the suffix length that found the cursor again; 0: the output followed the prediction

    def propose(self, tokens: list[int], generated: int, k: int) -> list[int]:
        """Up to `k` tokens of the prediction where the output is in it; `tokens`: the sequence's tokens
        (prompt then output, only grown since the last call), the last `generated` of them its output."""
        if self.seen is None:
            self.seen = len(tokens) - generated
        for token in tokens[self.seen :]:
            self._follow(token)
        self.seen = len(tokens)
        if self.cursor is None:
            # The sequence's last tokens, not only its output's: a sequence preempted and computed again
            # (its output then part of its prompt on a shard) finds its place as one that never left.
            self.cursor = self._find(tokens[-MAX_NGRAM:])
        if self.cursor is None or k < 1:
            return []
        # A place just found on n tokens proposes n at most until the output has followed it: a short match
        # may be a common phrase found at the wrong place, whose proposals cost rows that keep nothing and
        # pause the request (router/speculation_acceptance.py) before its output comes back to the
        # prediction. On the trained demo with a fifth of each prediction replaced, 8 at once kept 2210 of
        # 6144 output tokens (1.38x plain decoding), n at most 3938 (1.78x; benchmarks/results/predicted-outputs).
        return self.prediction[self.cursor : self.cursor + (min(k, self.found) if self.found else k)]

    def _follow(self, token: int) -> None:
        """The output went on with `token`: still in the prediction, or left it."""
        if self.cursor is not None and self.cursor < len(self.prediction) and self.prediction[self.cursor] == token:
            self.cursor += 1
            self.anchor = max(self.anchor, self.cursor)
            self.found = 0
        else:
            self.cursor = None

    def _find(self, last: list[int]) -> int | None:
        """Where in the prediction the sequence's `last` tokens end: the longest suffix (MAX_NGRAM down to
        MIN_NGRAM) that occurs at or after the anchor, its first such occurrence; else, for MIN_BACK_NGRAM
        tokens or more, its last occurrence before. None where no suffix occurs."""
        if self.starts is None:
            self.starts = {}
            for n in range(MIN_NGRAM, MAX_NGRAM + 1):
                for start in range(len(self.prediction) - n + 1):
                    self.starts.setdefault(tuple(self.prediction[start : start + n]), []).append(start)
        for n in range(min(MAX_NGRAM, len(last)), MIN_NGRAM - 1, -1):
            starts = self.starts.get(tuple(last[len(last) - n :]))
            if not starts:
                continue
            i = bisect_left(starts, self.anchor - n)
            if i < len(starts):
                end = starts[i] + n
            elif n >= MIN_BACK_NGRAM:
                end = starts[-1] + n
            else:
                continue
            self.anchor = max(self.anchor, end)
            self.found = n
            return end
        return None
