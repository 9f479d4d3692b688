/* y = x W^T (+ nothing else) for decode-sized batches, fp32 math over an fp32, bf16 or int8 weight, one
   CPU thread: projections and the LM head at 1-64 rows, where MKL's GEMM reads the weight at a fraction
   of the machine's bandwidth.

   Legend: R rows, K input features, N output features. x [R, K], W [N, K] of weight_type
   (element_type.h), scale [N] for int8 codes (else NULL), y [R, N], contiguous.
*/

#include "rows_times_weight.h"

int linear_rows(const float *x, const void *weight, int weight_type, const float *scale, float *y, int64_t R, int64_t K,
                int64_t N) {
    if (R < 0 || K <= 0 || N < 0 || !weight_type_known(weight_type)) return 1;
    if ((weight_type == ELEMENT_I8) != (scale != NULL)) return 2;
    rows_times_weight(x, R, K, weight, weight_type, scale, N, K, y, N);
    return 0;
}
