/* Per-row argmax and log-sum-exp of fp32 logits, one CPU thread: what greedy sampling and the
   chosen token's log-probability need, without torch's full log_softmax [B, V] and its argmax
   (together ~1 ms a step at batch 32 over a 8k vocabulary here).

   Legend: B rows, V vocabulary. logits [B, V] contiguous; argmax [B] int64 (the first index of the
   row's maximum, as torch.argmax); logsumexp [B]. Also both halves of greedy over a
   vocabulary-parallel LM head (slice_greedy_stats, combine_greedy), where torch's dozen small ops
   on a few numbers per row cost more than the rows' arithmetic. And a grammar's token bitmasks applied
   to the rows they constrain (apply_token_bitmask), in place of the half-dozen torch ops that build
   and add a bias row.
*/

#include <math.h>
#include <stdint.h>
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
