"""JSON-schema-constrained requests with and without speculation, side by side with an A/A control.

Three servers of one checkpoint, started together: plain, `--speculate K`, plain again (the control:
listed first and last, their gap is the run's noise). In each block every server answers the same
constrained requests in turn (order reversed every other block), at one stream or `--concurrency`;
greedy, the benchmark schema of `mixserve bench structured` (benchmarks/structured.py bench_schema),
`response_format: json_schema` on /v1/chat/completions. Reported per server: completion tokens per
second of wall time, and for the speculating one the proposals made and kept (/info) and whether
every answer equals the first plain server's (it must: greedy outputs do not change).

python benchmarks/results/structured-speculation/run.py MODEL_DIR [--speculate 5] [--blocks 6] [--per 8]

Since constrained requests speculate by default (`--speculate-constrained`), the plain servers need
`--plain-flags=--no-speculate-constrained` to be plain; `--speculate 0` with it compares the default.
"""

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from mixserve.benchmarks.structured import bench_schema

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parent.parent.parent / "shards" / "demo" / "corpus.txt"


def start(model: str, port: int, extra: list[str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mixserve.cli", "launch", "--model", model, "--port", str(port), *extra]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)


async def ready(session: aiohttp.ClientSession, url: str) -> None:
    for _ in range(1200):
        try:
            async with session.get(f"{url}/health") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.25)
    raise SystemExit(f"{url} not ready")


async def info(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(f"{url}/info") as response:
        return await response.json()


async def ask(session: aiohttp.ClientSession, url: str, prompt: str) -> tuple[str, int]:
    schema = {"name": "record", "schema": bench_schema(), "strict": True}
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 128,
        "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": schema},
    }
    async with session.post(f"{url}/v1/chat/completions", json=body) as response:
        answer = await response.json()
        assert response.status == 200, answer
    return answer["choices"][0]["message"]["content"], answer["usage"]["completion_tokens"]


async def block(session, url: str, prompts: list[str], concurrency: int) -> tuple[float, list[str]]:
    slots = asyncio.Semaphore(concurrency)

    async def one(prompt: str) -> tuple[str, int]:
        async with slots:
            return await ask(session, url, prompt)

    started = time.perf_counter()
    answers = await asyncio.gather(*(one(p) for p in prompts))
    return sum(n for _, n in answers) / (time.perf_counter() - started), [text for text, _ in answers]


async def main(args: argparse.Namespace) -> None:
    words = CORPUS.read_text(encoding="utf-8").split()
    rng = random.Random(args.seed)
    names = ["plain-1", f"speculate-{args.speculate}", "plain-2"]
    plain_flags = args.plain_flags.split()
    flags = {names[0]: plain_flags, names[1]: ["--speculate", str(args.speculate)], names[2]: plain_flags}
    urls = {name: f"http://127.0.0.1:{18300 + i}" for i, name in enumerate(names)}
    logs = HERE / "logs"
    logs.mkdir(exist_ok=True)
    shards = ["--num-shard", str(args.num_shard)]
    procs = [start(args.model, 18300 + i, shards + flags[n], logs / f"{n}.log") for i, n in enumerate(names)]
    rates: dict[str, list[float]] = {n: [] for n in names}
    same = True
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
            for url in urls.values():
                await ready(session, url)
            for url in urls.values():  # the schema compiled, every kernel warm
                await block(session, url, ["Describe the weather."] * 2, 1)
            before = await info(session, urls[names[1]])
            for b in range(args.blocks):
                prompts = []
                for _ in range(args.per):
                    at = rng.randrange(len(words) - 60)
                    prompts.append("Describe this as a record: " + " ".join(words[at : at + 40]))
                order = names if b % 2 == 0 else names[::-1]
                texts = {}
                for name in order:
                    rate, texts[name] = await block(session, urls[name], prompts, args.concurrency)
                    rates[name].append(rate)
                same &= texts[names[1]] == texts[names[0]] == texts[names[2]]
                print(b, " ".join(f"{n}={rates[n][-1]:.1f}" for n in names), flush=True)
            after = await info(session, urls[names[1]])
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()
    means = {n: sum(v) / len(v) for n, v in rates.items()}
    plain = (means[names[0]] + means[names[2]]) / 2
    proposed = after["speculative_proposed_tokens"] - before["speculative_proposed_tokens"]
    accepted = after["speculative_accepted_tokens"] - before["speculative_accepted_tokens"]
    result = {
        "command": " ".join(sys.argv),
        "model": args.model,
        "concurrency": args.concurrency,
        "blocks": args.blocks,
        "requests_per_block": args.per,
        "completion_tok_s_per_block": rates,
        "mean_tok_s": {n: round(v, 1) for n, v in means.items()},
        "speculating_over_plain_mean": round(means[names[1]] / plain, 3),
        "plain_a_a_gap": round(abs(means[names[0]] - means[names[2]]) / plain, 3),
        "proposed": proposed,
        "accepted": accepted,
        "outputs_equal": same,
    }
    out = HERE / f"result-k{args.speculate}-c{args.concurrency}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "completion_tok_s_per_block"}, indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--speculate", type=int, default=5)
    parser.add_argument("--num-shard", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--per", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plain-flags", default="", help="more flags of the two plain servers")
    asyncio.run(main(parser.parse_args()))
