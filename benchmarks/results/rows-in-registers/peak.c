/* The core's FMA rate: twelve independent chains of 8-float FMAs, no loads. cc -O2 -march=native peak.c;
   96.9-101.6 GFLOP/s on the Zen 3 EPYC (about 3.1 GHz x 2 FMA units x 16 flops). */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(void) {
    __m256 a[12];
    for (int i = 0; i < 12; i++) a[i] = _mm256_set1_ps(i * 0.001f);
    const __m256 b = _mm256_set1_ps(0.9999f), c = _mm256_set1_ps(0.0001f);
    double best = 1e9;
    for (int pass = 0; pass < 5; pass++) {
        double t = now();
        for (long it = 0; it < 100000000; it++) {
#pragma GCC unroll 12
            for (int i = 0; i < 12; i++) a[i] = _mm256_fmadd_ps(a[i], b, c);
        }
        t = now() - t;
        if (t < best) best = t;
    }
    float s = 0;
    for (int i = 0; i < 12; i++) s += a[i][0];
    printf("%.1f GFLOP/s (%f)\n", 1e8 * 12 * 16 / best / 1e9, s);
    return 0;
}
