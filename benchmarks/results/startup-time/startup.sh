#!/usr/bin/env bash
# Seconds from `mixserve launch` to /health answering 200, old and new alternating, from /tmp
# (PYTHONSAFEPATH: the working directory is not on sys.path). $1: the model directory.
set -u
model=$1; old=$2; rounds=${3:-3}
cd /tmp
for round in $(seq "$rounds"); do
  for side in before after; do
    if [ $side = before ]; then pp="$old:$old/proto"; else pp=""; fi
    start=$(date +%s.%N)
    PYTHONSAFEPATH=1 PYTHONPATH=$pp python -m mixserve.cli launch --port 18556 --model "$model" > /tmp/st/$side-$round.log 2>&1 &
    pid=$!
    until curl -sf localhost:18556/health > /dev/null; do sleep 0.1; done
    end=$(date +%s.%N)
    kill $pid; wait $pid
    printf '%s round %d: %.1f s, %s\n' $side "$round" "$(echo "$end - $start" | bc)" "$(grep -o 'event=ops.*kernels=[a-z]*' /tmp/st/$side-$round.log | head -1 | cut -c1-30)"
  done
done
