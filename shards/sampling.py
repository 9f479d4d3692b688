"""Next-token sampling on a shard: penalties, greedy, temperature, top-k, top-p, seeded draws.

Every rank of a tensor-parallel group ends a step with the same full logits and runs this same
code, so the draw must be a pure function of (request seed, per-step key): no communication, the
same token on every rank, in every run, whatever else shares the batch.

Shapes:
    B  sequences sampling this step (rows of the logits)
    V  vocabulary size
    R  the subset of rows a stage works on (rows with penalties, or rows that draw at random)
    N  the most top alternatives any row asked for (top_n_tokens)
    S  ids of one stage's (row, token) pairs, flattened over its rows
"""

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mixserve.shards import ops

_MASK64 = (1 << 64) - 1
# Below this a temperature would overflow logits / T to inf in fp32; such rows are greedy (as in vLLM).
_MIN_TEMPERATURE = 1e-5


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

    def __post_init__(self) -> None:
        if self.top_p == 0:
            self.top_p = 1.0
        if self.typical_p == 0:
            self.typical_p = 1.0
        if self.repetition_penalty == 0:
            self.repetition_penalty = 1.0
        floats = ("temperature", "top_p", "typical_p", "repetition_penalty", "frequency_penalty", "presence_penalty")
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
        for token, bias in self.logit_bias.items():
            if token < 0 or not math.isfinite(bias):
                raise ValueError(f"logit_bias needs token ids >= 0 and finite biases, got {token}: {bias}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (0 or 1 is off), got {self.repetition_penalty}")
        if not 0 <= self.seed <= _MASK64:
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
        )

    @property
    def greedy(self) -> bool:
        """True when the token is the argmax of the penalised logits (no random draw)."""
        return self.temperature < _MIN_TEMPERATURE or self.top_k == 1

    @property
    def has_repetition_penalty(self) -> bool:
        """True when the repetition penalty changes any logit."""
        return self.repetition_penalty != 1.0

    @property
    def has_output_penalty(self) -> bool:
        """True when a frequency or presence penalty changes any logit."""
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


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


@dataclass(slots=True)
class SampleOutput:
    """What `sample` chose. Log-probabilities are of the logits given (after logit_bias and any grammar mask),
    before penalties, temperature and the cuts."""

    token_ids: Tensor  # [B] long
    logprobs: Tensor  # [B] float32
    top_ids: Tensor  # [B, N] long, most probable first
    top_logprobs: Tensor  # [B, N] float32


def generator_seed(seed: int, key: int) -> int:
    """The seed of the row generator for a request seed and a per-step key (both taken mod 2**64).

    Hashing both (splitmix64) instead of adding them keeps (seed, key + 1) and (seed + 1, key)
    from drawing the same noise.
    """
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (key & _MASK64))


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mask_top_k_top_p(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Return `logits` `[R, V]` with the entries that top-k and then top-p remove set to -inf.

    `top_k` `[R]` keeps exactly the k highest (0 = off; ties at the k-th value go to the lower token
    id); `top_p` `[R]` then keeps the fewest most probable tokens whose probability (softmax of the
    top-k survivors) reaches p, and always the most probable one (p >= 1 = off).
    """
    vocab = logits.shape[-1]
    # A stable sort puts equal logits in token-id order, so tie-breaking is the same on every rank.
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True, stable=True)  # [R, V], [R, V]
    ranks = torch.arange(vocab, device=logits.device)  # [V]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab).to(logits.device)  # [R]
    removed = ranks[None, :] >= k[:, None]  # [R, V] in sorted order
    probs = sorted_logits.masked_fill(removed, -math.inf).softmax(dim=-1)  # [R, V]
    mass_before = probs.cumsum(dim=-1) - probs  # [R, V] mass of the more probable tokens
    top_p = top_p.to(device=logits.device, dtype=probs.dtype)[:, None]  # [R, 1]
    # The first token has mass_before 0 < p, so one always survives; p >= 1 is off even where
    # rounding lets the cumulative sum reach 1 before the tail.
    removed |= (mass_before >= top_p) & (top_p < 1)
    removed = torch.empty_like(removed).scatter_(1, sorted_ids, removed)  # [R, V] back in token order
    return logits.masked_fill(removed, -math.inf)


def mask_typical(logits: Tensor, mass: Tensor) -> Tensor:
    """Return `logits` `[R, V]` with the tokens typical sampling removes set to -inf (transformers'
    TypicalLogitsWarper): tokens ranked by how far their surprisal is from the row's entropy, the
    closest kept until their probability reaches `mass` `[R]` (>= 1 = off), the closest always."""
    log_probs = logits.log_softmax(dim=-1)  # [R, V]
    entropy = -(log_probs * log_probs.exp()).nansum(dim=-1, keepdim=True)  # [R, 1]
    distance = (-log_probs - entropy).abs()  # [R, V]
    # A stable sort puts equal distances in token-id order, the same on every rank.
    sorted_distance, sorted_ids = distance.sort(dim=-1, stable=True)  # [R, V], [R, V]
    cumulative = logits.gather(-1, sorted_ids).softmax(dim=-1).cumsum(dim=-1)  # [R, V]
    mass = mass.to(device=logits.device, dtype=cumulative.dtype)[:, None]  # [R, 1]
    last = (cumulative < mass).sum(dim=-1, keepdim=True).clamp_(max=logits.shape[-1] - 1)  # [R, 1]
    removed = sorted_distance > sorted_distance.gather(-1, last)  # [R, V] in sorted order
    removed[:, 0] = False
    removed &= mass < 1
    removed = torch.empty_like(removed).scatter_(1, sorted_ids, removed)  # [R, V] back in token order
    return logits.masked_fill(removed, -math.inf)


def apply_logit_bias(
    logits: Tensor, rows: list[int], biases: list[dict[int, float]], vocab_start: int, vocab_size: int
) -> Tensor:
    """`logits` `[R, P]` (fp32, this rank's columns from `vocab_start`) with each of `rows`' `biases` (token id ->
    bias, in the order of `rows`) added to the tokens it holds; ids at or past `vocab_size` are never biased."""
    row_of, columns, values = [], [], []
    end = min(vocab_start + logits.shape[1], vocab_size)
    for row, bias in zip(rows, biases, strict=True):
        for token, value in bias.items():
            if vocab_start <= token < end:
                row_of.append(row)
                columns.append(token - vocab_start)
                values.append(value)
    logits = logits.float()
    if not row_of:
        return logits
    device = logits.device
    index = (torch.tensor(row_of, device=device), torch.tensor(columns, device=device))  # [S], [S]
    return logits.index_put(index, torch.tensor(values, device=device), accumulate=True)


def apply_penalties(logits: Tensor, params: Sequence[SamplingParams], histories: Sequence[TokenHistory]) -> Tensor:
    """Penalised copy of `logits` `[B, V]` (`logits` itself when no row has a penalty).

    Repetition penalty, once per distinct prompt or output token: a positive logit is divided by
    it, any other multiplied. Then, per output token: logit -= frequency_penalty * count +
    presence_penalty * (count > 0).
    """
    rows = [i for i, p in enumerate(params) if p.has_repetition_penalty or p.has_output_penalty]
    if not rows:
        return logits
    device = logits.device
    row_index = torch.tensor(rows, device=device)  # [R]
    scores = logits.index_select(0, row_index)  # [R, V]
    sub_params = [params[i] for i in rows]
    sub_histories = [histories[i] for i in rows]

    if any(p.has_repetition_penalty for p in sub_params):
        seen = _row_token_mask(scores, [h.seen_ids() for h in sub_histories])  # [R, V] bool
        penalty = torch.tensor([p.repetition_penalty for p in sub_params], device=device)[:, None]  # [R, 1]
        penalised = torch.where(scores > 0, scores / penalty, scores * penalty)  # [R, V]
        scores = torch.where(seen, penalised, scores)

    if any(p.has_output_penalty for p in sub_params):
        counts = _row_token_counts(scores, [h.output_ids() for h in sub_histories])  # [R, V]
        frequency = torch.tensor([p.frequency_penalty for p in sub_params], device=device)[:, None]  # [R, 1]
        presence = torch.tensor([p.presence_penalty for p in sub_params], device=device)[:, None]  # [R, 1]
        scores = scores - frequency * counts - presence * (counts > 0)

    return logits.index_copy(0, row_index, scores)


def _flat_rows(ids_per_row: list[Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    lengths = torch.tensor([ids.numel() for ids in ids_per_row])  # [R]
    row_of = torch.repeat_interleave(torch.arange(len(ids_per_row)), lengths)  # [S]
    return row_of.to(device), torch.cat(ids_per_row).to(device)  # [S], [S]


def _row_token_mask(scores: Tensor, ids_per_row: list[Tensor]) -> Tensor:
    row_of, ids = _flat_rows(ids_per_row, scores.device)
    # 2-D indexing bounds-checks ids against V instead of spilling into the next row.
    return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).index_put_(
        (row_of, ids), torch.ones((), dtype=torch.bool, device=scores.device)
    )  # [R, V]


def _row_token_counts(scores: Tensor, ids_per_row: list[Tensor]) -> Tensor:
    row_of, ids = _flat_rows(ids_per_row, scores.device)
    return torch.zeros_like(scores).index_put_(
        (row_of, ids), torch.ones((), dtype=scores.dtype, device=scores.device), accumulate=True
    )  # [R, V]


def _draw(scores: Tensor, seeds: list[int]) -> Tensor:
    """Exponential race: argmax(p / E) with E ~ Exp(1) drawn per row from its own seeded generator.

    In log space this is argmax(scores - log E), which needs no softmax and leaves -inf entries out.
    """
    generator = torch.Generator(device=scores.device)
    noise = torch.empty_like(scores)  # [R, V]
    for row, seed in enumerate(seeds):
        generator.manual_seed(seed)
        noise[row].exponential_(generator=generator)
    # An Exp(1) draw of exactly 0 would make log E = -inf and turn a removed token's -inf into nan.
    log_noise = noise.clamp_min_(torch.finfo(scores.dtype).tiny).log_()  # [R, V]
    return (scores - log_noise).argmax(dim=-1)  # [R]


def sample(
    logits: Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[TokenHistory],
    keys: Sequence[int],
) -> SampleOutput:
    """Choose one next token per row of `logits` `[B, V]`.

    `keys[i]` is the per-step key of row i (the position being sampled): with the row's seed it
    fixes the random draw, so a row draws the same token on every rank, in every run, in any batch.
    Order: penalties, greedy argmax, temperature, top-k, top-p, typical, seeded draw. Returns the
    tokens, their log-probabilities under `logits` and the top `max(top_n_tokens)` alternatives.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    batch, vocab = logits.shape
    if not len(params) == len(histories) == len(keys) == batch:
        raise ValueError(
            f"need one params, history and key per row: {batch} rows, {len(params)} params, "
            f"{len(histories)} histories, {len(keys)} keys"
        )
    logits = logits.float()
    device = logits.device
    top_n = min(max((p.top_n_tokens for p in params), default=0), vocab)
    # Without alternatives to report, a token's log-probability is its logit minus the row's
    # log-sum-exp: one op gives that and the argmax (one C call on fp32 CPU), no [B, V] log_softmax.
    stats = None if top_n else ops.current().row_argmax_logsumexp(logits)
    if stats is None:
        raw_logprobs = logits.log_softmax(dim=-1)  # [B, V]
        top_logprobs, top_ids = raw_logprobs.topk(top_n, dim=-1)  # [B, N], [B, N]
    else:
        top_logprobs, top_ids = logits.new_empty(batch, 0), torch.empty(batch, 0, dtype=torch.long, device=device)

    scores = apply_penalties(logits, params, histories)  # [B, V]
    token_ids = stats[0] if stats is not None and scores is logits else scores.argmax(dim=-1)  # [B]
    drawn = [i for i, p in enumerate(params) if not p.greedy]
    if drawn:
        row_index = torch.tensor(drawn, device=device)  # [R]
        sub_params = [params[i] for i in drawn]
        sub = scores if len(drawn) == batch else scores.index_select(0, row_index)  # [R, V]
        temperature = torch.tensor([p.temperature for p in sub_params], device=device)[:, None]  # [R, 1]
        sub = sub / temperature
        if any(p.top_k > 0 or p.top_p < 1 for p in sub_params):
            top_k = torch.tensor([p.top_k for p in sub_params], device=device)  # [R]
            top_p = torch.tensor([p.top_p for p in sub_params], device=device)  # [R]
            sub = mask_top_k_top_p(sub, top_k, top_p)
        if any(p.typical_p < 1 for p in sub_params):
            sub = mask_typical(sub, torch.tensor([p.typical_p for p in sub_params], device=device))
        seeds = [generator_seed(params[i].seed, keys[i]) for i in drawn]
        token_ids = token_ids.index_copy(0, row_index, _draw(sub, seeds))

    if stats is None:
        logprobs = raw_logprobs.gather(1, token_ids[:, None]).squeeze(1)  # [B]
    else:
        logprobs = logits.gather(1, token_ids[:, None]).squeeze(1) - stats[1]  # [B]
    return SampleOutput(token_ids=token_ids, logprobs=logprobs, top_ids=top_ids, top_logprobs=top_logprobs)
