"""A/A/A: N identical servers; MODE=together (all up, measured in turn) or restart (each block on a fresh server, alone)."""
import asyncio, os, subprocess, sys, time, aiohttp, random
MODEL = sys.argv[1]; N = int(sys.argv[2]); ROUNDS = int(sys.argv[3]); PER = int(sys.argv[4]); MODE = sys.argv[5]
SHARDS = os.environ.get("SHARDS", "2"); CONC = int(os.environ.get("CONC", "1"))
ports = [18100 + i for i in range(N)]
def start(i):
    return subprocess.Popen(["mixserve", "launch", "--model", MODEL, "--num-shard", SHARDS, "--port", str(ports[i])],
                            stdout=open(f"/tmp/an/aaa-{i}.log", "a"), stderr=subprocess.STDOUT)
def stop(pr):
    pr.terminate(); pr.wait()
async def ready(s, p):
    for _ in range(600):
        try:
            async with s.get(f"http://127.0.0.1:{p}/health") as r:
                if r.status == 200: return
        except Exception: pass
        await asyncio.sleep(0.25)
    raise SystemExit(f"port {p} not ready")
async def one(s, p, prompt):
    body = {"model": "m", "prompt": prompt, "max_tokens": 128, "ignore_eos": True, "temperature": 0}
    async with s.post(f"http://127.0.0.1:{p}/v1/completions", json=body) as r:
        return (await r.json())["usage"]["completion_tokens"]
async def block(s, p, prompts):
    await asyncio.gather(*(one(s, p, "warm up " * 20) for _ in range(CONC)))
    sem = asyncio.Semaphore(CONC)
    async def lim(pr):
        async with sem: return await one(s, p, pr)
    t = time.perf_counter()
    toks = sum(await asyncio.gather(*(lim(pr) for pr in prompts)))
    return toks / (time.perf_counter() - t)
async def main():
    rng = random.Random(0)
    words = open("/work/main/shards/demo/corpus.txt").read().split()
    res = {i: [] for i in range(N)}
    procs = {}
    async with aiohttp.ClientSession() as s:
        if MODE == "together":
            for i in range(N):
                procs[i] = start(i); await ready(s, ports[i])
        for rnd in range(ROUNDS):
            prompts = []
            for _ in range(PER):
                st = rng.randrange(len(words) - 200); prompts.append(" ".join(words[st:st + 90]))
            order = list(range(N)) if rnd % 2 == 0 else list(reversed(range(N)))
            for i in order:
                if MODE == "restart":
                    procs[i] = start(i); await ready(s, ports[i])
                res[i].append(await block(s, ports[i], prompts))
                if MODE == "restart":
                    stop(procs.pop(i))
            print(rnd, " ".join(f"{res[i][-1]:.1f}" for i in range(N)), flush=True)
    for pr in procs.values(): stop(pr)
    m = [sum(v) / len(v) for v in res.values()]
    print(MODE, "mean", " ".join(f"{x:.1f}" for x in m), f"spread {(max(m)-min(m))/min(m)*100:.1f}%")
asyncio.run(main())
