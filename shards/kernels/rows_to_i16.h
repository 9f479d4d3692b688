/* Rows of x quantized to 15-bit integers for int8 codes' int16 dot products (a bf16 model's int8 weights):
   shared by rows_times_codes_dpwssd.h (AVX512_VNNI) and rows_times_codes_maddwd.h (AVX2), so that both
   builds meet the same integers and a row gives the same bits on either. Included by those headers.

   Each row of x is quantized once a call with a step of its own, max |x| / 16383 (x / step rounded to
   nearest even, the rounding mode's default). Plain C: it reads R x K floats once, against the products'
   R x K x N. */

#ifndef MIXSERVE_ROWS_TO_I16_H
#define MIXSERVE_ROWS_TO_I16_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define RTW_I16_LEVELS 16383.0f

/* Rows of x as int16 at this thread's buffer (*q, [R, K]) with their steps (*steps, [R]); -1 where a row is
   not finite or the buffer cannot grow. */
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
        float largest = 0.0f;
        uint32_t special = 0;
        for (int64_t k = 0; k < K; k++) {
            /* NaN or infinity: every exponent bit set (read from the bits: the build's -ffast-math assumes
               floats finite). */
            uint32_t bits;
            memcpy(&bits, xr + k, sizeof bits);
            special |= (bits & 0x7f800000u) == 0x7f800000u;
            largest = fmaxf(largest, fabsf(xr[k]));
        }
        if (special) return -1;
        /* Divided in double and rounded to float once, the same float whatever -ffast-math makes of a
           float division (a reciprocal may differ in its last bit). */
        const float inverse = largest > 0.0f ? (float)((double)RTW_I16_LEVELS / (double)largest) : 0.0f;
        row_steps[r] = largest > 0.0f ? (double)largest / RTW_I16_LEVELS : 0.0;
        int16_t *out = buffer + r * K;
        for (int64_t k = 0; k < K; k++) out[k] = (int16_t)lrintf(xr[k] * inverse);
    }
    *q = buffer;
    *steps = row_steps;
    return 0;
}

#endif
