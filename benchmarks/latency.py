"""`mixserve bench latency`: shard step latency over direct gRPC, and the router's own overhead.

1. Starts N shards with the shard CLI (`mixserve shard`, unix sockets in a temp dir), warms
   them up, and for each batch size B and sequence length S times, through the same
   ShardService calls the router makes: the prefill step of B sequences of S tokens, then
   decode steps of B sequences at context S. Each call goes to every shard at once, as the
   router sends it; the wall time is the client's, `forward` is the shard's own (rank 0). With
   several `--moe-parallel` modes (tp, ep) the sweep runs once per mode, one group after another,
   and a table sets them side by side with the tokens each expert gets (B K / E at decode).
2. Stops them, starts `mixserve launch` with as many shards and times `/predict` for one
   token from an S-token prompt (BOS included): TTFT over HTTP. The router's overhead is that
   TTFT minus the B=1 prefill step wall time at the same S (validation, tokenization,
   scheduling, the gRPC hop, detokenization, HTTP).
"""

import argparse
import asyncio
import json
import logging
import random
import shlex
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from mixserve.benchmarks import report
from mixserve.benchmarks.latency_report import latency_markdown
from mixserve.benchmarks.metrics import distribution_ms
from mixserve.benchmarks.processes import PYTHON, ServerProcess, child_env, free_port
from mixserve.benchmarks.targets import OpenAICompletionsTarget, PredictTarget
from mixserve.benchmarks.workload import BenchRequest, count_tokens, load_tokenizer, plain_token_ids, synthetic_prompt
from mixserve_pb import shard_pb2, shard_pb2_grpc

log = logging.getLogger("mixserve.bench")

# The router's per-token cost: tokens streamed per request, and requests measured (after one warm-up).
ITL_TOKENS = 32
ITL_REQUESTS = 4


@dataclass(slots=True)
class LatencyConfig:
    """The sweep: shards, batch sizes, sequence lengths, repeats."""

    model_dir: str
    num_shard: int = 1
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])
    seq_lens: list[int] = field(default_factory=lambda: [64, 256])
    prefill_repeats: int = 5
    decode_steps: int = 8
    block_size: int = 16
    router_requests: int = 10
    seed: int = 0
    moe_parallel: list[str] = field(default_factory=lambda: ["tp"])
    shard_args: list[str] = field(default_factory=list)  # e.g. --dtype bfloat16, --quantize int8-wo

    def __post_init__(self) -> None:
        if self.num_shard < 1 or min(self.batch_sizes) < 1 or min(self.seq_lens) < 2:
            raise ValueError("need num_shard >= 1, batch sizes >= 1 and sequence lengths >= 2")
        if not self.moe_parallel or not set(self.moe_parallel) <= {"tp", "ep"}:
            raise ValueError(f"moe_parallel must list tp and/or ep, got {self.moe_parallel}")
        if self.prefill_repeats < 1 or self.decode_steps < 1:
            raise ValueError("prefill_repeats and decode_steps must be >= 1")

    def blocks_per_sequence(self, seq_len: int) -> int:
        return -(-(seq_len + self.decode_steps) // self.block_size)


class ShardFanout:
    """Sync gRPC stubs of a shard group; each call goes to all shards at once, rank 0's answer is kept."""

    def __init__(self, addresses: list[str]) -> None:
        self.channels = [grpc.insecure_channel(a) for a in addresses]
        self.stubs = [shard_pb2_grpc.ShardServiceStub(c) for c in self.channels]

    def wait_ready(self, shards: list[ServerProcess], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for channel in self.channels:
            while True:
                for shard in shards:
                    shard.check_alive()
                try:
                    grpc.channel_ready_future(channel).result(timeout=1)
                    break
                except grpc.FutureTimeoutError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"shards not ready after {timeout_s:.0f}s") from None

    def call(self, method: str, request):
        futures = [getattr(stub, method).future(request) for stub in self.stubs]
        return [f.result() for f in futures][0]

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


def _sequence(seq_id: int, tokens: list[int], start: int, blocks: list[int], block_size: int, first: bool):
    positions = range(start, start + len(tokens))
    return shard_pb2.SequenceStep(
        seq_id=seq_id,
        token_ids=tokens,
        start_position=start,
        slot_mapping=[blocks[p // block_size] * block_size + p % block_size for p in positions],
        block_table=blocks,
        sample=True,
        sampling=shard_pb2.SamplingParams(temperature=0.0, seed=seq_id) if first else None,
    )


def time_steps(fanout: ShardFanout, config: LatencyConfig, batch: int, seq_len: int, vocab: int, ids) -> dict:
    """Prefill then decode timings of `batch` sequences of `seq_len` tokens (seconds lists)."""
    rng = random.Random(f"{config.seed}:{batch}:{seq_len}")
    per_seq = config.blocks_per_sequence(seq_len)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
    timings: dict[str, list[float]] = {"prefill": [], "prefill_forward": [], "decode": [], "decode_forward": []}
    for repeat in range(config.prefill_repeats):
        seq_ids = [next(ids) for _ in range(batch)]
        prompts = [[rng.randrange(3, vocab) for _ in range(seq_len)] for _ in range(batch)]
        request = shard_pb2.StepRequest(
            sequences=[
                _sequence(s, p, 0, t, config.block_size, True) for s, p, t in zip(seq_ids, prompts, tables, strict=True)
            ]
        )
        started = time.perf_counter()
        answer = fanout.call("Step", request)
        timings["prefill"].append(time.perf_counter() - started)
        timings["prefill_forward"].append(answer.forward_us / 1e6)
        if repeat < config.prefill_repeats - 1:
            fanout.call("Release", shard_pb2.ReleaseRequest(seq_ids=seq_ids))
    next_tokens = [r.token_id for r in answer.results]
    for k in range(config.decode_steps):
        request = shard_pb2.StepRequest(
            sequences=[
                _sequence(s, [tok], seq_len + k, t, config.block_size, False)
                for s, tok, t in zip(seq_ids, next_tokens, tables, strict=True)
            ]
        )
        started = time.perf_counter()
        answer = fanout.call("Step", request)
        timings["decode"].append(time.perf_counter() - started)
        timings["decode_forward"].append(answer.forward_us / 1e6)
        next_tokens = [r.token_id for r in answer.results]
    fanout.call("Release", shard_pb2.ReleaseRequest(seq_ids=seq_ids))
    return timings


def shard_sweep(config: LatencyConfig, work_dir: Path) -> list[dict]:
    """The rows of every `config.moe_parallel` mode, one shard group after another."""
    return [row for mode in config.moe_parallel for row in _mode_sweep(config, work_dir / mode, mode)]


def _mode_sweep(config: LatencyConfig, work_dir: Path, moe_parallel: str) -> list[dict]:
    """Start the shards, warm them up, time every (batch, seq_len), stop them."""
    master_port = str(free_port())
    shards, addresses = [], []
    work_dir.mkdir(parents=True, exist_ok=True)
    for rank in range(config.num_shard):
        path = work_dir / f"shard-{rank}.sock"
        cmd = [PYTHON, "-m", "mixserve.cli", "shard", "--rank", str(rank), "--world-size", str(config.num_shard)]
        cmd += ["--model", config.model_dir, "--uds", str(path), "--block-size", str(config.block_size)]
        cmd += ["--moe-parallel", moe_parallel, *config.shard_args]
        env = child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=master_port, RANK=str(rank))
        shards.append(ServerProcess(f"shard{rank}", cmd, work_dir / f"shard-{rank}.log", env))
        addresses.append(f"unix:{path}")
    fanout = ShardFanout(addresses)
    try:
        fanout.wait_ready(shards, 300)
        info = fanout.call("Info", shard_pb2.InfoRequest())
        blocks = max(b * config.blocks_per_sequence(s) for b in config.batch_sizes for s in config.seq_lens)
        fanout.call(
            "Warmup",
            shard_pb2.WarmupRequest(
                max_batch_tokens=max(config.batch_sizes) * max(config.seq_lens),
                max_batch_size=max(config.batch_sizes),
                max_blocks=blocks,
            ),
        )
        ids = iter(range(1, 1 << 62))
        rows = []
        for seq_len in config.seq_lens:
            for batch in config.batch_sizes:
                t = time_steps(fanout, config, batch, seq_len, info.vocab_size, ids)
                decode_p50 = distribution_ms(t["decode"])["p50"]
                per_expert = batch * info.num_experts_per_tok / info.num_experts
                rows.append(
                    {
                        "moe_parallel": moe_parallel,
                        "dtype": info.dtype,
                        "quantize": info.quantize,
                        "batch": batch,
                        "seq_len": seq_len,
                        "decode_tokens_per_expert": round(per_expert, 2),
                        "prefill_tokens_per_expert": round(per_expert * seq_len, 1),
                        "prefill_ms": distribution_ms(t["prefill"]),
                        "prefill_forward_ms": distribution_ms(t["prefill_forward"]),
                        "decode_ms": distribution_ms(t["decode"]),
                        "decode_forward_ms": distribution_ms(t["decode_forward"]),
                        "prefill_tok_s": round(batch * seq_len / (distribution_ms(t["prefill"])["p50"] / 1e3), 1),
                        "decode_tok_s": round(batch / (decode_p50 / 1e3), 1),
                    }
                )
                log.info(
                    "event=latency moe_parallel=%s batch=%d seq_len=%d decode_p50_ms=%s",
                    moe_parallel,
                    batch,
                    seq_len,
                    decode_p50,
                )
        return rows
    finally:
        fanout.close()
        for shard in shards:
            shard.stop()


async def _ttfts(url: str, requests: list[BenchRequest], warmup: int) -> list[float]:
    out = []
    async with PredictTarget(url, temperature=0.0, ignore_eos=True) as target:
        for i, request in enumerate(requests):
            record = await target.send(request)
            if not record.ok:
                raise RuntimeError(f"/predict failed during the router measurement: {record.error}")
            if i >= warmup:
                out.append(record.ttft if record.ttft is not None else record.e2e)
    return out


async def _itls(url: str, requests: list[BenchRequest], warmup: int) -> list[float]:
    """Gaps between the streamed tokens of `requests`, one at a time (OpenAI completions, EOS ignored)."""
    with urllib.request.urlopen(f"{url}/info", timeout=30) as response:
        model_id = json.load(response)["model_id"]
    out: list[float] = []
    async with OpenAICompletionsTarget(url, model_name=model_id, temperature=0.0, ignore_eos=True) as target:
        for i, request in enumerate(requests):
            record = await target.send(request)
            if not record.ok:
                raise RuntimeError(f"/v1/completions failed during the router measurement: {record.error}")
            if i >= warmup:
                out.extend(record.itls)
    return out


def router_overhead(config: LatencyConfig, url: str, rows: list[dict]) -> list[dict]:
    """TTFT over HTTP of a one-token request per sequence length at `url` (a mixserve with the same
    checkpoint and shard count), against the B=1 prefill step of `rows`; and the gap between streamed
    tokens of a lone request against the shard's own B=1 decode step (the router's per-token cost)."""
    tokenizer = load_tokenizer(config.model_dir)
    special = len(tokenizer.encode("a").ids) - count_tokens(tokenizer, "a")
    rng = random.Random(config.seed)
    pool = plain_token_ids(tokenizer)
    out = []
    for seq_len in config.seq_lens:
        # Distinct prompts, so that no prefix cache answers for the prefill.
        requests = [
            BenchRequest(synthetic_prompt(tokenizer, seq_len - special, rng, pool), seq_len, 1)
            for _ in range(config.router_requests + 2)
        ]
        ttft = distribution_ms(asyncio.run(_ttfts(url, requests, warmup=2)))
        streams = [BenchRequest(r.prompt, r.prompt_tokens, ITL_TOKENS) for r in requests[: ITL_REQUESTS + 1]]
        itl = distribution_ms(asyncio.run(_itls(url, streams, warmup=1)))
        step = next(r for r in rows if r["batch"] == 1 and r["seq_len"] == seq_len)
        out.append(
            {
                "seq_len": seq_len,
                "ttft_ms": ttft,
                "prefill_step_ms_p50": step["prefill_ms"]["p50"],
                "router_overhead_ms_p50": round(ttft["p50"] - step["prefill_ms"]["p50"], 3),
                "itl_ms": itl,
                "decode_forward_ms_p50": step["decode_forward_ms"]["p50"],
                "per_token_overhead_ms_p50": round(itl["p50"] - step["decode_forward_ms"]["p50"], 3),
            }
        )
    return out


def launched_router_overhead(config: LatencyConfig, work_dir: Path, rows: list[dict]) -> list[dict]:
    """Start `mixserve launch` with the same checkpoint, shard count and (first) MoE split, measure, stop it."""
    port = free_port()
    cmd = [PYTHON, "-m", "mixserve.cli", "launch", "--model", config.model_dir, "--port", str(port)]
    cmd += ["--num-shard", str(config.num_shard), "--block-size", str(config.block_size), "--max-kv-blocks", "1024"]
    cmd += ["--moe-parallel", config.moe_parallel[0]]  # the mode of the first rows, the ones compared with
    cmd += config.shard_args
    server = ServerProcess("mixserve", cmd, work_dir / "launch.log")
    try:
        server.wait_http_ready(f"http://127.0.0.1:{port}/health", 300)
        return router_overhead(config, f"http://127.0.0.1:{port}", rows)
    finally:
        server.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint directory (default: the demo checkpoint)")
    parser.add_argument("--num-shard", type=int, default=1)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--prefill-repeats", type=int, default=5)
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--router-requests", type=int, default=10, help="timed /predict requests per seq len")
    parser.add_argument("--no-router", action="store_true", help="skip the router overhead measurement")
    parser.add_argument(
        "--moe-parallel",
        nargs="+",
        choices=["tp", "ep"],
        default=["tp"],
        help="sweep each MoE split in turn (tp: slices of every expert; ep: whole experts per shard)",
    )
    parser.add_argument(
        "--shard-args",
        type=shlex.split,
        default=[],
        help="more shard options, one string (e.g. '--quantize int8-wo' or '--dtype bfloat16')",
    )
    parser.add_argument("--out", type=Path, help="write latency.json and latency.md into this directory")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s bench %(levelname)s %(message)s")
    model_dir = args.model
    if model_dir is None:
        from mixserve.shards.demo.checkpoint import ensure_demo_checkpoint

        model_dir = str(ensure_demo_checkpoint())
    config = LatencyConfig(
        model_dir=model_dir,
        num_shard=args.num_shard,
        batch_sizes=args.batch_sizes,
        seq_lens=args.seq_lens,
        prefill_repeats=args.prefill_repeats,
        decode_steps=args.decode_steps,
        router_requests=args.router_requests,
        moe_parallel=args.moe_parallel,
        shard_args=args.shard_args,
    )
    with tempfile.TemporaryDirectory(prefix="mixserve-latency-") as tmp:
        steps = shard_sweep(config, Path(tmp))
        router = [] if args.no_router else launched_router_overhead(config, Path(tmp), steps)
    result = {"meta": report.run_meta(), "config": asdict(config), "steps": steps, "router": router}
    table = latency_markdown(result)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "latency.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "latency.md").write_text(table + "\n")
    sys.stdout.write(table + "\n")
    return 0
