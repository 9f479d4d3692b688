set -e
M=~/.cache/mixserve/demo-trained
run() {
  PYTHONPATH=/work/main:/work/main/proto python -m mixserve.cli launch --model $M --num-shard 2 --dtype bfloat16 --max-batch-prefill-tokens $1 --port $2 > /tmp/tc-$1.log 2>&1 &
  echo $! > /tmp/tc-$1.pid
}
run 1024 8093; run 128 8094
for p in 8093 8094; do for i in $(seq 1 400); do curl -sf localhost:$p/health >/dev/null && break; sleep 0.5; done; done
python - <<'PY'
import json, urllib.request
words = open("/work/main/README.md").read().split()[:420]
prompt = " ".join(words)
out = {}
for port in (8093, 8094):
    body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": 48, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})
    r = json.load(urllib.request.urlopen(req, timeout=300))
    out[port] = (r["choices"][0]["text"], r["usage"])
print(out[8093][1], out[8094][1])
print("equal:", out[8093][0] == out[8094][0])
print(repr(out[8093][0][:120])); print(repr(out[8094][0][:120]))
PY
kill $(cat /tmp/tc-1024.pid) $(cat /tmp/tc-128.pid); wait || true
grep -h "event=kernel_tokens" /tmp/tc-1024.log | head -1 | cut -c25-120
