/* The element types the kernels read weights and KV caches in: fp32, or bf16 (the high half of an
   fp32, so widening is exact). Arithmetic is fp32 either way. */

#ifndef MIXSERVE_ELEMENT_TYPE_H
#define MIXSERVE_ELEMENT_TYPE_H

#include <stdint.h>
#include <string.h>

enum { ELEMENT_F32 = 0, ELEMENT_BF16 = 1 };

static inline int element_type_known(int type) { return type == ELEMENT_F32 || type == ELEMENT_BF16; }

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

/* Element i of p (of `type`) as a float. */
static inline float element_at(const void *p, int type, int64_t i) {
    return type == ELEMENT_BF16 ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* p advanced by `elements` elements of `type`. */
static inline const void *element_offset(const void *p, int type, int64_t elements) {
    return (const char *)p + elements * (type == ELEMENT_BF16 ? 2 : 4);
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
