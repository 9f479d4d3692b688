"""Sampled requests (temperature 0.8, top_p 0.95, 128 tokens, EOS ignored) against two servers, alternating blocks."""
import asyncio, json, random, sys, time
import aiohttp

WORDS = "the a little dog cat king queen said went saw big house tree river morning night and then".split()

async def block(url, c, n, seed):
    rnd = random.Random(seed)
    prompts = [" ".join(rnd.choice(WORDS) for _ in range(60)) for _ in range(n)]
    tokens = 0
    async with aiohttp.ClientSession() as s:
        sem = asyncio.Semaphore(c)
        async def one(i, p):
            nonlocal tokens
            async with sem:
                body = {"prompt": p, "max_tokens": 128, "temperature": 0.8, "top_p": 0.95, "ignore_eos": True, "seed": i}
                async with s.post(url + "/v1/completions", json=body) as r:
                    tokens += (await r.json())["usage"]["completion_tokens"]
        t = time.perf_counter()
        await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        return tokens / (time.perf_counter() - t)

async def main():
    a, b, c, n, blocks = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    await block(a, c, c, 0); await block(b, c, c, 0)
    res = {a: [], b: []}
    for k in range(blocks):
        order = (a, b) if k % 2 == 0 else (b, a)
        for u in order:
            res[u].append(await block(u, c, n, k))
    for u, v in res.items():
        print(u, "c=%d" % c, "tok/s per block", [round(x, 1) for x in v], "mean %.1f" % (sum(v) / len(v)))
    ma, mb = sum(res[a]) / blocks, sum(res[b]) / blocks
    print(f"ratio {b} / {a}: {mb / ma:.2f}x")

asyncio.run(main())
