/* rows_times_weight out of cache: y = x W^T for R rows of x against N x K weights of one type, cycling
   through a 256 MiB pool of weight matrices so that every product reads its weights from memory, one
   thread. Prints the weight bytes read a second (best of 7 passes) and a hash of y's bits, to compare two
   builds of the kernel headers. Usage: rows N K TYPE R [int16], TYPE 0 fp32, 1 bf16, 2 int8 codes (with
   `int16`: a bf16 model's codes, in the int16 dot product). Build: cc -O3 -march=native -I<kernels> rows.c -lm */

#include <stdio.h>

#include "rows_times_weight.h"
#include "rows_bench.h"

int main(int argc, char **argv) {
    if (argc < 5) return 2;
    const int64_t N = atoll(argv[1]), K = atoll(argv[2]), R = atoll(argv[4]);
    const int type = atoi(argv[3]);
    if (argc > 5) kernel_set_int8_bf16_activations(1);
    const int64_t matrix = N * K * element_bytes(type), count = ((int64_t)256 << 20) / matrix;
    char *pool = weight_pool(type, count, matrix);
    float *x = malloc(sizeof(float) * R * K), *y = malloc(sizeof(float) * R * N), *scale = malloc(sizeof(float) * N);
    fill_rows(x, R, K, scale, N);
    const float *scales = type == ELEMENT_I8 ? scale : NULL;
    double best = 1e30;
    for (int pass = 0; pass < 8; pass++) {
        const double start = now();
        for (int64_t c = 0; c < count; c++) rows_times_weight(x, R, K, pool + c * matrix, type, scales, N, K, y, N);
        const double took = now() - start;
        if (pass > 0 && took < best) best = took;
    }
    printf("%.1f GB/s  bits %08x\n", (double)(count * matrix) / best / 1e9, bits_hash(y, R * N));
    return 0;
}
