/* y = x W^T (+ nothing else) for decode-sized batches, fp32 math over an fp32 or bf16 weight, one CPU
   thread: projections and the LM head at 1-64 rows, where MKL's GEMM reads the weight at a fraction of
   the machine's bandwidth.

   Legend: R rows, K input features, N output features. x [R, K], W [N, K] of weight_type
   (element_type.h), y [R, N], contiguous.
*/

#include "rows_times_weight.h"

int linear_rows(const float *x, const void *weight, int weight_type, float *y, int64_t R, int64_t K, int64_t N) {
    if (R < 0 || K <= 0 || N < 0 || !element_type_known(weight_type)) return 1;
    rows_times_weight(x, R, K, weight, weight_type, N, K, y, N);
    return 0;
}
