/* The vector loop of rows_times_weight, written once for both vector widths: rows_times_weight.h
   includes this file for each vector width and weight type, after defining
     RTW_NAME            the function's name
     RTW_VEC, RTW_FLOATS the vector type and its floats
     RTW_ZERO(), RTW_LOAD(p), RTW_FMA(a, b, c)
     RTW_FOLD(v)         the vector folded to 8 lanes (__m256) by adding its halves
     RTW_WEIGHT          the weight's element type (float, uint16_t for bf16, int8_t for int8 codes)
     RTW_LOAD_W(p)       RTW_FLOATS weights from p as floats
   and undefines RTW_NAME, RTW_WEIGHT and RTW_LOAD_W at its end (the width's macros serve every
   weight type). The function runs the four-weight-row blocks (K a multiple of
   RTW_FLOATS) and returns the first weight row it left to the scalar tail; with `scale` (int8 codes)
   each weight row's dot products are multiplied by its scale. */

static int64_t RTW_NAME(const float *x, int64_t R, int64_t ldx, const RTW_WEIGHT *W, const float *scale, int64_t N,
                        int64_t K, float *y, int64_t ldy) {
    int64_t n0 = 0;
    for (; n0 + 4 <= N; n0 += 4) {
        const RTW_WEIGHT *w0 = W + n0 * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
        /* the four rows' scales in lanes 0-3 and again in 4-7, matching reduce8's two rows of x */
        const __m256 scales = scale ? _mm256_broadcast_ps((const __m128 *)(scale + n0)) : _mm256_set1_ps(1.0f);
        /* The next four weight rows are prefetched during the first pass over these, each line beside
           the one being read. A burst of all their lines at the block's start (up to 224 prefetches
           for int8 rows of 3584) was slower: a batch-1 int8 decode step of the 0.8B shape took ~12 %
           longer, bf16 ~4 %, on one rank (AMD EPYC). */
        const int prefetch = n0 + 8 <= N;
        int64_t r = 0;
        for (; r + 2 <= R; r += 2) {
            const float *xa = x + r * ldx, *xb = xa + ldx;
            RTW_VEC acc[8];
            for (int j = 0; j < 8; j++) acc[j] = RTW_ZERO();
            for (int64_t k = 0; k < K; k += RTW_FLOATS) {
                if (prefetch && r == 0) PREFETCH_NEXT_ROWS(w0, k, K);
                const RTW_VEC a = RTW_LOAD(xa + k), b = RTW_LOAD(xb + k);
                RTW_VEC w = RTW_LOAD_W(w0 + k);
                acc[0] = RTW_FMA(w, a, acc[0]);
                acc[4] = RTW_FMA(w, b, acc[4]);
                w = RTW_LOAD_W(w1 + k);
                acc[1] = RTW_FMA(w, a, acc[1]);
                acc[5] = RTW_FMA(w, b, acc[5]);
                w = RTW_LOAD_W(w2 + k);
                acc[2] = RTW_FMA(w, a, acc[2]);
                acc[6] = RTW_FMA(w, b, acc[6]);
                w = RTW_LOAD_W(w3 + k);
                acc[3] = RTW_FMA(w, a, acc[3]);
                acc[7] = RTW_FMA(w, b, acc[7]);
            }
            __m256 folded[8];
            for (int j = 0; j < 8; j++) folded[j] = RTW_FOLD(acc[j]);
            /* lanes 0-3: row r, weight rows n0..n0+3; 4-7: row r+1 */
            const __m256 sums = _mm256_mul_ps(reduce8(folded), scales);
            _mm_storeu_ps(y + r * ldy + n0, _mm256_castps256_ps128(sums));
            _mm_storeu_ps(y + (r + 1) * ldy + n0, _mm256_extractf128_ps(sums, 1));
        }
        if (r < R) {
            const float *xa = x + r * ldx;
            RTW_VEC a0 = RTW_ZERO(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t k = 0; k < K; k += RTW_FLOATS) {
                if (prefetch && r == 0) PREFETCH_NEXT_ROWS(w0, k, K);
                const RTW_VEC a = RTW_LOAD(xa + k);
                a0 = RTW_FMA(RTW_LOAD_W(w0 + k), a, a0);
                a1 = RTW_FMA(RTW_LOAD_W(w1 + k), a, a1);
                a2 = RTW_FMA(RTW_LOAD_W(w2 + k), a, a2);
                a3 = RTW_FMA(RTW_LOAD_W(w3 + k), a, a3);
            }
            const __m256 h0 = RTW_FOLD(a0), h1 = RTW_FOLD(a1), h2 = RTW_FOLD(a2), h3 = RTW_FOLD(a3);
            const __m256 folded[8] = {h0, h1, h2, h3, h0, h1, h2, h3};
            _mm_storeu_ps(y + r * ldy + n0, _mm256_castps256_ps128(_mm256_mul_ps(reduce8(folded), scales)));
        }
    }
    return n0;
}

#undef RTW_NAME
#undef RTW_WEIGHT
#undef RTW_LOAD_W
