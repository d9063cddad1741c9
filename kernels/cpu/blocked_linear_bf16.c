/* y = x @ w.T (+ bias) in bf16 on AVX512_BF16 CPUs, every row reduced in one fixed order.
 *
 * Each output is the sum of its K-blocks of `block` elements: each block is accumulated from zero
 * pair by pair with VDPBF16PS (fp32 accumulator; per pair the odd element's product is added
 * first, then the even one's; denormals flushed as the instruction does), the block sums are
 * added left to right in fp32, then a bf16 bias is added in fp32 and the result rounded to bf16
 * (round to nearest even). That order does not depend on the number of rows, which is the point:
 * a library GEMM may block K differently for one row than for several. Which block size
 * reproduces the library's one-row call is measured by the caller (selfspec.kernels.cpu), not
 * assumed.
 *
 * Weights are packed once by pack_weight() into [tiles][K/2][16][2] (for each tile of 16 outputs,
 * K/2 pairs of 16 lanes x 2 bf16: the layout VDPBF16PS reads), tiles padded with zero outputs to a
 * multiple of GROUP. Plain C with no torch headers, called through ctypes; single-threaded (a
 * verify step has a few rows, and the caller's library threads are idle meanwhile). */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define TILE 16  /* outputs per vector */
#define GROUP 4  /* output tiles per micro-kernel */
#define ROWS 4   /* rows per micro-kernel: ROWS x GROUP independent accumulators */

int64_t packed_elements(int64_t n, int64_t k) {
    int64_t tiles = (n + TILE - 1) / TILE;
    tiles = (tiles + GROUP - 1) / GROUP * GROUP;
    return tiles * (k / 2) * TILE * 2;
}

/* w: [n, k] bf16 row-major (k even) -> out: packed_elements(n, k) bf16. */
void pack_weight(const uint16_t *w, uint16_t *out, int64_t n, int64_t k) {
    int64_t pairs = k / 2, tiles = packed_elements(n, k) / (pairs * TILE * 2);
    for (int64_t t = 0; t < tiles; t++)
        for (int64_t p = 0; p < pairs; p++)
            for (int64_t lane = 0; lane < TILE; lane++) {
                int64_t row = t * TILE + lane;
                uint16_t *dst = out + ((t * pairs + p) * TILE + lane) * 2;
                dst[0] = row < n ? w[row * k + 2 * p] : 0;
                dst[1] = row < n ? w[row * k + 2 * p + 1] : 0;
            }
}

__attribute__((target("avx512f,avx512bf16,avx512bw,avx512vl"), always_inline))
static inline void micro(const uint16_t *x, int64_t x_stride, const uint16_t *wp, const uint16_t *bias,
                         uint16_t *y, int64_t n, int64_t pairs, int64_t block_pairs, int64_t t0, const int R) {
    __m512 total[ROWS][GROUP];
    const uint16_t *w[GROUP];
    for (int i = 0; i < GROUP; i++) w[i] = wp + (t0 + i) * pairs * TILE * 2;
    for (int64_t start = 0; start < pairs; start += block_pairs) {
        int64_t stop = start + block_pairs < pairs ? start + block_pairs : pairs;
        __m512 acc[ROWS][GROUP];
        for (int r = 0; r < R; r++)
            for (int i = 0; i < GROUP; i++) acc[r][i] = _mm512_setzero_ps();
        for (int64_t p = start; p < stop; p++) {
            __m512bh wv[GROUP];
            for (int i = 0; i < GROUP; i++) wv[i] = (__m512bh)_mm512_loadu_si512(w[i] + p * TILE * 2);
            for (int r = 0; r < R; r++) {
                int32_t xp;
                memcpy(&xp, x + r * x_stride + 2 * p, 4);
                __m512bh xb = (__m512bh)_mm512_set1_epi32(xp);
                for (int i = 0; i < GROUP; i++) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], wv[i], xb);
            }
        }
        for (int r = 0; r < R; r++)
            for (int i = 0; i < GROUP; i++)
                total[r][i] = start == 0 ? acc[r][i] : _mm512_add_ps(total[r][i], acc[r][i]);
    }
    for (int i = 0; i < GROUP; i++) {
        int64_t col = (t0 + i) * TILE, left = n - col;
        if (left <= 0) break;
        __mmask16 m = left >= TILE ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
        __m512 b = _mm512_setzero_ps();
        if (bias) /* bf16 -> fp32 is exact: shift the bits into the high half */
            b = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, bias + col)), 16));
        for (int r = 0; r < R; r++) {
            __m512 v = bias ? _mm512_add_ps(total[r][i], b) : total[r][i];
            _mm256_mask_storeu_epi16(y + r * n + col, m, (__m256i)_mm512_cvtneps_pbh(v));
        }
    }
}

/* x: [m, k] bf16 (row stride x_stride elements); wp: packed weight; bias: [n] bf16 or NULL;
 * y: [m, n] bf16 contiguous; block: even, the K-block length in elements. */
__attribute__((target("avx512f,avx512bf16,avx512bw,avx512vl")))
void blocked_linear(const uint16_t *x, int64_t x_stride, const uint16_t *wp, const uint16_t *bias,
                    uint16_t *y, int64_t m, int64_t n, int64_t k, int64_t block) {
    int64_t pairs = k / 2, block_pairs = block / 2;
    int64_t tiles = packed_elements(n, k) / (pairs * TILE * 2);
    /* Tile groups outermost: a group's packed weights (K x 64 bf16, 192 KiB at K = 1536) stay in
     * L2 while every row reads them. */
    for (int64_t t0 = 0; t0 < tiles; t0 += GROUP) {
        int64_t r = 0;
        for (; r + ROWS <= m; r += ROWS)
            micro(x + r * x_stride, x_stride, wp, bias, y + r * n, n, pairs, block_pairs, t0, ROWS);
        switch (m - r) {
            case 3: micro(x + r * x_stride, x_stride, wp, bias, y + r * n, n, pairs, block_pairs, t0, 3); break;
            case 2: micro(x + r * x_stride, x_stride, wp, bias, y + r * n, n, pairs, block_pairs, t0, 2); break;
            case 1: micro(x + r * x_stride, x_stride, wp, bias, y + r * n, n, pairs, block_pairs, t0, 1); break;
        }
    }
}
