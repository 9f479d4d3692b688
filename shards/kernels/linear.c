/* y = x W^T (+ nothing else) for decode-sized batches, fp32, one CPU thread: projections and the
   LM head at 1-64 rows, where MKL's GEMM reads the weight at a fraction of the machine's bandwidth.

   Legend: R rows, K input features, N output features. x [R, K], W [N, K], y [R, N], contiguous.
*/

#include "rows_times_weight.h"

int linear_rows(const float *x, const float *weight, float *y, int64_t R, int64_t K, int64_t N) {
    if (R < 0 || K <= 0 || N < 0) return 1;
    rows_times_weight(x, R, K, weight, N, K, y, N);
    return 0;
}
