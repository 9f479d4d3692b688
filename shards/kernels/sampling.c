/* Per-row argmax and log-sum-exp of fp32 logits, one CPU thread: what greedy sampling and the
   chosen token's log-probability need, without torch's full log_softmax [B, V] and its argmax
   (together ~1 ms a step at batch 32 over a 8k vocabulary here).

   Legend: B rows, V vocabulary. logits [B, V] contiguous; argmax [B] int64 (the first index of the
   row's maximum, as torch.argmax); logsumexp [B].
*/

#include <math.h>
#include <stdint.h>
#include <string.h>

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

int row_argmax_logsumexp(const float *logits, int64_t B, int64_t V, int64_t *argmax, float *logsumexp) {
    for (int64_t b = 0; b < B; b++) {
        const float *row = logits + b * V;
        if (!all_finite(row, V)) return 1;
        float best = row[0];
#pragma omp simd reduction(max : best)
        for (int64_t v = 1; v < V; v++) best = row[v] > best ? row[v] : best;
        int64_t best_at = 0;
        while (row[best_at] != best) best_at++;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t v = 0; v < V; v++) sum += expf(row[v] - best);
        argmax[b] = best_at;
        logsumexp[b] = best + logf(sum);
    }
    return 0;
}
