"""The tokens each sequence has seen on a shard, kept incrementally: the penalties read them as
tensors (shards/logits_processors.py), n-gram proposals (shards/ngram.py) as a list.

Shapes:
    S  token ids of one sequence's history
"""

from collections.abc import Iterable

import torch
from torch import Tensor


class _IdBuffer:
    """Append-only token ids: O(1) Python appends, copied to a tensor only when asked for.

    Sequences without penalties never pay for a tensor; sequences with them copy only the ids
    added since the last step into a buffer that grows by doubling.
    """

    __slots__ = ("ids", "_tensor", "_synced")

    def __init__(self) -> None:
        self.ids: list[int] = []
        self._tensor = torch.empty(0, dtype=torch.long)
        self._synced = 0

    def tensor(self) -> Tensor:
        n = len(self.ids)
        if self._synced < n:
            if self._tensor.numel() < n:
                grown = torch.empty(max(n, 2 * self._tensor.numel()), dtype=torch.long)
                grown[: self._synced] = self._tensor[: self._synced]
                self._tensor = grown
            self._tensor[self._synced : n] = torch.tensor(self.ids[self._synced :], dtype=torch.long)
            self._synced = n
        return self._tensor[:n]


def _checked_ids(ids: int | Iterable[int]) -> list[int]:
    out = [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]
    # A negative id would index from the end of the vocabulary and penalise the wrong token.
    if out and min(out) < 0:
        raise ValueError(f"token ids must be >= 0, got {min(out)}")
    return out


class TokenHistory:
    """The tokens one sequence has seen, kept incrementally for the penalties and n-gram speculation.

    Repetition penalty (Hugging Face style) looks at every distinct prompt and output token;
    frequency and presence penalties (OpenAI style) count output tokens only; n-gram proposals
    (shards/ngram.py) read every token in order.
    """

    __slots__ = ("_seen", "_seen_ids", "_output_ids", "tokens")

    def __init__(self) -> None:
        self._seen: set[int] = set()
        self._seen_ids = _IdBuffer()
        self._output_ids = _IdBuffer()
        self.tokens: list[int] = []  # prompt then output tokens, in order

    def _see(self, ids: list[int]) -> None:
        for token in ids:
            if token not in self._seen:
                self._seen.add(token)
                self._seen_ids.ids.append(token)

    def add_prompt(self, ids: Iterable[int]) -> None:
        """Record prompt tokens (call once per prefill chunk)."""
        checked = _checked_ids(ids)
        self._see(checked)
        self.tokens.extend(checked)

    def add_output(self, ids: int | Iterable[int]) -> None:
        """Record generated token(s)."""
        checked = _checked_ids(ids)
        self._see(checked)
        self._output_ids.ids.extend(checked)
        self.tokens.extend(checked)

    def seen_ids(self) -> Tensor:
        """Distinct prompt and output token ids in first-seen order, `[S]` long on the CPU."""
        return self._seen_ids.tensor()

    def output_ids(self) -> Tensor:
        """Every output token id in generation order (with repeats), `[S]` long on the CPU."""
        return self._output_ids.tensor()

    @property
    def generated(self) -> int:
        """Output tokens recorded (the last this many of `tokens`)."""
        return len(self._output_ids.ids)

    def output_tail(self, n: int) -> list[int]:
        """The last `n` output token ids (fewer where fewer were generated), in order."""
        return self._output_ids.ids[-n:] if n > 0 else []
