"""Per-request records of a load run and their summary: throughput, TTFT, ITL, TPOT, E2E, errors.

Definitions (as vLLM's and TGI's benchmarks use them):
- TTFT: send → first chunk that carries generated text.
- ITL (inter-token latency): gaps between successive text-carrying chunks, pooled over requests.
  A server that puts several tokens in one chunk shows fewer, longer gaps.
- TPOT (time per output token): (E2E - TTFT) / (output tokens - 1), per request.
- E2E: send → end of the response.
- Output throughput: output tokens of the successful requests / wall time of the level.
"""

import math
from dataclasses import dataclass, field

PERCENTILES = (50, 90, 99)


@dataclass(slots=True)
class RequestRecord:
    """What one request did, timed on the client (seconds; `token_times` are offsets from the send)."""

    prompt_tokens: int
    max_tokens: int
    sent_at: float = 0.0
    ok: bool = False
    status: int = 0
    error: str = ""
    e2e: float = 0.0
    token_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    count_method: str = ""
    # Filled by targets whose stream says them (openai, tgi): the text, and why it ended.
    text: str = ""
    finish_reason: str = ""

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] if self.token_times else None

    @property
    def itls(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:], strict=False)]

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def to_json(self) -> dict:
        """The record without its per-token times, in milliseconds."""
        return {
            "ok": self.ok,
            "status": self.status,
            "error": self.error,
            "prompt_tokens": self.prompt_tokens,
            "max_tokens": self.max_tokens,
            "output_tokens": self.output_tokens,
            "chunks": len(self.token_times),
            "sent_at_s": round(self.sent_at, 6),
            "ttft_ms": None if self.ttft is None else round(self.ttft * 1e3, 3),
            "tpot_ms": None if self.tpot is None else round(self.tpot * 1e3, 3),
            "e2e_ms": round(self.e2e * 1e3, 3),
            "finish_reason": self.finish_reason,
        }


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks, as numpy's default."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution_ms(values_s: list[float]) -> dict[str, float | None]:
    """Mean and percentiles of durations given in seconds, in milliseconds (None when there are none)."""
    if not values_s:
        return {"mean": None, **{f"p{q}": None for q in PERCENTILES}}
    out = {"mean": round(sum(values_s) / len(values_s) * 1e3, 3)}
    out.update({f"p{q}": round(percentile(values_s, q) * 1e3, 3) for q in PERCENTILES})
    return out


def summarize(records: list[RequestRecord], duration_s: float, server_output_tokens: int | None = None) -> dict:
    """The level's summary. Output tokens are the server's own count when it gave one for the level
    (exact), else the client's count (see each record's count_method)."""
    ok = [r for r in records if r.ok]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            kind = f"HTTP {r.status}" if r.status and r.status != 200 else r.error.split(":", 1)[0] or "error"
            errors[kind] = errors.get(kind, 0) + 1
    counted = sum(r.output_tokens for r in ok)
    tokens = counted if server_output_tokens is None else server_output_tokens
    methods = sorted({r.count_method for r in ok if r.count_method})
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "error_kinds": errors,
        "duration_s": round(duration_s, 3),
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "output_tokens_counted": counted,
        "output_tokens_server": server_output_tokens,
        "token_count_method": "server" if server_output_tokens is not None else "+".join(methods) or "none",
        "output_throughput": round(tokens / duration_s, 3) if duration_s > 0 else None,
        "request_throughput": round(len(ok) / duration_s, 3) if duration_s > 0 else None,
        "ttft_ms": distribution_ms([r.ttft for r in ok if r.ttft is not None]),
        "itl_ms": distribution_ms([gap for r in ok for gap in r.itls]),
        "tpot_ms": distribution_ms([r.tpot for r in ok if r.tpot is not None]),
        "e2e_ms": distribution_ms([r.e2e for r in ok]),
    }
