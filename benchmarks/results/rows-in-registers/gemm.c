/* rows_times_weight in cache, compute-bound: y = x W^T for R rows of x against N x K weights of one type,
   cycling through COUNT matrices (default 8, an expert set: the demo's w13 at 8 x 1 MiB sits in L3), one
   thread. Prints the products' GFLOP/s (best of 8 passes) and a hash of y's bits, to compare two builds of
   the kernel headers. Usage: gemm N K TYPE R [int16], TYPE 0 fp32, 1 bf16, 2 int8 codes (with `int16`: a
   bf16 model's codes, in the int16 dot product). Build: cc -O3 -march=native -I<kernels> gemm.c -lm */

#include <stdio.h>

#include "rows_times_weight.h"
#include "../spread-weight-rows/rows_bench.h"

int main(int argc, char **argv) {
    if (argc < 5) return 2;
    const int64_t N = atoll(argv[1]), K = atoll(argv[2]), R = atoll(argv[4]);
    const int type = atoi(argv[3]);
    if (argc > 5) kernel_set_int8_bf16_activations(1);
    const int64_t count = getenv("COUNT") ? atoll(getenv("COUNT")) : 8, matrix = N * K * element_bytes(type);
    char *pool = weight_pool(type, count, matrix);
    float *x = malloc(sizeof(float) * R * K), *y = malloc(sizeof(float) * R * N), *scale = malloc(sizeof(float) * N);
    fill_rows(x, R, K, scale, N);
    const float *scales = type == ELEMENT_I8 ? scale : NULL;
    const double flops = 2.0 * N * K * R * count;
    const int repeats = 1 + (int)(2e8 / flops); /* ~0.2 GFLOP a pass */
    double best = 1e30;
    for (int pass = 0; pass < 9; pass++) {
        const double start = now();
        for (int repeat = 0; repeat < repeats; repeat++)
            for (int64_t c = 0; c < count; c++)
                rows_times_weight(x, R, K, pool + c * matrix, type, scales, N, K, y, N);
        const double took = (now() - start) / repeats;
        if (pass > 0 && took < best) best = took;
    }
    printf("%.1f GFLOP/s  bits %08x\n", flops / best / 1e9, bits_hash(y, R * N));
    return 0;
}
