"""Schemathesis drives every route of a real `mixserve launch` (1 shard) from its own `/openapi.json`.

Requests that follow the spec and bodies that break it (derandomized, so the same cases every run, and a
bounded number per route) must get the answers the spec describes: no 5xx, only documented status codes,
content types and response schemas, and a 4xx for every body the spec rejects. Afterwards the server is
healthy, holds no KV block, and its log has no traceback (no exception escaped a handler).

Schemathesis' positive_data_acceptance check (every schema-valid body gets a 2xx) is left out: some refusals
depend on the model and not on the body's shape, which a JSON schema cannot state (the chat template
refuses roles that do not alternate, a prompt can be too long for the context), and they are 422s as they
should be.
"""

import aiohttp
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from prometheus_client.parser import text_string_to_metric_families
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

pytestmark = pytest.mark.slow

# Cases per route and generation mode: 7 routes with a body x 2 modes x 20, and the rest, about 300 requests.
CASES = 20
# Generated token limits are cut to this, and bodies without one get it, so the run stays quick on a CPU.
MAX_TOKENS = 3
TOKEN_LIMITS = ("max_tokens", "max_new_tokens", "max_completion_tokens", "min_tokens", "max_output_tokens")
DEFAULT_TOKEN_LIMIT = {
    "/predict": "max_tokens",
    "/v1/chat/completions": "max_tokens",
    "/v1/completions": "max_tokens",
    "/v1/responses": "max_output_tokens",
}


@pytest.fixture(scope="module")
def server(launch, demo_dir):
    server = launch("--model", str(demo_dir), "--num-shard", "1")
    yield server
    server.stop()  # free the CPU for the modules after this one


def cap_token_limits(body: object, default: str | None) -> None:
    """Cut every token limit in a generated body (and in TGI's `parameters`) to MAX_TOKENS, keeping its type,
    and give `default` that limit when the body has none (the APIs' defaults run to 100 tokens and more)."""
    if not isinstance(body, dict):
        return
    for name in TOKEN_LIMITS:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS:
            body[name] = MAX_TOKENS
    if default is not None and not any(name in body for name in TOKEN_LIMITS):
        body[default] = MAX_TOKENS
    if "inputs" in body:
        if body.get("parameters") is None:
            body["parameters"] = {}
        cap_token_limits(body["parameters"], "max_new_tokens")


def fuzz_operation(operation, mode: GenerationMode, base_url: str, session: requests.Session) -> None:
    """CASES derandomized cases of one operation in one mode; raises the first failure Hypothesis keeps."""

    @settings(
        max_examples=CASES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case):
        cap_token_limits(case.body, DEFAULT_TOKEN_LIMIT.get(operation.path))
        response = case.call(base_url=base_url, session=session, timeout=120)
        case.validate_response(response, excluded_checks=[positive_data_acceptance])

    check()


def test_every_route_answers_fuzzed_bodies_as_its_spec_says(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    failures = []
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            # Only a body can be made invalid: the other routes take at most a free-form path parameter.
            modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if operation.body else [GenerationMode.POSITIVE]
            for mode in modes:
                try:
                    fuzz_operation(operation, mode, server.url, session)
                # Schemathesis reports check failures as a BaseExceptionGroup; every operation's are kept.
                except (Exception, BaseExceptionGroup) as exc:
                    failures.append(f"{operation.label} ({mode.value}): {exc}")
    assert not failures, "\n\n".join(failures)
    log = server.contract_log("no exception escaped a handler: an error is one line, never a traceback")
    assert "Traceback" not in log and "event=internal_error" not in log, log[-4000:]


async def test_server_is_healthy_and_holds_no_block_after_the_fuzzing(server):
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.url}/health") as response:
            assert response.status == 200
        async with session.get(f"{server.url}/metrics") as response:
            families = {f.name: f for f in text_string_to_metric_families(await response.text())}
        body = {"prompt": "The", "max_tokens": 2, "stream": False}
        async with session.post(f"{server.url}/predict", json=body) as response:
            assert response.status == 200 and (await response.json())["generated_tokens"] == 2
    gauges = {name: families[name].samples[0].value for name in ("mixserve_kv_blocks_used", "mixserve_batch_size")}
    assert gauges == {"mixserve_kv_blocks_used": 0, "mixserve_batch_size": 0}
    requests_total = families["mixserve_requests"].samples
    assert sum(s.value for s in requests_total if s.name == "mixserve_requests_total") >= 200
