"""`mixserve bench structured`: what JSON-schema-constrained requests cost the requests around them.

Against a server it starts (`mixserve launch`, the demo on 2 shards) or `--url`, at `--concurrency`
(8), alternating rounds A/B/A/B... (`--rounds`; alternating cancels the drift of a shared machine):
(A) every request free, (B) every other request constrained by one bounded JSON schema (an object
with a few fields, enums, maxLength strings, so an output finishes by EOS within its token limit).
Free requests ignore EOS. The odd ones ask for as many tokens as the constrained outputs of a warm-up
run had (median), so both halves of B generate about as much; in A, the even ones (those B
constrains) ask for the warm-up's constrained lengths one by one, so A's requests end as unevenly as
B's and the two runs differ only by the grammars (requests of one length all end in the same step,
and the slots they free are refilled by one prefill, where uneven ends stall the batch once each).
Each run has its own prompts (no prefix-cache hits between runs). Then, at concurrency 1,
`--ttft-triples` times: a free request, a request with a schema never seen (a field name carries a
counter, so the router compiles it), the same schema again (compiled grammar cached); TTFT of each.

The issue-17 criteria, as measured: B's output tok/s over A's (>= 0.85), the free half's ITL p50 in B
over A's ITL p50 (<= 1.10), and the cached-schema request's TTFT minus the free request's, median
over triples (< 1 ms). Writes structured.json (every request, with the constrained outputs' text)
and structured.md to benchmarks/results/structured-<UTC time>/.
"""

import argparse
import asyncio
import datetime
import json
import logging
import statistics
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

from mixserve.benchmarks import report
from mixserve.benchmarks.metrics import RequestRecord, distribution_ms, summarize
from mixserve.benchmarks.processes import PYTHON, REPO, ServerProcess, free_port
from mixserve.benchmarks.serve import ServeConfig, resolve_model_dir, run_level
from mixserve.benchmarks.structured_report import constrained_outputs, criteria, markdown
from mixserve.benchmarks.targets import TARGETS, Target
from mixserve.benchmarks.workload import BenchRequest, WorkloadConfig, bench_schema, build_requests, load_tokenizer

log = logging.getLogger("mixserve.bench")

# Enough for the schema's longest output in compact JSON, so a constrained request ends by EOS.
CONSTRAINED_MAX_TOKENS = 128


def _target(args: argparse.Namespace, url: str, model_dir: str) -> Target:
    return TARGETS[args.target](url, model_dir, args.temperature, True, True, args.timeout)


def _config(args: argparse.Namespace, url: str, model_dir: str) -> ServeConfig:
    return ServeConfig(url=url, model_dir=model_dir, target=args.target, progress=not args.no_progress)


def _request_json(record: RequestRecord, request: BenchRequest, kind: str) -> dict:
    out = {"kind": kind, **record.to_json()}
    if request.json_schema is not None:
        out["text"] = record.text
    return out


async def _run(config: ServeConfig, target: Target, requests: list[BenchRequest], concurrency: int, name: str) -> dict:
    """One timed run; its summary, the free requests' ITL p50 and every request."""
    before = await target.generated_tokens()
    records, duration = await run_level(config, target, requests, concurrency, name)
    after = await target.generated_tokens()
    server_tokens = after - before if before is not None and after is not None else None
    free = [r for r, q in zip(records, requests, strict=True) if q.json_schema is None and r.ok]
    summary = summarize(records, duration, server_tokens)
    summary["free_itl_ms"] = distribution_ms([gap for r in free for gap in r.itls])
    log.info(
        "event=run name=%s ok=%d errors=%d output_tok_s=%s free_itl_p50_ms=%s",
        name, summary["ok"], summary["errors"], summary["output_throughput"], summary["free_itl_ms"]["p50"],
    )  # fmt: skip
    kinds = ["constrained" if q.json_schema is not None else "free" for q in requests]
    return {
        "name": name,
        "summary": summary,
        "requests": [_request_json(r, q, k) for r, q, k in zip(records, requests, kinds, strict=True)],
        "_records": records,
        "_requests": requests,
    }


def _length_matched(requests: list[BenchRequest], lengths: list[int]) -> list[BenchRequest]:
    """Every other request (the first one included: those `_mixed` constrains) asking for the constrained
    outputs' `lengths` in turn, the others as they are."""
    return [
        replace(r, max_tokens=lengths[(i // 2) % len(lengths)]) if i % 2 == 0 else r for i, r in enumerate(requests)
    ]


def _mixed(requests: list[BenchRequest], schema: dict) -> list[BenchRequest]:
    """Every other request constrained (the first one included), with room to finish by EOS."""
    return [
        replace(r, json_schema=schema, max_tokens=CONSTRAINED_MAX_TOKENS) if i % 2 == 0 else r
        for i, r in enumerate(requests)
    ]


async def measure(args: argparse.Namespace, url: str, model_dir: str) -> dict:
    """Warm-up, the A/B rounds and the TTFT triples; returns the result (without the criteria)."""
    config = _config(args, url, model_dir)
    tokenizer = load_tokenizer(model_dir)
    c, n = args.concurrency, args.num_prompts or 4 * args.concurrency
    schema = bench_schema()
    stream = iter(range(10_000))

    def prompts(count: int, output_len: int) -> list[BenchRequest]:
        workload = WorkloadConfig(args.input_len, output_len, 0.0, args.seed)
        return build_requests(tokenizer, workload, count, stream=next(stream))

    async with _target(args, url, model_dir) as target:
        # Warm-up: the schema compiled once, the batch sizes met; its constrained lengths set the free ones'.
        warm = await _run(config, target, [replace(r, json_schema=schema) for r in prompts(c, 128)], c, "warm-up")
        lengths = [r.output_tokens for r in warm["_records"] if r.ok and r.finish_reason == "stop"]
        output_len = args.output_len or (round(statistics.median(lengths)) if lengths else 32)
        await _run(config, target, prompts(c, output_len), c, "warm-up free")
        runs = []
        spread = lengths or [output_len]
        for round_index in range(args.rounds):
            free = _length_matched(prompts(n, output_len), spread)
            runs.append(await _run(config, target, free, c, f"A{round_index}"))
            runs.append(await _run(config, target, _mixed(prompts(n, output_len), schema), c, f"B{round_index}"))
        triples = await _ttft_triples(config, target, prompts(3 * args.ttft_triples, 4))
    return {
        "workload": {
            "concurrency": c,
            "requests_per_run": n,
            "rounds": args.rounds,
            "input_len": args.input_len,
            "free_output_len": output_len,
            "free_output_len_from": "--output-len" if args.output_len else "the warm-up's constrained median",
            "matched_output_lens": spread,
            "constrained_max_tokens": CONSTRAINED_MAX_TOKENS,
            "temperature": args.temperature,
            "target": args.target,
            "schema": schema,
        },
        "warmup": {"constrained_output_tokens": [r.output_tokens for r in warm["_records"]]},
        "runs": runs,
        "ttft_triples": triples,
    }


async def _ttft_triples(config: ServeConfig, target: Target, requests: list[BenchRequest]) -> list[dict]:
    """At concurrency 1: free, new schema, same schema again; TTFT of each in ms (None if it failed)."""
    nonce = uuid.uuid4().hex[:8]
    triples = []
    for i in range(0, len(requests), 3):
        schema = bench_schema(f"{nonce}_{i // 3}")
        free, new, cached = requests[i : i + 3]
        sent = [free, replace(new, json_schema=schema), replace(cached, json_schema=schema)]
        ttfts = {}
        for name, request in zip(("free", "new", "cached"), sent, strict=True):
            record = (await run_level(config, target, [request], 1))[0][0]
            ttfts[f"{name}_ttft_ms"] = None if not record.ok or record.ttft is None else round(record.ttft * 1e3, 3)
        triples.append(ttfts)
    return triples


def launch_server(args: argparse.Namespace, model_dir: str, out_dir: Path) -> tuple[ServerProcess, str]:
    """`mixserve launch` as a child, as `bench compare` starts mixserve; returns it and its URL once ready."""
    port = free_port()
    cmd = [PYTHON, "-m", "mixserve.cli", "launch", "--model", model_dir, "--num-shard", str(args.num_shard)]
    cmd += ["--port", str(port), "--shard-timeout", str(args.startup_timeout)]
    server = ServerProcess("mixserve", cmd, out_dir / "logs" / "mixserve.log")
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait_http_ready(f"{url}/health", args.startup_timeout)
    except BaseException:  # Ctrl-C while waiting too: never leave the server behind
        server.stop()
        raise
    return server, url


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="load a running server here (default: start `mixserve launch`)")
    parser.add_argument("--model", help="checkpoint dir (default: the demo, or /info's model_id with --url)")
    parser.add_argument("--num-shard", type=int, default=2, help="shards of the server it starts")
    parser.add_argument("--target", choices=["openai", "predict", "tgi", "grpc"], default="openai", help="API")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight in A and B")
    parser.add_argument("--rounds", type=int, default=4, help="A/B pairs of runs")
    parser.add_argument("--num-prompts", type=int, default=0, help="requests per run (0: 4 × concurrency)")
    parser.add_argument("--ttft-triples", type=int, default=8, help="free/new-schema/cached-schema TTFT triples")
    parser.add_argument("--input-len", type=int, default=64, help="prompt tokens")
    parser.add_argument(
        "--output-len", type=int, default=0, help="free requests' output tokens (0: the warm-up's constrained median)"
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--seed", type=int, default=0, help="workload seed")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for the server")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--out", type=Path, help="output dir (default: benchmarks/results/structured-<UTC time>)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s bench %(levelname)s %(message)s")
    if args.concurrency < 1 or args.rounds < 1 or args.ttft_triples < 1 or args.num_prompts < 0:
        raise SystemExit("--concurrency, --rounds and --ttft-triples must be >= 1, --num-prompts >= 0")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    out_dir = args.out or REPO / "benchmarks" / "results" / f"structured-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = report.run_meta()
    server = None
    if args.url:
        url, model_dir = args.url.rstrip("/"), resolve_model_dir(args.url, args.model)
        described = f"`{url}` (given)"
    else:
        model_dir = args.model or _demo_dir()
        server, url = launch_server(args, model_dir, out_dir)
        described = f"`mixserve launch --num-shard {args.num_shard}` of `{model_dir}` (log: logs/mixserve.log)"
    started = time.perf_counter()
    try:
        result = asyncio.run(measure(args, url, model_dir))
    finally:
        if server is not None:
            server.stop()
    meta["machine_at_end"] = report.machine_info()
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    result = {"meta": meta, "server": described, **result}
    result["criteria"] = criteria(result)
    result["constrained_outputs"] = constrained_outputs(result)
    for run_ in result["runs"]:
        del run_["_records"], run_["_requests"]
    (out_dir / "structured.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    (out_dir / "structured.md").write_text(text + "\n")
    sys.stdout.write(text + f"\n\nwritten to {out_dir}\n")
    errors = sum(r["summary"]["errors"] for r in result["runs"])
    return 1 if errors else 0


def _demo_dir() -> str:
    from mixserve.shards.demo.checkpoint import ensure_demo_checkpoint

    return str(ensure_demo_checkpoint())
