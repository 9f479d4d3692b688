#!/bin/bash
# decode-step on the 0.8B shape, from the repository root: $BEFORE (a checkout of the commit before) and this tree, alternating
cfg=benchmarks/results/decode-step-int8/mixtral-0.8b-config.json
for i in 1 2; do
  PYTHONPATH=$BEFORE:$BEFORE/proto python -m mixserve.cli bench decode-step --config $cfg --variants bf16,int8 --rounds 20 --out benchmarks/results/decode-step-prefetch/before-$i.json > benchmarks/results/decode-step-prefetch/before-$i.md 2>&1
  python -m mixserve.cli bench decode-step --config $cfg --variants bf16,int8 --rounds 20 --out benchmarks/results/decode-step-prefetch/after-$i.json > benchmarks/results/decode-step-prefetch/after-$i.md 2>&1
done
