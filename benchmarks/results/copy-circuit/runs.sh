#!/bin/bash
# usage: runs.sh CKPT [launch args]: one server alone (1 shard), 2 warm-up + $NP copy requests at one
# stream through `mixserve bench serve`, then its speculation counters; the server is stopped after.
CKPT=$1; shift
PORT=8931
mixserve launch --model "$CKPT" --num-shard 1 "$@" --port $PORT > /tmp/copy-circuit-server.log 2>&1 &
LP=$!
for i in $(seq 90); do curl -s localhost:$PORT/health >/dev/null && break; sleep 1; done
echo "== $*"
mixserve bench serve --url http://127.0.0.1:$PORT --workload copy --input-len 128 --output-len 128 --concurrency 1 \
  --num-prompts "${NP:-48}" --no-progress --model "$CKPT" 2>&1 | grep "^| 1" | cut -d'|' -f6,8,10,11,12
curl -s localhost:$PORT/metrics | grep -v "^#" | grep "speculative_.*_total"
kill $LP; wait $LP 2>/dev/null
