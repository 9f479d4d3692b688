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
from typing import Any

from mixserve.benchmarks import report
from mixserve.benchmarks.metrics import RequestRecord, distribution_ms, summarize
from mixserve.benchmarks.processes import PYTHON, REPO, ServerProcess, free_port
from mixserve.benchmarks.serve import ServeConfig, resolve_model_dir, run_level
from mixserve.benchmarks.targets import TARGETS, Target
from mixserve.benchmarks.workload import BenchRequest, WorkloadConfig, build_requests, load_tokenizer

log = logging.getLogger("mixserve.bench")

MIN_THROUGHPUT_RATIO = 0.85
MAX_ITL_RATIO = 1.10
MAX_CACHED_TTFT_DELTA_MS = 1.0
# Enough for the schema's longest output in compact JSON, so a constrained request ends by EOS.
CONSTRAINED_MAX_TOKENS = 128


def bench_schema(tag: str = "") -> dict[str, Any]:
    """The benchmark's bounded schema; `tag` names one more field, making a distinct schema per tag."""
    properties: dict[str, Any] = {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["alpha", "beta", "gamma"]},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "maxItems": 3},
        "note": {"type": "string", "maxLength": 16},
    }
    if tag:
        properties[f"field_{tag}"] = {"enum": ["a", "b"]}
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


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


def _pooled(runs: list[dict], prefix: str) -> dict:
    chosen = [r for r in runs if r["name"].startswith(prefix)]
    tokens = sum(r["summary"]["output_tokens_server"] or r["summary"]["output_tokens_counted"] for r in chosen)
    seconds = sum(r["summary"]["duration_s"] for r in chosen)
    records = [(rec, q) for r in chosen for rec, q in zip(r["_records"], r["_requests"], strict=True)]
    return {
        "output_tok_s": round(tokens / seconds, 3) if seconds else None,
        "itl_ms": distribution_ms([g for rec, _ in records if rec.ok for g in rec.itls]),
        "free_itl_ms": distribution_ms([g for rec, q in records if rec.ok and q.json_schema is None for g in rec.itls]),
        "free_tpot_ms": distribution_ms([r.tpot for r, q in records if r.ok and q.json_schema is None and r.tpot]),
        "errors": sum(r["summary"]["errors"] for r in chosen),
    }


def criteria(result: dict) -> dict:
    """The three issue-17 criteria as measured, each with its threshold and pass/fail."""
    a, b = _pooled(result["runs"], "A"), _pooled(result["runs"], "B")
    result["pooled"] = {"A": a, "B": b}
    throughput = b["output_tok_s"] / a["output_tok_s"] if a["output_tok_s"] and b["output_tok_s"] else None
    itl_a, itl_b = a["itl_ms"]["p50"], b["free_itl_ms"]["p50"]
    itl = itl_b / itl_a if itl_a and itl_b else None
    triples = [t for t in result["ttft_triples"] if None not in t.values()]
    tpot_a, tpot_b = a["free_tpot_ms"]["p50"], b["free_tpot_ms"]["p50"]
    pairs = zip(result["runs"][0::2], result["runs"][1::2], strict=True)
    per_round = [
        round(rb["summary"]["output_throughput"] / ra["summary"]["output_throughput"], 4)
        for ra, rb in pairs
        if ra["summary"]["output_throughput"] and rb["summary"]["output_throughput"]
    ]
    cached = statistics.median(t["cached_ttft_ms"] - t["free_ttft_ms"] for t in triples) if triples else None
    compile_ms = statistics.median(t["new_ttft_ms"] - t["cached_ttft_ms"] for t in triples) if triples else None
    return {
        "throughput_ratio": _criterion(throughput, MIN_THROUGHPUT_RATIO, at_least=True),
        "free_itl_p50_ratio": _criterion(itl, MAX_ITL_RATIO, at_least=False),
        "cached_schema_ttft_delta_ms": _criterion(cached, MAX_CACHED_TTFT_DELTA_MS, at_least=False, strict=True),
        "new_minus_cached_ttft_ms": None if compile_ms is None else round(compile_ms, 3),
        "free_tpot_p50_ratio": round(tpot_b / tpot_a, 4) if tpot_a and tpot_b else None,
        "throughput_ratio_per_round": per_round,
    }


def _criterion(value: float | None, threshold: float, at_least: bool, strict: bool = False) -> dict:
    if value is None:
        return {"value": None, "threshold": threshold, "passed": False}
    passed = value >= threshold if at_least else (value < threshold if strict else value <= threshold)
    return {"value": round(value, 4), "threshold": threshold, "passed": passed}


def constrained_outputs(result: dict) -> dict:
    """How the constrained outputs of the timed runs ended, and how many of those that ended by stop parse."""
    done = [r for run in result["runs"] for r in run["requests"] if r["kind"] == "constrained"]
    by_stop = [r for r in done if r["finish_reason"] == "stop"]
    parsed = 0
    for r in by_stop:
        try:
            json.loads(r["text"])
            parsed += 1
        except ValueError:
            pass
    return {"constrained": len(done), "finished_by_stop": len(by_stop), "parse_as_json": parsed}


def _lengths(workload: dict) -> str:
    lengths = workload.get("matched_output_lens") or []
    return f"{min(lengths)}-{max(lengths)}, median {statistics.median(lengths):g}" if lengths else "none"


def _load_warning(meta: dict) -> str:
    """A warning when other work shared the cores (a 1-minute load average above the core count at the start
    or the end), which makes run-to-run noise large."""
    start, end = meta["machine"], meta["machine_at_end"]
    loads = [(m.get("load_average") or [0.0])[0] for m in (start, end)]
    if max(loads) > (start.get("cores") or 1):
        return ". **These numbers come from a loaded machine** (other work shared the cores), so noise is large"
    return ""


def markdown(result: dict) -> str:
    """The report: conditions, the runs, the pooled A and B, and the three criteria."""
    w, meta = result["workload"], result["meta"]
    end_load = ", ".join(str(x) for x in meta["machine_at_end"]["load_average"])
    lines = [
        "## Structured output under load: half JSON-schema-constrained vs all free",
        "",
        *report.meta_lines(meta),
        f"- load average at end: {end_load}{_load_warning(meta)}; rounds alternate A/B to cancel drift.",
        f"- server: {result['server']}; API `{w['target']}`, temperature {w['temperature']}",
        f"- workload: concurrency {w['concurrency']}, {w['requests_per_run']} requests per run, {w['rounds']} rounds"
        f" of A (all free) then B (every other request constrained); {w['input_len']}-token prompts; free requests"
        f" ignore EOS; B's free half and A's odd requests ask for {w['free_output_len']} tokens"
        f" ({w['free_output_len_from']}), A's even requests for the warm-up's constrained lengths in turn"
        f" ({_lengths(w)}), so A ends requests as unevenly as B; constrained ones end by EOS within"
        f" {w['constrained_max_tokens']} tokens",
        f"- schema: `{json.dumps(w['schema'])}`",
        "",
        "| run | requests | errors | output tok/s | ITL p50 ms (all) | ITL p50 ms (free) | TTFT p50 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        s = run["summary"]
        lines.append(
            f"| {run['name']} | {s['requests']} | {s['errors']} | {report._fmt(s['output_throughput'])}"
            f" | {report._fmt(s['itl_ms']['p50'], 2)} | {report._fmt(s['free_itl_ms']['p50'], 2)}"
            f" | {report._fmt(s['ttft_ms']['p50'])} |"
        )
    for name, p in result["pooled"].items():
        lines.append(
            f"| **{name} pooled** | | {p['errors']} | {report._fmt(p['output_tok_s'])}"
            f" | {report._fmt(p['itl_ms']['p50'], 2)} | {report._fmt(p['free_itl_ms']['p50'], 2)} | |"
        )
    c = result["criteria"]
    t, i, f = c["throughput_ratio"], c["free_itl_p50_ratio"], c["cached_schema_ttft_delta_ms"]
    outputs = result["constrained_outputs"]
    triples = [t for t in result["ttft_triples"] if None not in t.values()]
    lines += [
        "",
        "| criterion (issue 17) | measured | threshold | result |",
        "|---|---|---|---|",
        f"| B output tok/s / A output tok/s | {_value(t)} | >= {t['threshold']} | {_verdict(t, True)} |",
        f"| free half's ITL p50 in B / A's ITL p50 | {_value(i)} | <= {i['threshold']} | {_verdict(i, False)} |",
        f"| TTFT, cached schema minus free, median ms | {_value(f)} | < {f['threshold']} | {_verdict(f, False)} |",
        "",
        f"- TTFT at concurrency 1 over {len(result['ttft_triples'])} triples (free, new schema, same schema again):"
        f" new minus cached, median {report._fmt(c['new_minus_cached_ttft_ms'], 2)} ms (the compile the cache saves);"
        " cached minus free per triple, ms: "
        + ", ".join(f"{t['cached_ttft_ms'] - t['free_ttft_ms']:.1f}" for t in triples)
        + " (the spread is the machine's noise, against which the 1 ms threshold is read)",
        f"- B/A output tok/s round by round: {', '.join(f'{x:.2f}' for x in c['throughput_ratio_per_round'])}"
        f" (median {_median(c['throughput_ratio_per_round'])}); pooled above is all B tokens over all B seconds",
        "- ITL p50 is bimodal here: with multi-step decode (`--max-decode-steps`, 8 on CPU) a stream gets up to 8"
        " tokens in one burst, so most gaps are ~0.01 ms and p50 lands on a burst gap or a step gap depending on"
        " the mix. The free half's TPOT p50 (per request, (E2E - TTFT) / (tokens - 1)) does not have that problem:"
        f" B / A = {report._fmt(c['free_tpot_p50_ratio'], 3)}"
        f" (A {report._fmt(result['pooled']['A']['free_tpot_ms']['p50'], 2)} ms,"
        f" B free half {report._fmt(result['pooled']['B']['free_tpot_ms']['p50'], 2)} ms)",
        f"- constrained outputs in the timed runs: {outputs['constrained']}, {outputs['finished_by_stop']} ended by"
        f" stop, {outputs['parse_as_json']} of those parse as JSON",
    ]
    return "\n".join(lines)


def _median(values: list[float]) -> str:
    return report._fmt(statistics.median(values), 2) if values else "–"


def _value(criterion: dict) -> str:
    return report._fmt(criterion["value"], 3)


def _verdict(criterion: dict, at_least: bool) -> str:
    value, threshold = criterion["value"], criterion["threshold"]
    if value is None:
        return "fail (not measured)"
    if criterion["passed"]:
        return "pass"
    gap = threshold - value if at_least else value - threshold
    return f"**fail** by {gap:.3f}"


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
