/* int8 codes against activations quantized to 15-bit integers in VNNI's int16 dot product (vpdpwssd), for a
   bf16 model's int8 weights where the build has AVX512_VNNI: included by rows_times_weight.h.

   Each row of x is quantized once a call with a step of its own, max |x| / 16383 (rows_to_i16.h), and a
   code vector is one sign extension to int16 per 32 weights before the dot product, where meeting x
   rounded to bf16 costs five conversions (rows_times_codes_dpbf16). On the AMX Xeon those
   conversions, not memory, bounded a batch-1 int8 decode (67 % of its bytes' roofline); in a standalone
   loop over 229 MB of codes the int16 form took 19.8 ms against 30.5 (the read of those bytes: 15.6).

   The sums are integers and exact: a lane adds K / 16 products of at most 16383 * 127, under 2^31 for K up
   to RTW_DPWSSD_MAX_K, and the lanes meet in int64. y = sum * step * scale, in double, rounded once. So a
   row gives the same bits alone or beside other rows, whatever the blocking. The quantization is as
   precise as bf16's rounding for a row's largest values (2^-14 of the largest against 2^-8 of each) and
   coarser for values far below them: the products' error is bf16's order. Rows with a NaN or an
   infinity go to the bf16 path, which keeps them. */

#include "rows_to_i16.h"

#define RTW_DPWSSD_MAX_K 16384

/* 32 codes from p as int16. */
static inline __m512i load32_codes_i16(const int8_t *p) {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)p));
}

/* The exact sum of v's 16 int32 lanes. */
static inline int64_t sum_i32_lanes(__m512i v) {
    return _mm512_reduce_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(v))) +
           _mm512_reduce_add_epi64(_mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1)));
}

/* y = (x codes^T) * scale for int8 codes [N, K] (K a multiple of 32, at most RTW_DPWSSD_MAX_K): 0, or -1
   (nothing written) where rows_to_i16 refuses x. */
#define RTI_NAME rows_times_codes_dpwssd
#define RTI_VEC __m512i
#define RTI_CODES 32
#define RTI_ZERO _mm512_setzero_si512
#define RTI_LOAD_X(p) _mm512_loadu_si512(p)
#define RTI_LOAD_C load32_codes_i16
#define RTI_DOT _mm512_dpwssd_epi32
#define RTI_SUM sum_i32_lanes
#include "rows_times_codes_i16_block.h"
