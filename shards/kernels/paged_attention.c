/* Decode attention over the paged KV cache, fp32 math over fp32 or bf16 K/V (kv_type, element_type.h;
   bf16 rows widened as they are read), one CPU thread, reading K/V where they lie.

   The torch path gathers every decoding sequence's blocks into one padded tensor before
   attending (copying the whole context of the batch every layer, about half a decode step's time
   at batch 32 on the demo model). Here each (sequence, KV head) pair walks its block table and
   attends its query heads with an online softmax, block by block.

   Legend: B decoding sequences, H query heads, KV key/value heads (H / KV query heads share one),
   D head dim, N cache blocks, S block size, M block-table width.
   Layouts (contiguous, row-major): q and out [B, H, D]; k_pool and v_pool [N, S, KV, D];
   block_tables [B, M]; context_lens [B] (the tokens each query attends to, its own included).
   window > 0 keeps only the last `window` positions (Mixtral's sliding window); 0 keeps all.
*/

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "element_type.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_AVX2 1
#endif

#define MAX_HEADS 64
#define MAX_HEAD_DIM 256
#define MAX_BLOCK 256

#ifdef HAVE_AVX2
/* Eight lanes of partial sums of q[h] . k[h / G] (D a multiple of 8; kv_at[h] = (h / G) D); their total is
   the score. */
static inline __m256 head_partial(const float (*qs)[MAX_HEAD_DIM], const float *kt, int64_t h, const int64_t *kv_at,
                                  int64_t D) {
    const float *qh = qs[h], *kh = kt + kv_at[h];
    __m256 sum = _mm256_mul_ps(_mm256_loadu_ps(qh), _mm256_loadu_ps(kh));
    for (int64_t d = 8; d < D; d += 8) sum = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d), _mm256_loadu_ps(kh + d), sum);
    return sum;
}
#endif

#ifdef HAVE_AVX2
/* 8 K/V elements at p (fp32, or bf16 widened: exact) as floats. */
static inline __m256 kv_load8(const void *p, int kv_type) {
    if (kv_type == ELEMENT_BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
    return _mm256_loadu_ps((const float *)p);
}

/* Lane i of the result: the total of v[i]'s eight lanes, summed as ((l0 + l1) + (l2 + l3)) + ((l4 + l5) +
   (l6 + l7)), the order every AVX2 score here is reduced in. */
static inline __m256 totals8(const __m256 v[8]) {
    const __m256 s01 = _mm256_hadd_ps(v[0], v[1]), s23 = _mm256_hadd_ps(v[2], v[3]);
    const __m256 s45 = _mm256_hadd_ps(v[4], v[5]), s67 = _mm256_hadd_ps(v[6], v[7]);
    const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
    /* lanes 0-3: vectors 0-3 over the low half of each, 4-7 over the high half */
    const __m256 low = _mm256_permute2f128_ps(s0123, s4567, 0x20);
    const __m256 high = _mm256_permute2f128_ps(s0123, s4567, 0x31);
    return _mm256_add_ps(low, high);
}

/* Keeps the compiler from folding the loads of q and K into the FMAs as memory operands: each vector is used
   by several FMAs (every K vector by the G >= 2 heads; a q vector by the 8 / G tokens, where there are
   more than one), and a folded load is one load per FMA, each waiting on the line where it misses. */
static inline __attribute__((always_inline)) void in_registers(__m256 *qv, int G, __m256 *kv, int T) {
    for (int g = 0; g < G; g++)
        if (T > 1) __asm__("" : "+x"(qv[g]));
    for (int t = 0; t < T; t++) __asm__("" : "+x"(kv[t]));
}

/* scores[t][h] for the tokens t0 <= t < t0 + 8 / G of a block (kb: its first token's K row) and all H = G KV
   heads: for each KV head its G query heads against the 8 / G tokens at once, eight FMA chains side by side,
   each q vector loaded once for every token and each K vector once for every head (a token at a time,
   every head's dot product was one chain of D / 8 FMAs waiting on each other, two loads each). Each score's
   products, their order and its reduction are those of token_scores where it reduces with AVX2 (H a multiple
   of 4), so are the bits there. */
static inline __attribute__((always_inline)) void tile_scores(const float (*qs)[MAX_HEAD_DIM], const void *kb,
                                                              int kv_type, int64_t token_stride, int64_t t0,
                                                              float (*scores)[MAX_HEADS], int64_t KV, int64_t D,
                                                              const int G) {
    const int T = 8 / G;
    for (int64_t kvh = 0; kvh < KV; kvh++) {
        const float *q = qs[kvh * G];
        const void *k = element_offset(kb, kv_type, t0 * token_stride + kvh * D);
        __m256 acc[8], qv[8], kv[8];
        for (int g = 0; g < G; g++) qv[g] = _mm256_loadu_ps(q + g * MAX_HEAD_DIM);
        for (int t = 0; t < T; t++) kv[t] = kv_load8(element_offset(k, kv_type, t * token_stride), kv_type);
        in_registers(qv, G, kv, T);
        for (int g = 0; g < G; g++)
            for (int t = 0; t < T; t++) acc[g * T + t] = _mm256_mul_ps(qv[g], kv[t]);
        for (int64_t d = 8; d < D; d += 8) {
            for (int g = 0; g < G; g++) qv[g] = _mm256_loadu_ps(q + g * MAX_HEAD_DIM + d);
            for (int t = 0; t < T; t++) kv[t] = kv_load8(element_offset(k, kv_type, t * token_stride + d), kv_type);
            in_registers(qv, G, kv, T);
            for (int g = 0; g < G; g++)
                for (int t = 0; t < T; t++) acc[g * T + t] = _mm256_fmadd_ps(qv[g], kv[t], acc[g * T + t]);
        }
        float total[8];
        _mm256_storeu_ps(total, totals8(acc));
        for (int g = 0; g < G; g++)
            for (int t = 0; t < T; t++) scores[t0 + t][kvh * G + g] = total[g * T + t];
    }
}
#endif

/* How many tokens tile_scores takes at once for G query heads a KV head, head dim D and K of kv_type: 8 / G for
   bf16 K where G is 2, 4 or 8 and D a multiple of 8 with AVX2, else 0 (tokens scored one at a time by
   token_scores, which widens a bf16 row into a buffer first). Measured with the KV out of cache, as a layer's
   weights leave it between two layers' attention: bf16 tiles took 0.56-0.99x the time of a token at a time;
   fp32 K, read in place a token at a time, gained nothing from them (0.87-1.2x), nor did G = 1 (1.1-1.4x). */
static int64_t tile_tokens(int64_t G, int64_t D, int kv_type) {
#ifdef HAVE_AVX2
    if (kv_type == ELEMENT_BF16 && D % 8 == 0 && (G == 2 || G == 4 || G == 8)) return 8 / G;
#endif
    (void)G, (void)D, (void)kv_type;
    return 0;
}

/* tile_scores of the tile at token t0 (G: 2, 4 or 8, where tile_tokens > 0), its G a constant in each call. */
static void score_tile(const float (*qs)[MAX_HEAD_DIM], const void *kb, int kv_type, int64_t token_stride, int64_t t0,
                       float (*scores)[MAX_HEADS], int64_t KV, int64_t G, int64_t D) {
#ifdef HAVE_AVX2
    switch (G) {
    case 2: tile_scores(qs, kb, kv_type, token_stride, t0, scores, KV, D, 2); break;
    case 4: tile_scores(qs, kb, kv_type, token_stride, t0, scores, KV, D, 4); break;
    default: tile_scores(qs, kb, kv_type, token_stride, t0, scores, KV, D, 8); break;
    }
#else
    (void)qs, (void)kb, (void)kv_type, (void)token_stride, (void)t0, (void)scores, (void)KV, (void)G, (void)D;
#endif
}

/* Blocks lie anywhere in the pool: while scoring tokens t0 <= t < t1 of a block, fetch the same tokens'
   rows of its V and of the next block's K (next_kb), so that the walk does not stall on every block change. */
static void prefetch_rows(const void *vb, const void *next_kb, int kv_type, int64_t token_stride, int64_t t0,
                          int64_t t1) {
    const int64_t per_line = kv_type == ELEMENT_BF16 ? 32 : 16;
    for (int64_t at = t0 * token_stride; at < t1 * token_stride; at += per_line) {
        __builtin_prefetch(element_offset(vb, kv_type, at));
        __builtin_prefetch(element_offset(next_kb, kv_type, at));
    }
}

/* scores[h] = q[h] . k[h / G] for the H heads of one token (kv_at[h] = (h / G) D, the offset of head h's KV
   head in the token's row, so that no head divides per token): 8, then 4 heads at a time with AVX2 (their
   partial-sum vectors reduced together), else one dot product each. */
static void token_scores(const float (*qs)[MAX_HEAD_DIM], const float *kt, float *scores, int64_t H,
                         const int64_t *kv_at, int64_t D) {
    int64_t h0 = 0;
#ifdef HAVE_AVX2
    if (D % 8 == 0) {
        for (; h0 + 8 <= H; h0 += 8) {
            __m256 v[8];
            for (int j = 0; j < 8; j++) v[j] = head_partial(qs, kt, h0 + j, kv_at, D);
            _mm256_storeu_ps(scores + h0, totals8(v));
        }
        for (; h0 + 4 <= H; h0 += 4) {
            __m256 v[4];
            for (int j = 0; j < 4; j++) v[j] = head_partial(qs, kt, h0 + j, kv_at, D);
            /* lanes 0-3: heads 0-3 over the low half of each vector, 4-7 the same over the high half */
            const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
            _mm_storeu_ps(scores + h0, _mm_add_ps(_mm256_castps256_ps128(s0123), _mm256_extractf128_ps(s0123, 1)));
        }
    }
#endif
    for (int64_t h = h0; h < H; h++) {
        const float *qh = qs[h], *kh = kt + kv_at[h];
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; d++) dot += qh[d] * kh[d];
        scores[h] = dot;
    }
}

#ifdef HAVE_AVX2
/* acc[h] = acc[h] * correction[h] + the sum over the block's tokens t (lo <= t < hi, in order) of
   scores[t][h] v[t] (head h's KV head: kv_at), for D a multiple of 32: each head's accumulator held in
   four registers at a time across the block's tokens. Written a token at a time, the loop loaded and stored
   every head's accumulator once a token; the products and their order are the same, so are the bits. */
static void block_values(float (*acc)[MAX_HEAD_DIM], const float *correction, const float (*scores)[MAX_HEADS],
                         const void *vb, int kv_type, int64_t token_stride, const int64_t *kv_at, int64_t lo,
                         int64_t hi, int64_t H, int64_t D) {
    int64_t h = 0;
    /* Two query heads of one KV head at a time: each V vector loaded once for both, and eight FMA chains
       side by side where four waited on each other token by token. */
    for (; h + 2 <= H && kv_at[h] == kv_at[h + 1]; h += 2) {
        const __m256 c = _mm256_set1_ps(correction[h]), e = _mm256_set1_ps(correction[h + 1]);
        for (int64_t d = 0; d < D; d += 32) {
            float *ah = acc[h] + d, *bh = acc[h + 1] + d;
            __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(ah), c), a1 = _mm256_mul_ps(_mm256_loadu_ps(ah + 8), c);
            __m256 a2 = _mm256_mul_ps(_mm256_loadu_ps(ah + 16), c), a3 = _mm256_mul_ps(_mm256_loadu_ps(ah + 24), c);
            __m256 b0 = _mm256_mul_ps(_mm256_loadu_ps(bh), e), b1 = _mm256_mul_ps(_mm256_loadu_ps(bh + 8), e);
            __m256 b2 = _mm256_mul_ps(_mm256_loadu_ps(bh + 16), e), b3 = _mm256_mul_ps(_mm256_loadu_ps(bh + 24), e);
            for (int64_t t = lo; t < hi; t++) {
                const __m256 p = _mm256_set1_ps(scores[t][h]), q = _mm256_set1_ps(scores[t][h + 1]);
                const int64_t at = t * token_stride + kv_at[h] + d;
                __m256 v = kv_load8(element_offset(vb, kv_type, at), kv_type);
                a0 = _mm256_fmadd_ps(p, v, a0);
                b0 = _mm256_fmadd_ps(q, v, b0);
                v = kv_load8(element_offset(vb, kv_type, at + 8), kv_type);
                a1 = _mm256_fmadd_ps(p, v, a1);
                b1 = _mm256_fmadd_ps(q, v, b1);
                v = kv_load8(element_offset(vb, kv_type, at + 16), kv_type);
                a2 = _mm256_fmadd_ps(p, v, a2);
                b2 = _mm256_fmadd_ps(q, v, b2);
                v = kv_load8(element_offset(vb, kv_type, at + 24), kv_type);
                a3 = _mm256_fmadd_ps(p, v, a3);
                b3 = _mm256_fmadd_ps(q, v, b3);
            }
            _mm256_storeu_ps(ah, a0);
            _mm256_storeu_ps(ah + 8, a1);
            _mm256_storeu_ps(ah + 16, a2);
            _mm256_storeu_ps(ah + 24, a3);
            _mm256_storeu_ps(bh, b0);
            _mm256_storeu_ps(bh + 8, b1);
            _mm256_storeu_ps(bh + 16, b2);
            _mm256_storeu_ps(bh + 24, b3);
        }
    }
    for (; h < H; h++) {
        const __m256 c = _mm256_set1_ps(correction[h]);
        for (int64_t d = 0; d < D; d += 32) {
            float *ah = acc[h] + d;
            __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(ah), c), a1 = _mm256_mul_ps(_mm256_loadu_ps(ah + 8), c);
            __m256 a2 = _mm256_mul_ps(_mm256_loadu_ps(ah + 16), c), a3 = _mm256_mul_ps(_mm256_loadu_ps(ah + 24), c);
            for (int64_t t = lo; t < hi; t++) {
                const __m256 p = _mm256_set1_ps(scores[t][h]);
                const int64_t at = t * token_stride + kv_at[h] + d;
                a0 = _mm256_fmadd_ps(p, kv_load8(element_offset(vb, kv_type, at), kv_type), a0);
                a1 = _mm256_fmadd_ps(p, kv_load8(element_offset(vb, kv_type, at + 8), kv_type), a1);
                a2 = _mm256_fmadd_ps(p, kv_load8(element_offset(vb, kv_type, at + 16), kv_type), a2);
                a3 = _mm256_fmadd_ps(p, kv_load8(element_offset(vb, kv_type, at + 24), kv_type), a3);
            }
            _mm256_storeu_ps(ah, a0);
            _mm256_storeu_ps(ah + 8, a1);
            _mm256_storeu_ps(ah + 16, a2);
            _mm256_storeu_ps(ah + 24, a3);
        }
    }
}
#endif

/* The refusals both attention kernels share, checked before anything is read or written: 1 heads, head dim
   or block size past the limits, or an unknown KV type (shapes_refused); 2 a context past its table row, 3 a
   block id outside the N blocks of the pools (table_refused: the blocks a context of `len` reads). */
static int shapes_refused(int64_t H, int64_t KV, int64_t D, int64_t S, int kv_type) {
    return H < 1 || KV < 1 || H > MAX_HEADS || (H / KV) * KV != H || D > MAX_HEAD_DIM || S > MAX_BLOCK ||
                   !element_type_known(kv_type)
               ? 1
               : 0;
}

static int table_refused(const int64_t *table, int64_t len, int64_t S, int64_t M, int64_t N) {
    if (len < 1 || len > M * S) return 2;
    for (int64_t i = 0; i < (len + S - 1) / S; i++)
        if (table[i] < 0 || table[i] >= N) return 3;
    return 0;
}

/* Built with -ffast-math (vectorised expf): no infinities here, -FLT_MAX stands for "no score yet".
   Each token's K (and V) row of all KV heads is contiguous, so one sequence's context is read
   front to back, once, for all of its query heads; scores are kept [token][head]. */
int paged_decode_attention(const float *q, const void *k_pool, const void *v_pool, int kv_type,
                           const int64_t *block_tables, const int64_t *context_lens, float *out,
                           int64_t B, int64_t H, int64_t KV, int64_t D, int64_t S, int64_t M, int64_t N,
                           float scale, int64_t window) {
    int status = shapes_refused(H, KV, D, S, kv_type);
    /* Every read stays inside the table rows and the pools. */
    for (int64_t b = 0; b < B && status == 0; b++)
        status = table_refused(block_tables + b * M, context_lens[b], S, M, N);
    if (status) return status;
    const int64_t G = H / KV;
    const int64_t token_stride = KV * D; /* elements between two tokens of one block */
    const int64_t tiled = tile_tokens(G, D, kv_type);
    float row[MAX_HEADS * MAX_HEAD_DIM]; /* a bf16 token's K or V row, widened */
    float qs[MAX_HEADS][MAX_HEAD_DIM], acc[MAX_HEADS][MAX_HEAD_DIM], scores[MAX_BLOCK][MAX_HEADS];
    float running_max[MAX_HEADS], running_sum[MAX_HEADS], correction[MAX_HEADS];
    int64_t kv_at[MAX_HEADS];
    for (int64_t h = 0; h < H; h++) kv_at[h] = (h / G) * D;
    for (int64_t b = 0; b < B; b++) {
        const int64_t len = context_lens[b];
        const int64_t first = (window > 0 && len > window) ? len - window : 0;
        const int64_t *table = block_tables + b * M;
        for (int64_t h = 0; h < H; h++) {
            const float *src = q + (b * H + h) * D;
            for (int64_t d = 0; d < D; d++) qs[h][d] = src[d] * scale;
            running_max[h] = -FLT_MAX;
            running_sum[h] = 0.0f;
            memset(acc[h], 0, sizeof(float) * D);
        }
        for (int64_t start = first - first % S; start < len; start += S) {
            const int64_t block = table[start / S];
            const int64_t lo = start < first ? first - start : 0;
            const int64_t hi = (len - start < S ? len - start : S);
            const void *kb = element_offset(k_pool, kv_type, block * S * token_stride);
            const void *vb = element_offset(v_pool, kv_type, block * S * token_stride);
            const void *next_kb =
                start + S < len ? element_offset(k_pool, kv_type, table[start / S + 1] * S * token_stride) : kb;
            int64_t t = lo;
            for (; tiled && t + tiled <= hi; t += tiled) {
                prefetch_rows(vb, next_kb, kv_type, token_stride, t, t + tiled);
                score_tile((const float (*)[MAX_HEAD_DIM])qs, kb, kv_type, token_stride, t, scores, KV, G, D);
            }
            for (; t < hi; t++) {
                prefetch_rows(vb, next_kb, kv_type, token_stride, t, t + 1);
                const void *k_stored = element_offset(kb, kv_type, t * token_stride);
                const float *kt = load_elements(k_stored, kv_type, token_stride, row);
                token_scores((const float (*)[MAX_HEAD_DIM])qs, kt, scores[t], H, kv_at, D);
            }
            for (int64_t h = 0; h < H; h++) {
                float block_max = running_max[h];
                for (int64_t t = lo; t < hi; t++) block_max = scores[t][h] > block_max ? scores[t][h] : block_max;
                correction[h] = running_sum[h] > 0.0f ? expf(running_max[h] - block_max) : 0.0f;
                running_max[h] = block_max;
                running_sum[h] *= correction[h];
            }
            for (int64_t t = lo; t < hi; t++) {
#pragma omp simd
                for (int64_t h = 0; h < H; h++) {
                    scores[t][h] = expf(scores[t][h] - running_max[h]);
                    running_sum[h] += scores[t][h];
                }
            }
#ifdef HAVE_AVX2
            if (D % 32 == 0) {
                block_values(acc, correction, (const float (*)[MAX_HEADS])scores, vb, kv_type, token_stride, kv_at, lo,
                             hi, H, D);
                continue;
            }
#endif
            for (int64_t h = 0; h < H; h++) {
                float *ah = acc[h];
                const float c = correction[h];
#pragma omp simd
                for (int64_t d = 0; d < D; d++) ah[d] *= c;
            }
            for (int64_t t = lo; t < hi; t++) {
                const void *v_stored = element_offset(vb, kv_type, t * token_stride);
                const float *vt = load_elements(v_stored, kv_type, token_stride, row);
                for (int64_t h = 0; h < H; h++) {
                    const float p = scores[t][h], *vh = vt + kv_at[h];
                    float *ah = acc[h];
#pragma omp simd
                    for (int64_t d = 0; d < D; d++) ah[d] += p * vh[d];
                }
            }
        }
        for (int64_t h = 0; h < H; h++) {
            float *o = out + (b * H + h) * D;
            const float inv = 1.0f / running_sum[h];
#pragma omp simd
            for (int64_t d = 0; d < D; d++) o[d] = acc[h][d] * inv;
        }
    }
    return 0;
}
