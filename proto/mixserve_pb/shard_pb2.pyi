from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model_type", "model_path", "rank", "world_size", "dtype", "device", "vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_key_value_heads", "num_experts", "num_experts_per_tok", "max_position_embeddings", "block_size", "num_blocks", "weight_bytes", "quantize", "kv_cache_bytes", "memory", "kernels", "kv_cache_dtype")
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_ATTENTION_HEADS_FIELD_NUMBER: _ClassVar[int]
    NUM_KEY_VALUE_HEADS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_PER_TOK_FIELD_NUMBER: _ClassVar[int]
    MAX_POSITION_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    QUANTIZE_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    KERNELS_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    model_type: str
    model_path: str
    rank: int
    world_size: int
    dtype: str
    device: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_experts: int
    num_experts_per_tok: int
    max_position_embeddings: int
    block_size: int
    num_blocks: int
    weight_bytes: int
    quantize: str
    kv_cache_bytes: int
    memory: MemoryReport
    kernels: KernelsReport
    kv_cache_dtype: str
    def __init__(self, model_type: _Optional[str] = ..., model_path: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., vocab_size: _Optional[int] = ..., hidden_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_attention_heads: _Optional[int] = ..., num_key_value_heads: _Optional[int] = ..., num_experts: _Optional[int] = ..., num_experts_per_tok: _Optional[int] = ..., max_position_embeddings: _Optional[int] = ..., block_size: _Optional[int] = ..., num_blocks: _Optional[int] = ..., weight_bytes: _Optional[int] = ..., quantize: _Optional[str] = ..., kv_cache_bytes: _Optional[int] = ..., memory: _Optional[_Union[MemoryReport, _Mapping]] = ..., kernels: _Optional[_Union[KernelsReport, _Mapping]] = ..., kv_cache_dtype: _Optional[str] = ...) -> None: ...

class KernelsReport(_message.Message):
    __slots__ = ("backends", "vector_floats", "bf16_dot_products", "amx_tile_products")
    class BackendsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FLOATS_FIELD_NUMBER: _ClassVar[int]
    BF16_DOT_PRODUCTS_FIELD_NUMBER: _ClassVar[int]
    AMX_TILE_PRODUCTS_FIELD_NUMBER: _ClassVar[int]
    backends: _containers.ScalarMap[str, str]
    vector_floats: int
    bf16_dot_products: bool
    amx_tile_products: bool
    def __init__(self, backends: _Optional[_Mapping[str, str]] = ..., vector_floats: _Optional[int] = ..., bf16_dot_products: _Optional[bool] = ..., amx_tile_products: _Optional[bool] = ...) -> None: ...

class MemoryReport(_message.Message):
    __slots__ = ("weight_bytes", "kv_cache_bytes", "block_bytes", "peak_activation_bytes", "headroom_bytes", "free_bytes", "max_batch_tokens", "max_batch_size", "max_context_tokens")
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    PEAK_ACTIVATION_BYTES_FIELD_NUMBER: _ClassVar[int]
    HEADROOM_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    weight_bytes: int
    kv_cache_bytes: int
    block_bytes: int
    peak_activation_bytes: int
    headroom_bytes: int
    free_bytes: int
    max_batch_tokens: int
    max_batch_size: int
    max_context_tokens: int
    def __init__(self, weight_bytes: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ..., block_bytes: _Optional[int] = ..., peak_activation_bytes: _Optional[int] = ..., headroom_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ..., max_batch_tokens: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., max_context_tokens: _Optional[int] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("ready",)
    READY_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    def __init__(self, ready: _Optional[bool] = ...) -> None: ...

class WarmupRequest(_message.Message):
    __slots__ = ("max_batch_tokens", "max_batch_size", "max_blocks", "max_context_tokens")
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_batch_tokens: int
    max_batch_size: int
    max_blocks: int
    max_context_tokens: int
    def __init__(self, max_batch_tokens: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., max_blocks: _Optional[int] = ..., max_context_tokens: _Optional[int] = ...) -> None: ...

class WarmupResponse(_message.Message):
    __slots__ = ("num_blocks", "block_size", "warmup_ms", "memory")
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    WARMUP_MS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    num_blocks: int
    block_size: int
    warmup_ms: int
    memory: MemoryReport
    def __init__(self, num_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., warmup_ms: _Optional[int] = ..., memory: _Optional[_Union[MemoryReport, _Mapping]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "repetition_penalty", "frequency_penalty", "presence_penalty", "seed", "top_n_tokens", "grammar", "typical_p", "logit_bias", "min_p", "allowed_token_ids", "bad_words", "prediction_token_ids")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TOP_N_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_FIELD_NUMBER: _ClassVar[int]
    TYPICAL_P_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    BAD_WORDS_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    frequency_penalty: float
    presence_penalty: float
    seed: int
    top_n_tokens: int
    grammar: str
    typical_p: float
    logit_bias: _containers.ScalarMap[int, float]
    min_p: float
    allowed_token_ids: _containers.RepeatedScalarFieldContainer[int]
    bad_words: _containers.RepeatedCompositeFieldContainer[TokenIds]
    prediction_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., seed: _Optional[int] = ..., top_n_tokens: _Optional[int] = ..., grammar: _Optional[str] = ..., typical_p: _Optional[float] = ..., logit_bias: _Optional[_Mapping[int, float]] = ..., min_p: _Optional[float] = ..., allowed_token_ids: _Optional[_Iterable[int]] = ..., bad_words: _Optional[_Iterable[_Union[TokenIds, _Mapping]]] = ..., prediction_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SequenceStep(_message.Message):
    __slots__ = ("seq_id", "token_ids", "start_position", "slot_mapping", "block_table", "sample", "sampling", "prefix_token_ids", "prompt_logprobs", "num_proposed", "draft", "speculate", "run_tokens")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    SLOT_MAPPING_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TABLE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    NUM_PROPOSED_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    SPECULATE_FIELD_NUMBER: _ClassVar[int]
    RUN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    start_position: int
    slot_mapping: _containers.RepeatedScalarFieldContainer[int]
    block_table: _containers.RepeatedScalarFieldContainer[int]
    sample: bool
    sampling: SamplingParams
    prefix_token_ids: _containers.RepeatedScalarFieldContainer[int]
    prompt_logprobs: bool
    num_proposed: int
    draft: bool
    speculate: int
    run_tokens: int
    def __init__(self, seq_id: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., start_position: _Optional[int] = ..., slot_mapping: _Optional[_Iterable[int]] = ..., block_table: _Optional[_Iterable[int]] = ..., sample: _Optional[bool] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., prefix_token_ids: _Optional[_Iterable[int]] = ..., prompt_logprobs: _Optional[bool] = ..., num_proposed: _Optional[int] = ..., draft: _Optional[bool] = ..., speculate: _Optional[int] = ..., run_tokens: _Optional[int] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("sequences", "release_seq_ids", "num_steps", "run_id", "stream_interval_us")
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    RELEASE_SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STREAM_INTERVAL_US_FIELD_NUMBER: _ClassVar[int]
    sequences: _containers.RepeatedCompositeFieldContainer[SequenceStep]
    release_seq_ids: _containers.RepeatedScalarFieldContainer[int]
    num_steps: int
    run_id: int
    stream_interval_us: int
    def __init__(self, sequences: _Optional[_Iterable[_Union[SequenceStep, _Mapping]]] = ..., release_seq_ids: _Optional[_Iterable[int]] = ..., num_steps: _Optional[int] = ..., run_id: _Optional[int] = ..., stream_interval_us: _Optional[int] = ...) -> None: ...

class InterruptRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: int
    def __init__(self, run_id: _Optional[int] = ...) -> None: ...

class InterruptResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TopToken(_message.Message):
    __slots__ = ("token_id", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class SequenceResult(_message.Message):
    __slots__ = ("seq_id", "sampled", "token_id", "logprob", "top_tokens", "prompt_logprobs", "next_tokens", "num_drafted", "prompt_top_tokens", "prompt_ranks")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_DRAFTED_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_RANKS_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    sampled: bool
    token_id: int
    logprob: float
    top_tokens: _containers.RepeatedCompositeFieldContainer[TopToken]
    prompt_logprobs: _containers.RepeatedScalarFieldContainer[float]
    next_tokens: _containers.RepeatedCompositeFieldContainer[NextToken]
    num_drafted: int
    prompt_top_tokens: _containers.RepeatedCompositeFieldContainer[PromptTop]
    prompt_ranks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, seq_id: _Optional[int] = ..., sampled: _Optional[bool] = ..., token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., top_tokens: _Optional[_Iterable[_Union[TopToken, _Mapping]]] = ..., prompt_logprobs: _Optional[_Iterable[float]] = ..., next_tokens: _Optional[_Iterable[_Union[NextToken, _Mapping]]] = ..., num_drafted: _Optional[int] = ..., prompt_top_tokens: _Optional[_Iterable[_Union[PromptTop, _Mapping]]] = ..., prompt_ranks: _Optional[_Iterable[int]] = ...) -> None: ...

class PromptTop(_message.Message):
    __slots__ = ("top_tokens",)
    TOP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    top_tokens: _containers.RepeatedCompositeFieldContainer[TopToken]
    def __init__(self, top_tokens: _Optional[_Iterable[_Union[TopToken, _Mapping]]] = ...) -> None: ...

class NextToken(_message.Message):
    __slots__ = ("token_id", "logprob", "top_tokens")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    top_tokens: _containers.RepeatedCompositeFieldContainer[TopToken]
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., top_tokens: _Optional[_Iterable[_Union[TopToken, _Mapping]]] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("results", "forward_us", "steps", "following")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_US_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    FOLLOWING_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SequenceResult]
    forward_us: int
    steps: int
    following: _containers.RepeatedCompositeFieldContainer[StepResponse]
    def __init__(self, results: _Optional[_Iterable[_Union[SequenceResult, _Mapping]]] = ..., forward_us: _Optional[int] = ..., steps: _Optional[int] = ..., following: _Optional[_Iterable[_Union[StepResponse, _Mapping]]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("seq_ids",)
    SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    seq_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, seq_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClearRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClearResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
