"""The OpenAPI schema of `GET /info`: the model, the limits, the live counters, the shard groups and
TGI's own /info fields.
"""

from mixserve.router.openapi_builders import array, nullable, obj, typed
from mixserve.shards import proposal_length

INFO = obj(
    {
        "model_id": typed("string", "the checkpoint as passed to --model"),
        "model_dtype": typed("string", "shard weight dtype"),
        "kv_cache_dtype": typed("string", "the KV cache's dtype (--kv-cache-dtype: the model's unless given)"),
        "num_shard": typed("integer", "tensor-parallel shards"),
        "quantize": nullable(typed("string", "quantization mode of the shards (--quantize; null: none)")),
        "weight_bytes_per_shard": typed("integer", "bytes of weights rank 0 holds, quantization state included"),
        "weights": typed("string", "random (the demo, --load-format dummy: text means nothing) or checkpoint"),
        "memory": obj(
            {
                "weight_bytes": typed("integer", "weights on rank 0"),
                "kv_cache_bytes": typed("integer", "its KV cache"),
                "block_bytes": typed("integer", "one KV block over all layers"),
                "peak_activation_bytes": typed(
                    "integer", "peak of the worst-case steps, measured at Warmup (0 on CPU: not run there)"
                ),
                "headroom_bytes": typed("integer", "kept free besides that peak"),
                "free_bytes": typed("integer", "free memory when the cache was sized (CPU: the KV budget)"),
                "max_batch_tokens": typed("integer", "worst case measured: tokens in a step"),
                "max_batch_size": typed("integer", "worst case measured: sequences in a step"),
                "max_context_tokens": typed("integer", "worst case measured: longest context"),
            },
            description="how rank 0 sized its KV cache (shard.proto MemoryReport)",
        ),
        "kernels": obj(
            {
                "backends": {
                    "type": "object",
                    "additionalProperties": {"enum": ["native", "triton", "torch"]},
                    "description": "each op's backend: native (the C kernels), triton or torch",
                },
                "vector_floats": typed(
                    "integer", "the C kernels' vector width in floats: 16 AVX-512, 8 AVX2, 1 plain C, 0 not run"
                ),
                "bf16_dot_products": typed(
                    "boolean",
                    "the model's bf16 weights (and int8 codes) meet their inputs rounded to bf16 in the CPU's bf16 "
                    "dot product (false for other dtypes)",
                ),
                "amx_tile_products": typed(
                    "boolean",
                    "the model's bf16 products of 1 MiB of weights and more (K 512 and more) run in AMX's tile dot "
                    "product (false where bf16_dot_products is)",
                ),
            },
            description="which kernels rank 0 runs (chosen at start-up; shard.proto KernelsReport)",
        ),
        "version": typed("string", "mixserve version"),
        "max_concurrent_requests": typed("integer", "queued + running requests before 429"),
        "max_input_tokens": typed("integer", "longest prompt"),
        "max_total_tokens": typed("integer", "prompt + new tokens"),
        "scheduling_policy": typed("string", "fcfs, or priority: requests' priority (lower first) orders the queue"),
        "max_batch_prefill_tokens": typed("integer", "prompt tokens per step"),
        "max_batch_total_tokens": nullable(typed("integer", "KV tokens the running batch may hold (null: all)")),
        "block_size": typed("integer", "KV tokens per block"),
        "kv_blocks_total": typed("integer", "KV cache blocks"),
        "kv_blocks_used": typed("integer", "blocks held by requests now"),
        "kv_blocks_free": typed("integer", "blocks free now"),
        "kv_blocks_cached": typed("integer", "free blocks still holding a cached prompt prefix"),
        "prefix_caching": typed("boolean", "whether prompt prefixes are reused"),
        "prefix_cache_query_tokens": typed("integer", "prompt tokens looked up in the prefix cache"),
        "prefix_cache_hit_tokens": typed("integer", "prompt tokens found there (not recomputed)"),
        "requests_waiting": typed("integer", "queued now"),
        "requests_running": typed("integer", "in the running batch now"),
        "steps": typed("integer", "shard steps run"),
        "step_sequences": typed("integer", "sequences over all steps"),
        "generated_tokens": typed("integer", "tokens generated"),
        "cancelled_requests": typed("integer", "requests whose client left"),
        "speculate": typed("integer", "tokens proposed per decode by speculation (0: off)"),
        "speculative_model": nullable(
            typed("string", "the draft model's checkpoint (--speculative-model; null: n-gram proposals)")
        ),
        "speculate_history_tokens": typed(
            "integer", "tokens of finished requests n-gram speculation also looks up (--speculate-history-tokens)"
        ),
        "speculate_constrained": typed(
            "boolean",
            "grammar-constrained requests speculate without --speculate, from their grammar's forced tokens "
            "(--speculate-constrained)",
        ),
        "speculate_length": typed(
            "string",
            "adaptive: each request's n-gram proposals per step follow its verifications; fixed: --speculate K",
            enum=list(proposal_length.MODES),
        ),
        "speculative_proposed_tokens": typed("integer", "tokens proposed since start"),
        "speculative_accepted_tokens": typed("integer", "proposed tokens that became output"),
        "uptime_s": typed("number", "seconds since start"),
        "shard_groups": array(
            obj(
                {
                    "group": typed("integer", "group index (--replicas order, or --shard-group order)"),
                    "status": {"enum": ["serving", "restarting", "down"]},
                    "error": nullable(typed("string", "why the group is down")),
                    "restarts": typed("integer", "times the group was restarted"),
                    "last_failure": nullable(typed("string", "why the group last failed (null: never)")),
                    "num_shard": typed("integer", "shards of the group"),
                    "requests_routed": typed("integer", "requests sent to the group"),
                    "requests_waiting": typed("integer", "queued on the group now"),
                    "requests_running": typed("integer", "in the group's running batch now"),
                    "kv_blocks_total": typed("integer", "KV cache blocks of the group"),
                    "kv_blocks_free": typed("integer", "of them free now"),
                    "steps": typed("integer", "shard steps the group ran"),
                    "generated_tokens": typed("integer", "tokens the group generated"),
                    "speculation_step_us": array(
                        obj(
                            {
                                "batch": typed("integer", "decodes in the step"),
                                "plain": nullable(typed("number", "a plain decode step, µs (null: not measured)")),
                                "speculating": nullable(
                                    typed("number", "a step with proposals, drafting included, µs (null: not measured)")
                                ),
                            }
                        ),
                        "the shards' step times speculation's cost back-off weighs (empty without it)",
                    ),
                }
            ),
            "every shard group behind this router; the counters above sum over them",
        ),
        "model_sha": {"type": "null", "description": "TGI field; unknown"},
        "model_pipeline_tag": {"const": "text-generation"},
        "max_input_length": typed("integer", "TGI's older name of max_input_tokens"),
        "max_best_of": typed("integer", "the most sequences of best_of (--max-best-of)"),
        "max_stop_sequences": typed("integer", "stop strings per request (--max-stop-sequences)"),
        "max_batch_size": typed("integer", "sequences running at once"),
        "router": {"const": "mixserve"},
        "sha": {"type": "null", "description": "TGI field; unknown"},
        "docker_label": {"type": "null", "description": "TGI field; unknown"},
    },
    description="model, limits, live counters, and TGI's /info fields",
)
