"""The synthetic workload: prompts of an exact token length, output lengths, arrival times.

Two kinds of prompt, both of an exact length in the served tokenizer (`tokenizer.json`, read with
`tokenizers` so the load generator never imports torch; special tokens the server adds, such as BOS,
not counted):
- `random`: random vocabulary pieces, decoded to text and adjusted until the text encodes back to
  exactly the asked number of tokens. Nothing in them repeats, so speculation finds little to copy.
- `corpus`: passages of the demo's training corpus (shards/demo/corpus.txt), each from a seeded
  offset (moved to the start of a word), cut to the exact length. A model trained on that corpus
  (`mixserve demo-model --train-steps N`) continues text it has seen, as served models continue
  documents, code and chats they are asked about: the workload for speculative decoding.
- `copy`: a corpus passage, a line break, and the passage's first eighth again, to the exact length.
  A model that copies from its context (as served models do when they quote, edit or summarise a
  document they are given) goes on repeating the passage: the workload prompt lookup is built for.
- `json`: corpus passages, each request's output constrained by one bounded JSON schema
  (`bench_schema`: an object of a few fields, enums, maxLength strings), so it ends by EOS within its
  token limit: structured output, whose forced tokens speculation proposes.
The same seed always gives the same workload.
"""

import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

WORKLOADS = ("random", "corpus", "copy", "json")
DEMO_CORPUS = Path(__file__).resolve().parent.parent / "shards" / "demo" / "corpus.txt"
# Characters of corpus read per prompt token before cutting to the exact length (the demo's
# tokenizer averages about 4 characters a token; short tokens and symbols need the slack).
CHARS_PER_TOKEN = 12
# A copy prompt repeats this fraction of its passage's tokens after the line break.
COPY_HEAD_FRACTION = 1 / 8

# Rounds of decode → encode → trim/pad before giving up on an exact length; two or three suffice
# for byte-fallback BPE vocabularies.
MAX_ROUNDS = 50
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@dataclass(slots=True, frozen=True)
class BenchRequest:
    """One request of the workload: the prompt text, its token count, how many tokens to ask for, and
    optionally a JSON schema the output must follow (sent as each API spells it; EOS then not ignored,
    since a finished grammar allows only EOS)."""

    prompt: str
    prompt_tokens: int
    max_tokens: int
    json_schema: dict[str, Any] | None = None


@dataclass(slots=True)
class WorkloadConfig:
    """Prompt length, output length (fixed, or uniform within ±spread of it), and the seed."""

    input_len: int = 64
    output_len: int = 64
    output_spread: float = 0.0
    seed: int = 0
    kind: str = "random"

    def __post_init__(self) -> None:
        if self.kind not in WORKLOADS:
            raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, got {self.kind!r}")
        if self.input_len < 1:
            raise ValueError(f"input_len must be >= 1, got {self.input_len}")
        if self.output_len < 1:
            raise ValueError(f"output_len must be >= 1, got {self.output_len}")
        if not 0.0 <= self.output_spread < 1.0:
            raise ValueError(f"output_spread must be in [0, 1), got {self.output_spread}")


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The served checkpoint's fast tokenizer (`<model_dir>/tokenizer.json`)."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; the load generator needs the checkpoint's tokenizer.json")
    return Tokenizer.from_file(str(path))


def count_tokens(tokenizer: Tokenizer, text: str) -> int:
    """Tokens of `text` without the special tokens the tokenizer would add around it."""
    return len(tokenizer.encode(text, add_special_tokens=False).ids)


def plain_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Vocabulary ids that are neither special/added tokens nor byte-fallback pieces."""
    added = set(tokenizer.get_added_tokens_decoder())
    return [
        i
        for i in range(tokenizer.get_vocab_size())
        if i not in added and not _BYTE_TOKEN.match(tokenizer.id_to_token(i) or "<0x00>")
    ]


def synthetic_prompt(tokenizer: Tokenizer, length: int, rng: random.Random, pool: list[int]) -> str:
    """Text that encodes to exactly `length` tokens, built from random pieces of `pool`."""
    ids = [rng.choice(pool) for _ in range(length)]
    for _ in range(MAX_ROUNDS):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if len(ids) == length:
            return text
        # Decoding then encoding merges or splits pieces; trim or pad and try again.
        ids = ids[:length] + [rng.choice(pool) for _ in range(length - len(ids))]
    raise ValueError(f"could not build a prompt of exactly {length} tokens in {MAX_ROUNDS} rounds")


def corpus_prompt(tokenizer: Tokenizer, corpus: str, length: int, rng: random.Random) -> str:
    """A passage of `corpus` that encodes to exactly `length` tokens, from a random word start on."""
    window = length * CHARS_PER_TOKEN
    if len(corpus) <= 2 * window:
        raise ValueError(f"the corpus ({len(corpus)} characters) is too short for {length}-token prompts")
    for _ in range(MAX_ROUNDS):
        start = rng.randrange(len(corpus) - 2 * window)
        # From the start of the next word: a prompt that starts with a space encodes differently in
        # tokenizers that always prepend the word marker (llama.cpp's) than in the checkpoint's.
        while not corpus[start - 1].isspace() or corpus[start].isspace():
            start += 1
        ids = tokenizer.encode(corpus[start : start + window], add_special_tokens=False).ids
        if len(ids) < length:
            continue
        text = tokenizer.decode(ids[:length], skip_special_tokens=True)
        if count_tokens(tokenizer, text) == length:
            return text
    raise ValueError(f"could not cut a passage of exactly {length} tokens in {MAX_ROUNDS} tries")


def copy_prompt(tokenizer: Tokenizer, corpus: str, length: int, rng: random.Random) -> str:
    """A corpus passage, a line break and the passage's first tokens again, `length` tokens in all."""
    if length < 3:
        raise ValueError(f"copy prompts need at least 3 tokens, got {length}")
    head = max(1, round(length * COPY_HEAD_FRACTION))
    passage_len = length - head - 1
    for _ in range(MAX_ROUNDS):
        passage = corpus_prompt(tokenizer, corpus, passage_len, rng)
        ids = tokenizer.encode(passage, add_special_tokens=False).ids
        text = passage + "\n" + tokenizer.decode(ids[:head], skip_special_tokens=True)
        # The join can merge pieces; such a passage is skipped, not trimmed, so the head stays a copy.
        if count_tokens(tokenizer, text) == length:
            return text
    raise ValueError(f"could not build a copy prompt of exactly {length} tokens in {MAX_ROUNDS} tries")


def bench_schema(tag: str = "") -> dict[str, Any]:
    """The benchmark's bounded schema; `tag` names one more field, making a distinct schema per tag."""
    properties: dict[str, Any] = {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["alpha", "beta", "gamma"]},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "maxItems": 3},
        "note": {"type": "string", "maxLength": 16},
    }
    if tag:
        properties[f"field_{tag}"] = {"enum": ["a", "b"]}
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def build_requests(tokenizer: Tokenizer, config: WorkloadConfig, count: int, *, stream: int = 0) -> list[BenchRequest]:
    """`count` requests; `stream` picks an independent sequence (warm-up and each sweep level use their own)."""
    rng = random.Random(f"{config.seed}:{stream}")
    low = max(1, math.floor(config.output_len * (1 - config.output_spread)))
    high = math.ceil(config.output_len * (1 + config.output_spread))
    if config.kind in ("corpus", "copy", "json"):
        corpus = DEMO_CORPUS.read_text(encoding="utf-8")
        cut = copy_prompt if config.kind == "copy" else corpus_prompt

        def prompt() -> str:
            return cut(tokenizer, corpus, config.input_len, rng)
    else:
        pool = plain_token_ids(tokenizer)

        def prompt() -> str:
            return synthetic_prompt(tokenizer, config.input_len, rng, pool)

    schema = bench_schema() if config.kind == "json" else None
    return [BenchRequest(prompt(), config.input_len, rng.randint(low, high), schema) for _ in range(count)]


def poisson_arrivals(count: int, rate: float, seed: int) -> list[float]:
    """Send times (seconds from the start) of a Poisson process at `rate` requests/s; all zero when rate is inf."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if math.isinf(rate):
        return [0.0] * count
    rng = random.Random(f"arrivals:{seed}")
    times, now = [], 0.0
    for _ in range(count):
        times.append(now)
        now += rng.expovariate(rate)
    return times
