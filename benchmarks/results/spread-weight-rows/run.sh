#!/bin/bash
# usage: run.sh [BEFORE]: builds rows.c against the kernel headers of BEFORE (default 266ca2d, four
# adjacent weight rows) and of the working tree (four rows a quarter of W apart), then times both on the
# same shapes, alternating. Run from the repository root.
set -e
BEFORE=${1:-266ca2d}
HERE=benchmarks/results/spread-weight-rows
WORK=$(mktemp -d)
mkdir "$WORK/before"
for f in $(git ls-tree --name-only "$BEFORE" shards/kernels/ | grep '\.h$'); do git show "$BEFORE:$f" > "$WORK/before/$(basename "$f")"; done
cc -O3 -march=native -I"$WORK/before" $HERE/rows.c -o "$WORK/before.bin" -lm
cc -O3 -march=native -Ishards/kernels $HERE/rows.c -o "$WORK/after.bin" -lm
# shapes: the demo's LM head at one rank (8192 x 256), an expert's w13 (1024 x 256) and w2 (256 x 512);
# issue 20's 0.8B at two ranks: its w13 slice (3584 x 1024)
echo "| N x K | weights | rows of x | before | after |"
echo "|---|---|---|---|---|"
for shape in "8192 256" "1024 256" "256 512" "3584 1024"; do
  for type in "0 fp32" "1 bf16" "2 int8" "2 int8-int16"; do
    for rows in 1 2 4 16; do
      set -- $shape; N=$1; K=$2; set -- $type; T=$1; NAME=$2
      EXTRA=""; [ "$NAME" = int8-int16 ] && EXTRA=int16
      B=$("$WORK/before.bin" $N $K $T $rows $EXTRA); A=$("$WORK/after.bin" $N $K $T $rows $EXTRA)
      echo "| $N x $K | $NAME | $rows | $B | $A |"
    done
  done
done
rm -rf "$WORK"
