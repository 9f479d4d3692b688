#!/usr/bin/env bash
# Seconds from `mixserve launch` to a healthy /health, and the shards' warm-up, for source trees (and
# flags) started in turn (the tests' server flags: 2 shards, fp32, --max-kv-blocks 4096, the built-in demo).
# usage: starts.sh ROUNDS LABEL=TREE[+FLAGS] ...   FLAGS: extra launch flags, commas for spaces, e.g.
#   starts.sh 4 before=/tmp/old fresh=/work/main+--warmup-timings,fresh stored=/work/main
# (from cpu-start-warmup/starts.sh, with the extra flags and the warm-up's timings= word.)
set -euo pipefail
rounds=$1; shift
cd "$(mktemp -d)"  # not a tree's root: `python -m` would import the package found in the working directory
export OMP_NUM_THREADS=1
for ((round = 1; round <= rounds; round++)); do
  for pair in "$@"; do
    label=${pair%%=*}; rest=${pair#*=}; tree=${rest%%+*}; flags=""
    [[ $rest == *+* ]] && flags=${rest#*+} && flags=${flags//,/ }
    start=$(date +%s.%N)
    # shellcheck disable=SC2086
    PYTHONPATH="$tree:$tree/proto" python -m mixserve.cli launch --port 18080 --dtype float32 \
      --max-kv-blocks 4096 --num-shard 2 $flags > "launch-$label.log" 2>&1 &
    pid=$!
    until curl -s -o /dev/null -w "%{http_code}" localhost:18080/health 2>/dev/null | grep -q 200; do sleep 0.05; done
    end=$(date +%s.%N)
    kill -TERM "$pid"; wait "$pid" || true
    warmup=$(grep -o 'event=warmup rank=0 .*' "launch-$label.log" | grep -o ' ms=[0-9]*' | tr -d ' ms=')
    timings=$(grep -o 'event=kernel_tokens rank=0 .*' "launch-$label.log" | grep -o 'timings=[a-z]*' || echo "timings=-")
    printf '%s round=%d healthy_s=%.2f warmup_ms=%s %s\n' "$label" "$round" "$(echo "$end - $start" | bc)" "$warmup" "$timings"
  done
done
