/* The block function of bf16's dot product (vdpbf16ps), written once for bf16 weights and for int8 codes
   made bf16 in registers: rows_times_weight.h includes this file for each, after defining
     DPB_NAME, DPB_ROW_NAME  the block function's and the leftover rows' function's names
     DPB_WEIGHT              the weight's element type (uint16_t for bf16, int8_t for int8 codes)
     DPB_LOAD_W(p)           32 weights from p as a __m512bh
   and undefines them at its end. A row of x takes the same sums whatever the other rows, and a weight
   vector the same bf16 values whichever instance loads it, so bf16 codes staged in a buffer and codes
   made bf16 in registers give the same bits. */

/* One weight row's dot products with every row of xb (bf16, [R, K]), times its scale if any, for the
   weight rows past the blocks of four. */
static void DPB_ROW_NAME(const uint16_t *xb, int64_t R, const DPB_WEIGHT *w, const float *scale, int64_t K, float *y,
                         int64_t ldy) {
    for (int64_t r = 0; r < R; r++) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 32) acc = _mm512_dpbf16_ps(acc, LOAD_BH(xb + r * K + k), DPB_LOAD_W(w + k));
        y[r * ldy] = scale != NULL ? _mm512_reduce_add_ps(acc) * *scale : _mm512_reduce_add_ps(acc);
    }
}

/* y = (xb W^T) * scale (no scaling where scale is NULL) for K a multiple of 32: four adjacent weight rows
   against two rows of x (eight accumulators), the next four weight rows prefetched during the first pass.
   Every weight row. (rows_times_weight_block.h takes its four rows a quarter of W apart instead, measured
   on an AVX2 EPYC; this loop runs only on CPUs with avx512_bf16, where that is not measured.) */
static void DPB_NAME(const uint16_t *xb, int64_t R, const DPB_WEIGHT *W, const float *scale, int64_t N, int64_t K,
                     float *y, int64_t ldy) {
    int64_t n0 = 0;
    for (; n0 + 4 <= N; n0 += 4) {
        const DPB_WEIGHT *w0 = W + n0 * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
        const __m256 scales = scale ? _mm256_broadcast_ps((const __m128 *)(scale + n0)) : _mm256_set1_ps(1.0f);
        const int prefetch = n0 + 8 <= N;
        int64_t r = 0;
        for (; r + 2 <= R; r += 2) {
            const uint16_t *xa = xb + r * K, *xc = xa + K;
            __m512 acc[8];
            for (int j = 0; j < 8; j++) acc[j] = _mm512_setzero_ps();
            for (int64_t k = 0; k < K; k += 32) {
                if (prefetch && r == 0)
                    for (int j = 0; j < 4; j++) __builtin_prefetch(w0 + (4 + j) * K + k);
                const __m512bh a = LOAD_BH(xa + k), b = LOAD_BH(xc + k);
                __m512bh w = DPB_LOAD_W(w0 + k);
                acc[0] = _mm512_dpbf16_ps(acc[0], w, a);
                acc[4] = _mm512_dpbf16_ps(acc[4], w, b);
                w = DPB_LOAD_W(w1 + k);
                acc[1] = _mm512_dpbf16_ps(acc[1], w, a);
                acc[5] = _mm512_dpbf16_ps(acc[5], w, b);
                w = DPB_LOAD_W(w2 + k);
                acc[2] = _mm512_dpbf16_ps(acc[2], w, a);
                acc[6] = _mm512_dpbf16_ps(acc[6], w, b);
                w = DPB_LOAD_W(w3 + k);
                acc[3] = _mm512_dpbf16_ps(acc[3], w, a);
                acc[7] = _mm512_dpbf16_ps(acc[7], w, b);
            }
            __m256 folded[8];
            for (int j = 0; j < 8; j++) folded[j] = fold512(acc[j]);
            /* lanes 0-3: row r, weight rows n0..n0+3; 4-7: row r+1 */
            const __m256 sums = scale ? _mm256_mul_ps(reduce8(folded), scales) : reduce8(folded);
            _mm_storeu_ps(y + r * ldy + n0, _mm256_castps256_ps128(sums));
            _mm_storeu_ps(y + (r + 1) * ldy + n0, _mm256_extractf128_ps(sums, 1));
        }
        if (r < R) {
            const uint16_t *xa = xb + r * K;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t k = 0; k < K; k += 32) {
                if (prefetch && r == 0)
                    for (int j = 0; j < 4; j++) __builtin_prefetch(w0 + (4 + j) * K + k);
                const __m512bh a = LOAD_BH(xa + k);
                a0 = _mm512_dpbf16_ps(a0, DPB_LOAD_W(w0 + k), a);
                a1 = _mm512_dpbf16_ps(a1, DPB_LOAD_W(w1 + k), a);
                a2 = _mm512_dpbf16_ps(a2, DPB_LOAD_W(w2 + k), a);
                a3 = _mm512_dpbf16_ps(a3, DPB_LOAD_W(w3 + k), a);
            }
            const __m256 h0 = fold512(a0), h1 = fold512(a1), h2 = fold512(a2), h3 = fold512(a3);
            const __m256 folded[8] = {h0, h1, h2, h3, h0, h1, h2, h3};
            const __m256 sums = scale ? _mm256_mul_ps(reduce8(folded), scales) : reduce8(folded);
            _mm_storeu_ps(y + r * ldy + n0, _mm256_castps256_ps128(sums));
        }
    }
    for (int64_t n = n0; n < N; n++) DPB_ROW_NAME(xb, R, W + n * K, scale ? scale + n : NULL, K, y + n, ldy);
}

#undef DPB_NAME
#undef DPB_ROW_NAME
#undef DPB_WEIGHT
#undef DPB_LOAD_W
