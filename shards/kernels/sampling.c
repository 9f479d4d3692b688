/* Per-row argmax and log-sum-exp of fp32 logits, one CPU thread: what greedy sampling and the
   chosen token's log-probability need, without torch's full log_softmax [B, V] and its argmax
   (together ~1 ms a step at batch 32 over a 8k vocabulary here).

   Legend: B rows, V vocabulary. logits [B, V] contiguous; argmax [B] int64 (the first index of the
   row's maximum, as torch.argmax); logsumexp [B]. Also both halves of greedy over a
   vocabulary-parallel LM head (slice_greedy_stats, combine_greedy), where torch's dozen small ops
   on a few numbers per row cost more than the rows' arithmetic. And a grammar's token bitmasks applied
   to the rows they constrain (apply_token_bitmask), in place of the half-dozen torch ops that build
   and add a bias row. And the random draw of sampled rows (draw_tokens): temperature, top-k, top-p and
   inverse transform sampling in one pass of C a row, in place of torch's ~20 ops.
*/

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The smallest exponent the log-sum-exp evaluates: exp(-87) is still a normal float. */
#define EXP_FLOOR (-87.0f)

/* Built with -ffast-math, which may assume away NaN and infinity: a row holding one is reported
   (return 1, the caller takes the torch path) by looking at the exponent bits themselves. */
static int all_finite(const float *row, int64_t V) {
    uint32_t worst = 0;
    for (int64_t v = 0; v < V; v++) {
        uint32_t bits;
        memcpy(&bits, row + v, sizeof bits);
        bits &= 0x7f800000u;
        worst = bits > worst ? bits : worst;
    }
    return worst != 0x7f800000u;
}

/* The maximum of a finite row, the first index holding it, and the row's log-sum-exp. */
static void row_stats(const float *row, int64_t V, float *max, int64_t *max_at, float *logsumexp) {
    float best = row[0];
#pragma omp simd reduction(max : best)
    for (int64_t v = 1; v < V; v++) best = row[v] > best ? row[v] : best;
    int64_t best_at = 0;
    while (row[best_at] != best) best_at++;
    /* Differences below EXP_FLOOR are raised to it: the vectorized expf sends arguments past its range (a
       grammar's masked logits are -1e30) down a per-lane scalar path, 4x slower over a masked row, while
       V terms of exp(EXP_FLOOR) < 1e-33 cannot change a sum of at least 1 (the maximum's own term). */
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t v = 0; v < V; v++) sum += expf(fmaxf(row[v] - best, EXP_FLOOR));
    *max = best;
    *max_at = best_at;
    *logsumexp = best + logf(sum);
}

int row_argmax_logsumexp(const float *logits, int64_t B, int64_t V, int64_t *argmax, float *logsumexp) {
    for (int64_t b = 0; b < B; b++) {
        const float *row = logits + b * V;
        if (!all_finite(row, V)) return 1;
        float best;
        row_stats(row, V, &best, argmax + b, logsumexp + b);
    }
    return 0;
}

/* Greedy over a vocabulary-parallel LM head (shards/parallel_greedy.py), this rank's half: per row
   of its slice [B, V] (rows `ld` floats apart), the row's maximum, the maximum's token id (its
   index plus vocab_start) and the row's log-sum-exp, as doubles into packed [B, 3]. Returns 1 where
   a row holds NaN or infinity. */
int slice_greedy_stats(const float *logits, int64_t ld, int64_t B, int64_t V, int64_t vocab_start, double *packed) {
    for (int64_t b = 0; b < B; b++) {
        const float *row = logits + b * ld;
        if (!all_finite(row, V)) return 1;
        float best, logsumexp;
        int64_t best_at;
        row_stats(row, V, &best, &best_at, &logsumexp);
        packed[3 * b] = best;
        packed[3 * b + 1] = (double)(best_at + vocab_start);
        packed[3 * b + 2] = logsumexp;
    }
    return 0;
}

/* The other half, the same on every rank: from every rank's packed numbers, gathered [R, N, 3] in
   rank order, each row's token (the id at the greatest maximum, the lowest rank on a tie) and its
   log-probability (that maximum less the log-sum-exp of the ranks' log-sum-exps). Returns 1 where
   any number is NaN or infinite (checked on the bits: -ffast-math assumes them away). */
int combine_greedy(const double *every, int64_t R, int64_t N, int64_t *token_ids, float *logprobs) {
    for (int64_t i = 0; i < R * N * 3; i++) {
        uint64_t bits;
        memcpy(&bits, every + i, sizeof bits);
        if ((bits & 0x7ff0000000000000ull) == 0x7ff0000000000000ull) return 1;
    }
    for (int64_t r = 0; r < R; r++) {
        const double *row = every + r * N * 3;
        int64_t winner = 0;
        double top = row[2];
        for (int64_t n = 1; n < N; n++) {
            if (row[3 * n] > row[3 * winner]) winner = n;
            top = row[3 * n + 2] > top ? row[3 * n + 2] : top;
        }
        double sum = 0.0;
        for (int64_t n = 0; n < N; n++) sum += exp(row[3 * n + 2] - top);
        token_ids[r] = (int64_t)row[3 * winner + 1];
        logprobs[r] = (float)(row[3 * winner] - (top + log(sum)));
    }
    return 0;
}

/* A grammar's masks, in place: in each of the C rows `rows` of logits (rows `ld` floats apart, P columns,
   column j being token vocab_start + j), every column whose token's bit is clear in the row's mask
   (bitmask [C, W], bit t % 32 of word t / 32) or lies at or past vocab_size (<= 32 W) becomes `masked`. */
void apply_token_bitmask(float *logits, int64_t ld, int64_t P, const int64_t *rows, int64_t C,
                         const uint32_t *bitmask, int64_t W, int64_t vocab_start, int64_t vocab_size,
                         float masked) {
    int64_t end = vocab_size - vocab_start < P ? vocab_size - vocab_start : P;  /* columns of real tokens */
    for (int64_t c = 0; c < C; c++) {
        float *row = logits + rows[c] * ld;
        const uint32_t *mask = bitmask + c * W;
        for (int64_t j = 0; j < end; j++) {
            int64_t t = vocab_start + j;
            if (!((mask[t >> 5] >> (t & 31)) & 1u)) row[j] = masked;
        }
        for (int64_t j = end < 0 ? 0 : end; j < P; j++) row[j] = masked;
    }
}

/* draw_tokens: bins of (row maximum - value) DRAW_BIN_WIDTH wide, the last holding everything below.
   They find the bin where a top-k or top-p cut falls; only that bin's entries are sorted. */
#define DRAW_BINS 256
#define DRAW_BIN_WIDTH 0.125f

typedef struct {
    float value;
    int64_t id;
} ranked;

/* Descending value, then ascending id: the order in which the cuts keep tokens. */
static int ranked_before(const void *a, const void *b) {
    const ranked *x = a, *y = b;
    if (x->value != y->value) return x->value > y->value ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

static int draw_bin(float top, float value) {
    float at = (top - value) * (1.0f / DRAW_BIN_WIDTH);
    return at < (float)(DRAW_BINS - 1) ? (int)at : DRAW_BINS - 1;
}

/* The entries of bin `bin` (bins[V] holds each entry's) among s[V], sorted (ranked_before) into out;
   their count. */
static int64_t sorted_bin(const float *s, const uint8_t *bins, int64_t V, int bin, ranked *out) {
    int64_t n = 0;
    for (int64_t v = 0; v < V; v++)
        if (bins[v] == bin) out[n++] = (ranked){s[v], v};
    qsort(out, (size_t)n, sizeof *out, ranked_before);
    return n;
}

/* Kept by the cuts: at or before (cut_value, cut_id) in ranked_before's order. */
static inline int draw_kept(float value, int64_t id, float cut_value, int64_t cut_id) {
    return value > cut_value || (value == cut_value && id <= cut_id);
}

/* The cut (cut_value, cut_id) of the top_k largest of s[V] (ties to the lower ids) and then the fewest
   largest of those whose mass (e = exp(s - top)) reaches top_p of theirs; all kept where neither cuts. */
static void draw_cut(const float *s, const float *e, int64_t V, float top, int64_t k, float p, uint8_t *bins,
                     ranked *scratch, float *cut_value, int64_t *cut_id) {
    *cut_value = -FLT_MAX;
    *cut_id = V;
    if (!(k > 0 && k < V) && !(p < 1.0f)) return;
#pragma omp simd
    for (int64_t v = 0; v < V; v++) bins[v] = (uint8_t)draw_bin(top, s[v]);
    /* Four histograms, entries taken in turn: a run of entries in one bin does not wait on one sum. */
    double mass4[4][DRAW_BINS] = {{0}};
    int64_t count4[4][DRAW_BINS] = {{0}};
    int64_t v = 0;
    for (; v + 4 <= V; v += 4)
        for (int j = 0; j < 4; j++) {
            mass4[j][bins[v + j]] += e[v + j];
            count4[j][bins[v + j]]++;
        }
    for (; v < V; v++) {
        mass4[0][bins[v]] += e[v];
        count4[0][bins[v]]++;
    }
    double bin_mass[DRAW_BINS];
    int64_t bin_count[DRAW_BINS];
    for (int b = 0; b < DRAW_BINS; b++) {
        bin_mass[b] = (mass4[0][b] + mass4[1][b]) + (mass4[2][b] + mass4[3][b]);
        bin_count[b] = count4[0][b] + count4[1][b] + count4[2][b] + count4[3][b];
    }
    int last_bin = DRAW_BINS - 1; /* bins past it keep nothing */
    double last_bin_mass = bin_mass[DRAW_BINS - 1];
    int64_t sorted_n = -1, sorted_at = -1; /* scratch holds bin sorted_at's first sorted_n kept, sorted */
    if (k > 0 && k < V) {
        int64_t above = 0;
        int b = 0;
        while (above + bin_count[b] < k) above += bin_count[b++];
        sorted_bin(s, bins, V, b, scratch);
        sorted_n = k - above;
        sorted_at = b;
        *cut_value = scratch[sorted_n - 1].value;
        *cut_id = scratch[sorted_n - 1].id;
        last_bin = b;
        last_bin_mass = 0.0;
        for (int64_t i = 0; i < sorted_n; i++) last_bin_mass += e[scratch[i].id];
    }
    if (!(p < 1.0f)) return;
    double kept_mass = last_bin_mass;
    for (int b = 0; b < last_bin; b++) kept_mass += bin_mass[b];
    const double goal = (double)p * kept_mass;
    double before = 0.0;
    int b = 0;
    for (; b <= last_bin; b++) {
        double mass = b == last_bin ? last_bin_mass : bin_mass[b];
        if (before + mass >= goal) break;
        before += mass;
    }
    if (b > last_bin) return; /* rounding left the nucleus open: the top-k cut stands */
    /* The nucleus closes in bin b: its entries are kept while the mass before them is below the goal. */
    int64_t n = b == sorted_at ? sorted_n : sorted_bin(s, bins, V, b, scratch);
    for (int64_t i = 0; i < n && before < goal; i++) {
        *cut_value = scratch[i].value;
        *cut_id = scratch[i].id;
        before += e[scratch[i].id];
    }
}

/* Tokens summed a chunk at a time by the draw, which then walks the chunk where u falls token by token. */
#define DRAW_CHUNK 64

/* One token per row of fp32 logits [R, V] (contiguous): the row divided by its temperature (> 0), then
   kept are its top_k largest (0 or >= V: all; ties to the lower ids), of those the fewest largest
   whose softmax mass reaches top_p (>= 1: all; the largest always), and the token drawn is the first,
   in token order, whose cumulative exp(value - max), summed in float64, passes its uniform (in [0, 1))
   times the kept total: shards/draw.py's torch path, whose token it is but where a u falls within
   rounding of a token's bound (the sums here go a chunk at a time). Returns 1 where a row holds NaN or
   infinity (the caller takes the torch path), 2 where scratch memory runs out. */
int draw_tokens(const float *logits, int64_t R, int64_t V, const double *settings, int64_t *tokens) {
    /* settings [4, R]: temperatures, top_k, top_p and uniforms (the first and third rounded to fp32, as
       torch's path holds them). */
    const double *temperature = settings, *top_k = settings + R, *top_p = settings + 2 * R, *uniforms = settings + 3 * R;
    const int64_t chunks = (V + DRAW_CHUNK - 1) / DRAW_CHUNK;
    float *s = malloc((size_t)V * sizeof *s);
    float *e = malloc((size_t)V * sizeof *e);
    double *chunk_mass = malloc((size_t)chunks * sizeof *chunk_mass);
    ranked *scratch = malloc((size_t)V * sizeof *scratch);
    uint8_t *bins = malloc((size_t)V);
    int rc = (s && e && chunk_mass && scratch && bins) ? 0 : 2;
    for (int64_t r = 0; r < R && rc == 0; r++) {
        const float *row = logits + r * V;
        if (!all_finite(row, V)) {
            rc = 1;
            break;
        }
        const float t = (float)temperature[r];
        float top = row[0] / t;
#pragma omp simd reduction(max : top)
        for (int64_t v = 0; v < V; v++) {
            s[v] = row[v] / t;
            top = s[v] > top ? s[v] : top;
        }
#pragma omp simd
        for (int64_t v = 0; v < V; v++) e[v] = expf(s[v] - top);
        float cut_value;
        int64_t cut_id;
        draw_cut(s, e, V, top, (int64_t)top_k[r], (float)top_p[r], bins, scratch, &cut_value, &cut_id);
        double total = 0.0;
        for (int64_t c = 0; c < chunks; c++) {
            const int64_t end = (c + 1) * DRAW_CHUNK < V ? (c + 1) * DRAW_CHUNK : V;
            double mass = 0.0;
#pragma omp simd reduction(+ : mass)
            for (int64_t v = c * DRAW_CHUNK; v < end; v++)
                mass += draw_kept(s[v], v, cut_value, cut_id) ? (double)e[v] : 0.0;
            chunk_mass[c] = mass;
            total += mass;
        }
        double target = uniforms[r] * total;
        if (target >= total) target = nextafter(total, 0.0);
        double before = 0.0;
        int64_t c = 0;
        while (c < chunks - 1 && before + chunk_mass[c] <= target) before += chunk_mass[c++];
        /* The first kept token of chunk c whose cumulative mass passes the target; the chunk's last kept
           one where rounding kept the sum a token at a time from passing it. */
        const int64_t end = (c + 1) * DRAW_CHUNK < V ? (c + 1) * DRAW_CHUNK : V;
        int64_t token = -1;
        for (int64_t v = c * DRAW_CHUNK; v < end; v++) {
            if (!draw_kept(s[v], v, cut_value, cut_id)) continue;
            token = v;
            before += e[v];
            if (before > target) break;
        }
        tokens[r] = token;
    }
    free(s);
    free(e);
    free(chunk_mass);
    free(scratch);
    free(bins);
    return rc;
}
