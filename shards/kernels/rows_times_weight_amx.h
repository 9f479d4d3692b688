/* bf16 weights in AMX's tile dot product (tdpbf16ps), where the build has AMX_TILE and AMX_BF16 and the
   kernel grants the process the tile state: y = xb W^T for x's rows already rounded to bf16 (as
   rows_times_weight_dpbf16 takes them), K a multiple of 32, for weights of AMX_MIN_WEIGHT elements and
   more with K of AMX_MIN_K and more (below).

   One tdpbf16ps multiplies a tile of 16 weight rows by 32 of K (read from W as it lies, row-major) with
   up to 16 rows of x (packed once a call, pairs of K side by side as the instruction takes them) into
   16 x (up to 16) fp32 sums. vdpbf16ps does 16 sums' worth of pairs an instruction and then folds each
   dot product's lanes, so at 4-16 rows of x (a verification step, a batch's decode) it runs out of
   instructions before memory (the 8192 x 256 LM head at 8 rows: ~80 GFLOP/s, 2.6x its one-row time);
   a tile instruction does the pairs of up to 256 dot products at once.

   Every row of x is computed this way whatever R, each sum over K in the same order (the pairs one
   after another, k ascending), so a row has the same bits alone or among others, as speculation's
   verification needs. The bits differ from vdpbf16ps's (another order of the same fp32 sums), so which
   of the two a weight row takes depends on the weight's shape alone (AMX_MIN_WEIGHT, AMX_MIN_K, N's last
   rows) and on amx_permitted, asked once a process: never on R.

   Blocking: two tiles of 16 weight rows against one or two tiles of x (four accumulators at most). Up
   to 16 rows of x, the x and sum tiles are as wide as x has rows (one row: x's own bf16 row is the x
   tile and the sums land in y as they are, no packing and no transposing); past 16, x is taken 16 rows
   at a time. Weight rows past the last full 32 take vdpbf16ps. */

#ifndef MIXSERVE_ROWS_TIMES_WEIGHT_AMX_H
#define MIXSERVE_ROWS_TIMES_WEIGHT_AMX_H

#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_REQ_XCOMP_PERM 0x1023 /* arch_prctl: ask for an extended state component */
#define AMX_XFEATURE_XTILEDATA 18

/* How far ahead of the tiles being read the weight rows are prefetched, in 32-element blocks of K along
   each of the 32 rows being read: 8 is 16 KiB ahead, within L1. Prefetching the next 32 rows at the
   block being read (64 KiB ahead at K = 1024) evicted lines before their use: a one-row product of
   3584 x 1024 from memory ran at ~15 against ~27 GB/s. */
#define AMX_AHEAD 8
/* The products that run in the tiles: 1 MiB of bf16 weights and more, K at least 512 (every product of
   issue 20's 0.8B but the router's gate, q/k/v and o of two ranks among them; every product of a real
   Mixtral's). From 2 MiB, which left those two on the vector loop, the 0.8B served 0.95x at one stream
   and 0.93x at 32 against from 1 MiB (benchmarks/results/amx-tiles-0.8b: fewer switches between the
   tiles and the vector loop in a step, it seems). A call's first tile
   instructions wait ~1-3 us for the tile unit when it has been idle for ~5-50 us (in C, interleaved with
   other work: 4-7 us against 3.8 for a 512 x 256 product at one row); on the demo's 128-256 K-element
   products, called microseconds apart, that made a one-row decode step 7 % slower in the tiles. Its LM
   head (8192 x 256, 2 MiB) was level in-process (a one-row step within 1 %) but served 2-3 % slower at
   one stream in three runs, and gained 5 % at 32 streams: K under 512 keeps the vector path. */
#ifndef AMX_MIN_WEIGHT /* (a build may set them: benchmarks/results/amx-tiles-0.8b/amx_idle_start.c) */
#define AMX_MIN_WEIGHT (1 << 19)
#endif
#ifndef AMX_MIN_K
#define AMX_MIN_K 512
#endif

/* Whether this process may use the tiles: asked of the kernel once (Linux 5.16 and later grant it on
   request); 0 where it refuses, and every call keeps the vector path. */
static int amx_permitted(void) {
    static int state = -1;
    int seen = __atomic_load_n(&state, __ATOMIC_ACQUIRE);
    if (seen < 0) {
        seen = syscall(SYS_arch_prctl, AMX_REQ_XCOMP_PERM, AMX_XFEATURE_XTILEDATA) == 0;
        __atomic_store_n(&state, seen, __ATOMIC_RELEASE);
    }
    return seen;
}

/* Palette 1, every tile 16 rows: tmm0-3 sums [16 weight rows][width rows of x] fp32, tmm4-5 weight tiles
   [16 weight rows][32 bf16 of K], tmm6-7 x tiles [16 pairs of K][width rows of x, a pair each]. */
struct amx_tile_config {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

static void amx_configure(int64_t width) {
    struct amx_tile_config config;
    memset(&config, 0, sizeof config);
    config.palette_id = 1;
    for (int t = 0; t < 8; t++) {
        config.colsb[t] = t == 4 || t == 5 ? 64 : (uint16_t)(4 * width);
        config.rows[t] = 16;
    }
    _tile_loadconfig(&config);
}

/* xb's rows [R, K] (bf16) as x tiles `width` rows wide: tile (c, kb) holds rows c width.. at K's 32-block
   kb, its row p the pairs (2p, 2p + 1) of each of those x rows side by side; rows past R zero. In this
   thread's buffer (NULL if it cannot grow). */
static const uint32_t *amx_pack_rows(const uint16_t *xb, int64_t R, int64_t K, int64_t width) {
    static __thread uint32_t *buffer = NULL;
    static __thread int64_t capacity = 0;
    const int64_t chunks = (R + width - 1) / width, blocks = K / 32, tile = 16 * width, words = chunks * blocks * tile;
    if (words > capacity) {
        uint32_t *grown = realloc(buffer, sizeof(uint32_t) * words);
        if (grown == NULL) return NULL;
        buffer = grown;
        capacity = words;
    }
    if (chunks * width > R) memset(buffer, 0, sizeof(uint32_t) * words);
    const uint32_t *pairs = (const uint32_t *)xb; /* row m's pair j at m K/2 + j */
    for (int64_t m = 0; m < R; m++)
        for (int64_t kb = 0; kb < blocks; kb++) {
            uint32_t *at = buffer + ((m / width) * blocks + kb) * tile + m % width;
            const uint32_t *row = pairs + m * (K / 2) + kb * 16;
            for (int p = 0; p < 16; p++) at[p * width] = row[p];
        }
    return buffer;
}

/* A stored sum tile [16 weight rows][16 rows of x] (rows 64 bytes apart) into y: row m of x's 16 sums at
   y + m ldy, for the `cols` rows of x that exist. The tile is the transpose of y's layout: its rows
   are loaded and transposed in registers (within 128-bit lanes, then across them). */
static inline void amx_scatter(const float sums[16][16], int64_t cols, float *y, int64_t ldy) {
    __m512 r[16], u[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_load_ps(sums[i]);
    for (int g = 0; g < 4; g++) { /* u[4g + c] lane L: column 4L + c of rows 4g..4g+3 */
        const __m512 t0 = _mm512_unpacklo_ps(r[4 * g], r[4 * g + 1]), t1 = _mm512_unpackhi_ps(r[4 * g], r[4 * g + 1]);
        const __m512 t2 = _mm512_unpacklo_ps(r[4 * g + 2], r[4 * g + 3]);
        const __m512 t3 = _mm512_unpackhi_ps(r[4 * g + 2], r[4 * g + 3]);
        u[4 * g] = _mm512_shuffle_ps(t0, t2, 0x44);
        u[4 * g + 1] = _mm512_shuffle_ps(t0, t2, 0xEE);
        u[4 * g + 2] = _mm512_shuffle_ps(t1, t3, 0x44);
        u[4 * g + 3] = _mm512_shuffle_ps(t1, t3, 0xEE);
    }
    for (int c = 0; c < 4; c++) { /* lanes L of u[c], u[4 + c], u[8 + c], u[12 + c] -> column 4L + c */
        const __m512 w0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44), w1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xEE);
        const __m512 w2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44);
        const __m512 w3 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xEE);
        const __m512 column[4] = {_mm512_shuffle_f32x4(w0, w2, 0x88), _mm512_shuffle_f32x4(w0, w2, 0xDD),
                                  _mm512_shuffle_f32x4(w1, w3, 0x88), _mm512_shuffle_f32x4(w1, w3, 0xDD)};
        for (int L = 0; L < 4; L++)
            if (4 * L + c < cols) _mm512_storeu_ps(y + (4 * L + c) * ldy, column[L]);
    }
}

/* Sum tile `tile` (0-3: the tile number must be a constant where it is used) stored at base, rows
   `stride` bytes apart. */
static inline void amx_store_tile(int tile, void *base, int64_t stride) {
    switch (tile) {
    case 0: _tile_stored(0, base, stride); break;
    case 1: _tile_stored(1, base, stride); break;
    case 2: _tile_stored(2, base, stride); break;
    default: _tile_stored(3, base, stride); break;
    }
}

/* Sum tile `tile` (16 weight rows by `width` rows of x, `cols` of them real) into y: one row of x's 16 sums
   straight into y, more through a buffer. */
static inline void amx_store(int tile, int64_t cols, int64_t width, float *y, int64_t ldy) {
    float sums[16][16] __attribute__((aligned(64)));
    if (width == 1) {
        amx_store_tile(tile, y, 4);
        return;
    }
    amx_store_tile(tile, sums, 64);
    amx_scatter((const float(*)[16])sums, cols, y, ldy);
}

/* Prefetch, for the tiles at K's block kb of the 32 weight rows at W, the lines AMX_AHEAD blocks further
   along each row, into the next 32 rows (`next`, NULL for none) past the row's end. */
static inline void amx_prefetch(const uint16_t *W, const uint16_t *next, int64_t kb, int64_t blocks, int64_t K) {
    int64_t ahead = kb + AMX_AHEAD;
    if (ahead >= blocks) {
        W = next;
        ahead -= blocks;
    }
    if (W != NULL && ahead < blocks)
        for (int j = 0; j < 32; j++) __builtin_prefetch(W + j * K + ahead * 32);
}

/* 32 weight rows from W (row stride K) against the x tiles at x (K's blocks `tile`
   words apart; `cols` rows of x real in tiles `width` wide) into y. With `two`, also against the x tiles
   `chunk` words further on, whose rows of x are y's 16 rows further on (`cols` counts both). */
static void amx_block(const uint16_t *W, const uint32_t *x, int64_t tile, int64_t width, int two,
                      int64_t chunk, int64_t cols, int64_t K, float *y, int64_t ldy, const uint16_t *next) {
    const int64_t blocks = K / 32, stride = 2 * K, xstride = 4 * width;
    _tile_zero(0);
    _tile_zero(1);
    if (two) {
        _tile_zero(2);
        _tile_zero(3);
    }
    for (int64_t kb = 0; kb < blocks; kb++) {
        amx_prefetch(W, next, kb, blocks, K);
        _tile_loadd(4, W + kb * 32, stride);
        _tile_loadd(5, W + 16 * K + kb * 32, stride);
        _tile_loadd(6, x + kb * tile, xstride);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 5, 6);
        if (two) {
            _tile_loadd(7, x + chunk + kb * tile, xstride);
            _tile_dpbf16ps(2, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    const int64_t first = cols < width ? cols : width;
    amx_store(0, first, width, y, ldy);
    amx_store(1, first, width, y + 16, ldy);
    if (two) {
        amx_store(2, cols - 16, width, y + 16 * ldy, ldy);
        amx_store(3, cols - 16, width, y + 16 * ldy + 16, ldy);
    }
}

/* y = xb W^T for bf16 xb [R, K] and bf16 W [N, K] (K a multiple of 32, R > 0) in the tiles, the weight rows
   past the last full 32 in vdpbf16ps (bf16_dot_row: which rows take it depends on N alone, so a row of x
   still has the same bits alone or among others). Returns 0, or -1 (nothing written) where W is under
   AMX_MIN_WEIGHT elements or K under AMX_MIN_K, the tiles are not granted or a buffer cannot grow. */
static int rows_times_weight_amx(const uint16_t *xb, int64_t R, const uint16_t *W, int64_t N, int64_t K, float *y,
                                 int64_t ldy) {
    if (N * K < AMX_MIN_WEIGHT || K < AMX_MIN_K || !amx_permitted()) return -1;
    const int64_t width = R < 16 ? R : 16, tile = 16 * width, chunk = K / 32 * tile;
    /* One row: its pairs, 4 bytes apart, are already an x tile one row of x wide. */
    const uint32_t *x = R == 1 ? (const uint32_t *)xb : amx_pack_rows(xb, R, K, width);
    if (x == NULL) return -1;
    const int64_t full = N / 32 * 32;
    amx_configure(width);
    for (int64_t n0 = 0; n0 < full; n0 += 32) {
        const uint16_t *w = W + n0 * K, *next = n0 + 64 <= full ? w + 32 * K : NULL;
        for (int64_t m0 = 0; m0 < R; m0 += 32) {
            const int64_t cols = R - m0 < 32 ? R - m0 : 32;
            amx_block(w, x + m0 / width * chunk, tile, width, cols > 16, chunk, cols, K, y + m0 * ldy + n0, ldy,
                      m0 == 0 ? next : NULL);
        }
    }
    _tile_release();
    for (int64_t n = full; n < N; n++) bf16_dot_row(xb, R, W + n * K, NULL, K, y + n, ldy);
    return 0;
}

#endif
