#!/bin/bash
# usage: run.sh [BEFORE]: builds gemm.c (compute-bound, in cache) and ../spread-weight-rows/rows.c (one
# matrix after another out of memory) against the kernel headers of BEFORE (default c09f026: two rows
# of x at a time, loads folded into the FMAs) and of the working tree, then times both on the same
# shapes, alternating, three times each. Run from the repository root.
set -e
BEFORE=${1:-c09f026}
HERE=benchmarks/results/rows-in-registers
WORK=$(mktemp -d)
mkdir "$WORK/before"
for f in $(git ls-tree --name-only "$BEFORE" shards/kernels/ | grep '\.h$'); do git show "$BEFORE:$f" > "$WORK/before/$(basename "$f")"; done
for tree in before after; do
  INC="$WORK/before"; [ $tree = after ] && INC=shards/kernels
  cc -O3 -march=native -I"$INC" $HERE/gemm.c -o "$WORK/gemm-$tree" -lm
  cc -O3 -march=native -I"$INC" benchmarks/results/spread-weight-rows/rows.c -o "$WORK/rows-$tree" -lm
done
# shapes: the demo's expert w13 (1024 x 256) and w2 (256 x 512), its attention's QKV at one rank (512 x 256),
# the LM head (8192 x 256); issue 20's 0.8B w13 slice at two ranks (3584 x 1024)
row() { # program, then its arguments: three runs of each build, alternating
  local B="" A=""
  for i in 1 2 3; do
    B="$B $("$WORK/$1-before" "${@:2}" | cut -d' ' -f1)"; A="$A $("$WORK/$1-after" "${@:2}" | cut -d' ' -f1)"
  done
  local BB=$("$WORK/$1-before" "${@:2}" | awk '{print $NF}') AB=$("$WORK/$1-after" "${@:2}" | awk '{print $NF}')
  echo "| $2 x $3 | $NAME | $5 | $B | $A | $([ "$BB" = "$AB" ] && echo same || echo DIFFER) |"
}
echo "In cache (gemm.c), GFLOP/s, three runs each:"
echo
echo "| N x K | weights | rows of x | before | after | bits |"
echo "|---|---|---|---|---|---|"
for shape in "1024 256" "256 512" "512 256" "3584 1024"; do
  for type in "0 fp32" "1 bf16" "2 int8" "2 int8-int16"; do
    for rows in 2 3 4 8 32; do
      set -- $shape; N=$1; K=$2; set -- $type; T=$1; NAME=$2
      if [ "$NAME" = int8-int16 ]; then row gemm $N $K $T $rows int16; else row gemm $N $K $T $rows; fi
    done
  done
done
echo
echo "Out of memory (rows.c), GB/s of weights, three runs each:"
echo
echo "| N x K | weights | rows of x | before | after | bits |"
echo "|---|---|---|---|---|---|"
for shape in "8192 256" "1024 256" "3584 1024"; do
  for type in "0 fp32" "1 bf16" "2 int8-int16"; do
    for rows in 1 2 4; do
      set -- $shape; N=$1; K=$2; set -- $type; T=$1; NAME=$2
      if [ "$NAME" = int8-int16 ]; then row rows $N $K $T $rows int16; else row rows $N $K $T $rows; fi
    done
  done
done
rm -rf "$WORK"
