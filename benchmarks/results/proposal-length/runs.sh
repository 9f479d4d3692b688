#!/bin/bash
# usage: runs.sh CKPT WORKLOAD [launch args]: 24 requests at c=1; runs (multi-step calls), steps, proposals
CKPT=$1; WL=$2; shift 2
PORT=8931
mixserve launch --model $CKPT --num-shard 1 "$@" --port $PORT > /tmp/an/server.log 2>&1 &
LP=$!
for i in $(seq 90); do curl -s localhost:$PORT/health >/dev/null && break; sleep 1; done
mixserve bench serve --url http://127.0.0.1:$PORT --workload $WL --input-len 128 --output-len 128 --concurrency 1 --num-prompts ${NP:-24} --no-progress --model $CKPT 2>&1 | grep "^| 1" | cut -d'|' -f6,10,11,12
curl -s localhost:$PORT/metrics | grep -v "^#" | grep "decode_run_steps_count\|decode_run_steps_sum\|step_duration_seconds_count{kind=\"decode\"}\|speculative_.*_total"
kill $LP; wait $LP 2>/dev/null
