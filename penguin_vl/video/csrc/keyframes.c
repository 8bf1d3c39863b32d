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
 * The horizontal pass resamples eight rows at once (one per vector lane), the vertical pass sums
 * whole rows and the HSV conversion runs a row at a time with selects, so all three vectorise.
 * Measured on 608x342 frames (one core, minimum of 60): ~0.9 ms a frame, against ~1.9 ms with a
 * scalar HSV reading 400 KB of result tables and ~4.2 ms for torch's resize plus the numpy HSV.
 */
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

enum { LANES = 8 }; /* rows resampled together by the horizontal pass, one per vector lane */

/* src: uint8 [height][width][3], rows `stride` bytes apart. work: height * out_w + LANES * (width + out_w)
 * floats; rgb: 3 * out_h * out_w bytes. patches: uint8 [out_h / patch][out_w / patch][3][patch][patch],
 * the HSV values (H 0..179, S, V) in the reference's patch order. sdiv, hdiv: OpenCV's fixed-point
 * reciprocal tables (256 entries each; small enough to stay in L1, unlike a table of results). */
int penguin_keyframe_patches(const uint8_t *src, int64_t stride, int32_t height, int32_t width, int32_t out_h,
                             int32_t out_w, const int32_t *h_first, const int32_t *h_count, const float *h_weights,
                             int32_t h_taps, const int32_t *v_first, const int32_t *v_count, const float *v_weights,
                             int32_t v_taps, const int32_t *sdiv, const int32_t *hdiv, int32_t patch,
                             float *work, uint8_t *rgb, uint8_t *patches) {
    const int64_t out_plane = (int64_t)out_h * out_w;
    float *mid = work;                             /* one channel after the horizontal pass: [height][out_w] */
    float *block = mid + (int64_t)height * out_w;  /* LANES source rows of one channel, interleaved: [width][LANES] */
    float *done = block + (int64_t)LANES * width;  /* their outputs, interleaved: [out_w][LANES]; one output row */
    for (int c = 0; c < 3; c++) {
        for (int32_t y0 = 0; y0 < height; y0 += LANES) {
            const int32_t rows = height - y0 < LANES ? height - y0 : LANES;
            if (width == out_w) {
                for (int32_t r = 0; r < rows; r++)
                    for (int32_t x = 0; x < width; x++)
                        mid[(int64_t)(y0 + r) * out_w + x] = (float)src[(y0 + r) * stride + 3 * x + c];
                continue;
            }
            /* interleave LANES rows so each output's taps are one vector per tap (spare lanes are zeros) */
            if (rows < LANES) memset(block, 0, sizeof(float) * LANES * width);
            for (int32_t r = 0; r < rows; r++) {
                const uint8_t *row = src + (y0 + r) * stride + c;
                for (int32_t x = 0; x < width; x++) block[(int64_t)x * LANES + r] = (float)row[3 * x];
            }
            for (int32_t j = 0; j < out_w; j++) {
                const float *restrict w = h_weights + (int64_t)j * h_taps;
                const float *restrict in = block + (int64_t)h_first[j] * LANES;
                float acc[LANES];
                for (int32_t r = 0; r < LANES; r++) acc[r] = in[r] * w[0];
                for (int32_t k = 1; k < h_count[j]; k++) {
                    const float wk = w[k];
                    for (int32_t r = 0; r < LANES; r++) acc[r] = fmaf(in[k * LANES + r], wk, acc[r]);
                }
                memcpy(done + (int64_t)j * LANES, acc, sizeof acc);
            }
            for (int32_t r = 0; r < rows; r++)
                for (int32_t j = 0; j < out_w; j++) mid[(int64_t)(y0 + r) * out_w + j] = done[(int64_t)j * LANES + r];
        }
        float *scratch = done;
        /* vertical pass (or none), then truncation to uint8 as numpy's astype does (values are >= 0) */
        uint8_t *dst = rgb + c * out_plane;
        for (int32_t i = 0; i < out_h; i++) {
            const float *r = mid + (int64_t)i * out_w;
            if (height != out_h) {
                combine_rows(mid, out_w, 1, v_first + i, v_count + i, v_weights + (int64_t)i * v_taps, v_taps,
                             scratch);
                r = scratch;
            }
            for (int32_t x = 0; x < out_w; x++) dst[(int64_t)i * out_w + x] = (uint8_t)(int32_t)r[x];
        }
    }
    /* OpenCV's RGB -> HSV a row at a time (selects, no branches: the loop vectorises), then the row's
     * pieces copied into the reference's patch order */
    const int32_t grid_w = out_w / patch, area = patch * patch;
    uint8_t *hsv = (uint8_t *)done; /* [3][out_w] */
    for (int32_t y = 0; y < out_h; y++) {
        const uint8_t *rr = rgb + (int64_t)y * out_w, *gr = rr + out_plane, *br = gr + out_plane;
        for (int32_t x = 0; x < out_w; x++) {
            const int32_t r = rr[x], g = gr[x], b = br[x];
            int32_t v = r > g ? r : g, mn = r < g ? r : g;
            v = v > b ? v : b;
            mn = mn < b ? mn : b;
            const int32_t diff = v - mn;
            /* the hue numerator by the channel holding the maximum (red wins ties, then green) */
            const int32_t num = v == r ? g - b : (v == g ? b - r + 2 * diff : r - g + 4 * diff);
            int32_t h = (num * hdiv[diff] + (1 << 11)) >> 12;
            h += h < 0 ? 180 : 0;
            hsv[x] = (uint8_t)h;
            hsv[out_w + x] = (uint8_t)((diff * sdiv[v] + (1 << 11)) >> 12);
            hsv[2 * out_w + x] = (uint8_t)v;
        }
        uint8_t *o = patches + ((int64_t)(y / patch) * grid_w) * 3 * area + (y % patch) * patch;
        for (int32_t px = 0; px < grid_w; px++, o += 3 * area)
            for (int c = 0; c < 3; c++) memcpy(o + c * area, hsv + c * out_w + px * patch, patch);
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
