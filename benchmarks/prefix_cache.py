"""Prefix caching benchmark: time to first token of a shared ~1,000-token system prompt, miss vs hit.

Each repetition makes a fresh system prompt (its first words name the repetition, so no block of it
is cached yet), sends it with one user question (the miss: the whole prompt is prefilled), then with
another (the hit: only the blocks past the shared system prompt are). Requests ask for one token and
do not stream, so a request's latency is its time to first token. Either launches
`mixserve launch` itself (default: 2 shards of the demo model) or measures the server at `--url`.

    python -m benchmarks.prefix_cache                       # launch, measure, stop
    python -m benchmarks.prefix_cache --url http://127.0.0.1:8080

Writes `prefix-cache-<date>.json` and `.md` to `--out` (default benchmarks/results/) with the command,
the machine, the load average and the other busy processes seen while it ran.
"""

import argparse
import asyncio
import datetime
import json
import logging
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

log = logging.getLogger("mixserve.bench.prefix_cache")

REPO = Path(__file__).resolve().parent.parent
WORDS = "river stone light green market quiet north paper window seven answer briefly always".split()
# A busy 2-core machine can take minutes to import torch in every shard.
STARTUP_TIMEOUT_S = 900
QUESTIONS = ("What is the color of the river?", "Which way is north from the market?")


def system_prompt(repetition: int, sentences: int) -> str:
    """A long system prompt whose first tokens are unique to `repetition`."""
    lines = [f"Session {repetition}: you are assistant number {repetition * 7919 % 10007}."]
    for i in range(sentences):
        words = " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(9))
        lines.append(f"Rule {i}: {words}.")
    return " ".join(lines)


async def count_tokens(session: aiohttp.ClientSession, url: str, text: str) -> int:
    async with session.post(f"{url}/tokenize", json={"inputs": text}) as response:
        response.raise_for_status()
        return len(await response.json())


async def sentences_for(session: aiohttp.ClientSession, url: str, target_tokens: int) -> int:
    """How many rule sentences make a system prompt of about `target_tokens` tokens."""
    base = await count_tokens(session, url, system_prompt(0, 0))
    per_sentence = (await count_tokens(session, url, system_prompt(0, 40)) - base) / 40
    return max(1, round((target_tokens - base) / per_sentence))


async def first_token_seconds(session: aiohttp.ClientSession, url: str, prompt: str) -> tuple[float, int]:
    """Latency of a one-token, non-streamed greedy request (its time to first token) and its prompt length."""
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": False}
    started = time.perf_counter()
    async with session.post(f"{url}/predict", json=body) as response:
        answer = await response.json()
        if response.status != 200:
            raise RuntimeError(f"/predict answered {response.status}: {answer}")
    return time.perf_counter() - started, answer["prompt_tokens"]


async def get_info(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(f"{url}/info") as response:
        response.raise_for_status()
        return await response.json()


async def measure(url: str, repetitions: int, target_tokens: int) -> dict:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        sentences = await sentences_for(session, url, target_tokens)
        # One untimed request first: the shards' first forwards of a shape are slower.
        await first_token_seconds(session, url, system_prompt(-1, sentences) + QUESTIONS[0])
        before = await get_info(session, url)
        misses, hits, prompt_tokens = [], [], []
        for repetition in range(repetitions):
            system = system_prompt(repetition, sentences)
            miss, tokens = await first_token_seconds(session, url, f"{system}\nUser: {QUESTIONS[0]}\nAssistant:")
            hit, _ = await first_token_seconds(session, url, f"{system}\nUser: {QUESTIONS[1]}\nAssistant:")
            misses.append(miss)
            hits.append(hit)
            prompt_tokens.append(tokens)
            log.info(
                "event=repetition n=%d prompt_tokens=%d miss_ms=%.1f hit_ms=%.1f",
                repetition,
                tokens,
                miss * 1e3,
                hit * 1e3,
            )
        after = await get_info(session, url)
    hit_tokens = after.get("prefix_cache_hit_tokens", 0) - before.get("prefix_cache_hit_tokens", 0)
    query_tokens = after.get("prefix_cache_query_tokens", 0) - before.get("prefix_cache_query_tokens", 0)
    miss_p50, hit_p50 = statistics.median(misses), statistics.median(hits)
    return {
        "server": {k: before.get(k) for k in ("num_shard", "model_dtype", "block_size", "prefix_caching", "version")},
        "repetitions": repetitions,
        "prompt_tokens": statistics.median(prompt_tokens),
        "ttft_miss_ms": [round(t * 1e3, 2) for t in misses],
        "ttft_hit_ms": [round(t * 1e3, 2) for t in hits],
        "ttft_miss_p50_ms": round(miss_p50 * 1e3, 2),
        "ttft_hit_p50_ms": round(hit_p50 * 1e3, 2),
        "speedup_p50": round(miss_p50 / hit_p50, 2),
        "prefix_cache_query_tokens": query_tokens,
        "prefix_cache_hit_tokens": hit_tokens,
        "hit_rate": round(hit_tokens / query_tokens, 3) if query_tokens else 0.0,
    }


def busy_processes(server_group: int | None, limit: int = 8) -> list[str]:
    """Processes other than this benchmark and its server that used >= 5 % CPU (ps: average since each
    started), busiest first: the timings are only as quiet as the machine was."""
    try:
        out = subprocess.run(["ps", "-eo", "pcpu,pid,pgid,args", "--sort=-pcpu"], capture_output=True, text=True)
    except OSError:
        return []
    rows = []
    for line in out.stdout.splitlines()[1:]:
        cpu, pid, pgid, args = line.split(None, 3)
        if float(cpu) >= 5.0 and int(pid) != os.getpid() and int(pgid) != server_group:
            rows.append(f"{args[:90]} ({cpu}% cpu)")
    return rows[:limit]


def machine() -> dict:
    cpu = platform.processor()
    try:
        models = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = models[0] if models else cpu
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def launch(args: argparse.Namespace, log_path: Path) -> tuple[subprocess.Popen, str]:
    """Start `mixserve launch` in its own process group and wait for /health; the server and its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "mixserve.cli", "launch", "--port", str(port), "--num-shard", str(args.num_shard)]
    cmd += ["--shard-timeout", str(STARTUP_TIMEOUT_S)]
    if args.model:
        cmd += ["--model", args.model]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), str(REPO / "proto"), env.get("PYTHONPATH")) if p)
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mixserve launch exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            pass
        time.sleep(0.5)
    stop(process)
    raise TimeoutError(f"mixserve launch not healthy after {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the launcher (it stops its shards), SIGKILL to the group if it does not exit."""
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def markdown(result: dict) -> str:
    r, m = result["result"], result["machine"]
    lines = [
        "# Prefix caching: time to first token, miss vs hit",
        "",
        f"- date (UTC): {result['date']}",
        f"- command: `{result['command']}`",
        f"- machine: {m['cpu']}, {m['cpu_count']} cores, {m['platform']}, Python {m['python']}",
        f"- load average (1, 5, 15 min): {result['load_average']['start']} at the start, "
        f"{result['load_average']['end']} at the end",
        f"- server: {r['server']}",
        "- other processes that were busy (ps, average CPU since each started): "
        + ("; ".join(f"`{row}`" for row in result["busy_processes"]) or "none"),
        "",
        "| prompt tokens | repetitions | TTFT miss p50 (ms) | TTFT hit p50 (ms) | speedup | hit rate (tokens) |",
        "|---|---|---|---|---|---|",
        f"| {r['prompt_tokens']:.0f} | {r['repetitions']} | {r['ttft_miss_p50_ms']:.1f} | {r['ttft_hit_p50_ms']:.1f} "
        f"| {r['speedup_p50']:.1f}x | {r['hit_rate']:.3f} |",
        "",
        f"Every miss (ms): {r['ttft_miss_ms']}  ",
        f"Every hit (ms): {r['ttft_hit_ms']}",
        "",
        "A request asks for one token without streaming, so its latency is its time to first token. The "
        "hit rate counts every admission of the run (misses included); a hit always recomputes the "
        "prompt's last block (the question) and at least its last token.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="measure this server instead of launching one")
    parser.add_argument("--model", help="checkpoint for the launched server (default: the demo model)")
    parser.add_argument("--num-shard", type=int, default=2, help="shards of the launched server")
    parser.add_argument("--system-tokens", type=int, default=1000, help="length of the shared system prompt")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    date = datetime.datetime.now(datetime.UTC)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"prefix-cache-{date:%Y%m%d-%H%M%S}"
    process = None
    url = args.url
    with tempfile.TemporaryDirectory(prefix="mixserve-bench-") as tmp:
        if url is None:
            process, url = launch(args, Path(tmp) / "server.log")
        try:
            load_before = load_average()
            measured = asyncio.run(measure(url, args.repetitions, args.system_tokens))
            load_after = load_average()
            busy = busy_processes(process.pid if process is not None else None)
        finally:
            if process is not None:
                stop(process)
    result = {
        "date": date.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "-m", "mixserve.benchmarks.prefix_cache", *sys.argv[1:]]),
        "machine": machine(),
        "load_average": {"start": load_before, "end": load_after},
        "busy_processes": busy,
        "result": measured,
    }
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(result))
    log.info("event=written path=%s speedup_p50=%.1f", args.out / f"{stem}.md", measured["speedup_p50"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
