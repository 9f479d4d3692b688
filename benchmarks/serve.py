"""`mixserve bench serve`: a load generator for a running server.

Sweeps fixed concurrency levels (each level: a few warm-up requests not counted, then the
measured requests), optionally with Poisson arrivals at a rate, against one of the APIs in
`benchmarks.targets`. One session (or gRPC channel) drives everything and nothing heavy runs
per request, so the client takes as little CPU from the server under test as it can.
"""

import argparse
import asyncio
import contextlib
import json
import logging
import math
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mixserve.benchmarks import report
from mixserve.benchmarks.metrics import RequestRecord, summarize
from mixserve.benchmarks.targets import TARGETS, Target
from mixserve.benchmarks.workload import (
    WORKLOADS,
    BenchRequest,
    WorkloadConfig,
    build_requests,
    load_tokenizer,
    poisson_arrivals,
)

log = logging.getLogger("mixserve.bench")


@dataclass(slots=True)
class ServeConfig:
    """One load run: where, which API, the sweep, and the workload."""

    url: str
    model_dir: str
    target: str = "predict"
    model_name: str = ""
    concurrency: list[int] = field(default_factory=lambda: [1, 8, 32])
    request_rate: float = math.inf
    num_prompts: int = 0
    rounds: int = 2
    warmup: int = 2
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    temperature: float = 0.0
    top_p: float = 1.0
    ignore_eos: bool = True
    timeout_s: float = 600.0
    keepalive: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {sorted(TARGETS)}, got {self.target!r}")
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"concurrency levels must be >= 1, got {self.concurrency}")
        if self.request_rate <= 0:
            raise ValueError(f"request_rate must be > 0 (inf: all at once), got {self.request_rate}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.num_prompts < 0 or self.warmup < 0 or self.rounds < 1:
            raise ValueError("num_prompts and warmup must be >= 0, rounds >= 1")
        self.url = self.url.rstrip("/")
        self.model_name = self.model_name or self.model_dir

    def prompts_for(self, concurrency: int) -> int:
        """Measured requests at a level: num_prompts, else `rounds` times the concurrency (at least 8)."""
        return self.num_prompts or max(8, self.rounds * concurrency)

    def make_target(self) -> Target:
        """The target the config describes (open it with `async with`)."""
        return TARGETS[self.target](
            self.url,
            self.model_name,
            self.temperature,
            self.ignore_eos,
            self.keepalive,
            self.timeout_s,
            top_p=self.top_p,
        )


async def run_level(
    config: ServeConfig,
    target: Target,
    requests: list[BenchRequest],
    concurrency: int,
    desc: str = "",
) -> tuple[list[RequestRecord], float]:
    """Send `requests` with at most `concurrency` in flight, arriving at config.request_rate;
    returns the records (in request order) and the wall time."""
    arrivals = poisson_arrivals(len(requests), config.request_rate, config.workload.seed)
    slots = asyncio.Semaphore(concurrency)
    bar = _progress(len(requests), desc) if config.progress else None
    start = time.perf_counter()

    async def one(request: BenchRequest, at: float) -> RequestRecord:
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        async with slots:
            sent_at = time.perf_counter() - start
            record = await target.send(request)
        record.sent_at = sent_at
        if bar is not None:
            bar.update(1)
        return record

    try:
        records = await asyncio.gather(*(one(r, a) for r, a in zip(requests, arrivals, strict=True)))
    finally:
        if bar is not None:
            bar.close()
    return list(records), time.perf_counter() - start


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, file=sys.stderr, mininterval=0.5)


def level_requests(tokenizer, config: ServeConfig, level: int, concurrency: int) -> tuple[list, list]:
    """Level `level`'s warm-up requests and measured requests, the same for every server driven with
    this workload. As many warm-up requests as the level keeps in flight (with --warmup > 0): a server
    that compiles per batch size (vLLM) meets this level's batch before the timed requests."""
    warmup = max(config.warmup, concurrency) if config.warmup else 0
    warm = build_requests(tokenizer, config.workload, warmup, stream=2 * level)
    measured = build_requests(tokenizer, config.workload, config.prompts_for(concurrency), stream=2 * level + 1)
    return warm, measured


def level_result(
    label: str, concurrency: int, records: list[RequestRecord], duration: float, server_tokens: int | None, **extra
) -> dict:
    """A level's entry of a result: its summary (logged), the records as JSON, and the live records under
    `_records`; `extra` fields go into the entry too."""
    summary = summarize(records, duration, server_tokens)
    log.info(
        "event=level label=%s concurrency=%d ok=%d errors=%d output_tok_s=%s ttft_p50_ms=%s",
        label,
        concurrency,
        summary["ok"],
        summary["errors"],
        summary["output_throughput"],
        summary["ttft_ms"]["p50"],
    )
    entry = {"concurrency": concurrency, **extra, "summary": summary}
    return entry | {"requests": [r.to_json() for r in records], "_records": records}


async def run_benchmark(config: ServeConfig, label: str = "") -> dict:
    """Run the sweep; returns the result (meta, then one entry per level with its summary, its
    per-request records as JSON, and the live records under `_records` for plots and tests)."""
    meta = report.run_meta()
    meta.update(label=label, config=config_json(config))
    tokenizer = load_tokenizer(config.model_dir)
    levels = []
    async with config.make_target() as target:
        for level, concurrency in enumerate(config.concurrency):
            warm, requests = level_requests(tokenizer, config, level, concurrency)
            if warm:
                await run_level(config, target, warm, concurrency, desc=f"warm-up c={concurrency}")
            before = await target.generated_tokens()
            records, duration = await run_level(config, target, requests, concurrency, f"c={concurrency}")
            after = await target.generated_tokens()
            server_tokens = after - before if before is not None and after is not None else None
            levels.append(level_result(label, concurrency, records, duration, server_tokens))
    return {"meta": meta, "levels": levels}


def config_json(config: ServeConfig) -> dict:
    out = asdict(config)
    out["request_rate"] = None if math.isinf(config.request_rate) else config.request_rate
    return out


def resolve_model_dir(url: str, model: str | None) -> str:
    """The checkpoint whose tokenizer builds the prompts: --model, else the server's `/info` model_id
    (mixserve), else the demo checkpoint."""
    if model:
        return model
    with contextlib.suppress(OSError, ValueError):
        with urllib.request.urlopen(f"{url.rstrip('/')}/info", timeout=10) as response:
            model_id = json.loads(response.read()).get("model_id")
            if model_id and (Path(model_id) / "tokenizer.json").exists():
                return model_id
    from mixserve.shards.demo.checkpoint import ensure_demo_checkpoint

    return str(ensure_demo_checkpoint())


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """Workload and sweep flags shared by `bench serve` and `bench compare`."""
    parser.add_argument("--model", help="checkpoint dir whose tokenizer builds the prompts (default: from /info)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="levels to sweep")
    parser.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals, requests/s (inf)")
    parser.add_argument("--num-prompts", type=int, default=0, help="measured requests per level (0: see --rounds)")
    parser.add_argument("--rounds", type=int, default=2, help="measured requests per level: rounds × c, at least 8")
    parser.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="uncounted warm-up requests before each level (at least the level's concurrency; 0: none)",
    )
    parser.add_argument("--input-len", type=int, default=64, help="prompt tokens (before the BOS a server adds)")
    parser.add_argument("--output-len", type=int, default=64, help="output tokens asked for")
    parser.add_argument("--output-spread", type=float, default=0.0, help="output length uniform within ±this fraction")
    parser.add_argument(
        "--workload",
        choices=WORKLOADS,
        default="random",
        help="prompts of random vocabulary pieces, passages of the demo's training corpus, such passages "
        "followed by their start again, or passages with each output constrained by a JSON schema (see workload.py)",
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus of sampled requests (1: off)")
    parser.add_argument("--seed", type=int, default=0, help="workload seed")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace, url: str, model_dir: str, target: str) -> ServeConfig:
    """The ServeConfig the shared flags describe, for one server."""
    return ServeConfig(
        url=url,
        model_dir=model_dir,
        target=target,
        concurrency=args.concurrency,
        request_rate=args.request_rate,
        num_prompts=args.num_prompts,
        rounds=args.rounds,
        warmup=args.warmup,
        workload=WorkloadConfig(args.input_len, args.output_len, args.output_spread, args.seed, args.workload),
        temperature=args.temperature,
        top_p=args.top_p,
        timeout_s=args.timeout,
        progress=not args.no_progress,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="server base URL")
    parser.add_argument("--target", choices=sorted(TARGETS), default="predict", help="API to drive")
    parser.add_argument("--model-name", default="", help="OpenAI `model` field (default: the --model path)")
    parser.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos (servers that reject it)")
    parser.add_argument("--no-keepalive", action="store_true", help="a new connection per request")
    parser.add_argument("--label", default="", help="name of the system in the outputs")
    parser.add_argument("--out", type=Path, help="write serve.json, serve.md and PNG plots into this directory")
    add_workload_arguments(parser)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s bench %(levelname)s %(message)s")
    config = config_from_args(args, args.url, resolve_model_dir(args.url, args.model), args.target)
    config.model_name = args.model_name or config.model_name
    config.ignore_eos = not args.no_ignore_eos
    config.keepalive = not args.no_keepalive
    result = asyncio.run(run_benchmark(config, args.label or args.target))
    table = report.serve_markdown(result)
    if args.out:
        report.write_serve_result(result, args.out)
    sys.stdout.write(table + "\n")
    failed = sum(level["summary"]["errors"] for level in result["levels"])
    return 1 if failed else 0
