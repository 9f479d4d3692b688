/* int8 codes against activations quantized to 15-bit integers in AVX2's int16 multiply-add (vpmaddwd, then
   vpaddd: VNNI's vpdpwssd in two instructions), for a bf16 model's int8 weights where the build has AVX2
   but not AVX-512: included by rows_times_weight.h. The integers are rows_to_i16.h's, as on VNNI
   (rows_times_codes_dpwssd.h), so a row gives the same bits on either build.

   Without it such a CPU widens each code to fp32 (a sign extension and a conversion per 8 codes) for an
   FMA against fp32 x; here one sign extension serves 16 codes, and 16 products take two instructions.

   The sums are integers and exact: a lane adds K / 8 products of at most 16383 * 127, under 2^31 for K up
   to RTW_MADDWD_MAX_K, and the lanes meet in int64. y = sum * step * scale, in double, rounded once. */

#include "rows_to_i16.h"

#define RTW_MADDWD_MAX_K 8192

/* 16 codes from p as int16. */
static inline __m256i load16_codes_i16(const int8_t *p) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
}

/* The exact sum of v's 8 int32 lanes. */
static inline int64_t sum_i32x8_lanes(__m256i v) {
    const __m256i wide = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)),
                                          _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1)));
    int64_t lanes[4];
    _mm256_storeu_si256((__m256i *)lanes, wide);
    return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}

/* acc plus the sums of adjacent pairs of c * a (vpmaddwd, vpaddd). */
static inline __m256i madd_i16(__m256i acc, __m256i c, __m256i a) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(c, a));
}

/* y = (x codes^T) * scale for int8 codes [N, K] (K a multiple of 16, at most RTW_MADDWD_MAX_K): 0, or -1
   (nothing written) where rows_to_i16 refuses x. */
#define RTI_NAME rows_times_codes_maddwd
#define RTI_VEC __m256i
#define RTI_CODES 16
#define RTI_ZERO _mm256_setzero_si256
#define RTI_LOAD_X(p) _mm256_loadu_si256((const __m256i *)(p))
#define RTI_LOAD_C load16_codes_i16
#define RTI_DOT madd_i16
#define RTI_SUM sum_i32x8_lanes
#include "rows_times_codes_i16_block.h"
