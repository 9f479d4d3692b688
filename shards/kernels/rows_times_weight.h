/* rows_times_weight: y = x W^T for a few rows x against a row-major weight W, each weight row read
   once from memory and reused from L1 for every row of x. Shared by moe.c, linear.c and
   decoder_layer.c.

   W is fp32, bf16 or int8 (ELEMENT_F32 / ELEMENT_BF16 / ELEMENT_I8, element_type.h); x, y and the
   accumulation are fp32 in every case. A bf16 weight becomes fp32 in registers (its 16 bits shifted
   into the high half of a float, exact), so bf16 changes only the bytes read, not the arithmetic:
   activations stay fp32 as transformers keeps them around its bf16 matmuls' fp32 accumulators.
   (Rounding the activations to bf16 pairs for vdpbf16ps would halve the multiplies, which are not
   what decode waits on: it waits on memory.) An int8 code becomes fp32 the same way (sign-extended,
   converted: exact), and each weight row's dot product is multiplied by its scale at the end, so the
   result is x's dot with the dequantized row up to fp32 rounding; activations are not quantized (a
   loop over activations quantized to int16 with VNNI's vpdpwssd, half the instructions per weight,
   was no faster for one row streaming int8 weights from memory here: the loads are what it waits on). */

#ifndef MIXSERVE_ROWS_TIMES_WEIGHT_H
#define MIXSERVE_ROWS_TIMES_WEIGHT_H

#include <stdint.h>

#include "element_type.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_AVX2 1
#endif
#if defined(HAVE_AVX2) && defined(__AVX512F__)
#define HAVE_AVX512 1
#endif

/* Prefetch the next four weight rows (from w0 + 4K), once per cache line, each at element k: issued
   while the current four rows are read, so the stream runs a block ahead at a steady rate. */
#define PREFETCH_NEXT_ROWS(w0, k, K)                                                          \
    do {                                                                                     \
        if (((k) * (int64_t)sizeof(*(w0))) % 64 < RTW_FLOATS * (int64_t)sizeof(*(w0)))       \
            for (int j_ = 0; j_ < 4; j_++) __builtin_prefetch((w0) + (4 + j_) * (K) + (k));  \
    } while (0)

#ifdef HAVE_AVX2
/* Lane j of the result: the sum of the 8 lanes of v[j]. */
static inline __m256 reduce8(const __m256 v[8]) {
    const __m256 s01 = _mm256_hadd_ps(v[0], v[1]), s23 = _mm256_hadd_ps(v[2], v[3]);
    const __m256 s45 = _mm256_hadd_ps(v[4], v[5]), s67 = _mm256_hadd_ps(v[6], v[7]);
    const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
    return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

static inline __m256 load8_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

static inline __m256 load8_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

#define RTW_VEC __m256
#define RTW_FLOATS 8
#define RTW_ZERO _mm256_setzero_ps
#define RTW_LOAD _mm256_loadu_ps
#define RTW_FMA _mm256_fmadd_ps
#define RTW_FOLD(v) (v)
#define RTW_NAME rows_times_weight_8
#define RTW_WEIGHT float
#define RTW_LOAD_W _mm256_loadu_ps
#include "rows_times_weight_block.h"
#define RTW_NAME rows_times_weight_8_bf16
#define RTW_WEIGHT uint16_t
#define RTW_LOAD_W load8_bf16
#include "rows_times_weight_block.h"
#define RTW_NAME rows_times_weight_8_i8
#define RTW_WEIGHT int8_t
#define RTW_LOAD_W load8_i8
#include "rows_times_weight_block.h"
#undef RTW_VEC
#undef RTW_FLOATS
#undef RTW_ZERO
#undef RTW_LOAD
#undef RTW_FMA
#undef RTW_FOLD
#endif

#ifdef HAVE_AVX512
/* The 16-float form, where the machine has AVX-512 and K is a multiple of 16: in L2/L3 ~15-20 %
   faster than the 8-float loop at 32 rows of MoE, ~30 % at 16 rows of the LM head; out of cache
   both wait on memory. */
static inline __m256 fold512(__m512 v) {
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

static inline __m512 load16_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline __m512 load16_i8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

#define RTW_VEC __m512
#define RTW_FLOATS 16
#define RTW_ZERO _mm512_setzero_ps
#define RTW_LOAD _mm512_loadu_ps
#define RTW_FMA _mm512_fmadd_ps
#define RTW_FOLD fold512
#define RTW_NAME rows_times_weight_16
#define RTW_WEIGHT float
#define RTW_LOAD_W _mm512_loadu_ps
#include "rows_times_weight_block.h"
#define RTW_NAME rows_times_weight_16_bf16
#define RTW_WEIGHT uint16_t
#define RTW_LOAD_W load16_bf16
#include "rows_times_weight_block.h"
#define RTW_NAME rows_times_weight_16_i8
#define RTW_WEIGHT int8_t
#define RTW_LOAD_W load16_i8
#include "rows_times_weight_block.h"
#undef RTW_VEC
#undef RTW_FLOATS
#undef RTW_ZERO
#undef RTW_LOAD
#undef RTW_FMA
#undef RTW_FOLD
#endif

/* y[r * ldy + n] = (x[r * ldx .. + K] . W[n * K .. + K]) * scale[n] for r < R, n < N (W row-major [N, K]
   of weight_type; scale [N] for int8 weights, NULL (no scaling) for the others). With vectors (K a
   multiple of 16 with AVX-512, else of 8 with AVX2): four weight rows at a time against two rows of x
   (eight accumulators, six loads per eight FMAs), the four weight rows staying in L1 for all rows of
   x; the rows left over, and any K without vectors, one dot product each. */
static void rows_times_weight(const float *x, int64_t R, int64_t ldx, const void *W, int weight_type,
                              const float *scale, int64_t N, int64_t K, float *y, int64_t ldy) {
    int64_t n0 = 0;
#ifdef HAVE_AVX512
    if (K % 16 == 0)
        n0 = weight_type == ELEMENT_I8     ? rows_times_weight_16_i8(x, R, ldx, W, scale, N, K, y, ldy)
             : weight_type == ELEMENT_BF16 ? rows_times_weight_16_bf16(x, R, ldx, W, NULL, N, K, y, ldy)
                                           : rows_times_weight_16(x, R, ldx, W, NULL, N, K, y, ldy);
#endif
#ifdef HAVE_AVX2
    if (n0 == 0 && K % 8 == 0)
        n0 = weight_type == ELEMENT_I8     ? rows_times_weight_8_i8(x, R, ldx, W, scale, N, K, y, ldy)
             : weight_type == ELEMENT_BF16 ? rows_times_weight_8_bf16(x, R, ldx, W, NULL, N, K, y, ldy)
                                           : rows_times_weight_8(x, R, ldx, W, NULL, N, K, y, ldy);
#endif
    for (int64_t n = n0; n < N; n++) {
        const float row_scale = weight_type == ELEMENT_I8 ? scale[n] : 1.0f;
        for (int64_t r = 0; r < R; r++) {
            const float *xr = x + r * ldx;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t k = 0; k < K; k++) dot += xr[k] * element_at(W, weight_type, n * K + k);
            y[r * ldy + n] = dot * row_scale;
        }
    }
}

#endif
