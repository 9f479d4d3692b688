/* The vector loop of rows_times_weight, written once for both vector widths: rows_times_weight.h
   includes this file for each vector width and weight type, after defining
     RTW_NAME            the function's name
     RTW_ROWS            the name of its inlined helper (a few rows of x against one block)
     RTW_VEC, RTW_FLOATS the vector type and its floats
     RTW_ZERO(), RTW_LOAD(p), RTW_FMA(a, b, c)
     RTW_FOLD(v)         the vector folded to 8 lanes (__m256) by adding its halves
     RTW_WEIGHT          the weight's element type (float, uint16_t for bf16, int8_t for int8 codes)
     RTW_LOAD_W(p)       RTW_FLOATS weights from p as floats
   and undefines RTW_NAME, RTW_ROWS, RTW_WEIGHT and RTW_LOAD_W at its end (the width's macros serve every
   weight type). The function runs the four-weight-row blocks (K a multiple of
   RTW_FLOATS) and returns the first weight row it left to the scalar tail; with `scale` (int8 codes)
   each weight row's dot products are multiplied by its scale. */

/* Rows x[0 .. rows) (stride ldx; rows 1, 2 or 3, a constant where this is inlined) against the four weight
   rows w[0..3]: rows * 4 accumulators, each x vector and each weight vector loaded once an iteration into a
   register (the empty asm keeps the compiler from folding them into the FMAs as memory operands, which
   loaded x, or the weights, once per FMA: 10-12 loads per 8 FMAs, where the loop waited on its loads at
   about half the FMA rate of one core in L1; a lone row is left to the compiler, each of its loads used
   once either way). y[i * ldy + j * Q] takes row i's dot with w[j], scaled:
   every dot product summed lane by lane and folded by reduce8, the same bits whatever `rows` is. */
static inline __attribute__((always_inline)) void RTW_ROWS(const float *x, int64_t ldx, int rows,
                                                           const RTW_WEIGHT *const w[4], int64_t K, __m256 scales,
                                                           float *y, int64_t ldy, int64_t Q) {
    RTW_VEC acc[12];
    for (int j = 0; j < 4 * rows; j++) acc[j] = RTW_ZERO();
    for (int64_t k = 0; k < K; k += RTW_FLOATS) {
        RTW_VEC xv[3];
        for (int i = 0; i < rows; i++) {
            xv[i] = RTW_LOAD(x + i * ldx + k);
            if (rows > 1) __asm__("" : "+v"(xv[i]));
        }
        for (int j = 0; j < 4; j++) {
            RTW_VEC wv = RTW_LOAD_W(w[j] + k);
            if (rows > 1) __asm__("" : "+v"(wv));
            for (int i = 0; i < rows; i++) acc[4 * i + j] = RTW_FMA(wv, xv[i], acc[4 * i + j]);
        }
    }
    float sums[8];
    for (int i = 0; i < rows; i += 2) {
        const int pair = i + 1 < rows;
        __m256 folded[8];
        for (int j = 0; j < 4; j++) {
            folded[j] = RTW_FOLD(acc[4 * i + j]);
            folded[4 + j] = pair ? RTW_FOLD(acc[4 * (i + 1) + j]) : folded[j];
        }
        /* lanes 0-3: row i, the block's weight rows in order; 4-7: row i + 1 */
        _mm256_storeu_ps(sums, _mm256_mul_ps(reduce8(folded), scales));
        for (int j = 0; j < 4; j++) {
            y[i * ldy + j * Q] = sums[j];
            if (pair) y[(i + 1) * ldy + j * Q] = sums[4 + j];
        }
    }
}

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
        const RTW_WEIGHT *const w[4] = {W + n * K, W + (n + Q) * K, W + (n + 2 * Q) * K, W + (n + 3 * Q) * K};
        /* the four rows' scales in lanes 0-3 and again in 4-7, matching reduce8's two rows of x */
        const __m256 scales = scale ? _mm256_setr_ps(scale[n], scale[n + Q], scale[n + 2 * Q], scale[n + 3 * Q],
                                                     scale[n], scale[n + Q], scale[n + 2 * Q], scale[n + 3 * Q])
                                    : _mm256_set1_ps(1.0f);
        /* Three rows of x at a time (12 accumulators: 7 loads per 12 FMAs), two where three would leave
           one row alone (one row's four chains wait on the FMA's latency), the last row alone. */
        int64_t r = 0;
        for (; R - r >= 5 || R - r == 3; r += 3) RTW_ROWS(x + r * ldx, ldx, 3, w, K, scales, y + r * ldy + n, ldy, Q);
        for (; R - r >= 2; r += 2) RTW_ROWS(x + r * ldx, ldx, 2, w, K, scales, y + r * ldy + n, ldy, Q);
        if (r < R) RTW_ROWS(x + r * ldx, ldx, 1, w, K, scales, y + r * ldy + n, ldy, Q);
    }
    return 4 * Q;
}

#undef RTW_NAME
#undef RTW_ROWS
#undef RTW_WEIGHT
#undef RTW_LOAD_W
