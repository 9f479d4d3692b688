/* A 512 x 256 bf16 product (one or four rows of x), vdpbf16ps against the tiles, each call after `gap` us of
   scalar work: the tile unit's start after idle. Built against this commit's kernels, AMX_MIN_WEIGHT and
   AMX_MIN_K lowered so that this small product takes the tiles:
     cc -O3 -march=native -ffast-math -Ishards/kernels -DAMX_MIN_WEIGHT=0 -DAMX_MIN_K=0 amx_idle_start.c -o /tmp/a
     for g in 0 5 50 500; do /tmp/a 512 256 1 $g; /tmp/a 512 256 4 $g; done */
#include "rows_times_weight.h"
#include <stdio.h>
#include <time.h>
static double now(){struct timespec t; clock_gettime(CLOCK_MONOTONIC,&t); return t.tv_sec+t.tv_nsec*1e-9;}
static volatile float sink;
static void busy(int us) { double t0 = now(); float a = 1; while (now() - t0 < us * 1e-6) a = a * 1.0000001f + 1e-7f; sink = a; }
int main(int argc, char **argv) {
  int64_t N = atoll(argv[1]), K = atoll(argv[2]), R = atoll(argv[3]); int gap = atoi(argv[4]);
  uint16_t *W = aligned_alloc(64, N * K * 2);
  for (int64_t i = 0; i < N * K; i++) W[i] = 0x3c00 + (i % 7);
  float *x = aligned_alloc(64, R * K * 4), *y = aligned_alloc(64, R * N * 4);
  for (int64_t i = 0; i < R * K; i++) x[i] = (i % 13) * 0.01f;
  const uint16_t *xb = rows_to_bf16(x, R, K, K);
  amx_permitted();
  double tot[2] = {0, 0}; int n = 300;
  for (int rep = 0; rep < n; rep++)
    for (int path = 0; path < 2; path++) {
      busy(gap);
      double t0 = now();
      if (path == 0) rows_times_weight_dpbf16(xb, R, W, NULL, N, K, y, N);
      else rows_times_weight_amx(xb, R, W, N, K, y, N);
      tot[path] += now() - t0;
    }
  printf("N %ld K %ld R %ld gap %d us: dpbf16 %.2f us, amx %.2f us (mean)\n", N, K, R, gap, tot[0]/n*1e6, tot[1]/n*1e6);
  return 0;
}
