"""vLLM's `return_token_ids` on the OpenAI responses (router/openai_responses.py): the prompt's token ids and
each choice's beside the text, as vLLM's OpenAI server gives them (RL and evaluation clients read the exact ids
rather than tokenize the text again, which need not give them back)."""

from mixserve.router.engine_api import GenerationHandle


class TokenIds:
    """vLLM's return_token_ids in a stream: a choice's first chunk carries its prompt's ids (`prompt_token_ids`),
    and each chunk the ids of the tokens since its choice's last (`token_ids`: a token that adds no text waits
    for the next chunk). Off, nothing is added."""

    __slots__ = ("on", "generations", "pending", "prompts_sent")

    def __init__(self, on: bool, generations: list[GenerationHandle]) -> None:
        self.on = on
        self.generations = generations
        self.pending: list[list[int]] = [[] for _ in generations]
        self.prompts_sent: set[int] = set()

    def add(self, i: int, token_id: int) -> None:
        if self.on:
            self.pending[i].append(token_id)

    def echo(self, i: int) -> None:
        """Choice `i`'s chunk starts with its prompt's text (completions' echo): its ids come first."""
        if self.on:
            self.pending[i][:0] = self.generations[i].prompt_ids

    def prompt(self, i: int) -> dict[str, list[int]]:
        """`prompt_token_ids` for choice `i`'s first chunk; nothing after it."""
        if not self.on or i in self.prompts_sent:
            return {}
        self.prompts_sent.add(i)
        return {"prompt_token_ids": list(self.generations[i].prompt_ids)}

    def take(self, i: int) -> dict[str, list[int]]:
        """`token_ids` for choice `i`'s chunk now: its tokens since the last."""
        if not self.on:
            return {}
        ids, self.pending[i] = self.pending[i], []
        return {"token_ids": ids}


def completion_token_ids(generation: GenerationHandle, generated: list[int], echo: bool) -> dict[str, list[int]]:
    """vLLM's return_token_ids on a completions choice: its prompt's ids, and the ids of its text (with echo,
    the prompt's first, as the text starts with it)."""
    prompt = list(generation.prompt_ids)
    return {"prompt_token_ids": prompt, "token_ids": prompt + generated if echo else generated}
