"""`GET /metrics` (the Prometheus exposition of the router's registry) and the HTTP request counter."""

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mixserve.router.metrics import Metrics
from mixserve.router.metrics_vllm import VllmNames

METRICS = web.AppKey("metrics", Metrics)


@web.middleware
async def count_requests(request: web.Request, handler):
    """Count every HTTP request by route template and final status."""
    # A handler cancelled because its client went away never gets a status: count it as nginx's 499.
    status = "499"
    try:
        response = await handler(request)
        status = str(response.status)
        return response
    except web.HTTPException as exc:
        status = str(exc.status)
        raise
    except Exception:
        status = "500"
        raise
    finally:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        request.app[METRICS].requests.labels("http", route, status).inc()


async def serve_metrics(request: web.Request) -> web.Response:
    """`GET /metrics`: the Prometheus text exposition of this router's registry."""
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def install(app: web.Application, metrics: Metrics, vllm_model_name: str | None = None) -> None:
    """Serve `GET /metrics` from `metrics` and count every HTTP request of `app` (outermost middleware); with
    `vllm_model_name`, the metrics under vLLM's names too (router/metrics_vllm.py), labelled with it."""
    if vllm_model_name is not None and not metrics.vllm_names:
        metrics.registry.register(VllmNames(metrics, vllm_model_name))
        metrics.vllm_names = True
    app[METRICS] = metrics
    app.middlewares.insert(0, count_requests)
    app.router.add_get("/metrics", serve_metrics)
