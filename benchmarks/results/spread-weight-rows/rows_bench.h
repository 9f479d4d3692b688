/* What rows.c and ../rows-in-registers/gemm.c share: a clock, a pool of `count` weight matrices of one type
   filled with the same values, x and the int8 rows' scales, and a hash of y's bits (to compare two builds
   of the kernel headers). Include after rows_times_weight.h. */

#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* `count` matrices of `matrix` bytes each, of weight type `type`, 64-byte aligned. */
static char *weight_pool(int type, int64_t count, int64_t matrix) {
    char *pool = aligned_alloc(64, count * matrix);
    for (int64_t i = 0; i < count * matrix / element_bytes(type); i++) {
        const float value = (float)((i * 7919) % 1000) * 1e-3f - 0.5f;
        if (type == ELEMENT_F32) ((float *)pool)[i] = value;
        if (type == ELEMENT_BF16) ((uint16_t *)pool)[i] = float_to_bf16(value);
        if (type == ELEMENT_I8) ((int8_t *)pool)[i] = (int8_t)((i * 7919) % 61 - 30);
    }
    return pool;
}

/* x [R, K] and scale [N] filled. */
static void fill_rows(float *x, int64_t R, int64_t K, float *scale, int64_t N) {
    for (int64_t i = 0; i < R * K; i++) x[i] = 0.001f * (float)(i % 977) - 0.3f;
    for (int64_t n = 0; n < N; n++) scale[n] = 0.01f + 1e-5f * (float)n;
}

/* A hash of the bits of y [n]. */
static unsigned bits_hash(const float *y, int64_t n) {
    unsigned hash = 0;
    for (int64_t i = 0; i < n; i++) {
        unsigned bits;
        memcpy(&bits, &y[i], sizeof bits);
        hash = hash * 31u + bits;
    }
    return hash;
}
