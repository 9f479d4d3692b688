#!/bin/bash
# Alternates the step probe between two source trees, three times each: OLD (a worktree of the commit
# before, e.g. `git worktree add /tmp/old 29f3765`) and NEW (this checkout).
#     bash run.sh /tmp/old /work/main MODEL_DIR "1 8" > output.txt
OLD=$1 NEW=$2 MODEL=$3 BATCHES=${4:-"1 8"} EXTRA=$5
HERE=$(cd "$(dirname "$0")" && pwd)
cd /tmp
for batch in $BATCHES; do
  for round in 1 2 3; do
    for tree in "$OLD" "$NEW"; do
      echo -n "$(basename "$tree") round=$round "
      PYTHONPATH=$tree:$tree/proto python "$HERE/step_probe.py" "$MODEL" "$batch" $EXTRA
    done
  done
done
