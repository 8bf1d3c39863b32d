/* One frame prepared for key-frame typing exactly as the reference prepares it (SPEC section 8.4):
 * torch's float32 antialiased bilinear resize of the uint8 RGB frame, truncated to uint8, OpenCV's
 * fixed-point uint8 RGB -> HSV, cut into 14 x 14 patches; and a frame's patches compared with the
 * last key frame's by exact integer dot products (penguin_vl/video/keyframes.py decides the few
 * patches too close to the threshold with the reference's own float ops).
 *
 * torch resizes with two separable passes, the horizontal one first, each skipped when its size
 * does not change; every output is the product of the first tap and its weight, then one fused
 * multiply-add per further tap, in tap order, in float32. The same operations in the same order
 * give torch's bits; the weights come from torch itself (keyframes.py), so they are its bits too.
 * (torch's compiled loop fuses only up to four taps; frames that need more are resized by torch,
 * see keyframes.py.) A tap of weight zero added at the end changes nothing (x * 0 + acc is acc for
 * the finite x here), which lets the permute path give every output the same number of taps.
 *
 * The frame is made one output row at a time, so that what a row needs stays in cache: the
 * horizontal pass fills a ring of rows just ahead of the vertical pass, which sums its taps in
 * registers and truncates to bytes; the bytes are split into planes, converted to HSV, and the
 * row's pieces copied into the patches. Where the width changes by a few pixels (the common case:
 * sides are rounded to a multiple of 14), the horizontal pass takes every 16 outputs from 32
 * inputs by two-register permutes (AVX-512), with the indices and weights built once a frame and
 * each group's held in registers across 8 rows; otherwise it resamples 8 rows at once, one per
 * vector lane, moving rows into and out of lanes by 8 x 8 register transposes (AVX2).
 * The HSV conversion takes 16 pixels a step with AVX-512, 8 with AVX2, in int32 lanes with the
 * reciprocals computed rather than read from OpenCV's tables (no gathers); and each band of 14 rows
 * of patches is compared with the key frame's as soon as it is cut, while it is still in cache.
 * Measured on one core of this project's CPU (AMD EPYC, Zen 4; other jobs on the second core),
 * best of 40 passes over 8 frames, comparison not included: a 608x342 frame ~0.33 ms with AVX-512
 * (~0.40 ms with AVX2 only; 0.62 ms for the whole-frame passes this replaced), a 854x480 frame
 * (vertical pass only) ~0.47 ms (AVX2 ~0.50, before 0.80). Without AVX2 the same arithmetic runs in
 * plain C loops, ~4.5 ms a frame.
 */
#ifdef __AVX2__
#include <immintrin.h>
#endif
#include <math.h>
#include <stdint.h>
#include <string.h>

/* the reference's patch side; rows resampled together by the lane path, one per vector lane */
enum { PATCH = 14, LANES = 8 };

/* torch's loop adds an output's taps with fused multiply-adds when it has at most FUSED_TAPS of them,
 * and with a product and a sum, each rounded, when it has five (keyframes.py checks both on the torch
 * it runs with, and has torch resize frames that need more) */
enum { FUSED_TAPS = 4 };

static inline float tap1(float acc, float x, float w, int fused) {
    if (fused) return fmaf(x, w, acc);
    const float product = x * w; /* built with -ffp-contract=off: never fused with the sum */
    return acc + product;
}
#ifdef __AVX2__
static inline __m256 tap8(__m256 acc, __m256 x, __m256 w, int fused) {
    return fused ? _mm256_fmadd_ps(x, w, acc) : _mm256_add_ps(acc, _mm256_mul_ps(x, w));
}
#endif
#ifdef __AVX512F__
static inline __m512 tap16(__m512 acc, __m512 x, __m512 w, int fused) {
    return fused ? _mm512_fmadd_ps(x, w, acc) : _mm512_add_ps(acc, _mm512_mul_ps(x, w));
}
#endif

#ifdef __AVX2__
static inline void transpose8(__m256 v[8]) {
    __m256 t[8], s[8];
    for (int k = 0; k < 8; k += 2) {
        t[k] = _mm256_unpacklo_ps(v[k], v[k + 1]);
        t[k + 1] = _mm256_unpackhi_ps(v[k], v[k + 1]);
    }
    for (int k = 0; k < 8; k += 4) {
        s[k] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(1, 0, 1, 0));
        s[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(3, 2, 3, 2));
        s[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(1, 0, 1, 0));
        s[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int k = 0; k < 4; k++) {
        v[k] = _mm256_permute2f128_ps(s[k], s[k + 4], 0x20);
        v[k + 4] = _mm256_permute2f128_ps(s[k], s[k + 4], 0x31);
    }
}
#endif

/* block[i][r] = row[r][i] for i < n: LANES rows into vector lanes (8 x 8 register transposes) */
static void rows_to_lanes(const uint8_t *const row[LANES], int32_t n, float *block) {
    int32_t i = 0;
#ifdef __AVX2__
    for (; i + 8 <= n; i += 8) {
        __m256 v[8];
        for (int r = 0; r < 8; r++)
            v[r] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row[r] + i))));
        transpose8(v);
        for (int k = 0; k < 8; k++) _mm256_storeu_ps(block + (int64_t)(i + k) * LANES, v[k]);
    }
#endif
    for (; i < n; i++)
        for (int32_t r = 0; r < LANES; r++) block[(int64_t)i * LANES + r] = (float)row[r][i];
}

/* out[r][q] = done[q][r] for q < n */
static void lanes_to_rows(const float *done, int32_t n, float *const out[LANES]) {
    int32_t q = 0;
#ifdef __AVX2__
    for (; q + 8 <= n; q += 8) {
        __m256 v[8];
        for (int k = 0; k < 8; k++) v[k] = _mm256_loadu_ps(done + (int64_t)(q + k) * LANES);
        transpose8(v);
        for (int r = 0; r < 8; r++) _mm256_storeu_ps(out[r] + q, v[r]);
    }
#endif
    for (; q < n; q++)
        for (int32_t r = 0; r < LANES; r++) out[r][q] = done[(int64_t)q * LANES + r];
}

/* the horizontal pass of LANES rows held in lanes (`block`): done[(j * 3 + c) * LANES + r] */
static void resample_lanes(const float *block, int32_t out_w, const int32_t *first, const int32_t *count,
                           const float *weights, int32_t taps, float *done) {
    for (int32_t j = 0; j < out_w; j++) {
        const float *w = weights + (int64_t)j * taps;
        const float *in = block + (int64_t)first[j] * 3 * LANES;
        const int32_t n = count[j];
        const int fused = n <= FUSED_TAPS;
        float *o = done + (int64_t)j * 3 * LANES;
#ifdef __AVX2__
        const __m256 w0 = _mm256_broadcast_ss(w);
        __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(in), w0);
        __m256 a1 = _mm256_mul_ps(_mm256_loadu_ps(in + LANES), w0);
        __m256 a2 = _mm256_mul_ps(_mm256_loadu_ps(in + 2 * LANES), w0);
        for (int32_t k = 1; k < n; k++) {
            const __m256 wk = _mm256_broadcast_ss(w + k);
            const float *p = in + k * 3 * LANES;
            a0 = tap8(a0, _mm256_loadu_ps(p), wk, fused);
            a1 = tap8(a1, _mm256_loadu_ps(p + LANES), wk, fused);
            a2 = tap8(a2, _mm256_loadu_ps(p + 2 * LANES), wk, fused);
        }
        _mm256_storeu_ps(o, a0);
        _mm256_storeu_ps(o + LANES, a1);
        _mm256_storeu_ps(o + 2 * LANES, a2);
#else
        for (int32_t r = 0; r < 3 * LANES; r++) {
            float acc = in[r] * w[0];
            for (int32_t k = 1; k < n; k++) acc = tap1(acc, in[k * 3 * LANES + r], w[k], fused);
            o[r] = acc;
        }
#endif
    }
}

#ifdef __AVX512F__
/* The horizontal pass by permutes: where every 16 consecutive outputs (interleaved channels) read
 * from 32 consecutive input values, as when the width changes by a few pixels, each tap of 16
 * outputs is one two-register permute and one fused multiply-add, with no transposes. The table
 * holds per group of 16 outputs: int32 base, then per tap 16 int32 lane indices and 16 float weights;
 * permute_table returns 0 where some group's inputs span more than 32 values. */
enum { GROUP = 16 };

static int32_t permute_table(int32_t width, int32_t out_w, const int32_t *first, const int32_t *count,
                             const float *weights, int32_t taps, int32_t *table) {
    const int32_t out_n = 3 * out_w, in_n = 3 * width, stride = 1 + taps * 2 * GROUP;
    if (in_n < 2 * GROUP) return 0;
    for (int32_t g = 0; g * GROUP < out_n; g++) {
        int32_t *t = table + (int64_t)g * stride;
        const int32_t q0 = g * GROUP;
        int32_t base = 3 * first[q0 / 3];
        int32_t top = base;
        for (int32_t u = 0; u < GROUP; u++) {
            const int32_t q = q0 + u < out_n ? q0 + u : out_n - 1, j = q / 3;
            const int32_t last = 3 * (first[j] + count[j] - 1) + q % 3;
            top = last > top ? last : top;
        }
        if (base > in_n - 2 * GROUP) base = in_n - 2 * GROUP;
        if (top - base >= 2 * GROUP) return 0;
        t[0] = base;
        for (int32_t k = 0; k < taps; k++) {
            int32_t *idx = t + 1 + k * 2 * GROUP;
            float *wt = (float *)(idx + GROUP);
            for (int32_t u = 0; u < GROUP; u++) {
                const int32_t q = q0 + u < out_n ? q0 + u : out_n - 1, j = q / 3;
                const int32_t kk = k < count[j] ? k : 0;
                idx[u] = 3 * (first[j] + kk) + q % 3 - base;
                wt[u] = k < count[j] ? weights[(int64_t)j * taps + k] : 0.0f;
            }
        }
    }
    return 1;
}

static void resample_permute(const uint8_t *const row[LANES], int32_t rows, int32_t out_n, int32_t taps,
                             const int32_t *table, float *const out[LANES]) {
    const int32_t stride = 1 + taps * 2 * GROUP;
    for (int32_t q0 = 0; q0 < out_n; q0 += GROUP, table += stride) {
        __m512i idx[FUSED_TAPS];
        __m512 wt[FUSED_TAPS];
        for (int32_t k = 0; k < taps; k++) {
            idx[k] = _mm512_loadu_si512(table + 1 + k * 2 * GROUP);
            wt[k] = _mm512_loadu_ps((const float *)(table + 1 + k * 2 * GROUP + GROUP));
        }
        const __mmask16 keep = q0 + GROUP <= out_n ? (__mmask16)0xFFFF : (__mmask16)((1u << (out_n - q0)) - 1);
        for (int32_t r = 0; r < rows; r++) {
            const uint8_t *p = row[r] + table[0];
            const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)));
            const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + GROUP))));
            __m512 acc = _mm512_mul_ps(_mm512_permutex2var_ps(lo, idx[0], hi), wt[0]);
            for (int32_t k = 1; k < taps; k++) acc = _mm512_fmadd_ps(_mm512_permutex2var_ps(lo, idx[k], hi), wt[k], acc);
            _mm512_mask_storeu_ps(out[r] + q0, keep, acc);
        }
    }
}
#endif

/* One output row of the vertical pass, truncated to uint8: rows[k] * w[k] summed over `count` rows of
 * n values, floats or (`bytes`) uint8. The loads are the only difference between the two kinds; the
 * compiler makes a copy of each loop per kind (the test is the same for the whole call). */
#ifdef __AVX512F__
static inline __m512 load16(const void *row, int32_t x, int bytes) {
    return bytes ? _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)((const uint8_t *)row + x))))
                 : _mm512_loadu_ps((const float *)row + x);
}
#endif
#ifdef __AVX2__
static inline __m256 load8(const void *row, int32_t x, int bytes) {
    return bytes ? _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)((const uint8_t *)row + x))))
                 : _mm256_loadu_ps((const float *)row + x);
}

static inline void store_bytes(uint8_t *out, __m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m256i ab = _mm256_packus_epi32(_mm256_cvttps_epi32(a), _mm256_cvttps_epi32(b));
    const __m256i cd = _mm256_packus_epi32(_mm256_cvttps_epi32(c), _mm256_cvttps_epi32(d));
    _mm256_storeu_si256((__m256i *)out, _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd), order));
}
#endif

static inline float load1(const void *row, int32_t x, int bytes) {
    return bytes ? (float)((const uint8_t *)row)[x] : ((const float *)row)[x];
}

static void vertical(const void *const *rows, int bytes, int32_t count, const float *w, int32_t n, uint8_t *out) {
    const int fused = count <= FUSED_TAPS;
    int32_t x = 0;
#ifdef __AVX512F__
    for (; x + 64 <= n; x += 64) {
        __m512 acc[4];
        const __m512 w0 = _mm512_set1_ps(w[0]);
        for (int u = 0; u < 4; u++) acc[u] = _mm512_mul_ps(load16(rows[0], x + 16 * u, bytes), w0);
        for (int32_t k = 1; k < count; k++) {
            const __m512 wk = _mm512_set1_ps(w[k]);
            for (int u = 0; u < 4; u++) acc[u] = tap16(acc[u], load16(rows[k], x + 16 * u, bytes), wk, fused);
        }
        for (int u = 0; u < 4; u++)
            _mm_storeu_si128((__m128i *)(out + x + 16 * u), _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(acc[u])));
    }
#endif
#ifdef __AVX2__
    for (; x + 32 <= n; x += 32) {
        __m256 acc[4];
        const __m256 w0 = _mm256_broadcast_ss(w);
        for (int u = 0; u < 4; u++) acc[u] = _mm256_mul_ps(load8(rows[0], x + 8 * u, bytes), w0);
        for (int32_t k = 1; k < count; k++) {
            const __m256 wk = _mm256_broadcast_ss(w + k);
            for (int u = 0; u < 4; u++) acc[u] = tap8(acc[u], load8(rows[k], x + 8 * u, bytes), wk, fused);
        }
        store_bytes(out + x, acc[0], acc[1], acc[2], acc[3]);
    }
#endif
    for (; x < n; x++) {
        float a = load1(rows[0], x, bytes) * w[0];
        for (int32_t k = 1; k < count; k++) a = tap1(a, load1(rows[k], x, bytes), w[k], fused);
        out[x] = (uint8_t)(int32_t)a;
    }
}

/* interleaved RGB bytes -> three planes */
static void deinterleave(const uint8_t *restrict px, int32_t n, uint8_t *restrict r, uint8_t *restrict g,
                         uint8_t *restrict b) {
    int32_t x = 0;
#ifdef __AVX2__
    const __m128i m[3][3] = {
        {_mm_setr_epi8(0, 3, 6, 9, 12, 15, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1),
         _mm_setr_epi8(-1, -1, -1, -1, -1, -1, 2, 5, 8, 11, 14, -1, -1, -1, -1, -1),
         _mm_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 1, 4, 7, 10, 13)},
        {_mm_setr_epi8(1, 4, 7, 10, 13, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1),
         _mm_setr_epi8(-1, -1, -1, -1, -1, 0, 3, 6, 9, 12, 15, -1, -1, -1, -1, -1),
         _mm_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 2, 5, 8, 11, 14)},
        {_mm_setr_epi8(2, 5, 8, 11, 14, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1),
         _mm_setr_epi8(-1, -1, -1, -1, -1, 1, 4, 7, 10, 13, -1, -1, -1, -1, -1, -1),
         _mm_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 3, 6, 9, 12, 15)}};
    uint8_t *plane[3] = {r, g, b};
    for (; x + 16 <= n; x += 16) {
        const __m128i a = _mm_loadu_si128((const __m128i *)(px + 3 * x));
        const __m128i bb = _mm_loadu_si128((const __m128i *)(px + 3 * x + 16));
        const __m128i c = _mm_loadu_si128((const __m128i *)(px + 3 * x + 32));
        for (int ch = 0; ch < 3; ch++)
            _mm_storeu_si128((__m128i *)(plane[ch] + x),
                             _mm_or_si128(_mm_or_si128(_mm_shuffle_epi8(a, m[ch][0]), _mm_shuffle_epi8(bb, m[ch][1])),
                                          _mm_shuffle_epi8(c, m[ch][2])));
    }
#endif
    for (; x < n; x++) {
        r[x] = px[3 * x];
        g[x] = px[3 * x + 1];
        b[x] = px[3 * x + 2];
    }
}

/* OpenCV's uint8 RGB -> HSV of n pixels from planar rows */
static void hsv_planar(const uint8_t *restrict R, const uint8_t *restrict G, const uint8_t *restrict B, int32_t n,
                       uint8_t *restrict H, uint8_t *restrict S, uint8_t *restrict V) {
    int32_t x = 0;
#ifdef __AVX512BW__
    /* 16 pixels a step; the same operations as the AVX2 loop below, with masks for its compares */
    const __m512i k2048_16 = _mm512_set1_epi32(2048), k180_16 = _mm512_set1_epi32(180), one_16 = _mm512_set1_epi32(1);
    const __m512 ks_16 = _mm512_set1_ps((float)(255 << 12)), kh_16 = _mm512_set1_ps((float)(30 << 12)),
                 half_16 = _mm512_set1_ps(0.5f);
    for (; x + 16 <= n; x += 16) {
        const __m512i r = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(R + x)));
        const __m512i g = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(G + x)));
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(B + x)));
        const __m512i v = _mm512_max_epi32(_mm512_max_epi32(r, g), b);
        const __m512i d = _mm512_sub_epi32(v, _mm512_min_epi32(_mm512_min_epi32(r, g), b));
        __m512i num = _mm512_add_epi32(_mm512_sub_epi32(r, g), _mm512_slli_epi32(d, 2));
        num = _mm512_mask_mov_epi32(num, _mm512_cmpeq_epi32_mask(v, g),
                                    _mm512_add_epi32(_mm512_sub_epi32(b, r), _mm512_slli_epi32(d, 1)));
        num = _mm512_mask_mov_epi32(num, _mm512_cmpeq_epi32_mask(v, r), _mm512_sub_epi32(g, b));
        const __m512i sdiv = _mm512_cvttps_epi32(
            _mm512_add_ps(_mm512_div_ps(ks_16, _mm512_cvtepi32_ps(_mm512_max_epi32(v, one_16))), half_16));
        const __m512i hdiv = _mm512_cvttps_epi32(
            _mm512_add_ps(_mm512_div_ps(kh_16, _mm512_cvtepi32_ps(_mm512_max_epi32(d, one_16))), half_16));
        __m512i h = _mm512_srai_epi32(_mm512_add_epi32(_mm512_mullo_epi32(num, hdiv), k2048_16), 12);
        h = _mm512_mask_add_epi32(h, _mm512_cmplt_epi32_mask(h, _mm512_setzero_si512()), h, k180_16);
        const __m512i sat = _mm512_srai_epi32(_mm512_add_epi32(_mm512_mullo_epi32(d, sdiv), k2048_16), 12);
        _mm_storeu_si128((__m128i *)(H + x), _mm512_cvtepi32_epi8(h));
        _mm_storeu_si128((__m128i *)(S + x), _mm512_cvtepi32_epi8(sat));
        _mm_storeu_si128((__m128i *)(V + x), _mm512_cvtepi32_epi8(v));
    }
#endif
#ifdef __AVX2__
    const __m256i k2048 = _mm256_set1_epi32(2048), k180 = _mm256_set1_epi32(180), one = _mm256_set1_epi32(1);
    const __m256 ks = _mm256_set1_ps((float)(255 << 12)), kh = _mm256_set1_ps((float)(30 << 12)),
                 half = _mm256_set1_ps(0.5f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (; x + 16 <= n; x += 16) {
        __m256i hh[2], ss[2], vv[2];
        for (int u = 0; u < 2; u++) {
            const __m256i r = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(R + x + 8 * u)));
            const __m256i g = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(G + x + 8 * u)));
            const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(B + x + 8 * u)));
            const __m256i v = _mm256_max_epi32(_mm256_max_epi32(r, g), b);
            const __m256i d = _mm256_sub_epi32(v, _mm256_min_epi32(_mm256_min_epi32(r, g), b));
            const __m256i num_b = _mm256_add_epi32(_mm256_sub_epi32(r, g), _mm256_slli_epi32(d, 2));
            const __m256i num_g = _mm256_add_epi32(_mm256_sub_epi32(b, r), _mm256_slli_epi32(d, 1));
            __m256i num = _mm256_blendv_epi8(num_b, num_g, _mm256_cmpeq_epi32(v, g));
            num = _mm256_blendv_epi8(num, _mm256_sub_epi32(g, b), _mm256_cmpeq_epi32(v, r));
            const __m256i sdiv = _mm256_cvttps_epi32(
                _mm256_add_ps(_mm256_div_ps(ks, _mm256_cvtepi32_ps(_mm256_max_epi32(v, one))), half));
            const __m256i hdiv = _mm256_cvttps_epi32(
                _mm256_add_ps(_mm256_div_ps(kh, _mm256_cvtepi32_ps(_mm256_max_epi32(d, one))), half));
            __m256i h = _mm256_srai_epi32(_mm256_add_epi32(_mm256_mullo_epi32(num, hdiv), k2048), 12);
            h = _mm256_add_epi32(h, _mm256_and_si256(_mm256_cmpgt_epi32(_mm256_setzero_si256(), h), k180));
            hh[u] = h;
            ss[u] = _mm256_srai_epi32(_mm256_add_epi32(_mm256_mullo_epi32(d, sdiv), k2048), 12);
            vv[u] = v;
        }
        /* 2 x 8 int32 -> 16 bytes in order */
        __m256i p;
        p = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(_mm256_packus_epi32(hh[0], hh[1]), _mm256_setzero_si256()), order);
        _mm_storeu_si128((__m128i *)(H + x), _mm256_castsi256_si128(p));
        p = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(_mm256_packus_epi32(ss[0], ss[1]), _mm256_setzero_si256()), order);
        _mm_storeu_si128((__m128i *)(S + x), _mm256_castsi256_si128(p));
        p = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(_mm256_packus_epi32(vv[0], vv[1]), _mm256_setzero_si256()), order);
        _mm_storeu_si128((__m128i *)(V + x), _mm256_castsi256_si128(p));
    }
#endif
    for (; x < n; x++) {
        const int32_t r = R[x], g = G[x], b = B[x];
        int32_t v = r > g ? r : g, mn = r < g ? r : g;
        v = v > b ? v : b;
        mn = mn < b ? mn : b;
        const int32_t d = v - mn;
        const int32_t num = v == r ? g - b : v == g ? b - r + 2 * d : r - g + 4 * d;
        const int32_t s_div = (int32_t)((float)(255 << 12) / (float)(v | (v == 0)) + 0.5f);
        const int32_t h_div = (int32_t)((float)(30 << 12) / (float)(d | (d == 0)) + 0.5f);
        const int32_t h = (num * h_div + (1 << 11)) >> 12;
        H[x] = (uint8_t)(h + (h < 0 ? 180 : 0));
        S[x] = (uint8_t)((d * s_div + (1 << 11)) >> 12);
        V[x] = (uint8_t)v;
    }
}

/* The permute path's table, at the start of the work buffer: bytes, rounded to a cache line. */
static int64_t table_bytes(int32_t out_w, int32_t h_taps) {
    const int64_t groups = (3 * (int64_t)out_w + 15) / 16;
    return (4 * groups * (1 + 32 * (int64_t)h_taps) + 63) / 64 * 64;
}

/* The work buffer penguin_keyframe_patches needs, in bytes. */
int64_t penguin_keyframe_work_bytes(int32_t width, int32_t out_w, int32_t h_taps, int32_t v_taps) {
    const int64_t out_n = 3 * (int64_t)out_w, ring = v_taps + LANES;
    const int64_t floats = ring * out_n + LANES * 3 * (int64_t)width + LANES * out_n;
    return table_bytes(out_w, h_taps) + 4 * floats + 3 * (out_n + 64) + 64 + 8 * (int64_t)v_taps;
}

/* Once per frame size, before penguin_keyframe_patches: the permute path's table in `work`. Returns
 * 1 where the horizontal pass takes the permutes, 0 where it takes the lanes (or there is none). */
int32_t penguin_keyframe_prepare(int32_t width, int32_t out_w, const int32_t *h_first, const int32_t *h_count,
                                 const float *h_weights, int32_t h_taps, uint8_t *work) {
#ifdef __AVX512F__
    return width != out_w && h_taps <= FUSED_TAPS &&
           permute_table(width, out_w, h_first, h_count, h_weights, h_taps, (int32_t *)work);
#else
    (void)width, (void)out_w, (void)h_first, (void)h_count, (void)h_weights, (void)h_taps, (void)work;
    return 0;
#endif
}

static void dots(const uint8_t *restrict a, const uint8_t *restrict b, int32_t length, int32_t *ab, int32_t *bb) {
    int32_t sum_ab = 0, sum_bb = 0, k = 0;
#ifdef __AVX512BW__
    __m512i wide_ab = _mm512_setzero_si512(), wide_bb = _mm512_setzero_si512();
    for (; k + 32 <= length; k += 32) {
        const __m512i x = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(a + k)));
        const __m512i y = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(b + k)));
        wide_ab = _mm512_add_epi32(wide_ab, _mm512_madd_epi16(x, y));
        wide_bb = _mm512_add_epi32(wide_bb, _mm512_madd_epi16(y, y));
    }
    if (k < length) { /* the last values, the lanes past the patch loaded as zeros */
        const __mmask32 tail = (__mmask32)((1ull << (length - k)) - 1);
        const __m512i x = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(tail, a + k));
        const __m512i y = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(tail, b + k));
        wide_ab = _mm512_add_epi32(wide_ab, _mm512_madd_epi16(x, y));
        wide_bb = _mm512_add_epi32(wide_bb, _mm512_madd_epi16(y, y));
        k = length;
    }
    sum_ab += _mm512_reduce_add_epi32(wide_ab);
    sum_bb += _mm512_reduce_add_epi32(wide_bb);
#endif
#ifdef __AVX2__
    /* bytes widened to 16 bits, products summed in pairs into 32 bits (exact: 2 * 255^2 fits) */
    __m256i acc_ab = _mm256_setzero_si256(), acc_bb = _mm256_setzero_si256();
    for (; k + 16 <= length; k += 16) {
        const __m256i x = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(a + k)));
        const __m256i y = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(b + k)));
        acc_ab = _mm256_add_epi32(acc_ab, _mm256_madd_epi16(x, y));
        acc_bb = _mm256_add_epi32(acc_bb, _mm256_madd_epi16(y, y));
    }
    int32_t lanes[8];
    _mm256_storeu_si256((__m256i *)lanes, acc_ab);
    for (int u = 0; u < 8; u++) sum_ab += lanes[u];
    _mm256_storeu_si256((__m256i *)lanes, acc_bb);
    for (int u = 0; u < 8; u++) sum_bb += lanes[u];
#endif
    for (; k < length; k++) {
        const int32_t x = a[k], y = b[k];
        sum_ab += x * y;
        sum_bb += y * y;
    }
    *ab = sum_ab;
    *bb = sum_bb;
}

/* Patches first .. first + count - 1 of a frame against the last key frame's (key NULL: the squares
 * only), added to the tallies; see penguin_keyframe_patches. */
typedef struct {
    const uint8_t *key;
    const int32_t *key_squares;
    int32_t *squares;
    int64_t *close;
    double threshold, margin;
    int64_t kept, similar, near;
} Tally;

static void compare(Tally *t, const uint8_t *patches, int64_t first, int64_t count, int32_t length) {
    const uint8_t *key = t->key, *cur = patches;
    const int32_t *key_squares = t->key_squares;
    int32_t *squares = t->squares;
    const double threshold = t->threshold, margin = t->margin;
    int64_t kept = 0, similar = 0, near = t->near;
    for (int64_t i = first; i < first + count; i++) {
        int32_t ab, bb;
        dots(key ? key + i * length : cur + i * length, cur + i * length, length, &ab, &bb);
        squares[i] = bb;
        if (!key || (key_squares[i] == 0 && bb == 0)) continue;
        kept++;
        if (key_squares[i] == 0 || bb == 0) continue;
        const double cosine = ab / sqrt((double)key_squares[i] * (double)bb);
        if (fabs(cosine - threshold) < margin)
            t->close[near++] = i;
        else
            similar += cosine > threshold;
    }
    t->kept += kept;
    t->similar += similar;
    t->near = near;
}

/* src: uint8 [height][width][3], rows `stride` bytes apart; work: penguin_keyframe_work_bytes,
 * 64-byte aligned, prepared by penguin_keyframe_prepare (`permute`: what it returned); patches:
 * uint8 [out_h / PATCH][out_w / PATCH][3][PATCH][PATCH], the HSV values (H 0..179, S, V) in the
 * reference's patch order.
 * With `squares`, each band of patches is also compared, while it is in cache, with the last key
 * frame's (`key`, NULL for none): squares[i] is patch i's squared norm (its dot products are exact,
 * at most 588 * 255^2, inside int32); counts[0] the patches left in (not both all black), counts[1]
 * those whose exact cosine is above `threshold` by `margin` or more; the indices of those within
 * `margin` of it go to `close`, and their number is returned. An all-black patch beside a lit one
 * has cosine 0 in the reference. */
int64_t penguin_keyframe_patches(const uint8_t *src, int64_t stride, int32_t height, int32_t width, int32_t out_h,
                                 int32_t out_w, const int32_t *h_first, const int32_t *h_count, const float *h_weights,
                                 int32_t h_taps, const int32_t *v_first, const int32_t *v_count,
                                 const float *v_weights, int32_t v_taps, uint8_t *work, int32_t permute,
                                 uint8_t *patches,
                                 const uint8_t *key, const int32_t *key_squares, int32_t *squares, double threshold,
                                 double margin, int64_t *counts, int64_t *close) {
    Tally tally = {key, key_squares, squares, close, threshold, margin, 0, 0, 0};
    const int32_t out_n = 3 * out_w, ring = v_taps + LANES;
    const int horizontal = width != out_w, vertical_pass = height != out_h;
    const int32_t *table = (const int32_t *)work;    /* the permute path's, from penguin_keyframe_prepare */
    float *mid = (float *)(work + table_bytes(out_w, h_taps)); /* ring of rows after the horizontal pass */
    float *block = mid + (int64_t)ring * out_n;       /* lane path: [width][3][LANES] */
    float *done = block + (int64_t)LANES * 3 * width; /* lane path: [out_w][3][LANES] */
    uint8_t *rgb = (uint8_t *)(done + (int64_t)LANES * out_n); /* one output row, interleaved */
    uint8_t *planes = rgb + out_n + 64;                        /* the same, [3][out_w] */
    uint8_t *hsv = planes + out_n + 64;                        /* [3][out_w] */
    const int64_t bytes_used = (hsv + out_n + 64) - work;
    const void **taps = (const void **)(work + (bytes_used + 63) / 64 * 64); /* the vertical pass's rows */
    const int32_t grid_w = out_w / PATCH, area = PATCH * PATCH;
#ifndef __AVX512F__
    (void)table, (void)permute;
#endif
    int32_t made = 0; /* rows of the horizontal pass made so far */
    for (int32_t i = 0; i < out_h; i++) {
        const int32_t first = vertical_pass ? v_first[i] : i, count = vertical_pass ? v_count[i] : 1;
        /* the rows first .. made + LANES - 1 are at most count + LANES - 1 < ring: none is overwritten */
        while (horizontal && made < first + count) {
            const int32_t rows = height - made < LANES ? height - made : LANES;
            const uint8_t *row[LANES];
            float *out[LANES];
            for (int32_t r = 0; r < LANES; r++) {
                const int32_t y = made + (r < rows ? r : rows - 1); /* spare lanes repeat the last row */
                row[r] = src + y * stride;
                out[r] = mid + (int64_t)(y % ring) * out_n;
            }
#ifdef __AVX512F__
            if (permute) {
                resample_permute(row, rows, out_n, h_taps, table, out);
                made += rows;
                continue;
            }
#endif
            rows_to_lanes(row, 3 * width, block);
            resample_lanes(block, out_w, h_first, h_count, h_weights, h_taps, done);
            lanes_to_rows(done, out_n, out);
            made += rows;
        }
        const uint8_t *px = rgb;
        if (horizontal) {
            static const float unit = 1.0f; /* no vertical pass: the row is truncated as it is */
            for (int32_t k = 0; k < count; k++) taps[k] = mid + (int64_t)((first + k) % ring) * out_n;
            vertical(taps, 0, count, vertical_pass ? v_weights + (int64_t)i * v_taps : &unit, out_n, rgb);
        } else if (vertical_pass) {
            for (int32_t k = 0; k < count; k++) taps[k] = src + (first + k) * stride;
            vertical(taps, 1, count, v_weights + (int64_t)i * v_taps, out_n, rgb);
        } else {
            px = src + i * stride;
        }
        deinterleave(px, out_w, planes, planes + out_w, planes + 2 * out_w);
        hsv_planar(planes, planes + out_w, planes + 2 * out_w, out_w, hsv, hsv + out_w, hsv + 2 * out_w);
        uint8_t *o = patches + ((int64_t)(i / PATCH) * grid_w) * 3 * area + (i % PATCH) * PATCH;
        for (int32_t p = 0; p < grid_w; p++, o += 3 * area)
            for (int c = 0; c < 3; c++) memcpy(o + c * area, hsv + c * out_w + p * PATCH, PATCH);
        if (squares && i % PATCH == PATCH - 1)
            compare(&tally, patches, (int64_t)(i / PATCH) * grid_w, grid_w, 3 * area);
    }
    if (squares) {
        counts[0] = tally.kept;
        counts[1] = tally.similar;
    }
    return tally.near;
}

