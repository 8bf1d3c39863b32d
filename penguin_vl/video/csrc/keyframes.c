/* One frame prepared for key-frame typing exactly as the reference prepares it (SPEC section 8.4):
 * torch's float32 antialiased bilinear resize of the uint8 RGB frame, truncated to uint8, OpenCV's
 * fixed-point uint8 RGB -> HSV, cut into 14 x 14 patches; and the patches' exact integer dot products,
 * from which penguin_vl/video/keyframes.py decides the similarities.
 *
 * torch resizes with two separable passes, the horizontal one first, each skipped when its size
 * does not change; every output is the product of the first tap and its weight, then one fused
 * multiply-add per further tap, in tap order, in float32. The same operations in the same order
 * give torch's bits.
 * The weights come from torch itself (penguin_vl/video/keyframes.py), so they are its bits too.
 * The channels stay interleaved, so every pass walks whole rows. The horizontal pass resamples eight
 * rows at once (one per vector lane; the rows go into and out of lanes by 8 x 8 register transposes
 * with AVX2), the vertical pass sums whole rows (straight from the frame's bytes when there is no
 * horizontal pass), and the HSV conversion runs a row at a time with selects and computed
 * reciprocals (no table lookups, which would be gathers), so all of it vectorises.
 * Measured on 608x342 frames (one core, minimum of 300): ~0.63 ms a frame; ~1.3 ms with OpenCV's
 * reciprocal tables read in a scalar HSV loop and the transposes left to the compiler, and ~4.2 ms
 * for torch's resize plus the numpy HSV.
 */
#ifdef __AVX2__
#include <immintrin.h>
#endif
#include <math.h>
#include <stdint.h>
#include <string.h>

/* dst[n] = src[first] * w[0], then fmaf over the taps, for each of `rows` rows of length n; rows
 * of `src` are `n` floats apart. */
static void combine_rows(const float *src, int32_t n, int32_t out_rows, const int32_t *first, const int32_t *count,
                         const float *weights, int32_t taps, float *dst) {
    for (int32_t o = 0; o < out_rows; o++) {
        const float *w = weights + (int64_t)o * taps;
        const float *row = src + (int64_t)first[o] * n;
        float *out = dst + (int64_t)o * n;
        const float w0 = w[0];
        for (int32_t x = 0; x < n; x++) out[x] = row[x] * w0;
        for (int32_t k = 1; k < count[o]; k++) {
            const float wk = w[k];
            const float *r = row + (int64_t)k * n;
            for (int32_t x = 0; x < n; x++) out[x] = fmaf(r[x], wk, out[x]);
        }
    }
}

/* OpenCV's RGB -> HSV of one row of n interleaved RGB pixels, in three loops over int32 and float
 * only (one loop mixing them with the bytes does not vectorise); value, diff and num: n int32 each. */
static void hsv_row(const uint8_t *restrict rgb, int32_t n,
                    int32_t *restrict value, int32_t *restrict diff, int32_t *restrict num, uint8_t *restrict hue,
                    uint8_t *restrict sat, uint8_t *restrict val) {
    for (int32_t x = 0; x < n; x++) {
        const int32_t r = rgb[3 * x], g = rgb[3 * x + 1], b = rgb[3 * x + 2];
        int32_t v = r > g ? r : g, mn = r < g ? r : g;
        v = v > b ? v : b;
        mn = mn < b ? mn : b;
        const int32_t d = v - mn;
        /* the hue numerator by the channel holding the maximum (red wins ties, then green) */
        const int32_t num_gb = v == g ? b - r + 2 * d : r - g + 4 * d;
        value[x] = v;
        diff[x] = d;
        num[x] = v == r ? g - b : num_gb;
    }
    for (int32_t x = 0; x < n; x++) {
        const int32_t v = value[x], d = diff[x];
        /* OpenCV's reciprocals round((255 << 12) / v) and round((30 << 12) / d), computed rather than
         * read from its tables so that the loop needs no gathers: float32 division rounded half up
         * gives every one of the 255 entries of both (the tests check them all). A zero divisor comes
         * with a zero numerator, so any finite reciprocal does for it. */
        const int32_t s_div = (int32_t)((float)(255 << 12) / (float)(v | (v == 0)) + 0.5f);
        const int32_t h_div = (int32_t)((float)(30 << 12) / (float)(d | (d == 0)) + 0.5f);
        const int32_t h = (num[x] * h_div + (1 << 11)) >> 12;
        num[x] = h + (h < 0 ? 180 : 0);
        diff[x] = (d * s_div + (1 << 11)) >> 12;
    }
    for (int32_t x = 0; x < n; x++) {
        hue[x] = (uint8_t)num[x];
        sat[x] = (uint8_t)diff[x];
        val[x] = (uint8_t)value[x];
    }
}

/* the reference's patch side; a constant so that each piece's copy is a few moves, not a call */
enum { PATCH = 14 };

/* the same for one output row from uint8 rows `stride` bytes apart, each value taken as float */
static void combine_byte_rows(const uint8_t *src, int64_t stride, int32_t n, int32_t first, int32_t count,
                              const float *w, float *restrict out) {
    const uint8_t *restrict row = src + first * stride;
    const float w0 = w[0];
    for (int32_t x = 0; x < n; x++) out[x] = (float)row[x] * w0;
    for (int32_t k = 1; k < count; k++) {
        const float wk = w[k];
        const uint8_t *restrict r = row + k * stride;
        for (int32_t x = 0; x < n; x++) out[x] = fmaf((float)r[x], wk, out[x]);
    }
}

enum { LANES = 8 }; /* rows resampled together by the horizontal pass, one per vector lane */

/* The horizontal pass's two transpositions, LANES rows <-> interleaved lanes. Compilers do not turn
 * these loops into shuffles, and they took most of the pass's time; with AVX2, 8 x 8 blocks go
 * through registers (moves only: the values are untouched). */
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

/* block[i][r] = row[r][i] for i < n */
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

/* src: uint8 [height][width][3], rows `stride` bytes apart. work: 3 * (height * out_w + LANES * (width + out_w)
 * + out_w) floats; rgb: out_h * out_w * 3 bytes. patches: uint8 [out_h / PATCH][out_w / PATCH][3][PATCH][PATCH],
 * the HSV values (H 0..179, S, V) in the reference's patch order. The channels stay interleaved
 * throughout: each pass reads and writes whole rows, once. */
int penguin_keyframe_patches(const uint8_t *src, int64_t stride, int32_t height, int32_t width, int32_t out_h,
                             int32_t out_w, const int32_t *h_first, const int32_t *h_count, const float *h_weights,
                             int32_t h_taps, const int32_t *v_first, const int32_t *v_count, const float *v_weights,
                             int32_t v_taps, float *work, uint8_t *rgb, uint8_t *patches) {
    const int32_t in_n = 3 * width, out_n = 3 * out_w;
    float *mid = work;                                  /* after the horizontal pass: [height][out_w][3] */
    float *block = mid + (int64_t)height * out_n;       /* LANES source rows, interleaved: [width][3][LANES] */
    float *done = block + (int64_t)LANES * in_n;        /* their outputs, interleaved: [out_w][3][LANES] */
    int32_t *scratch = (int32_t *)(done + (int64_t)LANES * out_n); /* [3][out_w] */
    /* without a horizontal pass, the vertical one reads the frame's bytes (no float copy of the frame) */
    for (int32_t y0 = 0; y0 < height && width != out_w; y0 += LANES) {
        const int32_t rows = height - y0 < LANES ? height - y0 : LANES;
        /* spare lanes repeat the last row */
        const uint8_t *row[LANES];
        for (int32_t r = 0; r < LANES; r++) row[r] = src + (y0 + (r < rows ? r : rows - 1)) * stride;
        rows_to_lanes(row, in_n, block);
        for (int32_t j = 0; j < out_w; j++) {
            const float *restrict w = h_weights + (int64_t)j * h_taps;
            for (int c = 0; c < 3; c++) {
                const float *restrict in = block + ((int64_t)h_first[j] * 3 + c) * LANES;
                float acc[LANES];
                for (int32_t r = 0; r < LANES; r++) acc[r] = in[r] * w[0];
                for (int32_t k = 1; k < h_count[j]; k++) {
                    const float wk = w[k];
                    for (int32_t r = 0; r < LANES; r++) acc[r] = fmaf(in[k * 3 * LANES + r], wk, acc[r]);
                }
                memcpy(done + ((int64_t)j * 3 + c) * LANES, acc, sizeof acc);
            }
        }
        /* a spare lane's output equals the last row's (same input), so it may land there too */
        float *out[LANES];
        for (int32_t r = 0; r < LANES; r++) out[r] = mid + (int64_t)(y0 + (r < rows ? r : rows - 1)) * out_n;
        lanes_to_rows(done, out_n, out);
    }
    /* vertical pass (or none), truncation to uint8 as numpy's astype does (values are >= 0), OpenCV's
     * RGB -> HSV, then the row's pieces copied into the reference's patch order */
    const int32_t grid_w = out_w / PATCH, area = PATCH * PATCH;
    float *summed = done;
    uint8_t *hsv = (uint8_t *)(done + out_n); /* [3][out_w] */
    for (int32_t i = 0; i < out_h; i++) {
        uint8_t *px = rgb + (int64_t)i * out_n;
        if (width == out_w && height == out_h) {
            memcpy(px, src + i * stride, out_n);
        } else {
            const float *r = summed;
            if (width == out_w)
                combine_byte_rows(src, stride, out_n, v_first[i], v_count[i], v_weights + (int64_t)i * v_taps, summed);
            else if (height != out_h)
                combine_rows(mid, out_n, 1, v_first + i, v_count + i, v_weights + (int64_t)i * v_taps, v_taps, summed);
            else
                r = mid + (int64_t)i * out_n;
            for (int32_t q = 0; q < out_n; q++) px[q] = (uint8_t)(int32_t)r[q];
        }
        hsv_row(px, out_w, scratch, scratch + out_w, scratch + 2 * out_w, hsv, hsv + out_w, hsv + 2 * out_w);
        uint8_t *o = patches + ((int64_t)(i / PATCH) * grid_w) * 3 * area + (i % PATCH) * PATCH;
        for (int32_t p = 0; p < grid_w; p++, o += 3 * area)
            for (int c = 0; c < 3; c++) memcpy(o + c * area, hsv + c * out_w + p * PATCH, PATCH);
    }
    return 0;
}

/* out[i] = sum of a[i][k] * b[i][k] over the `length` values of patch i, exactly (at most 588 * 255^2,
 * well inside int32). */
void penguin_patch_dots(const uint8_t *a, const uint8_t *b, int64_t count, int32_t length, int32_t *out) {
    for (int64_t i = 0; i < count; i++) {
        const uint8_t *restrict x = a + i * length, *restrict y = b + i * length;
        int32_t sum = 0;
        for (int32_t k = 0; k < length; k++) sum += (int32_t)x[k] * (int32_t)y[k];
        out[i] = sum;
    }
}
