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
    /* Each block holds weight rows n, n + Q, n + 2Q and n + 3Q: four streams a quarter of W apart, each read
       in order from start to end, which the hardware prefetchers follow. Four adjacent rows (one stream
       jumping between four short runs, the next four prefetched in software) read fp32 weights out of
       memory at 10-13 GB/s on one core of an AVX2 EPYC for one row of x and rows of 1 KiB, 18 GB/s for
       rows of 4 KiB; a quarter of W apart 22-27 and 22 GB/s, and software prefetches on top slowed it
       (benchmarks/results/spread-weight-rows). Which rows share a block does not change a row's bits.
       The AVX-512 builds run this loop too, not measured there. */
    const int64_t Q = N / 4;
    for (int64_t n = 0; n < Q; n++) {
        const RTW_WEIGHT *w0 = W + n * K, *w1 = w0 + Q * K, *w2 = w1 + Q * K, *w3 = w2 + Q * K;
        /* the four rows' scales in lanes 0-3 and again in 4-7, matching reduce8's two rows of x */
        const __m256 scales = scale ? _mm256_setr_ps(scale[n], scale[n + Q], scale[n + 2 * Q], scale[n + 3 * Q],
                                                     scale[n], scale[n + Q], scale[n + 2 * Q], scale[n + 3 * Q])
                                    : _mm256_set1_ps(1.0f);
        float sums[8];
        int64_t r = 0;
        for (; r + 2 <= R; r += 2) {
            const float *xa = x + r * ldx, *xb = xa + ldx;
            RTW_VEC acc[8];
            for (int j = 0; j < 8; j++) acc[j] = RTW_ZERO();
            for (int64_t k = 0; k < K; k += RTW_FLOATS) {
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
            /* lanes 0-3: row r, the block's weight rows in order; 4-7: row r+1 */
            _mm256_storeu_ps(sums, _mm256_mul_ps(reduce8(folded), scales));
            for (int j = 0; j < 4; j++) {
                y[r * ldy + n + j * Q] = sums[j];
                y[(r + 1) * ldy + n + j * Q] = sums[4 + j];
            }
        }
        if (r < R) {
            const float *xa = x + r * ldx;
            RTW_VEC a0 = RTW_ZERO(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t k = 0; k < K; k += RTW_FLOATS) {
                const RTW_VEC a = RTW_LOAD(xa + k);
                a0 = RTW_FMA(RTW_LOAD_W(w0 + k), a, a0);
                a1 = RTW_FMA(RTW_LOAD_W(w1 + k), a, a1);
                a2 = RTW_FMA(RTW_LOAD_W(w2 + k), a, a2);
                a3 = RTW_FMA(RTW_LOAD_W(w3 + k), a, a3);
            }
            const __m256 h0 = RTW_FOLD(a0), h1 = RTW_FOLD(a1), h2 = RTW_FOLD(a2), h3 = RTW_FOLD(a3);
            const __m256 folded[8] = {h0, h1, h2, h3, h0, h1, h2, h3};
            _mm256_storeu_ps(sums, _mm256_mul_ps(reduce8(folded), scales));
            for (int j = 0; j < 4; j++) y[r * ldy + n + j * Q] = sums[j];
        }
    }
    return 4 * Q;
}

#undef RTW_NAME
#undef RTW_WEIGHT
#undef RTW_LOAD_W
