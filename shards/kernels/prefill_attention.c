/* Prefill attention over the paged KV cache: R query rows that are consecutive positions of one sequence (a
   prompt's chunk: row r one position after row r - 1), fp32 math over fp32 or bf16 K/V, one CPU thread.

   paged_attention.c attends each query alone: a score is a dot product of q with a K row, one chain of D / 8
   FMAs with two loads each and a horizontal sum per position, a fifth of a core's FMA rate or less. A chunk's
   rows all read the same K and V, so here scores and values are small matrix products, as flash attention computes
   them: for each KV head its K is laid out once, transposed, 16 positions a tile ([D][16], "kt"), and its V
   widened beside it ([16][D], "vs"); then the query rows (position, head) of that KV head, QUERY_TILE at a
   time, walk the tiles: four rows against a tile's 16 positions per element of q (eight FMA chains, two K
   loads and four broadcasts for eight FMAs), an online softmax per row and tile, and the tile's values added
   into four rows' accumulators at a time. A chunk of 256 positions after 2750 cached, on an AVX2 EPYC core:
   Mixtral's heads on one of two shards 228 -> 90 ms (fp32 K/V; ~70 % of the core's FMA rate), the demo's 26 -> 8
   (benchmarks/results/prefill-attention-tiles: 2-3.4x a row at a time for fp32 K/V, 1.4-2.6x for bf16, whose
   decode path already scored tiles; 1.2-2.1x torch's flash attention).

   A row's bits depend only on its query and its context, not on the chunk it came in or its place there
   (tiles sit at absolute positions); they are not paged_decode_attention's (the sums run in another order),
   which is why paged_attention_rows sends only long runs here: a speculative verification's few rows keep
   the bits of the plain decode steps they stand for.

   Legend and layouts as paged_attention.c: H query heads, KV key/value heads, D head dim, N blocks of S
   positions, M block-table width; q and out [R, H, D]; the pools [N, S, KV, D]. Row r attends the positions
   first_r <= p < first_len + r (first_r: window > 0 keeps the last `window`).
*/

#include <stdlib.h>

#include "paged_attention.c"

#define POSITION_TILE 16
#define QUERY_TILE 32 /* query rows walking the tiles together: a multiple of 4 */
/* Runs of rows shorter than this take paged_decode_attention (see above): longer than any --speculate a
   user would set, short enough for a prompt's chunks. */
#define PREFILL_MIN_ROWS 32

static inline int64_t window_start(int64_t len, int64_t window) {
    return window > 0 && len > window ? len - window : 0;
}

#ifdef HAVE_AVX2
/* KV head kvh's K and V at the positions of tiles j0 <= j < j0 + tiles (positions j * 16 ...), as fp32: kt tile
   by tile transposed ([D][16]), vs row by row ([16][D]); positions outside [lo, hi) zero. */
static void lay_out_kv(const void *k_pool, const void *v_pool, int kv_type, const int64_t *table, int64_t S,
                       int64_t token_stride, int64_t kvh, int64_t D, int64_t lo, int64_t hi, int64_t j0,
                       int64_t tiles, float *kt, float *vs) {
    for (int64_t j = 0; j < tiles; j++) {
        float *ktile = kt + j * D * POSITION_TILE;
        for (int64_t i = 0; i < POSITION_TILE; i++) {
            const int64_t p = (j0 + j) * POSITION_TILE + i;
            float *vrow = vs + (j * POSITION_TILE + i) * D;
            if (p < lo || p >= hi) {
                for (int64_t d = 0; d < D; d++) ktile[d * POSITION_TILE + i] = 0.0f;
                memset(vrow, 0, sizeof(float) * D);
                continue;
            }
            const int64_t at = (table[p / S] * S + p % S) * token_stride + kvh * D;
            const float *k = load_elements(element_offset(k_pool, kv_type, at), kv_type, D, vrow);
            for (int64_t d = 0; d < D; d++) ktile[d * POSITION_TILE + i] = k[d];
            const float *v = load_elements(element_offset(v_pool, kv_type, at), kv_type, D, vrow);
            if (v != vrow) memcpy(vrow, v, sizeof(float) * D);
        }
    }
}

/* s[i][t] = q_i . k_t for four query rows (q + i D) and a tile's 16 positions (kt [D][16]); each score one FMA
   chain over d in order. */
static void tile_scores4(const float *q, const float *kt, int64_t D, float (*s)[POSITION_TILE]) {
    __m256 a0 = _mm256_setzero_ps(), b0 = a0, a1 = a0, b1 = a0, a2 = a0, b2 = a0, a3 = a0, b3 = a0;
    for (int64_t d = 0; d < D; d++) {
        __m256 lo = _mm256_load_ps(kt + d * POSITION_TILE), hi = _mm256_load_ps(kt + d * POSITION_TILE + 8);
        __asm__("" : "+x"(lo), "+x"(hi)); /* loaded once for the four rows, not folded into each FMA */
        __m256 x = _mm256_broadcast_ss(q + d);
        a0 = _mm256_fmadd_ps(x, lo, a0);
        b0 = _mm256_fmadd_ps(x, hi, b0);
        x = _mm256_broadcast_ss(q + D + d);
        a1 = _mm256_fmadd_ps(x, lo, a1);
        b1 = _mm256_fmadd_ps(x, hi, b1);
        x = _mm256_broadcast_ss(q + 2 * D + d);
        a2 = _mm256_fmadd_ps(x, lo, a2);
        b2 = _mm256_fmadd_ps(x, hi, b2);
        x = _mm256_broadcast_ss(q + 3 * D + d);
        a3 = _mm256_fmadd_ps(x, lo, a3);
        b3 = _mm256_fmadd_ps(x, hi, b3);
    }
    _mm256_storeu_ps(s[0], a0);
    _mm256_storeu_ps(s[0] + 8, b0);
    _mm256_storeu_ps(s[1], a1);
    _mm256_storeu_ps(s[1] + 8, b1);
    _mm256_storeu_ps(s[2], a2);
    _mm256_storeu_ps(s[2] + 8, b2);
    _mm256_storeu_ps(s[3], a3);
    _mm256_storeu_ps(s[3] + 8, b3);
}

/* acc_i = acc_i * correction[i] + the sum over the tile's positions t, in order, of p[i][t] v_t, for four
   query rows (acc + i D) and the tile's values (vs [16][D]): 16 floats of four rows' accumulators held in
   registers across the positions, each V vector loaded once for the four. */
static void tile_values4(float *acc, const float *correction, const float (*p)[POSITION_TILE], const float *vs,
                         int64_t D) {
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) {
        __m256 a[4][2];
        for (int i = 0; i < 4; i++) {
            const __m256 c = _mm256_set1_ps(correction[i]);
            a[i][0] = _mm256_mul_ps(_mm256_loadu_ps(acc + i * D + d), c);
            a[i][1] = _mm256_mul_ps(_mm256_loadu_ps(acc + i * D + d + 8), c);
        }
        for (int t = 0; t < POSITION_TILE; t++) {
            __m256 v0 = _mm256_load_ps(vs + t * D + d), v1 = _mm256_load_ps(vs + t * D + d + 8);
            __asm__("" : "+x"(v0), "+x"(v1));
            for (int i = 0; i < 4; i++) {
                const __m256 x = _mm256_broadcast_ss(&p[i][t]);
                a[i][0] = _mm256_fmadd_ps(x, v0, a[i][0]);
                a[i][1] = _mm256_fmadd_ps(x, v1, a[i][1]);
            }
        }
        for (int i = 0; i < 4; i++) {
            _mm256_storeu_ps(acc + i * D + d, a[i][0]);
            _mm256_storeu_ps(acc + i * D + d + 8, a[i][1]);
        }
    }
    for (; d < D; d += 8) {
        __m256 a[4];
        for (int i = 0; i < 4; i++)
            a[i] = _mm256_mul_ps(_mm256_loadu_ps(acc + i * D + d), _mm256_set1_ps(correction[i]));
        for (int t = 0; t < POSITION_TILE; t++) {
            __m256 v = _mm256_load_ps(vs + t * D + d);
            __asm__("" : "+x"(v));
            for (int i = 0; i < 4; i++) a[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(&p[i][t]), v, a[i]);
        }
        for (int i = 0; i < 4; i++) _mm256_storeu_ps(acc + i * D + d, a[i]);
    }
}

/* One row's online-softmax step over a tile: its scores s at the tile's positions a <= t < b (others are not
   its context) against its running maximum, raised to the tile's; p[t] = exp(s[t] - maximum) there, 0
   elsewhere; sums[t] (its running sum, kept per position and added up at the end) rescaled and p added.
   Returns the factor its accumulator takes before the tile's values: 1 where the maximum held, 0 before its
   first position. */
static inline float softmax_step(const float *s, float *p, int64_t a, int64_t b, float *running_max, float *sums) {
    if (a >= b) { /* none of its positions here */
        memset(p, 0, sizeof(float) * POSITION_TILE);
        return 1.0f;
    }
    const float old_max = *running_max;
    float new_max = old_max;
    if (a == 0 && b == POSITION_TILE) {
        const __m256 m = _mm256_max_ps(_mm256_loadu_ps(s), _mm256_loadu_ps(s + 8));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        const float tile_max = _mm_cvtss_f32(h);
        new_max = tile_max > new_max ? tile_max : new_max;
    } else {
        for (int64_t t = a; t < b; t++) new_max = s[t] > new_max ? s[t] : new_max;
    }
    float correction = 1.0f;
    if (new_max > old_max) {
        correction = old_max > -FLT_MAX ? expf(old_max - new_max) : 0.0f;
        *running_max = new_max;
    }
    if (a == 0 && b == POSITION_TILE) {
#pragma omp simd
        for (int64_t t = 0; t < POSITION_TILE; t++) {
            p[t] = expf(s[t] - new_max);
            sums[t] = sums[t] * correction + p[t];
        }
    } else {
#pragma omp simd
        for (int64_t t = 0; t < POSITION_TILE; t++) {
            p[t] = t >= a && t < b ? expf(s[t] - new_max) : 0.0f;
            sums[t] = sums[t] * correction + p[t];
        }
    }
    return correction;
}

/* The tiled form (D a multiple of 8); returns 0, or -1 where its buffers could not be had (nothing written). */
static int prefill_tiles(const float *q, const void *k_pool, const void *v_pool, int kv_type, const int64_t *table,
                         int64_t first_len, float *out, int64_t R, int64_t H, int64_t KV, int64_t D, int64_t S,
                         float scale, int64_t window) {
    const int64_t G = H / KV, token_stride = KV * D, rows = R * G;
    const int64_t lo = window_start(first_len, window), hi = first_len + R - 1;
    const int64_t j0 = lo / POSITION_TILE, tiles = (hi + POSITION_TILE - 1) / POSITION_TILE - j0;
    const size_t bytes = sizeof(float) * (size_t)(tiles * POSITION_TILE * D);
    float *kt = aligned_alloc(64, bytes), *vs = aligned_alloc(64, bytes);
    if (kt == NULL || vs == NULL) {
        free(kt);
        free(vs);
        return -1;
    }
    float qs[QUERY_TILE * MAX_HEAD_DIM], acc[QUERY_TILE * MAX_HEAD_DIM];
    float s[QUERY_TILE][POSITION_TILE], p[QUERY_TILE][POSITION_TILE];
    float running_max[QUERY_TILE], sums[QUERY_TILE][POSITION_TILE], correction[QUERY_TILE];
    int64_t lens[QUERY_TILE], firsts[QUERY_TILE];
    for (int64_t kvh = 0; kvh < KV; kvh++) {
        lay_out_kv(k_pool, v_pool, kv_type, table, S, token_stride, kvh, D, lo, hi, j0, tiles, kt, vs);
        for (int64_t i0 = 0; i0 < rows; i0 += QUERY_TILE) {
            const int64_t n = rows - i0 < QUERY_TILE ? rows - i0 : QUERY_TILE, padded = (n + 3) & ~(int64_t)3;
            for (int64_t i = 0; i < padded; i++) {
                float *qi = qs + i * D;
                running_max[i] = -FLT_MAX;
                memset(sums[i], 0, sizeof sums[i]);
                memset(acc + i * D, 0, sizeof(float) * D);
                if (i >= n) { /* a row of padding: attends nothing */
                    memset(qi, 0, sizeof(float) * D);
                    lens[i] = firsts[i] = 0;
                    continue;
                }
                const int64_t r = (i0 + i) / G, h = kvh * G + (i0 + i) % G;
                const float *src = q + (r * H + h) * D;
                for (int64_t d = 0; d < D; d++) qi[d] = src[d] * scale;
                lens[i] = first_len + r;
                firsts[i] = window_start(lens[i], window);
            }
            /* the tiles any of these rows attends */
            const int64_t j_first = firsts[0] / POSITION_TILE;
            const int64_t j_end = (lens[n - 1] + POSITION_TILE - 1) / POSITION_TILE;
            for (int64_t j = j_first; j < j_end; j++) {
                const int64_t start = j * POSITION_TILE;
                const float *ktile = kt + (j - j0) * D * POSITION_TILE, *vtile = vs + (j - j0) * POSITION_TILE * D;
                for (int64_t i = 0; i < padded; i += 4) tile_scores4(qs + i * D, ktile, D, s + i);
                for (int64_t i = 0; i < padded; i++) {
                    const int64_t a = (firsts[i] > start ? firsts[i] : start) - start;
                    const int64_t b = (lens[i] < start + POSITION_TILE ? lens[i] : start + POSITION_TILE) - start;
                    correction[i] = softmax_step(s[i], p[i], a, b, &running_max[i], sums[i]);
                }
                for (int64_t i = 0; i < padded; i += 4)
                    tile_values4(acc + i * D, correction + i, (const float (*)[POSITION_TILE])p + i, vtile, D);
            }
            for (int64_t i = 0; i < n; i++) {
                const int64_t r = (i0 + i) / G, h = kvh * G + (i0 + i) % G;
                float *o = out + (r * H + h) * D;
                float total = 0.0f;
                for (int64_t t = 0; t < POSITION_TILE; t++) total += sums[i][t];
                const float inv = 1.0f / total;
#pragma omp simd
                for (int64_t d = 0; d < D; d++) o[d] = acc[i * D + d] * inv;
            }
        }
    }
    free(kt);
    free(vs);
    return 0;
}
#endif

/* Attention of R consecutive positions of one sequence (q [R, H, D]; row r's context first_len + r positions,
   its own included) through one block-table row `table` [M]; out [R, H, D]. Returns 0, or
   paged_decode_attention's codes: 1 heads, head dim or block size past the limits, 2 a context past the row,
   3 a block id outside the pools (checked before anything is written). Head dims that are not a multiple of 8,
   or no AVX2, take paged_decode_attention row by row. */
int paged_prefill_attention(const float *q, const void *k_pool, const void *v_pool, int kv_type, const int64_t *table,
                            int64_t first_len, float *out, int64_t R, int64_t H, int64_t KV, int64_t D, int64_t S,
                            int64_t M, int64_t N, float scale, int64_t window) {
    if (shapes_refused(H, KV, D, S, kv_type)) return 1;
    if (R < 1 || first_len < 1) return 2;
    const int status = table_refused(table, first_len + R - 1, S, M, N); /* the last row reads them all */
    if (status) return status;
#ifdef HAVE_AVX2
    if (D % 8 == 0 &&
        prefill_tiles(q, k_pool, v_pool, kv_type, table, first_len, out, R, H, KV, D, S, scale, window) == 0)
        return 0;
#endif
    for (int64_t r = 0; r < R; r++) {
        const int64_t len = first_len + r;
        const int status = paged_decode_attention(q + r * H * D, k_pool, v_pool, kv_type, table, &len, out + r * H * D,
                                                  1, H, KV, D, S, M, N, scale, window);
        if (status) return status;
    }
    return 0;
}

/* Whether row b (context len_b) is the position after row a's (len_a) in the same sequence: its length one more,
   and the blocks row a reads the same in both rows (a's blocks are then the first of b's). */
static int next_position(const int64_t *row_a, int64_t len_a, const int64_t *row_b, int64_t len_b, int64_t S,
                         int64_t M) {
    if (len_b != len_a + 1 || len_a < 1 || len_a > M * S) return 0;
    return memcmp(row_a, row_b, sizeof(int64_t) * (size_t)((len_a + S - 1) / S)) == 0;
}

/* paged_decode_attention's call (one query row each, its own block-table row and context length), with runs of
   at least PREFILL_MIN_ROWS rows that are consecutive positions of one sequence (a prefill chunk, as the
   decoder-layer kernel passes it) through paged_prefill_attention. Same codes. */
int paged_attention_rows(const float *q, const void *k_pool, const void *v_pool, int kv_type,
                         const int64_t *block_tables, const int64_t *context_lens, float *out, int64_t B, int64_t H,
                         int64_t KV, int64_t D, int64_t S, int64_t M, int64_t N, float scale, int64_t window) {
    int64_t pending = 0; /* rows from here on not yet attended go to paged_decode_attention together */
    for (int64_t t = 0; t < B;) {
        int64_t end = t + 1;
        while (end < B && next_position(block_tables + (end - 1) * M, context_lens[end - 1], block_tables + end * M,
                                        context_lens[end], S, M))
            end++;
        if (end - t >= PREFILL_MIN_ROWS) {
            int status = 0;
            if (t > pending)
                status = paged_decode_attention(q + pending * H * D, k_pool, v_pool, kv_type,
                                                block_tables + pending * M, context_lens + pending,
                                                out + pending * H * D, t - pending, H, KV, D, S, M, N, scale, window);
            if (status == 0)
                status = paged_prefill_attention(q + t * H * D, k_pool, v_pool, kv_type, block_tables + (end - 1) * M,
                                                 context_lens[t], out + t * H * D, end - t, H, KV, D, S, M, N, scale,
                                                 window);
            if (status) return status;
            pending = end;
        }
        t = end;
    }
    if (pending == B) return 0;
    return paged_decode_attention(q + pending * H * D, k_pool, v_pool, kv_type, block_tables + pending * M,
                                  context_lens + pending, out + pending * H * D, B - pending, H, KV, D, S, M, N, scale,
                                  window);
}
