/* Weight-only int8 codes back to floats, for steps past the few-row kernels' caps (prefill chunks,
   large decode batches): there a blocked GEMM (oneDNN through torch, vdpbf16ps in bf16) beats streaming
   the codes, so the codes are widened once per call into a scratch buffer the GEMM then reads.

   out[n, k] = codes[n, k] * scale[n], computed in fp32 and stored as fp32 or rounded to the nearest bf16
   (ties to even), exactly what Int8Weight.dequantize computes. With AVX-512 sixteen codes a step; with
   avx512_bf16 the rounding is one vcvtneps2bf16, else the compiler vectorizes float_to_bf16.

   Legend: N rows (output channels), K codes per row. codes [N, K] int8, scale [N] fp32, out [N, K] of
   out_type (element_type.h: ELEMENT_F32 or ELEMENT_BF16), all contiguous.
*/

#include <stdint.h>

#include "element_type.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static void dequantize_row_f32(const int8_t *codes, float scale, float *out, int64_t K) {
    int64_t k = 0;
#if defined(__AVX512F__)
    const __m512 s = _mm512_set1_ps(scale);
    for (; k + 16 <= K; k += 16)
        _mm512_storeu_ps(out + k, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                                    _mm_loadu_si128((const __m128i *)(codes + k)))),
                                                s));
#endif
#pragma omp simd
    for (int64_t i = k; i < K; i++) out[i] = (float)codes[i] * scale;
}

static void dequantize_row_bf16(const int8_t *codes, float scale, uint16_t *out, int64_t K) {
    int64_t k = 0;
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    const __m512 s = _mm512_set1_ps(scale);
    for (; k + 16 <= K; k += 16) {
        const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                           _mm_loadu_si128((const __m128i *)(codes + k)))),
                                       s);
        _mm256_storeu_si256((__m256i *)(out + k), (__m256i)_mm512_cvtneps_pbh(v));
    }
#endif
#pragma omp simd
    for (int64_t i = k; i < K; i++) out[i] = float_to_bf16((float)codes[i] * scale);
}

int dequantize_int8(const int8_t *codes, const float *scale, int out_type, void *out, int64_t N, int64_t K) {
    if (N < 0 || K < 0 || !element_type_known(out_type)) return 1;
    for (int64_t n = 0; n < N; n++) {
        if (out_type == ELEMENT_BF16)
            dequantize_row_bf16(codes + n * K, scale[n], (uint16_t *)out + n * K, K);
        else
            dequantize_row_f32(codes + n * K, scale[n], (float *)out + n * K, K);
    }
    return 0;
}
