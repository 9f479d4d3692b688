"""What every front (HTTP and gRPC) is configured with besides the engine, and its API key check."""

import hashlib
import hmac
from dataclasses import dataclass, field

from mixserve.router.params import RequestLimits


@dataclass(slots=True)
class ServerConfig:
    """What the fronts need to know besides the engine: the served model's facts and the request limits."""

    model_id: str
    api_key: str | None = None
    max_body_bytes: int = 2 << 20
    # Seconds a client has to send its whole body (its headers are bounded by the server's keep-alive timeout).
    read_timeout_s: float = 60.0
    limits: RequestLimits = field(default_factory=RequestLimits)
    num_shard: int = 1
    dtype: str = ""
    kv_cache_dtype: str = ""
    quantize: str = ""
    weight_bytes_per_shard: int = 0
    # Rank 0's KV cache sizing (shard.proto's MemoryReport), as /info shows it.
    memory: dict[str, int] = field(default_factory=dict)
    # Rank 0's kernels (shard.proto's KernelsReport), as /info shows them.
    kernels: dict = field(default_factory=dict)
    # `random` (the built-in demo, --load-format dummy: the text means nothing) or `checkpoint`.
    weights: str = "checkpoint"
    version: str = ""
    # --served-model-name: the names the OpenAI API answers to (the first is the default one); none: model_id.
    served_model_names: tuple[str, ...] = ()
    # --strict-model-name: a request naming another model is a 404 instead of being served by this one.
    strict_model_name: bool = False
    # --speculative-model: the draft model's checkpoint (None: n-gram proposals, or no speculation).
    speculative_model: str | None = None
    # --speculate-history-tokens: finished requests' tokens n-gram speculation also looks up (0: none).
    speculate_history_tokens: int = 0
    # --speculate-length: n-gram proposals per step adapted to each request's verifications, or fixed at K.
    speculate_length: str = "adaptive"
    # --speculate-constrained: grammar-constrained requests speculate without --speculate (their forced tokens).
    speculate_constrained: bool = True
    # --cors-allow-origin: the web origins whose pages may call the API (`*`: any; none: no cross-origin reads).
    cors_allow_origins: tuple[str, ...] = ()
    # --vllm-metrics: /metrics also under vLLM's names (router/metrics_vllm.py).
    vllm_metrics: bool = False


def api_key_matches(authorization: str, key: str) -> bool:
    """Whether an `Authorization` value, `Bearer KEY` or `Api-Key KEY`, carries `key`.

    The keys are compared as SHA-256 digests with hmac.compare_digest: constant time in their content, and
    of one length whatever was sent, so the time a refusal takes tells nothing about the key.
    """
    scheme, _, given = authorization.partition(" ")
    sent = hashlib.sha256(given.strip().encode(errors="surrogatepass")).digest()
    matches = hmac.compare_digest(sent, hashlib.sha256(key.encode(errors="surrogatepass")).digest())
    return matches and scheme.lower() in ("bearer", "api-key")
