/* Single-query attention for many queries at once, each query reduced in the order torch's CPU
 * flash attention (torch 2.13, bf16, one query per head) reduces it, so that every query gets
 * bitwise what that library call gives it. Each query (a tree node and a head) attends to its
 * own keys: the first `prefix` cache rows, then its own list of ancestor rows. The prefix is read
 * in place for every query (no copy), which is what makes a tree cheap.
 *
 * The order, per query (identified by probing the library, see selfspec/hf.py and the docs):
 *  - score_j = dot(q, k_j) * scale; the dot in 4 lanes, lane l summing the exact bf16 products of
 *    d = l, l+4, l+8, ... in order, then (lane0 + lane2) + (lane1 + lane3);
 *  - keys in blocks of 512 with an online softmax: m = max(previous max, block max);
 *    e_j = fexp(score_j - m) for the block's leading multiple of 16 keys (the library's fast
 *    exponential, restated below), expf for the rest; the block sum adds the 16-key chunks into
 *    two alternating 16-lane accumulators, adds those, halves down to one lane, then adds the
 *    rest in order; sum = fma(expf(previous max - m), previous sum, block sum);
 *  - p_j = bf16(e_j); the output accumulator is scaled by expf(previous max - m) after the first
 *    block, then gets the block's p.V added in groups of 4 keys, (x0 + x2) + (x1 + x3), groups in
 *    order (the first block's first group initialises it); the 1-3 keys after the last whole group
 *    are added one at a time, last key first: ((acc + x2) + x1) + x0 (found on inputs whose outputs
 *    cancel to a few ulps of their terms, where any other order shows);
 *  - out = bf16(acc * (1 / sum)).
 * The caller checks the result bitwise against the library at load time and falls back to it
 * where they differ. Plain C, no torch headers, called through ctypes, single-threaded. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define KV_BLOCK 512
#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

TARGET static inline __m512 load16_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* The library's fast exp for 16 lanes (a degree-3 correction of 2^x built in the exponent bits). */
TARGET static inline __m512 fast_exp16(__m512 x) {
    const __m512 c0 = _mm512_set1_ps(0.00010703434948458272f), c1 = _mm512_set1_ps(0.30354260500649682f),
                 c2 = _mm512_set1_ps(-0.22433836478672356f), c3 = _mm512_set1_ps(-0.079204240219773236f);
    const __m512 log2e = _mm512_castsi512_ps(_mm512_set1_epi32(0x3fb8aa3b));
    const __m512 lo = _mm512_castsi512_ps(_mm512_set1_epi32((int)0xc2aeac50u));
    const __m512 hi = _mm512_castsi512_ps(_mm512_set1_epi32(0x42b17218));
    __mmask16 small = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OS), large = _mm512_cmp_ps_mask(x, hi, _CMP_GT_OS);
    __m512 t = _mm512_mul_ps(x, log2e);
    __m512 frac = _mm512_sub_ps(t, _mm512_floor_ps(t));
    __m512 r = _mm512_fmadd_ps(frac, c3, c2);
    r = _mm512_fmadd_ps(frac, r, c1);
    r = _mm512_fmadd_ps(frac, r, c0);
    t = _mm512_sub_ps(t, r);
    __m512 bits = _mm512_fmadd_ps(_mm512_set1_ps(8388608.f), t, _mm512_set1_ps(8388608.f * 127.f));
    __m512 res = _mm512_castsi512_ps(_mm512_cvttps_epi32(bits));
    res = _mm512_mask_blend_ps(small, res, _mm512_setzero_ps());
    return _mm512_mask_blend_ps(large, res, _mm512_set1_ps(INFINITY));
}

/* Half-down reduction of 16 lanes: (i + 8), then (i + 4), (i + 2), (i + 1). */
static inline float halve16(const float *a) {
    float x[16];
    memcpy(x, a, sizeof x);
    for (int h = 8; h >= 1; h >>= 1)
        for (int i = 0; i < h; i++) x[i] = x[i] + x[i + h];
    return x[0];
}

/* dot(q, k) in the 4-lane order; d a multiple of 4. */
TARGET static inline float dot4(const float *qf, const uint16_t *k, int64_t d) {
    __m128 acc = _mm_mul_ps(_mm_loadu_ps(qf), _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i *)k)), 16)));
    for (int64_t c = 4; c < d; c += 4) {
        __m128 kf = _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i *)(k + c))), 16));
        acc = _mm_add_ps(acc, _mm_mul_ps(_mm_loadu_ps(qf + c), kf));
    }
    float l[4];
    _mm_storeu_ps(l, acc);
    return (l[0] + l[2]) + (l[1] + l[3]);
}

static inline const uint16_t *row_ptr(const uint16_t *base, int64_t row_stride, int64_t prefix, const int64_t *anc,
                                      int64_t i) {
    return base + (i < prefix ? i : anc[i - prefix]) * row_stride;
}

/* One query over prefix + w ancestor rows. kq, vq: this query's K/V head bases; d <= 256, d % 16 == 0. */
TARGET static void one_query(const uint16_t *q, const uint16_t *kq, const uint16_t *vq, int64_t row_stride,
                             int64_t prefix, const int64_t *anc, int64_t w, int64_t d, float scale, uint16_t *out,
                             float *score, uint16_t *prob) {
    float qf[256], acc[256];
    for (int64_t i = 0; i < d; i++) qf[i] = bf16_to_f32(q[i]);
    int64_t total = prefix + w;
    float gmax = -INFINITY, gsum = 0.f;
    for (int64_t n0 = 0; n0 < total; n0 += KV_BLOCK) {
        int64_t nb = total - n0 < KV_BLOCK ? total - n0 : KV_BLOCK;
        float bmax = -INFINITY;
        for (int64_t j = 0; j < nb; j++) {
            float s = dot4(qf, row_ptr(kq, row_stride, prefix, anc, n0 + j), d) * scale;
            score[j] = s;
            bmax = s > bmax ? s : bmax;
        }
        float m = gmax > bmax ? gmax : bmax;
        __m512 vm = _mm512_set1_ps(m), s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
        int64_t j = 0;
        for (int chunk = 0; j + 16 <= nb; j += 16, chunk++) {
            __m512 e = fast_exp16(_mm512_sub_ps(_mm512_loadu_ps(score + j), vm));
            if (chunk & 1) s1 = _mm512_add_ps(s1, e);
            else s0 = _mm512_add_ps(s0, e);
            _mm512_storeu_ps(score + j, e);
        }
        float lanes[16], bsum;
        _mm512_storeu_ps(lanes, _mm512_add_ps(s0, s1));
        bsum = halve16(lanes);
        for (; j < nb; j++) {
            float e = expf(score[j] - m);
            bsum += e;
            score[j] = e;
        }
        for (j = 0; j < nb; j++) prob[j] = f32_to_bf16(score[j]);
        float et = expf(gmax - m);
        gsum = fmaf(et, gsum, bsum);
        gmax = m;
        if (n0 > 0)
            for (int64_t c = 0; c < d; c += 16) _mm512_storeu_ps(acc + c, _mm512_mul_ps(_mm512_loadu_ps(acc + c), _mm512_set1_ps(et)));
        int64_t whole = nb & ~(int64_t)3;
        for (int64_t g = 0; g < whole; g += 4) {
            const uint16_t *vr[4];
            __m512 pw[4];
            for (int i = 0; i < 4; i++) {
                vr[i] = row_ptr(vq, row_stride, prefix, anc, n0 + g + i);
                pw[i] = _mm512_set1_ps(bf16_to_f32(prob[g + i]));
            }
            for (int64_t c = 0; c < d; c += 16) {
                __m512 x[4];
                for (int i = 0; i < 4; i++) x[i] = _mm512_mul_ps(load16_bf16(vr[i] + c), pw[i]);
                __m512 gs = _mm512_add_ps(_mm512_add_ps(x[0], x[2]), _mm512_add_ps(x[1], x[3]));
                __m512 run = (n0 == 0 && g == 0) ? gs : _mm512_add_ps(_mm512_loadu_ps(acc + c), gs);
                _mm512_storeu_ps(acc + c, run);
            }
        }
        for (int64_t g = nb - 1; g >= whole; g--) {
            const uint16_t *vr = row_ptr(vq, row_stride, prefix, anc, n0 + g);
            __m512 pw = _mm512_set1_ps(bf16_to_f32(prob[g]));
            for (int64_t c = 0; c < d; c += 16) {
                __m512 x = _mm512_mul_ps(load16_bf16(vr + c), pw);
                __m512 run = (n0 == 0 && whole == 0 && g == nb - 1) ? x : _mm512_add_ps(_mm512_loadu_ps(acc + c), x);
                _mm512_storeu_ps(acc + c, run);
            }
        }
    }
    float inv = 1.f / gsum;
    for (int64_t c = 0; c < d; c++) out[c] = f32_to_bf16(acc[c] * inv);
}

/* q: [t, hq, d] bf16 contiguous; k, v: one layer's cache [hkv, rows, d] (head stride, row stride
 * in elements); anc: [t, max_w] cache rows of each query's ancestors, root first; widths: [t];
 * out: [t, hq, d]. Query head h reads K/V head h / (hq / hkv). work: 2 * 512 floats scratch. */
TARGET void tree_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, int64_t head_stride,
                           int64_t row_stride, int64_t prefix, const int64_t *anc, const int64_t *widths,
                           int64_t max_w, int64_t t, int64_t hq, int64_t hkv, int64_t d, float scale,
                           uint16_t *out) {
    float score[KV_BLOCK];
    uint16_t prob[KV_BLOCK];
    int64_t group = hq / hkv;
    for (int64_t n = 0; n < t; n++)
        for (int64_t h = 0; h < hq; h++) {
            int64_t g = h / group;
            one_query(q + (n * hq + h) * d, k + g * head_stride, v + g * head_stride, row_stride, prefix,
                      anc + n * max_w, widths[n], d, scale, out + (n * hq + h) * d, score, prob);
        }
}
