/* The two ends of a whole-model decode step, for decoder_stack (decoder_layer.c includes this file):
   the token embedding before the first layer, and after the last the final norm, the LM head and the
   greedy statistics of each row asked for. Torch runs them as a dozen small ops (an embedding, the
   widening to the fp32 residual, its rounding back, a row index, the norm, the head's widen and round,
   the statistics' slice): on a small model those cost more than their arithmetic, and each is the
   first op after a kernel that streamed the weights through the cache, so it runs cold (~20-60 us
   an op on the demo in bf16, against ~5 us warm).

   Each end computes what the torch-side path computes, bit for bit: the embedding rows widened
   exactly; the head through linear.c's linear_rows and elementwise.c's norms, with a bf16 model's
   roundings where its ops round (the residual to bf16, the norm as transformers rounds it, the logits
   to bf16), and the statistics through sampling.c's row_stats, as slice_greedy_stats gives them.

   Legend: T tokens, H hidden size, R rows asked for, P this rank's vocabulary rows, of which `valid`
   are real tokens (the rest padding).
*/

#include "linear.c"
#include "sampling.c"

/* decoder_stack's `ends` (NULL: x holds the step's hidden on entry and is left as the residual stream). */
typedef struct {
    /* The embedding: x[t] = row token_ids[t] - vocab_start of this rank's table [vocab_rows, H] of
       embedding_type, zero for a token outside it; summed over the ranks (each token's row is on one). */
    const int64_t *token_ids; /* [T] */
    int64_t T;
    const void *embedding;
    int64_t embedding_type, vocab_start, vocab_rows;
    /* The head, over the residual rows `rows`: the final norm (its weight fp32, or bf16 for a bf16 model,
       whose roundings `round_bf16` asks for), then the LM head [P, H] of head_type (int8 codes with
       their row scales head_scale), into logits [R, P]. */
    const int64_t *rows; /* [R] */
    int64_t R;
    const void *norm_weight;
    int64_t round_bf16;
    const void *head;
    const float *head_scale;
    int64_t head_type, P, valid;
    float *logits;
    /* [R, 3] (maximum, its token id, log-sum-exp) over the valid columns of each row, NaN for a row
       holding NaN or infinity or no valid column; NULL: none. */
    double *stats;
    float norm_eps;
} StackEnds;

/* x [T, H] = each token's embedding row on this rank, or zeros. */
static void embed_tokens(const StackEnds *e, float *x, int64_t T, int64_t H) {
    for (int64_t t = 0; t < T; t++) {
        const int64_t row = e->token_ids[t] - e->vocab_start;
        float *xt = x + t * H;
        if (row < 0 || row >= e->vocab_rows) {
            memset(xt, 0, sizeof(float) * H);
        } else if (e->embedding_type == ELEMENT_BF16) {
            const uint16_t *w = (const uint16_t *)e->embedding + row * H;
#pragma omp simd
            for (int64_t i = 0; i < H; i++) xt[i] = bf16_to_float(w[i]);
        } else {
            memcpy(xt, (const float *)e->embedding + row * H, sizeof(float) * H);
        }
    }
}

/* value rounded to bf16 as torch rounds it (a NaN stays a NaN), widened back. */
static inline float bf16_rounded(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return value;
    return bf16_to_float(float_to_bf16(value));
}

/* The logits and statistics of the rows asked for, from the residual stream x [T, H]; scratch holds 2 R H
   floats. Returns 0, linear_rows' code, or 10 for a row outside the T tokens. */
static int head_rows(const StackEnds *e, const float *x, float *scratch, int64_t T, int64_t H) {
    const int64_t R = e->R, P = e->P;
    for (int64_t r = 0; r < R; r++)
        if (e->rows[r] < 0 || e->rows[r] >= T) return 10;
    float *normed = scratch; /* [R, H] */
    if (e->round_bf16) {
        uint16_t *rounded = (uint16_t *)(normed + R * H), *normed16 = rounded + R * H; /* [R, H] each */
        for (int64_t r = 0; r < R; r++) {
            const float *xr = x + e->rows[r] * H;
            for (int64_t i = 0; i < H; i++) rounded[r * H + i] = float_to_bf16(xr[i]);
        }
        rms_norm_bf16(rounded, e->norm_weight, normed16, R, H, e->norm_eps);
        for (int64_t i = 0; i < R * H; i++) normed[i] = bf16_to_float(normed16[i]);
    } else {
        for (int64_t r = 0; r < R; r++) rms_norm(x + e->rows[r] * H, e->norm_weight, normed + r * H, 1, H, e->norm_eps);
    }
    const int status = linear_rows(normed, e->head, (int)e->head_type, e->head_scale, e->logits, R, H, P);
    if (status) return status;
    if (e->round_bf16)
        for (int64_t i = 0; i < R * P; i++) e->logits[i] = bf16_rounded(e->logits[i]);
    if (e->stats == NULL) return 0;
    for (int64_t r = 0; r < R; r++) {
        const float *row = e->logits + r * P;
        double *packed = e->stats + 3 * r;
        if (e->valid <= 0 || !all_finite(row, e->valid)) {
            packed[0] = packed[1] = packed[2] = NAN;
            continue;
        }
        float best, logsumexp;
        int64_t best_at;
        row_stats(row, e->valid, &best, &best_at, &logsumexp);
        packed[0] = best;
        packed[1] = (double)(best_at + e->vocab_start);
        packed[2] = logsumexp;
    }
    return 0;
}
