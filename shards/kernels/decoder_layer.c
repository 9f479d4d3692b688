/* One Mixtral decoder layer of a decode step (every token is its sequence's next), fp32 math over fp32,
   bf16 or int8 weights and fp32 or bf16 KV pools, one CPU thread, as two calls around the layer's two
   all-reduces, or every layer of the step in one call (decoder_stack, the all-reduces inside).

   At decode batch sizes the layer's arithmetic is small and its torch form is some forty small ops
   (norms, the projections, rotary, the KV write, routing, the residual adds), each paying dispatch
   and allocation: about two thirds of a two-shard decode step on the demo model. Here each half of
   the layer is one call that runs the kernels of this folder back to back in its own scratch.
   A unity build: the kernels' sources are included, so each keeps one spelling of its math.

   Legend: T tokens (one per sequence), H hidden size, h query heads and kv KV heads held, D head
   dim, S block size, M block-table width, P positions in the rotary tables, E experts held (from
   `first_expert` on) of `num_experts`, K experts per token, I intermediate size held.
   x [T, H] is the residual stream, updated in place: each call first adds `partial` (the summed
   output of the block before, NULL for none), then writes this rank's partial output of its own
   block to out [T, H] for the caller to all-reduce. Weights are row-major as the layers hold them:
   w_qkv [(h + 2 kv) D, H], w_o [H, h D], w13 [E, 2I, H], w2 [E, H, I], all of weight_type, with their
   row scales for int8 codes (qkv_scale [(h + 2 kv) D], o_scale [H], w13_scale [E, 2I], w2_scale [E, H];
   NULL otherwise); the router's gate [num_experts, H] of gate_type (never int8: routing decisions stay
   in the model's dtype); the pools [N, S, kv, D] of kv_type (element_type.h). x, partial, out, the
   norms' weights and the rotary tables are fp32.
*/

#include "shm_exchange.c" /* first: it defines _GNU_SOURCE before any system header */
#include "elementwise.c"
#include "moe.c"
#include "prefill_attention.c" /* and paged_attention.c, which it includes */
#include "stack_ends.c"

#define EVEN(n) (((n) + 1) & ~(int64_t)1) /* float counts kept even, so int64 arrays after them align */

static void add_partial(float *x, const float *partial, int64_t n) {
    if (partial == NULL) return;
#pragma omp simd
    for (int64_t i = 0; i < n; i++) x[i] += partial[i];
}

static int64_t attention_scratch(int64_t T, int64_t H, int64_t h, int64_t kv, int64_t D) {
    return T * H + T * (h + 2 * kv) * D + 2 * T * h * D + kv * D;
}

static int64_t moe_scratch(int64_t T, int64_t H, int64_t num_experts, int64_t K, int64_t E, int64_t I) {
    const int64_t pairs = T * K;
    return EVEN(T * H) + EVEN(T * num_experts) + EVEN(pairs) + 2 * pairs +
           pairs * (2 * I + 2 * H) + 2 * (pairs + 2 * (E + 1));
}

/* Floats of scratch either call needs. */
int64_t decoder_layer_scratch(int64_t T, int64_t H, int64_t h, int64_t kv, int64_t D, int64_t num_experts,
                              int64_t K, int64_t E, int64_t I) {
    const int64_t a = attention_scratch(T, H, h, kv, D), m = moe_scratch(T, H, num_experts, K, E, I);
    return a > m ? a : m;
}

/* x += partial; then this rank's o_proj partial of attention over the paged cache: RMSNorm, the
   q/k/v projection, rotary on q and k, k and v written to the cache at each token's slot, paged
   attention (context_lens count the token itself), o_proj. Returns 0, or the refusing kernel's
   code: 10 + rotary's (a position past the tables), 20 + paged attention's (1 heads, head dim or
   block size past its limits, 2 a context past its table row, 3 a block id outside the N blocks),
   30 a slot outside the pools, 40 an unknown weight or KV element type. */
int attention_block(float *x, const float *partial, const float *norm_weight, float eps, const void *w_qkv,
                    const void *w_o, const float *qkv_scale, const float *o_scale, const int64_t *positions, const float *cos_table, const float *sin_table,
                    int64_t P, const int64_t *slots, void *k_pool, void *v_pool, const int64_t *block_tables,
                    const int64_t *context_lens, int64_t M, int64_t N, float *out, float *scratch, int64_t T,
                    int64_t H, int64_t h, int64_t kv, int64_t D, int64_t S, float scale, int64_t window,
                    int weight_type, int kv_type) {
    const int64_t width = (h + 2 * kv) * D;
    float *normed = scratch;   /* [T, H] */
    float *qkv = normed + T * H; /* [T, (h + 2 kv) D] */
    float *q = qkv + T * width;  /* [T, h, D] rotated */
    float *attn = q + T * h * D; /* [T, h, D] */
    float *k_rotated = attn + T * h * D; /* [kv, D] one token's k before it is stored */
    if (!weight_type_known(weight_type) || !element_type_known(kv_type)) return 40;
    const int int8 = weight_type == ELEMENT_I8;
    if (int8 != (qkv_scale != NULL) || int8 != (o_scale != NULL)) return 40;
    for (int64_t t = 0; t < T; t++)
        if (slots[t] < 0 || slots[t] >= N * S) return 30;
    add_partial(x, partial, T * H);
    rms_norm(x, norm_weight, normed, T, H, eps);
    rows_times_weight(normed, T, H, w_qkv, weight_type, qkv_scale, width, H, qkv, width);
    int status = rotary(qkv, width, positions, cos_table, sin_table, q, T, h, D, P);
    if (status) return 10 + status;
    for (int64_t t = 0; t < T; t++) {
        const float *k = qkv + t * width + h * D;
        rotary(k, width, positions + t, cos_table, sin_table, k_rotated, 1, kv, D, P);
        store_elements((void *)element_offset(k_pool, kv_type, slots[t] * kv * D), kv_type, k_rotated, kv * D);
        store_elements((void *)element_offset(v_pool, kv_type, slots[t] * kv * D), kv_type, k + kv * D, kv * D);
    }
    status = paged_attention_rows(q, k_pool, v_pool, kv_type, block_tables, context_lens, attn, T, h, kv, D, S, M, N,
                                  scale, window);
    if (status) return 20 + status;
    rows_times_weight(attn, T, h * D, w_o, weight_type, o_scale, H, h * D, out, H);
    return 0;
}

/* Mixtral's routing of one token: softmax over the experts' logits, the top K (the lowest id on a
   tie), their probabilities renormalised to sum to one; the softmax's denominator cancels in the
   renormalisation, so only the chosen experts' exponentials are taken. Ids are among the experts
   held: id - first_expert, or E for an expert held elsewhere (moe_experts skips those). */
static void route_token(const float *logits, int64_t num_experts, int64_t K, int64_t first_expert, int64_t E,
                        float *weights, int64_t *ids) {
    uint64_t taken[4] = {0, 0, 0, 0}; /* up to 256 experts */
    float total = 0.0f;
    for (int64_t k = 0; k < K; k++) {
        int64_t best = -1;
        for (int64_t e = 0; e < num_experts; e++) {
            if (taken[e / 64] >> (e % 64) & 1) continue;
            if (best < 0 || logits[e] > logits[best]) best = e;
        }
        taken[best / 64] |= (uint64_t)1 << (best % 64);
        weights[k] = k == 0 ? 1.0f : expf(logits[best] - logits[ids[0]]);
        total += weights[k];
        ids[k] = best; /* global for now: the first one is the maximum the others are taken against */
    }
    for (int64_t k = 0; k < K; k++) {
        weights[k] /= total;
        const int64_t local = ids[k] - first_expert;
        ids[k] = local >= 0 && local < E ? local : E;
    }
}

/* x += partial; then this rank's partial output of the sparse MoE block: RMSNorm, the router gate,
   Mixtral's top-K routing, the experts held (moe.c). Returns 0, 1 for more than 256 experts, K
   outside [1, num_experts] or an unknown gate type, 2 for an unknown expert weight type or scales that
   do not match it (moe_experts' code). */
int moe_block(float *x, const float *partial, const float *norm_weight, float eps, const void *gate, int gate_type,
              const void *w13, const void *w2, const float *w13_scale, const float *w2_scale, float *out,
              float *scratch, int64_t T, int64_t H, int64_t num_experts, int64_t K, int64_t first_expert, int64_t E,
              int64_t I, int weight_type) {
    if (num_experts > 256 || K < 1 || K > num_experts || !element_type_known(gate_type)) return 1;
    if (!weight_type_known(weight_type)) return 2;
    const int64_t pairs = T * K;
    float *normed = scratch;                                     /* [T, H] */
    float *logits = normed + EVEN(T * H);                        /* [T, num_experts] */
    float *weights = logits + EVEN(T * num_experts);             /* [T, K] */
    int64_t *ids = (int64_t *)(weights + EVEN(pairs));           /* [T, K] */
    float *experts_scratch = (float *)(ids + pairs);
    add_partial(x, partial, T * H);
    rms_norm(x, norm_weight, normed, T, H, eps);
    rows_times_weight(normed, T, H, gate, gate_type, NULL, num_experts, H, logits, num_experts);
    for (int64_t t = 0; t < T; t++)
        route_token(logits + t * num_experts, num_experts, K, first_expert, E, weights + t * K, ids + t * K);
    return moe_experts(normed, weights, ids, w13, w2, weight_type, w13_scale, w2_scale, out, experts_scratch, T, H, K,
                       E, I);
}

/* One layer's own pointers for decoder_stack: its halves' weights (as attention_block and moe_block
   take them) and its KV pools. */
typedef struct {
    const float *attn_norm;
    const void *w_qkv, *w_o;
    const float *qkv_scale, *o_scale;
    const float *cos_table, *sin_table;
    void *k_pool, *v_pool;
    const float *moe_norm;
    const void *gate, *w13, *w2;
    const float *w13_scale, *w2_scale;
    float attn_eps, moe_eps;
} StackLayer;

/* Every layer of a step in one call: per layer attention_block, the all-reduce of its output,
   moe_block, the all-reduce of its output, then the last layer's summed MoE output added to x. The
   all-reduces are shm_all_reduce_f32 over the group's segment (shm_seq NULL: one rank, none), calls
   first_call, first_call + 1, ... as the Python group numbers them. What every layer shares (shapes,
   types, the attention scale and window) comes once. Returns 0; else sets *failed_layer and returns
   the refusing block's code (attention_block's, or 100 + moe_block's, or 200 + the head's linear_rows'),
   or -1 when a rank never reached an all-reduce within timeout_ns.
   With `ends` (stack_ends.c), x is filled with the tokens' embeddings first (summed over the ranks in
   call first_call, the layers' all-reduces numbered after it) and the rows asked for go through the
   final norm and the LM head after the last layer (scratch holds their 2 R H floats too). */
int decoder_stack(int64_t L, const StackLayer *layers, float *x, const int64_t *positions, int64_t P,
                  const int64_t *slots, const int64_t *block_tables, const int64_t *context_lens, int64_t M, int64_t N,
                  float *attn_out, float *moe_out, float *scratch, int64_t T, int64_t H, int64_t h, int64_t kv,
                  int64_t D, int64_t S, float scale, int64_t window, int weight_type, int kv_type, int gate_type,
                  int64_t num_experts, int64_t K, int64_t first_expert, int64_t E, int64_t I, int64_t *shm_seq,
                  char *shm_slots, int64_t slot_bytes, int64_t ranks, int64_t rank, int64_t first_call,
                  int64_t timeout_ns, int64_t *failed_layer, const StackEnds *ends) {
    const float *pending = NULL;
    int64_t call = first_call;
    *failed_layer = 0;
    if (ends != NULL) {
        embed_tokens(ends, x, T, H);
        if (shm_seq != NULL && shm_all_reduce_f32(shm_seq, shm_slots, slot_bytes, ranks, rank, call++, x, T * H, timeout_ns))
            return -1;
    }
    for (int64_t l = 0; l < L; l++) {
        const StackLayer *w = layers + l;
        *failed_layer = l;
        int status = attention_block(x, pending, w->attn_norm, w->attn_eps, w->w_qkv, w->w_o, w->qkv_scale, w->o_scale,
                                     positions, w->cos_table, w->sin_table, P, slots, w->k_pool, w->v_pool,
                                     block_tables, context_lens, M, N, attn_out, scratch, T, H, h, kv, D, S, scale,
                                     window, weight_type, kv_type);
        if (status) return status;
        if (shm_seq != NULL &&
            shm_all_reduce_f32(shm_seq, shm_slots, slot_bytes, ranks, rank, call++, attn_out, T * H, timeout_ns))
            return -1;
        status = moe_block(x, attn_out, w->moe_norm, w->moe_eps, w->gate, gate_type, w->w13, w->w2, w->w13_scale,
                           w->w2_scale, moe_out, scratch, T, H, num_experts, K, first_expert, E, I, weight_type);
        if (status) return 100 + status;
        if (shm_seq != NULL &&
            shm_all_reduce_f32(shm_seq, shm_slots, slot_bytes, ranks, rank, call++, moe_out, T * H, timeout_ns))
            return -1;
        pending = moe_out;
    }
    add_partial(x, pending, T * H);
    if (ends != NULL) {
        const int status = head_rows(ends, x, scratch, T, H);
        if (status) return 200 + status;
    }
    return 0;
}
