#!/bin/bash
# standalone.sh LABEL PYTHONPATH EXTRA...: one server, sampled corpus c=8 then c=1, 160 requests each
label=$1; pp=$2; shift 2
cd /tmp  # python -m puts the working directory first on sys.path: /work/main would shadow PYTHONPATH
while pgrep -f 'mixserve' > /dev/null; do sleep 1; done
(PYTHONPATH=$pp mixserve launch --model ~/.cache/mixserve/demo-93bc109d09c8 --num-shard 1 --port 8313 "$@" > /tmp/bench/l3-$label.log 2>&1 &)
for i in $(seq 60); do curl -sf localhost:8313/health > /dev/null && break; sleep 1; done
timeout 300 mixserve bench serve --url http://127.0.0.1:8313 --model ~/.cache/mixserve/demo-93bc109d09c8 --target openai --workload ${WORKLOAD:-corpus} --concurrency ${LEVELS:-8 1} --num-prompts 160 --input-len 128 --output-len 128 --temperature ${TEMP:-0.8} --top-p ${TOPP:-0.95} --no-progress 2>&1 | grep '^| [0-9]* | ' | sed "s/^/$label /"
curl -s localhost:8313/metrics | grep -E '^mixserve_speculative_(proposed|accepted)_tokens_total' | sed "s/^/$label /" | tr '\n' ' '; echo
pkill -f 'port 8313'
while pgrep -f 'mixserve' > /dev/null; do sleep 1; done
