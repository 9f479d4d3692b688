"""`mixserve bench soak`: minutes of mixed load, then a leak check.

Starts `mixserve launch` (the demo, 2 shards, unless told otherwise) or targets `--url`, and
for `--minutes` keeps `--concurrency` requests in flight, drawn from the mix in
`benchmarks.soak_load` (every API streamed and not, cancelled streams, invalid and over-limit
bodies). Every few seconds it samples the router's and each shard's RSS, the KV blocks in use
and the load average. At the end it checks that every request is accounted for on both sides,
that the KV blocks are back to 0, that nothing answered 5xx or restarted, and that RSS grew by
less than `--max-rss-growth` percent between the first and the last steady-state window.
Writes soak.json and soak.md (and the server's log) to benchmarks/results/soak-<UTC time>/.
"""

import argparse
import asyncio
import datetime
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

from mixserve.benchmarks import report, soak_report
from mixserve.benchmarks.processes import PYTHON, REPO, ServerProcess, free_port
from mixserve.benchmarks.serve import resolve_model_dir
from mixserve.benchmarks.soak_load import Outcome, ServerLimits, SoakClient, kind_schedule
from mixserve.benchmarks.soak_probe import ServerProbe, shard_pids
from mixserve.benchmarks.workload import WorkloadConfig, build_requests, load_tokenizer

log = logging.getLogger("mixserve.bench")


@dataclass(slots=True)
class SoakConfig:
    """One soak: the server, how long and how hard, and what counts as a leak."""

    url: str
    model_dir: str
    minutes: float = 5.0
    concurrency: int = 8
    warmup_s: float = 30.0
    window_s: float = 60.0
    sample_every_s: float = 5.0
    workload: WorkloadConfig = field(default_factory=lambda: WorkloadConfig(32, 16, 0.5, 0))
    prompts: int = 64
    max_body_bytes: int = 2 << 20
    max_rss_growth_pct: float = 5.0
    timeout_s: float = 120.0
    settle_s: float = 30.0
    api_key: str | None = None

    def __post_init__(self) -> None:
        if self.minutes <= 0 or self.concurrency < 1 or self.prompts < 1:
            raise ValueError("minutes must be > 0, concurrency and prompts >= 1")
        if self.warmup_s < 0 or self.window_s <= 0 or self.sample_every_s <= 0:
            raise ValueError("warmup must be >= 0, window and sample interval > 0")
        if self.warmup_s >= self.minutes * 60:
            raise ValueError(f"warm-up ({self.warmup_s}s) must be shorter than the soak ({self.minutes * 60:.0f}s)")
        self.url = self.url.rstrip("/")


async def run_soak(config: SoakConfig, pids: dict[str, int]) -> dict:
    """Load the server for config.minutes and gather what the checks need; returns the result
    (meta, load, server, rss, checks, samples, requests)."""
    meta = report.run_meta()
    meta["config"] = {**asdict(config), "api_key": bool(config.api_key)}
    tokenizer = load_tokenizer(config.model_dir)
    requests = build_requests(tokenizer, config.workload, config.prompts)
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as probe_session:
        probe = ServerProbe(probe_session, config.url, pids)
        info_before = await probe.info()
        counts_before = await probe.counts()
        limits = ServerLimits(info_before["max_total_tokens"], info_before["max_stop_sequences"], config.max_body_bytes)
        model_name = info_before.get("model_id") or config.model_dir
        client = SoakClient(config.url, model_name, limits, config.timeout_s, headers=headers)
        samples: list[dict] = []
        outcomes: list[Outcome] = []
        sent = 0
        start = time.perf_counter()
        deadline = start + config.minutes * 60

        async def worker() -> None:
            nonlocal sent
            while time.perf_counter() < deadline:
                index, sent = sent, sent + 1
                sent_at = time.perf_counter() - start
                kind = kind_schedule(index, config.workload.seed)
                try:
                    outcome = await client.send(kind, requests[index % len(requests)], index, sent_at)
                except Exception as exc:  # a harness bug must still leave the request accounted for
                    outcome = Outcome(kind, "unexpected", 0, f"harness: {type(exc).__name__}: {exc}", sent_at, 0.0)
                outcomes.append(outcome)

        async def sampler() -> None:
            while True:
                samples.append(await _sample(probe, time.perf_counter() - start))
                last = samples[-1]
                log.info(
                    "event=soak_sample t_s=%.0f sent=%d done=%d kv_blocks_used=%s load_1m=%s rss_kib=%s",
                    last["t_s"], sent, len(outcomes), last.get("kv_blocks_used"), last.get("load_1m"),
                    ",".join(f"{k}:{v}" for k, v in (last.get("rss_kib") or {}).items()),
                )  # fmt: skip
                await asyncio.sleep(config.sample_every_s)

        async with client:
            sampling = asyncio.create_task(sampler())
            await asyncio.gather(*(worker() for _ in range(config.concurrency)))
            load_s = time.perf_counter() - start
            sampling.cancel()
        info_after, delta = await probe.settle(sent, counts_before, config.settle_s)
        samples.append(await _sample(probe, time.perf_counter() - start))
    meta["machine_at_end"] = report.machine_info()
    result = {
        "meta": meta,
        "load": soak_report.load_summary(sent, outcomes, load_s),
        "server": soak_report.server_summary(info_before, info_after, delta, samples),
        "rss": soak_report.rss_growth(samples, config.warmup_s, config.window_s, load_s),
        "samples": samples,
        "requests": [o.to_json() for o in outcomes],
    }
    result["checks"] = soak_report.checks(result, config.max_rss_growth_pct)
    result["passed"] = all(c["ok"] is not False for c in result["checks"].values())
    return result


async def _sample(probe: ServerProbe, elapsed_s: float) -> dict:
    """A sample, or the reason there is none this time (a server that stopped answering /info)."""
    try:
        return await probe.sample(elapsed_s)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return {"t_s": round(elapsed_s, 2), "error": f"{type(exc).__name__}: {exc}"}


def launch_server(args: argparse.Namespace, model_dir: str, out_dir: Path) -> tuple[ServerProcess, str, dict[str, int]]:
    """`mixserve launch` as a child; returns it, its URL and the router's and shards' pids once ready."""
    port = free_port()
    cmd = [PYTHON, "-m", "mixserve.cli", "launch", "--model", model_dir, "--num-shard", str(args.num_shard)]
    cmd += ["--port", str(port), "--max-body-bytes", str(args.max_body_bytes), *args.launch_arg]
    server = ServerProcess("mixserve", cmd, out_dir / "logs" / "mixserve.log")
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait_http_ready(f"{url}/health", args.startup_timeout)
    except (RuntimeError, TimeoutError):
        server.stop()
        raise
    # The router runs in the launcher's own process; the shards are its children.
    pids = {"router": server.process.pid, **shard_pids(server.log_path.read_text(errors="replace"))}
    return server, url, pids


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="soak a running server here (default: start `mixserve launch`)")
    parser.add_argument("--model", help="checkpoint dir (default: the demo, or /info's model_id with --url)")
    parser.add_argument("--num-shard", type=int, default=2, help="shards of the server it starts")
    parser.add_argument(
        "--launch-arg", action="append", default=[], help="extra `mixserve launch` flag: --launch-arg=--flag=value"
    )
    parser.add_argument("--pid", action="append", default=[], help="NAME=PID to sample RSS of, with --url (repeat)")
    parser.add_argument("--minutes", type=float, default=5.0, help="how long to load the server")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at all times")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds of load before the first RSS window")
    parser.add_argument("--window", type=float, default=60.0, help="seconds of each RSS window compared")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--input-len", type=int, default=32, help="prompt tokens")
    parser.add_argument("--output-len", type=int, default=16, help="output tokens asked for")
    parser.add_argument("--output-spread", type=float, default=0.5, help="output length uniform within ±this fraction")
    parser.add_argument("--seed", type=int, default=0, help="workload and mix seed")
    parser.add_argument("--max-body-bytes", type=int, default=2 << 20, help="the server's body limit (413 past it)")
    parser.add_argument("--max-rss-growth", type=float, default=5.0, help="RSS growth allowed, percent")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request before it counts as lost")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for the server")
    parser.add_argument("--api-key", default=os.environ.get("MIXSERVE_API_KEY"), help="with --url: the server's key")
    parser.add_argument("--out", type=Path, help="output dir (default: benchmarks/results/soak-<UTC time>)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s bench %(levelname)s %(message)s")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    out_dir = args.out or REPO / "benchmarks" / "results" / f"soak-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    server = None
    if args.url:
        url, model_dir = args.url, resolve_model_dir(args.url, args.model)
        pids = {name: int(pid) for name, pid in (p.split("=", 1) for p in args.pid)}
    else:
        model_dir = args.model or _demo_dir()
        server, url, pids = launch_server(args, model_dir, out_dir)
    config = SoakConfig(
        url=url,
        model_dir=model_dir,
        minutes=args.minutes,
        concurrency=args.concurrency,
        warmup_s=args.warmup,
        window_s=args.window,
        sample_every_s=args.sample_every,
        workload=WorkloadConfig(args.input_len, args.output_len, args.output_spread, args.seed),
        max_body_bytes=args.max_body_bytes,
        max_rss_growth_pct=args.max_rss_growth,
        timeout_s=args.timeout,
        api_key=args.api_key if args.url else None,
    )
    try:
        result = asyncio.run(run_soak(config, pids))
    finally:
        if server is not None:
            exit_code = server.stop()
    if server is not None:
        result["server"]["exit_code"] = exit_code
    report.write_json(result, out_dir / "soak.json")
    markdown = soak_report.markdown(result)
    (out_dir / "soak.md").write_text(markdown + "\n")
    sys.stdout.write(markdown + "\n")
    log.info("event=soak_done passed=%s out=%s", result["passed"], out_dir)
    return 0 if result["passed"] else 1


def _demo_dir() -> str:
    from mixserve.shards.demo.checkpoint import ensure_demo_checkpoint

    return str(ensure_demo_checkpoint())
