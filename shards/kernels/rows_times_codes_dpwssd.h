/* int8 codes against activations quantized to 15-bit integers in VNNI's int16 dot product (vpdpwssd), for a
   bf16 model's int8 weights where the build has AVX512_VNNI: included by rows_times_weight.h.

   Each row of x is quantized once a call with a step of its own, max |x| / 16383 (x / step rounded to
   nearest even), and a code vector is one sign extension to int16 per 32 weights before the dot product,
   where meeting x rounded to bf16 costs five conversions (rows_times_codes_dpbf16). On the AMX Xeon those
   conversions, not memory, bounded a batch-1 int8 decode (67 % of its bytes' roofline); in a standalone
   loop over 229 MB of codes the int16 form took 19.8 ms against 30.5 (the read of those bytes: 15.6).

   The sums are integers and exact: a lane adds K / 16 products of at most 16383 * 127, under 2^31 for K up
   to RTW_DPWSSD_MAX_K, and the lanes meet in int64. y = sum * step * scale, in double, rounded once. So a
   row gives the same bits alone or beside other rows, whatever the blocking. The quantization is as
   precise as bf16's rounding for a row's largest values (2^-14 of the largest against 2^-8 of each) and
   coarser for values far below them: the products' error is bf16's order. Rows with a NaN or an
   infinity go to the bf16 path, which keeps them. */

#define RTW_DPWSSD_MAX_K 16384
#define RTW_DPWSSD_LEVELS 16383.0f

/* Rows of x as int16 at this thread's buffer (*q, [R, K]) with their steps (*steps, [R]); -1 where a row is
   not finite or the buffer cannot grow. K a multiple of 16. */
static int rows_to_i16(const float *x, int64_t R, int64_t ldx, int64_t K, const int16_t **q, const double **steps) {
    static __thread int16_t *buffer = NULL;
    static __thread double *row_steps = NULL;
    static __thread int64_t capacity = 0, step_capacity = 0;
    if (R * K > capacity) {
        int16_t *grown = realloc(buffer, sizeof(int16_t) * R * K);
        if (grown == NULL) return -1;
        buffer = grown;
        capacity = R * K;
    }
    if (R > step_capacity) {
        double *grown = realloc(row_steps, sizeof(double) * R);
        if (grown == NULL) return -1;
        row_steps = grown;
        step_capacity = R;
    }
    for (int64_t r = 0; r < R; r++) {
        const float *xr = x + r * ldx;
        const __m512i exponent = _mm512_set1_epi32(0x7f800000);
        __m512 top = _mm512_setzero_ps();
        __mmask16 special = 0;
        for (int64_t k = 0; k < K; k += 16) {
            const __m512 v = _mm512_loadu_ps(xr + k);
            /* NaN or infinity: every exponent bit set (read from the bits: the build's -ffast-math assumes
               floats finite). */
            special |= _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(v), exponent), exponent);
            top = _mm512_max_ps(top, _mm512_abs_ps(v));
        }
        if (special) return -1;
        const float largest = _mm512_reduce_max_ps(top);
        /* Divided in double and rounded to float once, the same float whatever -ffast-math makes of a
           float division (a reciprocal may differ in its last bit). */
        const float inverse = largest > 0.0f ? (float)((double)RTW_DPWSSD_LEVELS / (double)largest) : 0.0f;
        row_steps[r] = largest > 0.0f ? (double)largest / RTW_DPWSSD_LEVELS : 0.0;
        const __m512 scale = _mm512_set1_ps(inverse);
        for (int64_t k = 0; k < K; k += 16) {
            const __m512i ints = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr + k), scale));
            _mm256_storeu_si256((__m256i *)(buffer + r * K + k), _mm512_cvtsepi32_epi16(ints));
        }
    }
    *q = buffer;
    *steps = row_steps;
    return 0;
}

/* 32 codes from p as int16. */
static inline __m512i load32_codes_i16(const int8_t *p) {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)p));
}

/* The exact sum of v's 16 int32 lanes. */
static inline int64_t sum_i32_lanes(__m512i v) {
    return _mm512_reduce_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(v))) +
           _mm512_reduce_add_epi64(_mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1)));
}

/* One code row against every row of xq, for the code rows past the blocks of four. */
static void codes_dpwssd_row(const int16_t *xq, const double *steps, int64_t R, const int8_t *w, double scale,
                             int64_t K, float *y, int64_t ldy) {
    for (int64_t r = 0; r < R; r++) {
        __m512i acc = _mm512_setzero_si512();
        for (int64_t k = 0; k < K; k += 32)
            acc = _mm512_dpwssd_epi32(acc, load32_codes_i16(w + k), _mm512_loadu_si512(xq + r * K + k));
        y[r * ldy] = (float)((double)sum_i32_lanes(acc) * steps[r] * scale);
    }
}

/* y = (x codes^T) * scale for int8 codes [N, K] (K a multiple of 32, at most RTW_DPWSSD_MAX_K), the blocking of
   rows_times_weight_dpbf16.h: four code rows against two rows of x (eight accumulators), the next four code
   rows prefetched during the first pass. Returns 0, or -1 (nothing written) where rows_to_i16 refuses x. */
static int rows_times_codes_dpwssd(const float *x, int64_t R, int64_t ldx, const int8_t *codes, const float *scale,
                                   int64_t N, int64_t K, float *y, int64_t ldy) {
    const int16_t *xq;
    const double *steps;
    if (rows_to_i16(x, R, ldx, K, &xq, &steps) != 0) return -1;
    int64_t n0 = 0;
    for (; n0 + 4 <= N; n0 += 4) {
        const int8_t *w[4] = {codes + n0 * K, codes + (n0 + 1) * K, codes + (n0 + 2) * K, codes + (n0 + 3) * K};
        const int prefetch = n0 + 8 <= N;
        for (int64_t r = 0; r < R; r += 2) {
            const int pair = r + 1 < R;
            const int16_t *xa = xq + r * K, *xc = pair ? xa + K : xa;
            __m512i acc[8];
            for (int j = 0; j < 8; j++) acc[j] = _mm512_setzero_si512();
            if (pair) {
                for (int64_t k = 0; k < K; k += 32) {
                    if (prefetch && r == 0)
                        for (int j = 0; j < 4; j++) __builtin_prefetch(w[0] + (4 + j) * K + k);
                    const __m512i a = _mm512_loadu_si512(xa + k), b = _mm512_loadu_si512(xc + k);
                    for (int j = 0; j < 4; j++) {
                        const __m512i c = load32_codes_i16(w[j] + k);
                        acc[j] = _mm512_dpwssd_epi32(acc[j], c, a);
                        acc[4 + j] = _mm512_dpwssd_epi32(acc[4 + j], c, b);
                    }
                }
            } else {
                for (int64_t k = 0; k < K; k += 32) {
                    if (prefetch && r == 0)
                        for (int j = 0; j < 4; j++) __builtin_prefetch(w[0] + (4 + j) * K + k);
                    const __m512i a = _mm512_loadu_si512(xa + k);
                    for (int j = 0; j < 4; j++) acc[j] = _mm512_dpwssd_epi32(acc[j], load32_codes_i16(w[j] + k), a);
                }
            }
            for (int j = 0; j < 4; j++) {
                y[r * ldy + n0 + j] = (float)((double)sum_i32_lanes(acc[j]) * steps[r] * scale[n0 + j]);
                if (pair)
                    y[(r + 1) * ldy + n0 + j] =
                        (float)((double)sum_i32_lanes(acc[4 + j]) * steps[r + 1] * scale[n0 + j]);
            }
        }
    }
    for (int64_t n = n0; n < N; n++) codes_dpwssd_row(xq, steps, R, codes + n * K, scale[n], K, y + n, ldy);
    return 0;
}
