/* RMSNorm and rotary embedding for fp32 CPU tensors (RMSNorm also for bf16 ones), one call each
   where torch runs six and twenty small ops: at decode batch sizes those ops cost more in dispatch
   than in arithmetic.

   Legend: T tokens, H hidden size, h heads of q or k, d head dim, P positions in the tables.
*/

#include <math.h>
#include <stdint.h>

#include "element_type.h"

/* out[t] = weight * x[t] / sqrt(mean(x[t]^2) + eps); x and out [T, H] contiguous. */
int rms_norm(const float *x, const float *weight, float *out, int64_t T, int64_t H, float eps) {
    for (int64_t t = 0; t < T; t++) {
        const float *xt = x + t * H;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < H; i++) sum += xt[i] * xt[i];
        const float scale = 1.0f / sqrtf(sum / (float)H + eps);
        float *ot = out + t * H;
#pragma omp simd
        for (int64_t i = 0; i < H; i++) ot[i] = weight[i] * (xt[i] * scale);
    }
    return 0;
}

/* rms_norm for bf16 x, weight and out [T, H], rounded where transformers' MixtralRMSNorm rounds a bf16
   input: the sum of squares in fp32, x / sqrt(mean + eps) rounded to bf16, times the weight, rounded
   again (bf16 times bf16 is exact in fp32, so the product rounds once, as torch's bf16 multiply does). */
int rms_norm_bf16(const uint16_t *x, const uint16_t *weight, uint16_t *out, int64_t T, int64_t H, float eps) {
    for (int64_t t = 0; t < T; t++) {
        const uint16_t *xt = x + t * H;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < H; i++) {
            const float v = bf16_to_float(xt[i]);
            sum += v * v;
        }
        const float scale = 1.0f / sqrtf(sum / (float)H + eps);
        uint16_t *ot = out + t * H;
#pragma omp simd
        for (int64_t i = 0; i < H; i++) {
            const float normed = bf16_to_float(float_to_bf16(bf16_to_float(xt[i]) * scale));
            ot[i] = float_to_bf16(bf16_to_float(weight[i]) * normed);
        }
    }
    return 0;
}

/* Rotate the h heads of each token (rows of `stride` floats, heads of d contiguous floats) by its
   position: out[i] = x[i] cos[i] - x[i + d/2] sin[i], out[i + d/2] = x[i + d/2] cos + x[i] sin
   (cos and sin [P, d] hold each frequency twice, as transformers builds them). out [T, h, d]. */
int rotary(const float *x, int64_t stride, const int64_t *positions, const float *cos_table,
           const float *sin_table, float *out, int64_t T, int64_t h, int64_t d, int64_t P) {
    const int64_t half = d / 2;
    if (d % 2) return 1;
    for (int64_t t = 0; t < T; t++) {
        const int64_t p = positions[t];
        if (p < 0 || p >= P) return 2;
        const float *c = cos_table + p * d, *s = sin_table + p * d;
        for (int64_t j = 0; j < h; j++) {
            const float *xj = x + t * stride + j * d;
            float *oj = out + (t * h + j) * d;
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                oj[i] = xj[i] * c[i] - xj[i + half] * s[i];
                oj[i + half] = xj[i + half] * c[i + half] + xj[i] * s[i + half];
            }
        }
    }
    return 0;
}
