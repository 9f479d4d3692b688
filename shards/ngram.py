"""N-gram speculation (prompt lookup): proposals from a sequence's own tokens, made on the shard.

Text that copies from its context (code edits, summaries, extraction, repeated structure) continues
the way it went before. The proposer takes the longest suffix of the sequence's tokens (prompt and
output, `MAX_NGRAM` down to `MIN_NGRAM` tokens) that occurred earlier, latest occurrence first, and
proposes the tokens that followed it there (vLLM's `ngram` and TGI's `--speculate` without a Medusa
head). The step verifies them at once (shards/speculative.py) and keeps what the sampler agrees with,
so outputs never change; a wrong proposal costs only compute.

It runs on the shard, where every rank holds the same tokens (each sequence's TokenHistory), so the
ranks propose alike without a collective, and a multi-step run proposes before each of its steps
(shards/multi_step.py) without a round trip to the router. `propose` is the definition, a scan of
the whole sequence; a live sequence keeps an `NgramIndex` instead, which gives the same proposals
from the latest occurrence of every n-gram, updated as tokens arrive, so a step's lookup costs the
same at any context length.

With `--speculate-history-tokens N` a sequence whose own tokens hold no match looks next in the tokens
of recently finished sequences (`HistoryIndex`, up to N tokens of them, oldest dropped first): text
that recurs across requests (the same documents retrieved again, templated answers, a corpus) then
proposes too (vLLM's suffix decoding keeps such a cache across requests). Off by default: other
requests' text then shapes a request's acceptance, and so its timing. Every rank releases the same
sequences at the same step, so the ranks' history indexes stay alike. Pure Python.
"""

MAX_NGRAM = 3
# A single repeated token predicts its successor poorly: on the trained demo's corpus workload (128-token
# passages, 128 greedy tokens, k = 5) 1-token matches brought acceptance from 45 % to 40 % and cost
# verification steps that kept nothing (benchmarks/RESULTS.md, speculation).
MIN_NGRAM = 2


def propose(tokens: list[int], k: int, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the longest suffix of `tokens`
    (`max_ngram` down to `min_ngram` tokens long); [] when no suffix occurred before."""
    if k < 1:
        return []
    length = len(tokens)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        suffix = tokens[length - n :]
        first = suffix[0]
        # An occurrence starting at i is followed by tokens[i + n], which must exist before the suffix.
        for i in range(length - n - 1, -1, -1):
            if tokens[i] == first and tokens[i : i + n] == suffix:
                return tokens[i + n : i + n + k]
    return []


def followed_grams(tokens: list[int], min_ngram: int, max_ngram: int, since: int = 0):
    """(start, n-gram) of every n-gram of `min_ngram` to `max_ngram` tokens that a token of `tokens` follows
    (starts 0 .. len - n - 1), but those a list of its first `since` tokens already had (starts below
    since - n); increasing starts for each n."""
    for n in range(min_ngram, max_ngram + 1):
        for start in range(max(0, since - n), len(tokens) - n):
            yield start, tuple(tokens[start : start + n])


class NgramIndex:
    """`propose` for one growing token list: the latest start of every n-gram (`min_ngram` to `max_ngram`
    tokens) that a later token follows, updated with the tokens added since the last call."""

    __slots__ = ("max_ngram", "min_ngram", "indexed", "latest")

    def __init__(self, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> None:
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.indexed = 0  # length of the token list at the last call
        self.latest: dict[tuple[int, ...], int] = {}

    def propose(self, tokens: list[int], k: int, history: "HistoryIndex | None" = None) -> list[int]:
        """`propose(tokens, k)`, for `tokens` that only grew since the last call; with `history`, a suffix
        not found in `tokens` is looked up there before a shorter one is tried."""
        length = len(tokens)
        if length < self.indexed:
            raise ValueError(f"the tokens shrank from {self.indexed} to {length}; an index only follows a growing list")
        for start, gram in followed_grams(tokens, self.min_ngram, self.max_ngram, self.indexed):
            self.latest[gram] = start  # a later start overwrites an earlier one
        self.indexed = length
        if k < 1:
            return []
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            suffix = tuple(tokens[length - n :])
            start = self.latest.get(suffix)
            if start is not None:
                return tokens[start + n : start + n + k]
            if history is not None:
                found = history.follow(suffix, k)
                if found:
                    return found
        return []


class HistoryIndex:
    """The latest occurrence of every n-gram (`min_ngram` to `max_ngram` tokens) that a token follows in
    the token lists of finished sequences, newest list first, over at most `budget` tokens of lists
    (the oldest dropped first; a list longer than the budget keeps its last `budget` tokens). A list
    is indexed at the first lookup after it came (~1 ms for 256 tokens), so a shard whose batch is
    too large to speculate spends nothing on it but the copy."""

    __slots__ = ("budget", "max_ngram", "min_ngram", "held", "lists", "latest", "added", "indexed")

    def __init__(self, budget: int, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> None:
        if budget < 1:
            raise ValueError(f"a history index holds at least 1 token, not {budget}")
        self.budget = budget
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.held = 0  # tokens in `lists`
        self.lists: dict[int, list[int]] = {}  # by key, the order they came in, oldest first
        self.latest: dict[tuple[int, ...], tuple[int, int]] = {}  # n-gram -> (key, start)
        self.added = 0  # keys handed out
        self.indexed = 0  # lists of keys below this are in `latest`

    def add(self, tokens: list[int]) -> None:
        """Keep a finished sequence's tokens (copied), then drop the oldest lists past the budget."""
        tokens = list(tokens[-self.budget :])
        self.lists[self.added] = tokens
        self.added += 1
        self.held += len(tokens)
        while self.held > self.budget:
            self._drop(next(iter(self.lists)))

    def follow(self, suffix: tuple[int, ...], k: int) -> list[int]:
        """Up to `k` tokens that followed the latest occurrence of `suffix`; [] where none is held."""
        self._index_new()
        found = self.latest.get(suffix)
        if found is None:
            return []
        key, start = found
        return self.lists[key][start + len(suffix) : start + len(suffix) + k]

    def clear(self) -> None:
        self.lists.clear()
        self.latest.clear()
        self.held = 0
        self.indexed = self.added

    def _index_new(self) -> None:
        for key in range(self.indexed, self.added):
            tokens = self.lists.get(key)
            if tokens is not None:  # not dropped before its first lookup
                for start, gram in followed_grams(tokens, self.min_ngram, self.max_ngram):
                    self.latest[gram] = (key, start)
        self.indexed = self.added

    def _drop(self, key: int) -> None:
        tokens = self.lists.pop(key)
        self.held -= len(tokens)
        if key < self.indexed:
            for _, gram in followed_grams(tokens, self.min_ngram, self.max_ngram):
                if self.latest.get(gram, (None,))[0] == key:
                    del self.latest[gram]
