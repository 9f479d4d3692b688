/* y = x W^T (+ nothing else) for decode-sized batches, fp32 math over an fp32, bf16 or int8 weight, one
   CPU thread: projections and the LM head at 1-64 rows, where MKL's GEMM reads the weight at a fraction
   of the machine's bandwidth. More rows run in tiles of ROW_TILE, the weight read once per tile, so a
   tile's rows stay in L2 while every weight row passes them (int8 steps in fp32 past the decode caps:
   ~20 % faster than one pass over 1024 rows of the 0.8B shape's LM head).

   Legend: R rows, K input features, N output features. x [R, K], W [N, K] of weight_type
   (element_type.h), scale [N] for int8 codes (else NULL), y [R, N], contiguous.
*/

#include "rows_times_weight.h"

/* 64 rows of 1024-4096 fp32 features: 256 KiB-1 MiB, within L2. */
#define ROW_TILE 64

int linear_rows(const float *x, const void *weight, int weight_type, const float *scale, float *y, int64_t R, int64_t K,
                int64_t N) {
    if (R < 0 || K <= 0 || N < 0 || !weight_type_known(weight_type)) return 1;
    if ((weight_type == ELEMENT_I8) != (scale != NULL)) return 2;
    for (int64_t r0 = 0; r0 < R; r0 += ROW_TILE) {
        const int64_t rows = R - r0 < ROW_TILE ? R - r0 : ROW_TILE;
        rows_times_weight(x + r0 * K, rows, K, weight, weight_type, scale, N, K, y + r0 * N, N);
    }
    return 0;
}
