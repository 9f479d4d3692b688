"""One request's sampling settings on a shard, as a step's wire message carries them: checked as they
are built (ValueError), with one spelling of "off" for each setting from there on.
"""

import math
from dataclasses import dataclass, field

# Seeds and per-step keys are taken mod 2**64.
MASK64 = (1 << 64) - 1
# Below this a temperature would overflow logits / T to inf in fp32; such rows are greedy (as in vLLM).
_MIN_TEMPERATURE = 1e-5


def is_greedy(temperature: float, top_k: int) -> bool:
    """Whether settings of this temperature and top_k take the argmax (no random draw); the router asks too."""
    return temperature < _MIN_TEMPERATURE or top_k == 1


@dataclass(slots=True)
class SamplingParams:
    """One request's sampling settings, as `mixserve.shard.v1.SamplingParams` carries them.

    The wire's "off" values are kept: temperature 0 is greedy, top_k 0 keeps every token; top_p and
    repetition_penalty of 0 are mapped to 1.0 (off) here, so later code sees one spelling of "off".
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int = 0
    top_n_tokens: int = 0
    # llguidance's serialized grammar the output must follow; empty for free text (see shards/grammar.py).
    grammar: str = ""
    # Typical sampling's mass (transformers' TypicalLogitsWarper); 1.0 (or 0) is off.
    typical_p: float = 1.0
    # Token id -> value added to its logit before every sample (OpenAI's logit_bias).
    logit_bias: dict[int, float] = field(default_factory=dict)
    # Min-p: a drawn token is at least this share as likely as the most likely one; 0.0 is off.
    min_p: float = 0.0
    # vLLM's allowed_token_ids: only these are sampled; empty: every token.
    allowed_token_ids: list[int] = field(default_factory=list)
    # vLLM's bad_words as token id sequences (shards/logits_processors.banned_tokens).
    bad_words: list[list[int]] = field(default_factory=list)
    # OpenAI's Predicted Outputs: the output the request expects, its proposals' source (shards/prediction.py).
    prediction_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.top_p == 0:
            self.top_p = 1.0
        if self.typical_p == 0:
            self.typical_p = 1.0
        if self.repetition_penalty == 0:
            self.repetition_penalty = 1.0
        floats = (
            "temperature",
            "top_p",
            "typical_p",
            "min_p",
            "repetition_penalty",
            "frequency_penalty",
            "presence_penalty",
        )
        for name in floats:
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 is off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (0 or 1 is off), got {self.top_p}")
        if not 0 < self.typical_p <= 1:
            raise ValueError(f"typical_p must be in (0, 1] (0 or 1 is off), got {self.typical_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (0 is off), got {self.min_p}")
        for token, bias in self.logit_bias.items():
            if token < 0 or not math.isfinite(bias):
                raise ValueError(f"logit_bias needs token ids >= 0 and finite biases, got {token}: {bias}")
        if self.allowed_token_ids and min(self.allowed_token_ids) < 0:
            raise ValueError(f"allowed_token_ids must be >= 0, got {min(self.allowed_token_ids)}")
        if self.prediction_token_ids and min(self.prediction_token_ids) < 0:
            raise ValueError(f"prediction_token_ids must be >= 0, got {min(self.prediction_token_ids)}")
        if any(not word or min(word) < 0 for word in self.bad_words):
            raise ValueError("bad_words must be non-empty sequences of token ids >= 0")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (0 or 1 is off), got {self.repetition_penalty}")
        if not 0 <= self.seed <= MASK64:
            raise ValueError(f"seed must fit in an unsigned 64-bit integer, got {self.seed}")
        if self.top_n_tokens < 0:
            raise ValueError(f"top_n_tokens must be >= 0, got {self.top_n_tokens}")

    @classmethod
    def from_proto(cls, msg) -> "SamplingParams":
        """Build from a `mixserve_pb.shard_pb2.SamplingParams` message (raises ValueError if invalid)."""
        return cls(
            temperature=msg.temperature,
            top_k=msg.top_k,
            top_p=msg.top_p,
            repetition_penalty=msg.repetition_penalty,
            frequency_penalty=msg.frequency_penalty,
            presence_penalty=msg.presence_penalty,
            seed=msg.seed,
            top_n_tokens=msg.top_n_tokens,
            grammar=msg.grammar,
            typical_p=msg.typical_p,
            logit_bias=dict(msg.logit_bias),
            min_p=msg.min_p,
            allowed_token_ids=list(msg.allowed_token_ids),
            bad_words=[list(word.ids) for word in msg.bad_words],
            prediction_token_ids=list(msg.prediction_token_ids),
        )

    @property
    def greedy(self) -> bool:
        """True when the token is the argmax of the penalised logits (no random draw)."""
        return is_greedy(self.temperature, self.top_k)

    @property
    def has_repetition_penalty(self) -> bool:
        """True when the repetition penalty changes any logit."""
        return self.repetition_penalty != 1.0

    @property
    def has_output_penalty(self) -> bool:
        """True when a frequency or presence penalty changes any logit."""
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
