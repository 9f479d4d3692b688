/* rows_times_weight: y = x W^T for a few rows x against a row-major weight W, each weight row read
   once from memory and reused from L1 for every row of x. Shared by moe.c, linear.c and
   decoder_layer.c.

   W is fp32, bf16 or int8 (ELEMENT_F32 / ELEMENT_BF16 / ELEMENT_I8, element_type.h); x, y and the
   accumulation are fp32 in every case. A bf16 weight meets x rounded to bf16 in the CPU's bf16 dot
   product where the build has AVX512_BF16 and K is a multiple of 32 (rows_times_weight_dpbf16 below:
   out of cache no faster, it waits on memory, but about twice the products a second in cache; with AMX,
   products of 1 MiB of weights and more, K 512 and more, in its tiles: rows_times_weight_amx.h);
   otherwise it becomes fp32 (its 16 bits shifted into the high half of a float, exact) against fp32 x:
   in registers, or from STAGED_ROWS rows of x once per block of four weight rows, in a buffer the fp32
   loop reads (from 64 rows 1.05-1.2x faster on an AVX2 EPYC, where the widening bounds the loop). Either
   way a row of x gives the same bits alone or beside other rows. An int8 code becomes fp32 the same way
   (sign-extended, converted: exact; staged too), and each weight row's dot product is multiplied by its
   scale at the end, so the result is x's dot with the dequantized row up to fp32 rounding; activations
   are not quantized (a loop over activations quantized to int16 with VNNI's vpdpwssd, half the
   instructions per weight, was no faster for one row streaming int8 weights from memory here: the loads
   are what it waits on). In a bf16 model (kernel_set_int8_bf16_activations),
   with AVX512_BF16 and K a multiple of 32, int8 codes become bf16 instead (exact too) and meet x rounded
   to bf16 in the dot product, as bf16 weights do (rows_times_codes_dpbf16): from 3 rows the codes are
   made bf16 once per block rather than once per pair of rows (at 32 rows of a 3584 x 1024 weight, half
   the time of widening to fp32). With AVX512_VNNI a bf16 model's codes meet x quantized to 15 bits in
   the int16 dot product instead (rows_times_codes_dpwssd.h: one sign extension per 32 codes; on the AMX
   Xeon, whose memory is slower than the EPYC's, the five conversions to bf16 bounded a batch-1 step), and
   without AVX-512 in AVX2's int16 multiply-add (rows_times_codes_maddwd.h), the same integers. */

#ifndef MIXSERVE_ROWS_TIMES_WEIGHT_H
#define MIXSERVE_ROWS_TIMES_WEIGHT_H

#include <stdint.h>
#include <stdlib.h>

#include "element_type.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_AVX2 1
#endif
#if defined(HAVE_AVX2) && defined(__AVX512F__)
#define HAVE_AVX512 1
#endif

#ifdef HAVE_AVX2
/* Lane j of the result: the sum of the 8 lanes of v[j]. */
static inline __m256 reduce8(const __m256 v[8]) {
    const __m256 s01 = _mm256_hadd_ps(v[0], v[1]), s23 = _mm256_hadd_ps(v[2], v[3]);
    const __m256 s45 = _mm256_hadd_ps(v[4], v[5]), s67 = _mm256_hadd_ps(v[6], v[7]);
    const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
    return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

static inline __m256 load8_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

static inline __m256 load8_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

#define RTW_VEC __m256
#define RTW_FLOATS 8
#define RTW_ZERO _mm256_setzero_ps
#define RTW_LOAD _mm256_loadu_ps
#define RTW_FMA _mm256_fmadd_ps
#define RTW_FOLD(v) (v)
#define RTW_NAME rows_times_weight_8
#define RTW_ROWS rows_times_weight_8_rows
#define RTW_WEIGHT float
#define RTW_LOAD_W _mm256_loadu_ps
#include "rows_times_weight_block.h"
#define RTW_NAME rows_times_weight_8_bf16
#define RTW_ROWS rows_times_weight_8_bf16_rows
#define RTW_WEIGHT uint16_t
#define RTW_LOAD_W load8_bf16
#include "rows_times_weight_block.h"
#define RTW_NAME rows_times_weight_8_i8
#define RTW_ROWS rows_times_weight_8_i8_rows
#define RTW_WEIGHT int8_t
#define RTW_LOAD_W load8_i8
#include "rows_times_weight_block.h"
#undef RTW_VEC
#undef RTW_FLOATS
#undef RTW_ZERO
#undef RTW_LOAD
#undef RTW_FMA
#undef RTW_FOLD
#endif

#ifdef HAVE_AVX2
/* From this many rows of x, bf16 weights and int8 codes are widened to fp32 once per block of four weight
   rows, in this thread's buffer, and the fp32 loop reads them there (a code block with its rows' scales),
   instead of widening each weight vector in registers once per group of rows. Widening is exact and the
   fp32 loop takes the same products in the same order, so a row gets the same bits either way. On an AVX2
   EPYC (one thread, in cache; benchmarks/results/rows-in-registers), with rows of x taken three at a time
   and every vector loaded once into a register, bf16 widened in registers ran 2x staging's speed at 8 rows,
   1.0-1.7x at 16-24, level at 32 (0.8-1.2x), and staging led from 48-64 (1.05-1.2x at 64); int8 codes
   were level at 32 and staged led at 64. (With rows of x two at a time and loads folded into the FMAs,
   bf16 had gained from staging from 8 rows.) AVX-512 CPUs without avx512_bf16 take the same threshold, not
   measured there. */
#define STAGED_ROWS 32

typedef int64_t (*fp32_rows_fn)(const float *x, int64_t R, int64_t ldx, const float *W, const float *scale,
                                int64_t N, int64_t K, float *y, int64_t ldy);

/* rows_times_weight's four-row blocks of bf16 or int8 W [N, K] (K a multiple of 8) through `fp32_rows` (the
   fp32 block loop of the build's vector width) over each block widened once; returns the first weight row
   it left to the scalar tail, or 0 where the buffer cannot grow (the caller then widens in registers). */
static int64_t rows_times_staged(fp32_rows_fn fp32_rows, const float *x, int64_t R, int64_t ldx, const void *W,
                                 int weight_type, const float *scale, int64_t N, int64_t K, float *y, int64_t ldy) {
    static __thread float *buffer = NULL;
    static __thread int64_t capacity = 0;
    if (4 * K > capacity) {
        float *grown = realloc(buffer, sizeof(float) * 4 * K);
        if (grown == NULL) return 0;
        buffer = grown;
        capacity = 4 * K;
    }
    const int codes = weight_type == ELEMENT_I8;
    const int64_t line = codes ? 64 : 32; /* elements in a cache line */
    int64_t n0 = 0;
    for (; n0 + 4 <= N; n0 += 4) {
        const int prefetch = n0 + 8 <= N;
        for (int64_t i = 0; i < 4 * K; i += 8) {
            const int64_t at = n0 * K + i;
            if (codes) {
                if (prefetch && i % line == 0) __builtin_prefetch((const int8_t *)W + at + 4 * K);
                _mm256_storeu_ps(buffer + i, load8_i8((const int8_t *)W + at));
            } else {
                if (prefetch && i % line == 0) __builtin_prefetch((const uint16_t *)W + at + 4 * K);
                _mm256_storeu_ps(buffer + i, load8_bf16((const uint16_t *)W + at));
            }
        }
        fp32_rows(x, R, ldx, buffer, codes ? scale + n0 : NULL, 4, K, y + n0, ldy);
    }
    return n0;
}
#endif

#ifdef HAVE_AVX512
/* The 16-float form, where the machine has AVX-512 and K is a multiple of 16: in L2/L3 ~15-20 %
   faster than the 8-float loop at 32 rows of MoE, ~30 % at 16 rows of the LM head; out of cache
   both wait on memory. */
static inline __m256 fold512(__m512 v) {
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

static inline __m512 load16_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline __m512 load16_i8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

#define RTW_VEC __m512
#define RTW_FLOATS 16
#define RTW_ZERO _mm512_setzero_ps
#define RTW_LOAD _mm512_loadu_ps
#define RTW_FMA _mm512_fmadd_ps
#define RTW_FOLD fold512
#define RTW_NAME rows_times_weight_16
#define RTW_ROWS rows_times_weight_16_rows
#define RTW_WEIGHT float
#define RTW_LOAD_W _mm512_loadu_ps
#include "rows_times_weight_block.h"
#define RTW_NAME rows_times_weight_16_bf16
#define RTW_ROWS rows_times_weight_16_bf16_rows
#define RTW_WEIGHT uint16_t
#define RTW_LOAD_W load16_bf16
#include "rows_times_weight_block.h"
#define RTW_NAME rows_times_weight_16_i8
#define RTW_ROWS rows_times_weight_16_i8_rows
#define RTW_WEIGHT int8_t
#define RTW_LOAD_W load16_i8
#include "rows_times_weight_block.h"
#undef RTW_VEC
#undef RTW_FLOATS
#undef RTW_ZERO
#undef RTW_LOAD
#undef RTW_FMA
#undef RTW_FOLD
#endif

#if defined(HAVE_AVX512) && defined(__AVX512BF16__)
#define HAVE_AVX512_BF16 1
/* bf16 weights where the machine has AVX512_BF16's dot product (vdpbf16ps: 32 bf16 products a vector
   into 16 fp32 sums): x's rows are rounded to bf16 once a call (to nearest even, as torch rounds), so
   a weight vector is one instruction instead of a widening, a shift and an FMA per 16. In L1/L2 (the
   demo, a verification step's rows, a batch's decode) that is about twice the products a second; out
   of cache it waits on memory either way. The rounding is what transformers does in bf16, whose
   activations are bf16 tensors going into each matmul; the sums stay fp32. */

/* Row r of x (stride ldx) rounded to bf16 at out + r K, for K a multiple of 16; the buffer is this
   thread's, grown as needed and kept for later calls (NULL if it cannot grow). */
static const uint16_t *rows_to_bf16(const float *x, int64_t R, int64_t ldx, int64_t K) {
    static __thread uint16_t *buffer = NULL;
    static __thread int64_t capacity = 0;
    if (R * K > capacity) {
        uint16_t *grown = realloc(buffer, sizeof(uint16_t) * R * K);
        if (grown == NULL) return NULL;
        buffer = grown;
        capacity = R * K;
    }
    for (int64_t r = 0; r < R; r++)
        for (int64_t k = 0; k < K; k += 16)
            _mm256_storeu_si256((__m256i *)(buffer + r * K + k),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + r * ldx + k)));
    return buffer;
}

#define LOAD_BH(p) ((__m512bh)_mm512_loadu_si512((const void *)(p)))

/* 32 int8 codes from p as bf16 (exact: a code needs 8 significant bits). */
static inline __m512bh load32_codes_as_bf16(const int8_t *p) {
    const __m256i bytes = _mm256_loadu_si256((const __m256i *)p);
    const __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(bytes)));
    const __m512 high = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(bytes, 1)));
    return _mm512_cvtne2ps_pbh(high, low);
}

#define DPB_NAME rows_times_weight_dpbf16
#define DPB_ROW_NAME bf16_dot_row
#define DPB_WEIGHT uint16_t
#define DPB_LOAD_W LOAD_BH
#include "rows_times_weight_dpbf16.h"
#define DPB_NAME rows_times_codes_dpbf16_in_registers
#define DPB_ROW_NAME codes_dot_row
#define DPB_WEIGHT int8_t
#define DPB_LOAD_W load32_codes_as_bf16
#include "rows_times_weight_dpbf16.h"

/* From this many rows of x, int8 codes are made bf16 once per block of four rows, in a buffer, instead of
   in registers once per pair of rows: at one row the buffer's extra pass loses to streaming (a 0.8B
   batch-1 decode step took ~25 % longer), at 32 rows of a 3584 x 1024 weight it halves the time. */
#define CODES_STAGED_ROWS 3

/* y = (xb codes^T) * scale for int8 codes [N, K] (K a multiple of 32) in bf16's dot product; at
   CODES_STAGED_ROWS rows or more each block of four code rows is made bf16 once in this thread's buffer
   and read there by rows_times_weight_dpbf16. Either way the same bf16 weights meet the same sums, so
   a row has the same bits alone or among others. Returns 0, or -1 if the buffer cannot grow. */
static int rows_times_codes_dpbf16(const uint16_t *xb, int64_t R, const int8_t *codes, const float *scale,
                                   int64_t N, int64_t K, float *y, int64_t ldy) {
    if (R < CODES_STAGED_ROWS) {
        rows_times_codes_dpbf16_in_registers(xb, R, codes, scale, N, K, y, ldy);
        return 0;
    }
    static __thread uint16_t *buffer = NULL;
    static __thread int64_t capacity = 0;
    if (4 * K > capacity) {
        uint16_t *grown = realloc(buffer, sizeof(uint16_t) * 4 * K);
        if (grown == NULL) return -1;
        buffer = grown;
        capacity = 4 * K;
    }
    for (int64_t n0 = 0; n0 < N; n0 += 4) {
        const int64_t rows = N - n0 < 4 ? N - n0 : 4;
        const int8_t *block = codes + n0 * K;
        for (int64_t i = 0; i < rows * K; i += 32) {
            if (n0 + rows < N) __builtin_prefetch(block + i + 4 * K); /* the next block's line, as this one's */
            _mm512_storeu_si512((void *)(buffer + i), (__m512i)load32_codes_as_bf16(block + i));
        }
        rows_times_weight_dpbf16(xb, R, buffer, scale + n0, rows, K, y + n0, ldy);
    }
    return 0;
}
#undef LOAD_BH

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define HAVE_AMX_BF16 1
#include "rows_times_weight_amx.h"
#endif
#endif

/* A bf16 model's int8 codes against x quantized to 15 bits (rows_to_i16.h) in an int16 dot product: VNNI's
   vpdpwssd with AVX-512, AVX2's vpmaddwd and vpaddd on CPUs without AVX-512 (the same integers, the same
   bits). AVX-512 CPUs without VNNI keep widening the codes to fp32 (not measured there). */
#if defined(HAVE_AVX512) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define HAVE_AVX512_VNNI 1
#include "rows_times_codes_dpwssd.h"
#define HAVE_INT16_CODES 1
#define RTW_INT16_K_MULTIPLE 32
#define RTW_INT16_MAX_K RTW_DPWSSD_MAX_K
#define rows_times_codes_int16 rows_times_codes_dpwssd
#elif defined(HAVE_AVX2) && !defined(HAVE_AVX512)
#include "rows_times_codes_maddwd.h"
#define HAVE_INT16_CODES 1
#define RTW_INT16_K_MULTIPLE 16
#define RTW_INT16_MAX_K RTW_MADDWD_MAX_K
#define rows_times_codes_int16 rows_times_codes_maddwd
#endif

/* Whether int8 codes meet x at a bf16 model's precision: quantized to 15 bits in an int16 dot product
   (rows_times_codes_int16) where the build has one, else rounded to bf16 in bf16's dot product
   (rows_times_codes_dpbf16). On for a bf16 model (kernel_set_int8_bf16_activations); off, x stays fp32
   against codes widened to fp32. */
static int rtw_int8_bf16_activations = 0;

/* Let int8 weights meet x at a bf16 model's precision (1) or not (0); returns whether they will (0 without
   AVX512_BF16 and an int16 dot product). */
int kernel_set_int8_bf16_activations(int on) {
#if defined(HAVE_AVX512_BF16) || defined(HAVE_INT16_CODES)
    rtw_int8_bf16_activations = on != 0;
#else
    (void)on;
#endif
    return rtw_int8_bf16_activations;
}

/* Whether a bf16 model's int8 codes meet x quantized to 15 bits in an int16 dot product in this build (for
   some K: int8_int16_takes): 1, or 0. */
static inline int int8_int16_dot_products(void) {
#ifdef HAVE_INT16_CODES
    return 1;
#else
    return 0;
#endif
}

/* Whether the int16 dot product takes codes of K inputs (a multiple of RTW_INT16_K_MULTIPLE, at most
   RTW_INT16_MAX_K, whose products' sums fit its int32 lanes): 1, or 0. */
static inline int int8_int16_takes(int64_t K) {
#ifdef HAVE_INT16_CODES
    return K > 0 && K % RTW_INT16_K_MULTIPLE == 0 && K <= RTW_INT16_MAX_K;
#else
    (void)K;
    return 0;
#endif
}

/* Whether bf16 weights may take AMX's tiles (kernel_set_amx_tiles: on unless `--cpu-tiles off`). Set once,
   before a process's first step: which path a product takes must not change between steps. */
static int rtw_amx_tiles = 1;

/* Whether bf16 weights of AMX_MIN_WEIGHT elements and more (K at least AMX_MIN_K) meet x rounded to bf16 in
   AMX's tiles (tdpbf16ps) in this process: 1, or 0 (turned off, not in this build, or the kernel refuses
   this process the tile state). */
static inline int amx_tile_products(void) {
#ifdef HAVE_AMX_BF16
    return rtw_amx_tiles && amx_permitted();
#else
    return 0;
#endif
}

/* Let bf16 weights take AMX's tiles (1) or not (0); returns whether they will. */
int kernel_set_amx_tiles(int on) {
    rtw_amx_tiles = on != 0;
    return amx_tile_products();
}

/* Whether bf16 weights meet x rounded to bf16 (vdpbf16ps, K a multiple of 32) in this build: 1, or 0
   where they are widened to fp32 against fp32 x. */
static inline int bf16_dot_products(void) {
#ifdef HAVE_AVX512_BF16
    return 1;
#else
    return 0;
#endif
}

/* y[r * ldy + n] = (x[r * ldx .. + K] . W[n * K .. + K]) * scale[n] for r < R, n < N (W row-major [N, K]
   of weight_type; scale [N] for int8 weights, NULL (no scaling) for the others). With vectors (K a
   multiple of 16 with AVX-512, else of 8 with AVX2): four weight rows a quarter of W apart at a time
   against three rows of x (twelve accumulators, seven loads per twelve FMAs; two or one where rows are
   left), the four weight rows staying in L1 for all rows of x; the weight rows left over, and any K
   without vectors, one dot product each. */
static void rows_times_weight(const float *x, int64_t R, int64_t ldx, const void *W, int weight_type,
                              const float *scale, int64_t N, int64_t K, float *y, int64_t ldy) {
    int64_t n0 = 0;
#ifdef HAVE_INT16_CODES
    if (weight_type == ELEMENT_I8 && rtw_int8_bf16_activations && int8_int16_takes(K) && R > 0 &&
        rows_times_codes_int16(x, R, ldx, W, scale, N, K, y, ldy) == 0)
        return;
#endif
#ifdef HAVE_AVX512_BF16
    const int codes_in_bf16 = weight_type == ELEMENT_I8 && rtw_int8_bf16_activations;
    if ((weight_type == ELEMENT_BF16 || codes_in_bf16) && K % 32 == 0 && R > 0) {
        const uint16_t *xb = rows_to_bf16(x, R, ldx, K);
        if (xb != NULL && !codes_in_bf16) {
#ifdef HAVE_AMX_BF16
            if (rtw_amx_tiles && rows_times_weight_amx(xb, R, W, N, K, y, ldy) == 0) return;
#endif
            rows_times_weight_dpbf16(xb, R, W, NULL, N, K, y, ldy);
            return;
        }
        if (xb != NULL && rows_times_codes_dpbf16(xb, R, W, scale, N, K, y, ldy) == 0) return;
    }
#endif
#ifdef HAVE_AVX2
    const int staged = weight_type != ELEMENT_F32 && R >= STAGED_ROWS;
#endif
#ifdef HAVE_AVX512
    if (K % 16 == 0 && staged)
        n0 = rows_times_staged(rows_times_weight_16, x, R, ldx, W, weight_type, scale, N, K, y, ldy);
    if (n0 == 0 && K % 16 == 0)
        n0 = weight_type == ELEMENT_I8     ? rows_times_weight_16_i8(x, R, ldx, W, scale, N, K, y, ldy)
             : weight_type == ELEMENT_BF16 ? rows_times_weight_16_bf16(x, R, ldx, W, NULL, N, K, y, ldy)
                                           : rows_times_weight_16(x, R, ldx, W, NULL, N, K, y, ldy);
#endif
#ifdef HAVE_AVX2
    if (n0 == 0 && K % 8 == 0 && staged)
        n0 = rows_times_staged(rows_times_weight_8, x, R, ldx, W, weight_type, scale, N, K, y, ldy);
    if (n0 == 0 && K % 8 == 0)
        n0 = weight_type == ELEMENT_I8     ? rows_times_weight_8_i8(x, R, ldx, W, scale, N, K, y, ldy)
             : weight_type == ELEMENT_BF16 ? rows_times_weight_8_bf16(x, R, ldx, W, NULL, N, K, y, ldy)
                                           : rows_times_weight_8(x, R, ldx, W, NULL, N, K, y, ldy);
#endif
    for (int64_t n = n0; n < N; n++) {
        const float row_scale = weight_type == ELEMENT_I8 ? scale[n] : 1.0f;
        for (int64_t r = 0; r < R; r++) {
            const float *xr = x + r * ldx;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t k = 0; k < K; k++) dot += xr[k] * element_at(W, weight_type, n * K + k);
            y[r * ldy + n] = dot * row_scale;
        }
    }
}

#endif
