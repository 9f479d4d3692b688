"""`GET /health` and `GET /info`: the router's state for probes and clients, read from the engine's
`health()` and `stats()`; and vLLM's `GET /version`."""

import time

from aiohttp import web

from mixserve.router.errors import error_body, error_headers
from mixserve.router.http_common import CONFIG, ENGINE, STARTED


async def health(request: web.Request) -> web.Response:
    """200 when every shard answers and the engine is serving, 503 with the reason otherwise (and
    Retry-After while the shard group restarts). With several shard groups: 200 while one serves,
    `degraded` naming the groups down."""
    report = await request.app[ENGINE].health()
    if report.unavailable is not None:
        exc = report.unavailable
        status = "unavailable" if exc.retry_after_s is None else "restarting"
        return web.json_response({"status": status, **error_body(exc)}, status=503, headers=error_headers(exc))
    if len(report.groups_down) == report.num_groups:
        return web.json_response(
            {"status": "unavailable", "error": "a shard does not answer Health", "error_type": "unavailable"},
            status=503,
        )
    if report.groups_down:
        groups_down = [{"group": group, "error": reason} for group, reason in report.groups_down.items()]
        return web.json_response({"status": "degraded", "groups_down": groups_down})
    return web.json_response({"status": "ok"})


async def info(request: web.Request) -> web.Response:
    """Model, limits and live counters (KV blocks, queue, steps) of this router."""
    config = request.app[CONFIG]
    stats = request.app[ENGINE].stats()
    limits = stats.limits
    return web.json_response(
        {
            "model_id": config.model_id,
            "model_dtype": config.dtype,
            "kv_cache_dtype": config.kv_cache_dtype,
            "num_shard": config.num_shard,
            "quantize": config.quantize or None,
            "weight_bytes_per_shard": config.weight_bytes_per_shard,
            "memory": config.memory,
            "kernels": config.kernels,
            "weights": config.weights,
            "version": config.version,
            "max_concurrent_requests": limits.max_concurrent_requests,
            "max_input_tokens": limits.max_input_tokens,
            "max_total_tokens": limits.max_total_tokens,
            "scheduling_policy": limits.scheduling_policy,
            "max_batch_prefill_tokens": stats.max_batch_prefill_tokens,
            "max_batch_total_tokens": stats.max_batch_total_tokens,
            "block_size": stats.block_size,
            "kv_blocks_total": stats.kv_blocks_total,
            "kv_blocks_used": stats.kv_blocks_used,
            "kv_blocks_free": stats.kv_blocks_free,
            "kv_blocks_cached": stats.kv_blocks_cached,
            "prefix_caching": stats.prefix_caching,
            "prefix_cache_query_tokens": stats.prefix_cache_query_tokens,
            "prefix_cache_hit_tokens": stats.prefix_cache_hit_tokens,
            "requests_waiting": stats.requests_waiting,
            "requests_running": stats.requests_running,
            "steps": stats.steps,
            "step_sequences": stats.step_sequences,
            "generated_tokens": stats.generated_tokens,
            "cancelled_requests": stats.cancelled_requests,
            "speculate": stats.speculate,
            "speculative_model": config.speculative_model,
            "speculate_history_tokens": config.speculate_history_tokens,
            "speculate_length": config.speculate_length,
            "speculate_constrained": config.speculate_constrained,
            "speculative_proposed_tokens": stats.speculative_proposed_tokens,
            "speculative_accepted_tokens": stats.speculative_accepted_tokens,
            "uptime_s": round(time.monotonic() - request.app[STARTED], 1),
            "shard_groups": [
                {
                    "group": g.group,
                    "status": "serving" if g.error is None else "restarting" if g.restarting else "down",
                    "error": g.error,
                    "restarts": g.restarts,
                    "last_failure": g.last_failure,
                    "num_shard": g.num_shard,
                    "requests_routed": g.requests_routed,
                    "requests_waiting": g.requests_waiting,
                    "requests_running": g.requests_running,
                    "kv_blocks_total": g.kv_blocks_total,
                    "kv_blocks_free": g.kv_blocks_free,
                    "steps": g.steps,
                    "generated_tokens": g.generated_tokens,
                    "speculation_step_us": [
                        {"batch": batch, "plain": _rounded(plain), "speculating": _rounded(speculating)}
                        for batch, plain, speculating in g.speculation_step_us
                    ],
                }
                for g in stats.groups
            ],
            # The rest of TGI's /info, for clients that read it.
            "model_sha": None,
            "model_pipeline_tag": "text-generation",
            "max_input_length": limits.max_input_tokens,
            "max_best_of": config.limits.max_best_of,
            "max_stop_sequences": config.limits.max_stop_sequences,
            "max_batch_size": stats.max_batch_size,
            "router": "mixserve",
            "sha": None,
            "docker_label": None,
        }
    )


async def version(request: web.Request) -> web.Response:
    """`GET /version` (vLLM's): the server's version."""
    return web.json_response({"version": request.app[CONFIG].version})


def add_routes(app: web.Application) -> None:
    """Register `/health`, `/info` and `/version` on `app` (built by `router.server.build_app`)."""
    app.router.add_get("/health", health)
    app.router.add_get("/info", info)
    app.router.add_get("/version", version)


def _rounded(us: float | None) -> float | None:
    return None if us is None else round(us, 1)
