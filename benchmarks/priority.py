"""`mixserve bench priority`: what `--scheduling-policy priority` gives urgent requests under a full queue.

Starts `mixserve launch` (the demo on 2 shards unless `--model`) once per policy and round, alternating
fcfs / priority (`--rounds` pairs, so the drift of a shared machine falls on both). In each run,
`--background` clients each send one long request after another (`--background-tokens` tokens, EOS
ignored) against `--max-batch-size` running slots, so a queue stands; once it does, `--urgent` short
requests (`--urgent-tokens`) arrive `--urgent-interval` seconds apart. Under priority the background
sends priority 1 and the urgent requests -1; under fcfs every request is priority 0. Per run: the urgent
requests' time to first token and to their end (p50 / p90), the background's output tok/s over the
window the urgent requests ran in (the server's generated-token count less the urgent tokens), and the
preemptions the server counted (`vllm:num_preemptions_total`).
Writes priority.json and priority.md (with the command) to benchmarks/results/priority-<UTC time>/.
"""

import argparse
import asyncio
import datetime
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import aiohttp

from mixserve.benchmarks import report
from mixserve.benchmarks.processes import PYTHON, REPO, ServerProcess, free_port

log = logging.getLogger("mixserve.bench")

POLICIES = ("fcfs", "priority")


def launch(args: argparse.Namespace, model_dir: str, policy: str, log_path: Path) -> tuple[ServerProcess, str]:
    port = free_port()
    cmd = [PYTHON, "-m", "mixserve.cli", "launch", "--model", model_dir, "--num-shard", str(args.num_shard)]
    cmd += ["--port", str(port), "--max-batch-size", str(args.max_batch_size), "--scheduling-policy", policy]
    cmd += ["--vllm-metrics", "--max-concurrent-requests", str(args.background + args.urgent + 8)]
    server = ServerProcess(f"mixserve-{policy}", cmd, log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait_http_ready(f"{url}/health", args.startup_timeout)
    except BaseException:
        server.stop()
        raise
    return server, url


async def stream(session: aiohttp.ClientSession, url: str, prompt: str, tokens: int, priority: int) -> dict:
    """One streamed completion: seconds to its first token and to its end, and its tokens."""
    body = {"prompt": prompt, "max_tokens": tokens, "ignore_eos": True, "temperature": 0, "stream": True}
    body |= {"priority": priority, "stream_options": {"include_usage": True}}
    started = time.monotonic()
    first, got = None, 0
    async with session.post(f"{url}/v1/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"{response.status}: {await response.text()}")
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices"):
                first = time.monotonic() - started
            if chunk.get("usage"):
                got = chunk["usage"]["completion_tokens"]
    return {"ttft_s": first, "e2e_s": time.monotonic() - started, "tokens": got}


async def gauge(session: aiohttp.ClientSession, url: str, name: str) -> float:
    async with session.get(f"{url}/metrics") as response:
        text = await response.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def one_run(args: argparse.Namespace, url: str, policy: str) -> dict:
    low, high = (1, -1) if policy == "priority" else (0, 0)
    done = asyncio.Event()
    background: list[dict] = []

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=args.timeout)) as session:

        async def client(i: int) -> None:
            n = 0
            while not done.is_set():
                prompt = f"background {i} request {n}: " + "the river flows " * 8
                background.append(await stream(session, url, prompt, args.background_tokens, low))
                n += 1

        clients = [asyncio.create_task(client(i)) for i in range(args.background)]
        while True:  # until a queue stands
            async with session.get(f"{url}/info") as response:
                info = await response.json()
            if info["requests_waiting"] >= args.background - args.max_batch_size:
                break
            await asyncio.sleep(0.05)
        preempted = await gauge(session, url, "vllm:num_preemptions_total")
        generated = await gauge(session, url, "mixserve_generated_tokens_total")
        window_start = time.monotonic()
        urgent_tasks = []
        for i in range(args.urgent):
            prompt = f"urgent {i}: " + "a short question " * 4
            urgent_tasks.append(asyncio.create_task(stream(session, url, prompt, args.urgent_tokens, high)))
            await asyncio.sleep(args.urgent_interval)
        urgent = await asyncio.gather(*urgent_tasks)
        window_end = time.monotonic()
        preempted = await gauge(session, url, "vllm:num_preemptions_total") - preempted
        generated = await gauge(session, url, "mixserve_generated_tokens_total") - generated
        done.set()
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)

    window = window_end - window_start
    # The server's count over the window, less the urgent requests' own tokens.
    tokens = generated - sum(r["tokens"] for r in urgent)

    def dist(values: list[float]) -> dict:
        values = sorted(values)
        return {
            "p50_ms": round(1000 * statistics.median(values), 1),
            "p90_ms": round(1000 * values[min(len(values) - 1, int(0.9 * len(values)))], 1),
        }

    summary = {
        "policy": policy,
        "urgent_ttft": dist([r["ttft_s"] for r in urgent]),
        "urgent_e2e": dist([r["e2e_s"] for r in urgent]),
        "urgent_tokens_ok": all(r["tokens"] == args.urgent_tokens for r in urgent),
        "background_tok_s": round(tokens / window, 1),
        "background_requests": len(background),
        "window_s": round(window, 2),
        "preemptions": int(preempted),
    }
    log.info("event=run %s", json.dumps(summary))
    return summary


def markdown(result: dict) -> str:
    lines = [
        "# Priority scheduling under a full queue",
        "",
        f"- command: `{result['command']}`",
        f"- server: {result['server']}",
        f"- {result['workload']}",
        "",
        "| run | policy | urgent TTFT p50 / p90 ms | urgent end-to-end p50 / p90 ms | background tok/s | "
        "preemptions | urgent tokens all there |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(result["runs"]):
        t, e = r["urgent_ttft"], r["urgent_e2e"]
        lines.append(
            f"| {i} | {r['policy']} | {t['p50_ms']} / {t['p90_ms']} | {e['p50_ms']} / {e['p90_ms']} | "
            f"{r['background_tok_s']} | {r['preemptions']} | {r['urgent_tokens_ok']} |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint dir (default: the demo)")
    parser.add_argument("--num-shard", type=int, default=2, help="shards of each server")
    parser.add_argument("--max-batch-size", type=int, default=8, help="running slots of each server")
    parser.add_argument("--background", type=int, default=24, help="clients sending long requests back to back")
    parser.add_argument("--background-tokens", type=int, default=256, help="tokens of each background request")
    parser.add_argument("--urgent", type=int, default=12, help="urgent requests a run")
    parser.add_argument("--urgent-tokens", type=int, default=16, help="tokens of each urgent request")
    parser.add_argument("--urgent-interval", type=float, default=0.5, help="seconds between urgent arrivals")
    parser.add_argument("--rounds", type=int, default=2, help="fcfs / priority pairs of runs")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for a server")
    parser.add_argument("--out", type=Path, help="output dir (default: benchmarks/results/priority-<UTC time>)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s bench %(levelname)s %(message)s")
    if args.background <= args.max_batch_size:
        raise SystemExit("--background must exceed --max-batch-size, or no queue stands")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    out_dir = args.out or REPO / "benchmarks" / "results" / f"priority-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.model:
        model_dir = args.model
    else:
        from mixserve.shards.demo.checkpoint import ensure_demo_checkpoint

        model_dir = str(ensure_demo_checkpoint())
    meta = report.run_meta()
    runs = []
    for round_index in range(args.rounds):
        for policy in POLICIES:
            server, url = launch(args, model_dir, policy, out_dir / "logs" / f"{policy}-{round_index}.log")
            try:
                runs.append(asyncio.run(one_run(args, url, policy)))
            finally:
                server.stop()
    result = {
        "meta": meta,
        "command": "mixserve bench " + " ".join(sys.argv[sys.argv.index("priority") :]),
        "server": f"`mixserve launch --num-shard {args.num_shard} --max-batch-size {args.max_batch_size}` of "
        f"`{model_dir}`, one per run (logs/)",
        "workload": (
            f"{args.background} background clients of {args.background_tokens}-token requests back to back, "
            f"{args.urgent} urgent {args.urgent_tokens}-token requests {args.urgent_interval} s apart once a "
            "queue stands; greedy, EOS ignored; priority: background 1, urgent -1; fcfs: all 0"
        ),
        "runs": runs,
    }
    (out_dir / "priority.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    (out_dir / "priority.md").write_text(text + "\n")
    sys.stdout.write(text + f"\n\nwritten to {out_dir}\n")
    return 0 if all(r["urgent_tokens_ok"] for r in runs) else 1
