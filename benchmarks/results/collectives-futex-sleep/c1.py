import json, os, sys, time, http.client
def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
pids = [int(p) for p in sys.argv[1].split(",")]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 20
def req(conn):
    body = json.dumps({"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 128, "ignore_eos_token": True, "details": False}, "stream": True})
    conn.request("POST", "/generate_stream", body, {"Content-Type": "application/json"})
    r = conn.getresponse(); toks = 0; times = []
    for line in r:
        if line.startswith(b"data:"): toks += 1; times.append(time.perf_counter())
    return toks, times
conn = http.client.HTTPConnection("localhost", 8090)
req(conn)
c0 = [cpu(p) for p in pids]; me0 = time.process_time(); t0 = time.perf_counter(); total = 0; itl = []
for _ in range(n):
    k, ts = req(conn); total += k; itl += [b - a for a, b in zip(ts, ts[1:])]
wall = time.perf_counter() - t0
c1 = [cpu(p) for p in pids]; me = time.process_time() - me0
itl.sort()
print(f"tokens {total} wall {wall:.2f}s {total/wall:.0f} tok/s  ITL p50 {itl[len(itl)//2]*1e3:.2f} ms")
print("cpu ms/token per pid:", [round((b - a) / total * 1e3, 3) for a, b in zip(c0, c1)], "client", round(me / total * 1e3, 3))
