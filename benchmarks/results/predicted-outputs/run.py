"""OpenAI's Predicted Outputs on one server, request kinds interleaved, with an A/A control.

One server (no --speculate: requests with a prediction speculate from it anyway). Corpus passages as
completions prompts, greedy, `--max-tokens` each; each prompt's plain output is taken first (warm-up).
Then in each block every kind answers the block's prompts in turn (order reversed every other block),
at one stream or `--concurrency`:
- plain-1 / plain-2: no prediction (listed first and last: their gap is the run's noise);
- exact: the prediction is the plain output (a client regenerating what it has);
- edited: the plain output with its middle fifth replaced by other corpus text (a stale copy);
- unrelated: another prompt's plain output (a prediction that does not fit).
Reported per kind: completion tokens per second of wall time, the prediction tokens kept and not
(usage.completion_tokens_details), and whether every answer equals the plain output (it must).

python benchmarks/results/predicted-outputs/run.py MODEL_DIR [--blocks 6] [--per 8] [--concurrency 1]
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

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parent.parent.parent / "shards" / "demo" / "corpus.txt"
KINDS = ["plain-1", "exact", "edited", "unrelated", "plain-2"]


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


async def ask(session, url: str, prompt: str, max_tokens: int, prediction: str | None) -> dict:
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if prediction is not None:
        body["prediction"] = {"type": "content", "content": prediction}
    async with session.post(f"{url}/v1/completions", json=body) as response:
        answer = await response.json()
        assert response.status == 200, answer
    return answer


async def block(session, url: str, requests: list[tuple[str, str | None]], max_tokens: int, concurrency: int):
    slots = asyncio.Semaphore(concurrency)

    async def one(prompt: str, prediction: str | None) -> dict:
        async with slots:
            return await ask(session, url, prompt, max_tokens, prediction)

    started = time.perf_counter()
    answers = await asyncio.gather(*(one(p, q) for p, q in requests))
    elapsed = time.perf_counter() - started
    return sum(a["usage"]["completion_tokens"] for a in answers) / elapsed, answers


def edit(text: str, words: list[str], rng: random.Random) -> str:
    """`text` with its middle fifth replaced by as many characters of other corpus text."""
    fifth = len(text) // 5
    at = rng.randrange(len(words) - 200)
    other = " ".join(words[at : at + 200])[:fifth]
    return text[: 2 * fifth] + other + text[3 * fifth :]


async def main(args: argparse.Namespace) -> None:
    words = CORPUS.read_text(encoding="utf-8").split()
    rng = random.Random(args.seed)
    url = f"http://127.0.0.1:{args.port}"
    log = HERE / "logs"
    log.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "mixserve.cli", "launch", "--model", args.model, "--port", str(args.port)]
    cmd += ["--num-shard", str(args.num_shard)]
    proc = subprocess.Popen(cmd, stdout=(log / f"server-c{args.concurrency}.log").open("w"), stderr=subprocess.STDOUT)
    rates: dict[str, list[float]] = {k: [] for k in KINDS}
    kept = {k: [0, 0] for k in KINDS}
    same = True
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
            await ready(session, url)
            for b in range(args.blocks):
                prompts = []
                for _ in range(args.per):
                    at = rng.randrange(len(words) - 60)
                    prompts.append(" ".join(words[at : at + 40]))
                _, answers = await block(session, url, [(p, None) for p in prompts], args.max_tokens, args.concurrency)
                plain = [a["choices"][0]["text"] for a in answers]
                predictions = {
                    "plain-1": [None] * len(plain),
                    "exact": plain,
                    "edited": [edit(t, words, rng) for t in plain],
                    "unrelated": plain[1:] + plain[:1],
                    "plain-2": [None] * len(plain),
                }
                order = KINDS if b % 2 == 0 else KINDS[::-1]
                for kind in order:
                    requests = list(zip(prompts, predictions[kind], strict=True))
                    rate, answers = await block(session, url, requests, args.max_tokens, args.concurrency)
                    rates[kind].append(rate)
                    same &= [a["choices"][0]["text"] for a in answers] == plain
                    for a in answers:
                        details = a["usage"].get("completion_tokens_details") or {}
                        kept[kind][0] += details.get("accepted_prediction_tokens", 0)
                        kept[kind][1] += details.get("rejected_prediction_tokens", 0)
                print(b, " ".join(f"{k}={rates[k][-1]:.1f}" for k in KINDS), flush=True)
    finally:
        proc.terminate()
        proc.wait()
    means = {k: sum(v) / len(v) for k, v in rates.items()}
    plain_mean = (means["plain-1"] + means["plain-2"]) / 2
    result = {
        "command": " ".join(sys.argv),
        "model": args.model,
        "num_shard": args.num_shard,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "blocks": args.blocks,
        "requests_per_block": args.per,
        "completion_tok_s_per_block": rates,
        "mean_tok_s": {k: round(v, 1) for k, v in means.items()},
        "over_plain_mean": {k: round(v / plain_mean, 3) for k, v in means.items()},
        "plain_a_a_gap": round(abs(means["plain-1"] - means["plain-2"]) / plain_mean, 3),
        "prediction_tokens_accepted_rejected": kept,
        "outputs_equal": same,
    }
    (HERE / f"result-c{args.concurrency}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "completion_tok_s_per_block"}, indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--num-shard", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--per", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--port", type=int, default=18400)
    parser.add_argument("--seed", type=int, default=0)
    asyncio.run(main(parser.parse_args()))
