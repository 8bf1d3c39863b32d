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
 * whole rows and the HSV conversion runs a row at a time with selects and computed reciprocals (no
 * table lookups, which would be gathers), so all three vectorise.
 * Measured on 608x342 frames (one core, minimum of 300): ~0.8 ms a frame, ~0.4 ms of it the
 * horizontal pass; ~1.3 ms with OpenCV's reciprocal tables read in a scalar HSV loop, and ~4.2 ms
 * for torch's resize plus the numpy HSV.
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

/* OpenCV's RGB -> HSV of one row, in three loops over int32 and float only (one loop mixing them
 * with the bytes does not vectorise); value, diff and num: n int32 each of scratch. */
static void hsv_row(const uint8_t *restrict rr, const uint8_t *restrict gr, const uint8_t *restrict br, int32_t n,
                    int32_t *restrict value, int32_t *restrict diff, int32_t *restrict num, uint8_t *restrict hue,
                    uint8_t *restrict sat, uint8_t *restrict val) {
    for (int32_t x = 0; x < n; x++) {
        const int32_t r = rr[x], g = gr[x], b = br[x];
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

enum { LANES = 8 }; /* rows resampled together by the horizontal pass, one per vector lane */

/* src: uint8 [height][width][3], rows `stride` bytes apart. work: height * out_w + LANES * (width + out_w)
 * floats; rgb: 3 * out_h * out_w bytes. patches: uint8 [out_h / PATCH][out_w / PATCH][3][PATCH][PATCH],
 * the HSV values (H 0..179, S, V) in the reference's patch order. */
int penguin_keyframe_patches(const uint8_t *src, int64_t stride, int32_t height, int32_t width, int32_t out_h,
                             int32_t out_w, const int32_t *h_first, const int32_t *h_count, const float *h_weights,
                             int32_t h_taps, const int32_t *v_first, const int32_t *v_count, const float *v_weights,
                             int32_t v_taps,
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
    /* OpenCV's RGB -> HSV a row at a time, then the row's pieces copied into the reference's patch order */
    const int32_t grid_w = out_w / PATCH, area = PATCH * PATCH;
    uint8_t *hsv = (uint8_t *)done; /* [3][out_w] */
    int32_t *scratch_hsv = (int32_t *)(done + (int64_t)LANES * out_w);
    for (int32_t y = 0; y < out_h; y++) {
        const uint8_t *rr = rgb + (int64_t)y * out_w;
        hsv_row(rr, rr + out_plane, rr + 2 * out_plane, out_w, scratch_hsv, scratch_hsv + out_w, scratch_hsv + 2 * out_w,
                hsv, hsv + out_w, hsv + 2 * out_w);
        uint8_t *o = patches + ((int64_t)(y / PATCH) * grid_w) * 3 * area + (y % PATCH) * PATCH;
        for (int32_t px = 0; px < grid_w; px++, o += 3 * area)
            for (int c = 0; c < 3; c++) memcpy(o + c * area, hsv + c * out_w + px * PATCH, PATCH);
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
