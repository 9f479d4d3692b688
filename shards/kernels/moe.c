/* Mixtral's expert MLPs for a decode-sized batch, fp32 math over fp32, bf16 or int8 weights, one CPU thread:
   one call per MoE layer.

   At a handful of tokens per expert the torch path is a loop of small matmuls (two per expert, plus
   the slicing and the activation between them): MKL's GEMM reaches a fraction of the machine's
   bandwidth at 1-16 rows, and the Python loop costs as much again. Here the (token, expert) pairs
   are bucketed by expert and each expert's weights are streamed once, eight weight rows at a time
   against every one of its rows, so the weights are read from memory once and reused from L1.

   Legend: T tokens, H hidden size, K experts per token, E experts held (w13 [E, 2I, H] = w1 over
   w3, w2 [E, H, I], both of weight_type: element_type.h; for int8 codes their row scales w13_scale
   [E, 2I] and w2_scale [E, H], else NULL), I intermediate size held, P pairs routed to the experts held.
   Inputs: hidden [T, H]; routing weights [T, K] (fp32) and expert ids [T, K] (ids >= E are held
   elsewhere and skipped); out [T, H] receives this rank's partial sum. scratch holds at least
   P (2I + 2H) floats and then P + 2 (E + 1) int64, with P = T K.
*/

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "rows_times_weight.h"

/* The floats per vector of the matmul loop this build runs (16 with AVX-512, 8 with AVX2, 1 without):
   the wider, the more tokens per step it beats MKL's GEMM at. */
int moe_vector_floats(void) {
#if defined(HAVE_AVX512)
    return 16;
#elif defined(HAVE_AVX2)
    return 8;
#else
    return 1;
#endif
}

/* 1 where bf16 weights meet activations rounded to bf16 (rows_times_weight.h, vdpbf16ps), 0 where they
   are widened to fp32 against fp32 activations. */
int moe_bf16_dot_products(void) { return bf16_dot_products(); }

/* 1 where a bf16 model's int8 codes meet activations quantized to 15 bits in an int16 dot product (VNNI's
   rows_times_codes_dpwssd.h, AVX2's rows_times_codes_maddwd.h), 0 where they meet them rounded to bf16 (or
   widened to fp32); moe_int8_int16_takes: whether it takes codes of K inputs. */
int moe_int8_int16_dot_products(void) { return int8_int16_dot_products(); }
int moe_int8_int16_takes(int64_t K) { return int8_int16_takes(K); }

/* 1 where bf16 weights of 1 MiB and more (K 512 and more) meet activations rounded to bf16 in AMX's tiles
   (rows_times_weight_amx.h), 0 where every bf16 product takes the vector path. */
int moe_amx_tile_products(void) { return amx_tile_products(); }

int moe_experts(const float *hidden, const float *routing_weights, const int64_t *expert_ids, const void *w13,
                const void *w2, int weight_type, const float *w13_scale, const float *w2_scale, float *out,
                float *scratch, int64_t T, int64_t H, int64_t K, int64_t E, int64_t I) {
    if (!weight_type_known(weight_type)) return 2;
    const int int8 = weight_type == ELEMENT_I8;
    if (int8 != (w13_scale != NULL) || int8 != (w2_scale != NULL)) return 2;
    const int64_t pairs = T * K;
    float *rows = scratch;                 /* [P, H] the routed tokens, grouped by expert */
    float *gate_up = rows + pairs * H;     /* [P, 2I] */
    float *down = gate_up + pairs * 2 * I; /* [P, H] */
    int64_t *pair_of = (int64_t *)(down + pairs * H);
    int64_t *count = pair_of + pairs; /* [E + 1] then [E + 1] starts */
    int64_t *start = count + (E + 1);
    memset(count, 0, sizeof(int64_t) * (E + 1));
    for (int64_t p = 0; p < pairs; p++) {
        const int64_t e = expert_ids[p];
        if (e < 0) return 1;
        count[e < E ? e : E]++;
    }
    start[0] = 0;
    for (int64_t e = 0; e < E; e++) start[e + 1] = start[e] + count[e];
    memset(count, 0, sizeof(int64_t) * (E + 1));
    for (int64_t p = 0; p < pairs; p++) {
        const int64_t e = expert_ids[p];
        if (e >= E) continue;
        const int64_t slot = start[e] + count[e]++;
        pair_of[slot] = p;
        memcpy(rows + slot * H, hidden + (p / K) * H, sizeof(float) * H);
    }
    memset(out, 0, sizeof(float) * T * H);
    for (int64_t e = 0; e < E; e++) {
        const int64_t first = start[e], n = start[e + 1] - first;
        if (n == 0) continue;
        float *gu = gate_up + first * 2 * I;
        const void *w13_e = element_offset(w13, weight_type, e * 2 * I * H);
        const void *w2_e = element_offset(w2, weight_type, e * H * I);
        const float *w13_scale_e = int8 ? w13_scale + e * 2 * I : NULL, *w2_scale_e = int8 ? w2_scale + e * H : NULL;
        rows_times_weight(rows + first * H, n, H, w13_e, weight_type, w13_scale_e, 2 * I, H, gu, 2 * I);
        for (int64_t r = 0; r < n; r++) {
            float *g = gu + r * 2 * I;
            const float *u = g + I;
#pragma omp simd
            for (int64_t i = 0; i < I; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
        }
        rows_times_weight(gu, n, 2 * I, w2_e, weight_type, w2_scale_e, H, I, down + first * H, H);
        for (int64_t r = 0; r < n; r++) {
            const int64_t p = pair_of[first + r];
            const float weight = routing_weights[p];
            float *o = out + (p / K) * H;
            const float *d = down + (first + r) * H;
#pragma omp simd
            for (int64_t h = 0; h < H; h++) o[h] += weight * d[h];
        }
    }
    return 0;
}
