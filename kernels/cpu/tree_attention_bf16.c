/* Single-query attention for many queries at once, each query reduced in the order torch's CPU
 * flash attention (torch 2.13, bf16, one query per head) reduces it, so that every query gets
 * bitwise what that library call gives it. Each query (a tree node and a head) attends to its
 * own keys: the first `prefix` cache rows, then its own list of ancestor rows.
 *
 * How it is fast while keeping each query's order: the queries that read one K/V head (the
 * head's group, for every node) share each block of prefix keys, converted to fp32 once per
 * block (K transposed into 16-key tiles, so one vector holds 16 keys' lane sums and each key's
 * 4-lane order is kept; V row by row); scores and p.V then run over all of those queries a
 * 64-key sub-block at a time, so the keys stay in L1. A product of two bf16 values is exact in
 * fp32 (short of an underflow below 2^-126), so fma(a, b, s) rounds exactly as s + a * b does:
 * the kernel fuses where the library multiplies and then adds, and the sums are unchanged.
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
#include <stdlib.h>
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

/* The queries that read one K/V head: Q of them, query i is node i / group, head h0 + i % group.
 * Blocks of keys are shared by every query whose keys reach them: the prefix rows of a block are
 * converted to fp32 once (K in 16-key tiles, [tile][c][16], so 16 keys' dots run in one vector
 * with each key's 4-lane order kept; V row-major) and read by all Q queries; a query's ancestor
 * rows (after the prefix) are read from the cache one at a time. */
typedef struct {
    const uint16_t *q, *kh, *vh; /* queries [t, hq, d]; this K/V head's rows */
    int64_t row_stride, prefix, max_w, t, hq, group, h0, d;
    const int64_t *anc, *widths;
    float scale;
    uint16_t *out;
} head_job;

/* V of key j of a block for one query, 16 lanes at column c: the shared fp32 copy or the cache. */
TARGET static inline __m512 v_at(const head_job *jb, const float *vf, int64_t ns, int64_t n0, int64_t node,
                                 int64_t j, int64_t c) {
    if (j < ns) return _mm512_loadu_ps(vf + j * jb->d + c);
    return load16_bf16(jb->vh + jb->anc[node * jb->max_w + (n0 + j - jb->prefix)] * jb->row_stride + c);
}

/* 16 keys' rows (bf16, `rows` <= 16 of them; missing rows read as zero) into one fp32 tile
 * [c][16]: 16x16 transposes in registers. */
TARGET static void k_tile(const uint16_t *k0, int64_t row_stride, int64_t rows, int64_t d, float *tile) {
    for (int64_t c0 = 0; c0 < d; c0 += 16) {
        __m512 r[16], t[16], u[16];
        for (int i = 0; i < 16; i++) r[i] = i < rows ? load16_bf16(k0 + i * row_stride + c0) : _mm512_setzero_ps();
        for (int i = 0; i < 16; i += 2) {
            t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
            t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
        }
        for (int i = 0; i < 16; i += 4) {
            u[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
            u[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
            u[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
            u[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
        }
        for (int h = 0; h < 16; h += 8)
            for (int i = 0; i < 4; i++) {
                r[h + i] = _mm512_shuffle_f32x4(u[h + i], u[h + 4 + i], 0x88);
                r[h + 4 + i] = _mm512_shuffle_f32x4(u[h + i], u[h + 4 + i], 0xDD);
            }
        for (int i = 0; i < 8; i++) {
            _mm512_storeu_ps(tile + (c0 + i) * 16, _mm512_shuffle_f32x4(r[i], r[i + 8], 0x88));
            _mm512_storeu_ps(tile + (c0 + 8 + i) * 16, _mm512_shuffle_f32x4(r[i], r[i + 8], 0xDD));
        }
    }
}

#define SUB 64 /* keys per L1-resident sub-block: scores and p.V run over all queries per sub-block */

/* Scores of shared keys [lo, hi) for one query, 32 keys (two tiles) per pass where it can. A
 * product of two bf16 values is exact in fp32, so fma(q, k, acc) rounds exactly as acc + q * k:
 * the 4-lane order is kept with half the instructions. */
TARGET static void shared_scores(const float *kt, const float *qf, int64_t lo, int64_t hi, int64_t d, __m512 vscale,
                                 float *score) {
    int64_t j = lo;
    for (; j + 32 <= hi; j += 32) {
        const float *t0 = kt + (j >> 4) * d * 16, *t1 = t0 + d * 16;
        __m512 b0 = _mm512_set1_ps(qf[0]), b1 = _mm512_set1_ps(qf[1]), b2 = _mm512_set1_ps(qf[2]),
               b3 = _mm512_set1_ps(qf[3]);
        __m512 a0 = _mm512_mul_ps(b0, _mm512_loadu_ps(t0)), c0 = _mm512_mul_ps(b0, _mm512_loadu_ps(t1));
        __m512 a1 = _mm512_mul_ps(b1, _mm512_loadu_ps(t0 + 16)), c1 = _mm512_mul_ps(b1, _mm512_loadu_ps(t1 + 16));
        __m512 a2 = _mm512_mul_ps(b2, _mm512_loadu_ps(t0 + 32)), c2 = _mm512_mul_ps(b2, _mm512_loadu_ps(t1 + 32));
        __m512 a3 = _mm512_mul_ps(b3, _mm512_loadu_ps(t0 + 48)), c3 = _mm512_mul_ps(b3, _mm512_loadu_ps(t1 + 48));
        for (int64_t c = 4; c < d; c += 4) {
            b0 = _mm512_set1_ps(qf[c]);
            b1 = _mm512_set1_ps(qf[c + 1]);
            b2 = _mm512_set1_ps(qf[c + 2]);
            b3 = _mm512_set1_ps(qf[c + 3]);
            a0 = _mm512_fmadd_ps(b0, _mm512_loadu_ps(t0 + c * 16), a0);
            c0 = _mm512_fmadd_ps(b0, _mm512_loadu_ps(t1 + c * 16), c0);
            a1 = _mm512_fmadd_ps(b1, _mm512_loadu_ps(t0 + (c + 1) * 16), a1);
            c1 = _mm512_fmadd_ps(b1, _mm512_loadu_ps(t1 + (c + 1) * 16), c1);
            a2 = _mm512_fmadd_ps(b2, _mm512_loadu_ps(t0 + (c + 2) * 16), a2);
            c2 = _mm512_fmadd_ps(b2, _mm512_loadu_ps(t1 + (c + 2) * 16), c2);
            a3 = _mm512_fmadd_ps(b3, _mm512_loadu_ps(t0 + (c + 3) * 16), a3);
            c3 = _mm512_fmadd_ps(b3, _mm512_loadu_ps(t1 + (c + 3) * 16), c3);
        }
        _mm512_storeu_ps(score + j, _mm512_mul_ps(_mm512_add_ps(_mm512_add_ps(a0, a2), _mm512_add_ps(a1, a3)), vscale));
        _mm512_storeu_ps(score + j + 16,
                         _mm512_mul_ps(_mm512_add_ps(_mm512_add_ps(c0, c2), _mm512_add_ps(c1, c3)), vscale));
    }
    for (; j < hi; j += 16) {
        const float *tk = kt + (j >> 4) * d * 16;
        __m512 a0 = _mm512_mul_ps(_mm512_set1_ps(qf[0]), _mm512_loadu_ps(tk));
        __m512 a1 = _mm512_mul_ps(_mm512_set1_ps(qf[1]), _mm512_loadu_ps(tk + 16));
        __m512 a2 = _mm512_mul_ps(_mm512_set1_ps(qf[2]), _mm512_loadu_ps(tk + 32));
        __m512 a3 = _mm512_mul_ps(_mm512_set1_ps(qf[3]), _mm512_loadu_ps(tk + 48));
        for (int64_t c = 4; c < d; c += 4) {
            a0 = _mm512_fmadd_ps(_mm512_set1_ps(qf[c]), _mm512_loadu_ps(tk + c * 16), a0);
            a1 = _mm512_fmadd_ps(_mm512_set1_ps(qf[c + 1]), _mm512_loadu_ps(tk + (c + 1) * 16), a1);
            a2 = _mm512_fmadd_ps(_mm512_set1_ps(qf[c + 2]), _mm512_loadu_ps(tk + (c + 2) * 16), a2);
            a3 = _mm512_fmadd_ps(_mm512_set1_ps(qf[c + 3]), _mm512_loadu_ps(tk + (c + 3) * 16), a3);
        }
        __m512 s = _mm512_add_ps(_mm512_add_ps(a0, a2), _mm512_add_ps(a1, a3));
        _mm512_storeu_ps(score + j, _mm512_mul_ps(s, vscale));
    }
}

/* p.V of whole 4-key groups g in [lo, hi) inside the shared rows (fp32 copy in vf); pf: the
 * probabilities as fp32 values of their bf16 roundings. Columns outer, so each 16-column slice
 * of acc stays in a register over the groups; each column's order is unchanged. The products
 * (bf16 value times bf16 probability) are exact, so (x0 + x2) = fma(v0, p0, x2). */
#define PV_GROUP(V, P0, P1, P2, P3, D)                                                                     \
    _mm512_add_ps(_mm512_fmadd_ps(_mm512_loadu_ps(V), P0, _mm512_mul_ps(_mm512_loadu_ps((V) + 2 * (D)), P2)), \
                  _mm512_fmadd_ps(_mm512_loadu_ps((V) + (D)), P1, _mm512_mul_ps(_mm512_loadu_ps((V) + 3 * (D)), P3)))

TARGET static void shared_pv(const float *vf, const float *pf, int64_t lo, int64_t hi, int64_t d, int first,
                             float *acc) {
    int64_t c0 = 0;
    for (; c0 + 64 <= d; c0 += 64) { /* 4 slices at once: independent add chains */
        __m512 r0 = _mm512_loadu_ps(acc + c0), r1 = _mm512_loadu_ps(acc + c0 + 16);
        __m512 r2 = _mm512_loadu_ps(acc + c0 + 32), r3 = _mm512_loadu_ps(acc + c0 + 48);
        int64_t g = lo;
        if (first && g == 0) {
            const float *v = vf + c0;
            const __m512 p0 = _mm512_set1_ps(pf[0]), p1 = _mm512_set1_ps(pf[1]);
            const __m512 p2 = _mm512_set1_ps(pf[2]), p3 = _mm512_set1_ps(pf[3]);
            r0 = PV_GROUP(v, p0, p1, p2, p3, d);
            r1 = PV_GROUP(v + 16, p0, p1, p2, p3, d);
            r2 = PV_GROUP(v + 32, p0, p1, p2, p3, d);
            r3 = PV_GROUP(v + 48, p0, p1, p2, p3, d);
            g += 4;
        }
        for (; g < hi; g += 4) {
            const float *v = vf + g * d + c0;
            const __m512 p0 = _mm512_set1_ps(pf[g]), p1 = _mm512_set1_ps(pf[g + 1]);
            const __m512 p2 = _mm512_set1_ps(pf[g + 2]), p3 = _mm512_set1_ps(pf[g + 3]);
            r0 = _mm512_add_ps(r0, PV_GROUP(v, p0, p1, p2, p3, d));
            r1 = _mm512_add_ps(r1, PV_GROUP(v + 16, p0, p1, p2, p3, d));
            r2 = _mm512_add_ps(r2, PV_GROUP(v + 32, p0, p1, p2, p3, d));
            r3 = _mm512_add_ps(r3, PV_GROUP(v + 48, p0, p1, p2, p3, d));
        }
        _mm512_storeu_ps(acc + c0, r0);
        _mm512_storeu_ps(acc + c0 + 16, r1);
        _mm512_storeu_ps(acc + c0 + 32, r2);
        _mm512_storeu_ps(acc + c0 + 48, r3);
    }
    for (; c0 < d; c0 += 16) {
        __m512 r = _mm512_loadu_ps(acc + c0);
        for (int64_t g = lo; g < hi; g += 4) {
            const __m512 x = PV_GROUP(vf + g * d + c0, _mm512_set1_ps(pf[g]), _mm512_set1_ps(pf[g + 1]),
                                      _mm512_set1_ps(pf[g + 2]), _mm512_set1_ps(pf[g + 3]), d);
            r = (first && g == 0) ? x : _mm512_add_ps(r, x);
        }
        _mm512_storeu_ps(acc + c0, r);
    }
}

/* Per query: state [d + 2] (acc, running max, running sum) and scores [KV_BLOCK] (fp32; after the
 * softmax terms, each p_j as the fp32 value of its bf16 rounding, which p.V multiplies by). */
TARGET static void run_head(const head_job *jb, float *kt, float *vf, float *state, float *scores) {
    const int64_t d = jb->d, nq = jb->t * jb->group, prefix = jb->prefix;
    const __m512 vscale = _mm512_set1_ps(jb->scale);
    int64_t longest = 0;
    for (int64_t n = 0; n < jb->t; n++) longest = jb->widths[n] > longest ? jb->widths[n] : longest;
    float *qfs = state + nq * (d + 2); /* [nq, d] the queries in fp32 */
    for (int64_t i = 0; i < nq; i++) {
        state[i * (d + 2) + d] = -INFINITY;
        state[i * (d + 2) + d + 1] = 0.f;
        const uint16_t *qrow = jb->q + ((i / jb->group) * jb->hq + jb->h0 + i % jb->group) * d;
        for (int64_t c = 0; c < d; c++) qfs[i * d + c] = bf16_to_f32(qrow[c]);
    }
    for (int64_t n0 = 0; n0 < prefix + longest; n0 += KV_BLOCK) {
        int64_t ns = prefix - n0 < KV_BLOCK ? prefix - n0 : KV_BLOCK; /* shared (prefix) rows of the block */
        if (ns < 0) ns = 0;
        for (int64_t j = 0; j < ns; j += 16)
            k_tile(jb->kh + (n0 + j) * jb->row_stride, jb->row_stride, ns - j < 16 ? ns - j : 16, d, kt + j * d);
        for (int64_t j = 0; j < ns; j++) {
            const uint16_t *vr = jb->vh + (n0 + j) * jb->row_stride;
            for (int64_t c = 0; c < d; c += 16) _mm512_storeu_ps(vf + j * d + c, load16_bf16(vr + c));
        }
        /* scores of the shared keys, a sub-block at a time for every query (lanes past ns are ignored) */
        for (int64_t lo = 0; lo < ns; lo += SUB) {
            int64_t hi = lo + SUB < ns ? lo + SUB : ns;
            for (int64_t i = 0; i < nq; i++) {
                if (n0 >= prefix + jb->widths[i / jb->group]) continue;
                shared_scores(kt, qfs + i * d, lo, hi, d, vscale, scores + i * KV_BLOCK);
            }
        }
        /* per query: the ancestor keys' scores, the block's softmax terms, rescaling of acc */
        for (int64_t i = 0; i < nq; i++) {
            const int64_t node = i / jb->group, total = prefix + jb->widths[node];
            if (n0 >= total) continue;
            const int64_t nb = total - n0 < KV_BLOCK ? total - n0 : KV_BLOCK;
            float *score = scores + i * KV_BLOCK, *acc = state + i * (d + 2), *gm = acc + d, *gs = acc + d + 1;
            for (int64_t j = ns; j < nb; j++)
                score[j] = dot4(qfs + i * d, jb->kh + jb->anc[node * jb->max_w + (n0 + j - prefix)] * jb->row_stride, d) *
                           jb->scale;
            __m512 vmax = _mm512_set1_ps(-INFINITY); /* the order of a max does not matter; NaN is skipped */
            int64_t jm = 0;
            for (; jm + 16 <= nb; jm += 16) vmax = _mm512_max_ps(_mm512_loadu_ps(score + jm), vmax);
            float bmax = _mm512_reduce_max_ps(vmax);
            for (; jm < nb; jm++) bmax = score[jm] > bmax ? score[jm] : bmax;
            float m = *gm > bmax ? *gm : bmax;
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
            for (j = 0; j < nb; j++) {
                score[j] = bf16_to_f32(f32_to_bf16(score[j])); /* p_j = bf16(e_j) */
            }
            float et = expf(*gm - m);
            *gs = fmaf(et, *gs, bsum);
            *gm = m;
            if (n0 > 0)
                for (int64_t c = 0; c < d; c += 16)
                    _mm512_storeu_ps(acc + c, _mm512_mul_ps(_mm512_loadu_ps(acc + c), _mm512_set1_ps(et)));
        }
        /* p.V of the whole 4-key groups inside the shared rows, a sub-block at a time for every query */
        for (int64_t lo = 0; lo < ns; lo += SUB) {
            for (int64_t i = 0; i < nq; i++) {
                const int64_t total = prefix + jb->widths[i / jb->group];
                if (n0 >= total) continue;
                const int64_t nb = total - n0 < KV_BLOCK ? total - n0 : KV_BLOCK;
                int64_t hi = lo + SUB, end = (nb < ns ? nb : ns) & ~(int64_t)3; /* whole groups within ns */
                hi = hi < end ? hi : end;
                if (lo < hi) shared_pv(vf, scores + i * KV_BLOCK, lo, hi, d, n0 == 0, state + i * (d + 2));
            }
        }
        /* the rest of each query's block: groups reaching past the shared rows, then the 1-3 last keys */
        for (int64_t i = 0; i < nq; i++) {
            const int64_t node = i / jb->group, total = prefix + jb->widths[node];
            if (n0 >= total) continue;
            const int64_t nb = total - n0 < KV_BLOCK ? total - n0 : KV_BLOCK;
            const int64_t whole = nb & ~(int64_t)3;
            const float *pf = scores + i * KV_BLOCK;
            float *acc = state + i * (d + 2);
            for (int64_t g = (nb < ns ? nb : ns) & ~(int64_t)3; g < whole; g += 4) {
                __m512 pw[4];
                for (int k = 0; k < 4; k++) pw[k] = _mm512_set1_ps(pf[g + k]);
                for (int64_t c = 0; c < d; c += 16) {
                    __m512 x[4];
                    for (int k = 0; k < 4; k++) x[k] = _mm512_mul_ps(v_at(jb, vf, ns, n0, node, g + k, c), pw[k]);
                    __m512 gsum4 = _mm512_add_ps(_mm512_add_ps(x[0], x[2]), _mm512_add_ps(x[1], x[3]));
                    __m512 run = (n0 == 0 && g == 0) ? gsum4 : _mm512_add_ps(_mm512_loadu_ps(acc + c), gsum4);
                    _mm512_storeu_ps(acc + c, run);
                }
            }
            for (int64_t g = nb - 1; g >= whole; g--) {
                __m512 pw = _mm512_set1_ps(pf[g]);
                for (int64_t c = 0; c < d; c += 16) {
                    __m512 x = _mm512_mul_ps(v_at(jb, vf, ns, n0, node, g, c), pw);
                    __m512 run =
                        (n0 == 0 && whole == 0 && g == nb - 1) ? x : _mm512_add_ps(_mm512_loadu_ps(acc + c), x);
                    _mm512_storeu_ps(acc + c, run);
                }
            }
        }
    }
    for (int64_t i = 0; i < nq; i++) {
        const int64_t node = i / jb->group, head = jb->h0 + i % jb->group;
        const float *acc = state + i * (d + 2);
        float inv = 1.f / acc[d + 1];
        uint16_t *o = jb->out + (node * jb->hq + head) * d;
        for (int64_t c = 0; c < d; c++) o[c] = f32_to_bf16(acc[c] * inv);
    }
}

/* Scratch that grows as needed, one per thread: K tiles and V rows of a block, per-query state. */
static __thread float *scratch = NULL;
static __thread int64_t scratch_len = 0;

static float *scratch_for(int64_t floats) {
    if (floats > scratch_len) {
        free(scratch);
        scratch = (float *)aligned_alloc(64, (size_t)((floats + 15) / 16 * 16) * sizeof(float));
        if (scratch == NULL) {
            scratch_len = 0;
            return NULL;
        }
        memset(scratch, 0, (size_t)((floats + 15) / 16 * 16) * sizeof(float));
        scratch_len = (floats + 15) / 16 * 16;
    }
    return scratch;
}

/* q: [t, hq, d] bf16 contiguous; k, v: one layer's cache [hkv, rows, d] (head stride, row stride
 * in elements); anc: [t, max_w] cache rows of each query's ancestors, root first; widths: [t];
 * out: [t, hq, d]. Query head h reads K/V head h / (hq / hkv). Returns 0, or -1 when scratch
 * memory could not be allocated (out is then unwritten). */
TARGET int tree_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, int64_t head_stride,
                          int64_t row_stride, int64_t prefix, const int64_t *anc, const int64_t *widths,
                          int64_t max_w, int64_t t, int64_t hq, int64_t hkv, int64_t d, float scale,
                          uint16_t *out) {
    int64_t group = hq / hkv, nq = t * group;
    /* K tiles, V rows, per query: state + fp32 query, scores */
    float *buf = scratch_for(2 * KV_BLOCK * d + nq * (2 * d + 2) + nq * KV_BLOCK);
    if (buf == NULL) return -1;
    float *kt = buf, *vf = buf + KV_BLOCK * d, *state = vf + KV_BLOCK * d, *scores = state + nq * (2 * d + 2);
    for (int64_t g = 0; g < hkv; g++) {
        head_job jb = {q, k + g * head_stride, v + g * head_stride, row_stride, prefix, max_w, t, hq, group,
                       g * group, d, anc, widths, scale, out};
        run_head(&jb, kt, vf, state, scores);
    }
    return 0;
}
