"""OpenAI's logprobs objects: chat's per-token `logprobs.content` entries, the legacy completions
`logprobs` object (echoed prompts included), and vLLM's `prompt_logprobs`; tokens named by their text
piece or, with vLLM's `return_tokens_as_token_ids`, "token_id:N". Used by router/openai_responses.py.
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mixserve.router.detokenizer import token_piece
from mixserve.router.engine_api import GenerationHandle, TokenEvent


def token_namer(tokenizer, as_token_ids: bool) -> Callable[[int], str]:
    """How logprobs name a token: its text piece, or with vLLM's return_tokens_as_token_ids "token_id:N"."""
    if as_token_ids:
        return lambda token_id: f"token_id:{token_id}"
    return functools.partial(token_piece, tokenizer)


def chat_logprobs(name: Callable[[int], str], event: TokenEvent, n: int) -> dict[str, Any]:
    """A generated token's chat logprobs, with its `n` top alternatives (the engine may hold more, for the
    prompt's logprobs)."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        piece = name(token_id)
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}

    alternatives = [entry(t, lp) for t, lp in event.top_tokens[:n]]
    return {**entry(event.token_id, event.logprob), "top_logprobs": alternatives}


def vllm_prompt_logprobs(tokenizer, generation: GenerationHandle, n: int) -> list[dict[str, dict] | None]:
    """vLLM's `prompt_logprobs`: per prompt token (None for the first), the token and its `n` most likely
    alternatives at its position, by token id: `{logprob, rank, decoded_token}`."""

    def entry(token_id: int, logprob: float, rank: int) -> dict[str, Any]:
        return {"logprob": logprob, "rank": rank, "decoded_token": token_piece(tokenizer, token_id)}

    tops = generation.prompt_top_tokens or [[] for _ in generation.prompt_ids]
    scored: list[dict[str, dict] | None] = []
    for token_id, logprob, rank, top in zip(
        generation.prompt_ids, generation.prompt_logprobs, generation.prompt_ranks, tops, strict=True
    ):
        if logprob is None:
            scored.append(None)
            continue
        position = {str(t): entry(t, lp, k) for k, (t, lp) in enumerate(top[:n], 1)}
        position.setdefault(str(token_id), entry(token_id, logprob, rank))
        scored.append(position)
    return scored


@dataclass(slots=True)
class CompletionLogprobs:
    """The legacy completions `logprobs` object, built token by token."""

    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def add(self, name: Callable[[int], str], event: TokenEvent, offset: int, n: int) -> None:
        """A generated token, with its `n` top alternatives (the engine may hold more), each named by `name`."""
        piece = name(event.token_id)
        self.tokens.append(piece)
        self.token_logprobs.append(event.logprob)
        # OpenAI: the requested alternatives, and always the sampled token.
        top = {name(t): lp for t, lp in event.top_tokens[:n]}
        top.setdefault(piece, event.logprob)
        self.top_logprobs.append(top)
        self.text_offset.append(offset)

    def add_prompt(
        self, tokenizer, name: Callable[[int], str], prompt: str, generation: GenerationHandle, n: int
    ) -> None:
        """The echoed prompt's tokens first, as OpenAI gave them: the first token's logprob null."""
        ids = generation.prompt_ids
        starts = [0] * len(ids)
        # A string prompt got the tokenizer's special tokens; token ids were taken as given.
        for special in (True, False):
            encoded = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=special)
            if encoded["input_ids"] == ids:
                starts = [start for start, _ in encoded["offset_mapping"]]
                break
        tops = generation.prompt_top_tokens or [[] for _ in ids]
        for token_id, logprob, top, start in zip(ids, generation.prompt_logprobs, tops, starts, strict=True):
            piece = name(token_id)
            self.tokens.append(piece)
            self.token_logprobs.append(logprob)
            if logprob is None:
                self.top_logprobs.append(None)
            else:
                # As for generated tokens: the requested alternatives, and always the prompt's own token.
                alternatives = {name(t): lp for t, lp in top[:n]}
                alternatives.setdefault(piece, logprob)
                self.top_logprobs.append(alternatives)
            self.text_offset.append(start)

    def extend(self, other: "CompletionLogprobs") -> None:
        """Append `other`'s tokens after these."""
        self.tokens += other.tokens
        self.token_logprobs += other.token_logprobs
        self.top_logprobs += other.top_logprobs
        self.text_offset += other.text_offset

    def as_dict(self) -> dict[str, list]:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }
