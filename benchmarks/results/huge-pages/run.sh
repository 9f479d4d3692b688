#!/bin/bash
# usage: run.sh: the kernels' matmul loop on 4 KiB pages against 2 MiB pages, alternating, three runs each.
# Builds ../spread-weight-rows/rows.c (one row of x and a few, weights out of memory: GB/s of weights) and
# ../rows-in-registers/gemm.c (33 rows, weights cycled through cache: GFLOP/s) from the working tree's
# kernel headers. Huge pages come from glibc's malloc (GLIBC_TUNABLES=glibc.malloc.hugetlb=1: madvise
# MADV_HUGEPAGE on what it maps), as torch's allocator asks for them under THP_MEM_ALLOC_ENABLE=1; the
# kernel grants them where /sys/kernel/mm/transparent_hugepage/enabled is always or madvise. Same bits
# either way (the hashes). Run from the repository root.
set -e
R=benchmarks/results
WORK=$(mktemp -d)
cc -O3 -march=native -Ishards/kernels $R/spread-weight-rows/rows.c -o "$WORK/rows" -lm
cc -O3 -march=native -Ishards/kernels $R/rows-in-registers/gemm.c -o "$WORK/gemm" -lm
echo "huge page mode: $(cat /sys/kernel/mm/transparent_hugepage/enabled)"
row() { # program, then its arguments
  local S="" H=""
  for i in 1 2 3; do
    S="$S $("$WORK/$1" "${@:2}" | cut -d' ' -f1)"
    H="$H $(GLIBC_TUNABLES=glibc.malloc.hugetlb=1 "$WORK/$1" "${@:2}" | cut -d' ' -f1)"
  done
  local SB=$("$WORK/$1" "${@:2}" | awk '{print $NF}') HB=$(GLIBC_TUNABLES=glibc.malloc.hugetlb=1 "$WORK/$1" "${@:2}" | awk '{print $NF}')
  echo "| $2 x $3 | $NAME | $5 | $S | $H | $([ "$SB" = "$HB" ] && echo same || echo DIFFER) |"
}
echo
echo "Out of memory (rows.c), GB/s of weights:"
echo
echo "| N x K | weights | rows of x | 4 KiB pages | 2 MiB pages | bits |"
echo "|---|---|---|---|---|---|"
# issue 20's 0.8B at two ranks: w13's slice, w2's slice, the LM head's half; the demo's w13
for shape in "3584 1024" "1024 1792" "16000 1024" "1024 256"; do
  for type in "0 fp32" "1 bf16" "2 int8"; do
    for rows in 1 4; do
      set -- $shape; N=$1; K=$2; set -- $type; T=$1; NAME=$2
      row rows $N $K $T $rows
    done
  done
done
echo
echo "In cache (gemm.c), GFLOP/s:"
echo
echo "| N x K | weights | rows of x | 4 KiB pages | 2 MiB pages | bits |"
echo "|---|---|---|---|---|---|"
for shape in "1024 256" "256 512" "1024 1024" "3584 1024" "512 2048"; do
  for type in "0 fp32" "1 bf16"; do
    set -- $shape; N=$1; K=$2; set -- $type; T=$1; NAME=$2
    row gemm $N $K $T 33
  done
done
