/* The element types the kernels read weights and KV caches in: fp32, or bf16 (the high half of an
   fp32, so widening is exact); weights also in int8, weight-only quantized codes whose row n stands
   for codes[n] * scale[n] (one fp32 scale per output channel, passed beside the weight; the kernels
   multiply each row's dot product by it). Arithmetic is fp32 in every case. */

#ifndef MIXSERVE_ELEMENT_TYPE_H
#define MIXSERVE_ELEMENT_TYPE_H

#include <stdint.h>
#include <string.h>

enum { ELEMENT_F32 = 0, ELEMENT_BF16 = 1, ELEMENT_I8 = 2 };

/* The types a KV pool (and anything the kernels store into) may hold: fp32 or bf16. */
static inline int element_type_known(int type) { return type == ELEMENT_F32 || type == ELEMENT_BF16; }

/* The types a weight may hold: those, or int8 codes (which need their row scales). */
static inline int weight_type_known(int type) { return element_type_known(type) || type == ELEMENT_I8; }

static inline int64_t element_bytes(int type) { return type == ELEMENT_I8 ? 1 : type == ELEMENT_BF16 ? 2 : 4; }

/* The fp32 value of a bf16 number: its bits are the float's high half. */
static inline float bf16_to_float(uint16_t bits) {
    const uint32_t wide = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &wide, sizeof value);
    return value;
}

/* value rounded to the nearest bf16 (ties to even), as torch's .to(torch.bfloat16) rounds finite values. */
static inline uint16_t float_to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* Element i of p (of `type`) as a float: an int8 code unscaled. */
static inline float element_at(const void *p, int type, int64_t i) {
    if (type == ELEMENT_I8) return (float)((const int8_t *)p)[i];
    return type == ELEMENT_BF16 ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* p advanced by `elements` elements of `type`. */
static inline const void *element_offset(const void *p, int type, int64_t elements) {
    return (const char *)p + elements * element_bytes(type);
}

/* n floats stored at dst (of `type`) from src. */
static inline void store_elements(void *dst, int type, const float *src, int64_t n) {
    if (type == ELEMENT_BF16) {
        uint16_t *out = dst;
        for (int64_t i = 0; i < n; i++) out[i] = float_to_bf16(src[i]);
    } else {
        memcpy(dst, src, sizeof(float) * n);
    }
}

/* n elements of src (of `type`) as floats: src itself for fp32, else widened into buffer. */
static inline const float *load_elements(const void *src, int type, int64_t n, float *buffer) {
    if (type != ELEMENT_BF16) return src;
    const uint16_t *in = src;
#pragma omp simd
    for (int64_t i = 0; i < n; i++) buffer[i] = bf16_to_float(in[i]);
    return buffer;
}

#endif
