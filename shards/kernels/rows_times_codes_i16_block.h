/* The loops of an int16 dot product of int8 codes against rows of x quantized to 15 bits (rows_to_i16.h),
   written once for both: rows_times_codes_dpwssd.h (VNNI, 512 bits) and rows_times_codes_maddwd.h (AVX2,
   256 bits) each include this file once, after defining
     RTI_NAME            the function's name
     RTI_VEC             the integer vector type
     RTI_CODES           the codes (and int16 values of x) one vector holds
     RTI_ZERO()          a vector of zeros
     RTI_LOAD_X(p)       RTI_CODES int16 values of x from p
     RTI_LOAD_C(p)       RTI_CODES int8 codes from p, sign-extended to int16
     RTI_DOT(acc, c, a)  acc plus the sums of adjacent pairs of c * a, in int32 lanes
     RTI_SUM(v)          the exact sum of v's int32 lanes, as int64
   and undefines them at its end.

   y = (x codes^T) * scale for int8 codes [N, K] (K a multiple of RTI_CODES, small enough that no lane's
   sum passes 2^31): four code rows a quarter of the codes apart against two rows of x (eight accumulators);
   the code rows past the blocks of four one at a time.
   Returns 0, or -1 (nothing written) where rows_to_i16 refuses x. y = sum * step * scale, in double,
   rounded once: a row gives the same bits alone or beside other rows, whatever the blocking. */

static int RTI_NAME(const float *x, int64_t R, int64_t ldx, const int8_t *codes, const float *scale, int64_t N,
                    int64_t K, float *y, int64_t ldy) {
    const int16_t *xq;
    const double *steps;
    if (rows_to_i16(x, R, ldx, K, &xq, &steps) != 0) return -1;
    /* Block n holds code rows n, n + Q, n + 2Q and n + 3Q: four streams read in order (as
       rows_times_weight_block.h's, which says why). */
    const int64_t Q = N / 4;
    for (int64_t n = 0; n < Q; n++) {
        const int8_t *w[4] = {codes + n * K, codes + (n + Q) * K, codes + (n + 2 * Q) * K, codes + (n + 3 * Q) * K};
        for (int64_t r = 0; r < R; r += 2) {
            const int pair = r + 1 < R;
            const int16_t *xa = xq + r * K, *xc = pair ? xa + K : xa;
            RTI_VEC acc[8];
            for (int j = 0; j < 8; j++) acc[j] = RTI_ZERO();
            if (pair) {
                for (int64_t k = 0; k < K; k += RTI_CODES) {
                    RTI_VEC a = RTI_LOAD_X(xa + k), b = RTI_LOAD_X(xc + k);
                    __asm__("" : "+v"(a), "+v"(b)); /* in registers, not reloaded by each RTI_DOT */
                    for (int j = 0; j < 4; j++) {
                        const RTI_VEC c = RTI_LOAD_C(w[j] + k);
                        acc[j] = RTI_DOT(acc[j], c, a);
                        acc[4 + j] = RTI_DOT(acc[4 + j], c, b);
                    }
                }
            } else {
                for (int64_t k = 0; k < K; k += RTI_CODES) {
                    const RTI_VEC a = RTI_LOAD_X(xa + k);
                    for (int j = 0; j < 4; j++) acc[j] = RTI_DOT(acc[j], RTI_LOAD_C(w[j] + k), a);
                }
            }
            for (int j = 0; j < 4; j++) {
                const int64_t row = n + j * Q;
                y[r * ldy + row] = (float)((double)RTI_SUM(acc[j]) * steps[r] * scale[row]);
                if (pair) y[(r + 1) * ldy + row] = (float)((double)RTI_SUM(acc[4 + j]) * steps[r + 1] * scale[row]);
            }
        }
    }
    for (int64_t n = 4 * Q; n < N; n++) {
        const int8_t *w = codes + n * K;
        for (int64_t r = 0; r < R; r++) {
            RTI_VEC acc = RTI_ZERO();
            for (int64_t k = 0; k < K; k += RTI_CODES)
                acc = RTI_DOT(acc, RTI_LOAD_C(w + k), RTI_LOAD_X(xq + r * K + k));
            y[r * ldy + n] = (float)((double)RTI_SUM(acc) * steps[r] * scale[n]);
        }
    }
    return 0;
}

#undef RTI_NAME
#undef RTI_VEC
#undef RTI_CODES
#undef RTI_ZERO
#undef RTI_LOAD_X
#undef RTI_LOAD_C
#undef RTI_DOT
#undef RTI_SUM
