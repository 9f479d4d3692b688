# pairs.py NAME=ENV;ARGS ... : serve each (1 shard, trained demo), send corpus requests round-robin, report tok/s
import json, os, subprocess, sys, time, urllib.request, statistics
from mixserve.benchmarks.workload import WorkloadConfig, build_requests, load_tokenizer
M = os.environ.get("MODEL", "/root/.cache/mixserve/demo-trained"); N = int(os.environ.get("N", "24"))
specs = []
for i, a in enumerate(sys.argv[1:]):
    name, rest = a.split("=", 1); env_s, args = rest.split(";", 1)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if env_s: k, v = env_s.split(":", 1); env[k] = v
    port = 8700 + i
    p = subprocess.Popen(["mixserve", "launch", "--model", M, "--port", str(port), *args.split()], env=env,
                         stdout=open(f"/tmp/bench/srv-{name}.log", "w"), stderr=subprocess.STDOUT)
    specs.append((name, port, p))
def up(port):
    try: return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200
    except Exception: return False
t0 = time.time()
while not all(up(p) for _, p, _ in specs):
    if time.time() - t0 > 300: sys.exit("servers did not come up")
    time.sleep(2)
tok = load_tokenizer(M)
reqs = build_requests(tok, WorkloadConfig(kind="corpus", input_len=128, output_len=128), N + 2, stream=1)
def send(port, prompt):
    body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": 128, "temperature": 0, "ignore_eos": True}).encode()
    r = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})
    a = time.perf_counter(); d = json.load(urllib.request.urlopen(r, timeout=120)); return d["usage"]["completion_tokens"], time.perf_counter() - a
res = {n: [] for n, _, _ in specs}
try:
    for i, r in enumerate(reqs):
        order = specs[i % len(specs):] + specs[:i % len(specs)]
        for name, port, _ in order:
            n, dt = send(port, r.prompt)
            if i >= 2: res[name].append((n, dt))
    base = None
    for name, v in res.items():
        tps = sum(n for n, _ in v) / sum(d for _, d in v)
        base = base or tps
        print(f"{name}: {tps:.0f} tok/s ({tps / base:.2f}x first), median E2E {statistics.median(d for _, d in v) * 1e3:.0f} ms, {len(v)} requests")
finally:
    for _, _, p in specs: p.terminate()
    for _, _, p in specs: p.wait()
