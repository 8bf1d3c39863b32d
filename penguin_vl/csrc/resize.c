/*
 * Pillow's 8-bit BICUBIC resize, bit for bit, fused with the preprocessor's normalisation and
 * patch layout (the arithmetic is in penguin_vl/_resize.py's docstring), built on first use by
 * penguin_vl/_native.py and called through ctypes.
 *
 * Per axis the caller passes Pillow's filter: output i reads count[i] input samples from first[i]
 * with int32 fixed-point weights w[i * ksize + k]. A pass computes
 *
 *     out = clamp((2**21 + sum_k pixel(first + k) * w[k]) >> 22, 0, 255)
 *
 * in int32 (pixels are at most 255 and the weights of one output sum to 2**22, their positive
 * part below 1.2 * 2**22: no overflow), and the uint8 result of the first pass feeds the second,
 * in the order the caller gives (Pillow's).
 *
 * Images are uint8 with interleaved channels, a row being width * channels values. Both passes
 * run eight lanes at a time in int32 (GCC/Clang vector extensions, one AVX2 register):
 * - vertical: lanes are eight consecutive values of a row, and an output adds whole source rows;
 * - horizontal: lanes are eight rows. A tile of eight rows is transposed in cache (value x of row
 *   r to t[x * 8 + r]), so that a tap reads the eight rows' samples as one 8-byte load, the taps
 *   are summed like rows, and the result is transposed back. This runs at the same speed at any
 *   scale, where a run-by-run vectorisation along the row falls apart when the taps jump often.
 *
 * The output is either uint8 rows [H', W', C] or, given a table, float32 patch rows
 * [(H'/p) * (W'/p), C * p * p] in the merge-block order, table[c * 256 + v] being the normalised
 * value of channel c. Patch rows are written band by band (p image rows), each patch row whole.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define PRECISION_BITS 22
#define HALF (1 << (PRECISION_BITS - 1))
#define LANES 8

typedef int32_t v8i __attribute__((vector_size(32)));

#if defined(__AVX2__)
#include <immintrin.h>

static inline v8i load8(const uint8_t *p) { return (v8i)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }

/* (acc >> 22) clamped to 0..255 by the saturating packs */
static inline void store8(uint8_t *p, v8i acc) {
    const __m256i v = _mm256_srai_epi32((__m256i)acc, PRECISION_BITS);
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storel_epi64((__m128i *)p, _mm_packus_epi16(w, w));
}
#else
static inline v8i load8(const uint8_t *p) {
    const v8i v = {p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]};
    return v;
}

static inline void store8(uint8_t *p, v8i acc) {
    v8i v = acc >> PRECISION_BITS;
    v &= ~(v < 0);
    const v8i big = v > 255;
    v = (v & ~big) | (big & 255);
    for (int j = 0; j < 8; j++) p[j] = (uint8_t)v[j];
}
#endif

static inline uint8_t clip8(int32_t acc) {
    const int32_t v = acc >> PRECISION_BITS;
    return (uint8_t)(v < 0 ? 0 : (v > 255 ? 255 : v));
}

typedef struct {
    int32_t in_size, out_size, ksize;
    const int32_t *first, *count, *weights;
} axis;

/* --- vertical pass --------------------------------------------------------------------------- */

/* Output row i over rows of n values, source row r at src + (r - base) * stride. */
static void vertical_row(const uint8_t *src, int64_t stride, int32_t base, int64_t n, const axis *ax, int32_t i,
                         uint8_t *restrict dst) {
    const int32_t count = ax->count[i];
    const int32_t *w = ax->weights + (int64_t)i * ax->ksize;
    const uint8_t *rows = src + (int64_t)(ax->first[i] - base) * stride;
    const v8i half = {HALF, HALF, HALF, HALF, HALF, HALF, HALF, HALF};
    int64_t x = 0;
    for (; x + 2 * LANES <= n; x += 2 * LANES) {
        v8i s0 = half, s1 = half;
        const uint8_t *p = rows + x;
        for (int32_t k = 0; k < count; k++, p += stride) {
            s0 += load8(p) * w[k];
            s1 += load8(p + LANES) * w[k];
        }
        store8(dst + x, s0);
        store8(dst + x + LANES, s1);
    }
    for (; x < n; x++) {
        int32_t s = HALF;
        for (int32_t k = 0; k < count; k++) s += (int32_t)rows[k * stride + x] * w[k];
        dst[x] = clip8(s);
    }
}

/* --- horizontal pass ------------------------------------------------------------------------- */

/* Eight records of 8 bytes, in[j * in_stride], transposed into out[r * out_stride] (also 8 x 8). */
static inline void transpose8(const uint8_t *in, int64_t in_stride, uint8_t *out, int64_t out_stride) {
#if defined(__SSE2__)
    __m128i r[8];
    for (int j = 0; j < 8; j++) r[j] = _mm_loadl_epi64((const __m128i *)(in + j * in_stride));
    const __m128i p0 = _mm_unpacklo_epi8(r[0], r[1]), p1 = _mm_unpacklo_epi8(r[2], r[3]);
    const __m128i p2 = _mm_unpacklo_epi8(r[4], r[5]), p3 = _mm_unpacklo_epi8(r[6], r[7]);
    const __m128i u0 = _mm_unpacklo_epi16(p0, p1), u1 = _mm_unpackhi_epi16(p0, p1);
    const __m128i u2 = _mm_unpacklo_epi16(p2, p3), u3 = _mm_unpackhi_epi16(p2, p3);
    const __m128i o[4] = {_mm_unpacklo_epi32(u0, u2), _mm_unpackhi_epi32(u0, u2), _mm_unpacklo_epi32(u1, u3),
                          _mm_unpackhi_epi32(u1, u3)};
    for (int j = 0; j < 4; j++) {
        _mm_storel_epi64((__m128i *)(out + (2 * j) * out_stride), o[j]);
        _mm_storel_epi64((__m128i *)(out + (2 * j + 1) * out_stride), _mm_srli_si128(o[j], 8));
    }
#else
    for (int j = 0; j < 8; j++)
        for (int r = 0; r < 8; r++) out[r * out_stride + j] = in[j * in_stride + r];
#endif
}

/* Eight rows (row r at rows + r * stride) of n values into t[x * 8 + r]. */
static void to_lanes(const uint8_t *rows, int64_t stride, int64_t n, uint8_t *restrict t) {
    int64_t x = 0;
    for (; x + 8 <= n; x += 8) transpose8(rows + x, stride, t + x * 8, 8);
    for (; x < n; x++)
        for (int r = 0; r < 8; r++) t[x * 8 + r] = rows[r * stride + x];
}

/* t[x * 8 + r] back into eight rows. */
static void from_lanes(const uint8_t *t, int64_t n, uint8_t *restrict rows, int64_t stride) {
    int64_t x = 0;
    for (; x + 8 <= n; x += 8) transpose8(t + x * 8, 8, rows + x, stride);
    for (; x < n; x++)
        for (int r = 0; r < 8; r++) rows[r * stride + x] = t[x * 8 + r];
}

/* The horizontal pass over eight rows in lanes: tin [in_size * C][8] -> tout [out_size * C][8]. */
static void horizontal_lanes(const axis *ax, int32_t channels, const uint8_t *tin, uint8_t *restrict tout) {
    const v8i half = {HALF, HALF, HALF, HALF, HALF, HALF, HALF, HALF};
    const int64_t tap = (int64_t)channels * 8;
    for (int32_t i = 0; i < ax->out_size; i++) {
        const int32_t count = ax->count[i];
        const int32_t *w = ax->weights + (int64_t)i * ax->ksize;
        const uint8_t *in = tin + (int64_t)ax->first[i] * tap;
        uint8_t *out = tout + (int64_t)i * tap;
        if (channels == 3) {
            v8i s0 = half, s1 = half, s2 = half;
            for (int32_t k = 0; k < count; k++, in += tap) {
                s0 += load8(in) * w[k];
                s1 += load8(in + 8) * w[k];
                s2 += load8(in + 16) * w[k];
            }
            store8(out, s0);
            store8(out + 8, s1);
            store8(out + 16, s2);
            continue;
        }
        for (int32_t c = 0; c < channels; c++) {
            v8i s = half;
            for (int32_t k = 0; k < count; k++) s += load8(in + k * tap + c * 8) * w[k];
            store8(out + c * 8, s);
        }
    }
}

/* --- output ---------------------------------------------------------------------------------- */

typedef struct {
    int32_t width, channels;
    uint8_t *rows;       /* uint8 output, or NULL */
    float *patches;      /* patch output, or NULL */
    const float *table;  /* [channels * 256] */
    int32_t patch, merge;
    uint8_t *band;       /* the patch rows' p image rows */
} sink;

/* The p x p values of one channel of one patch, through the channel's table. Inlined: called with
 * constant p and C, the loops are unrolled for them. */
static inline void patch_values(const uint8_t *block, int64_t row_values, int32_t p, int32_t C, const float *t,
                                float *restrict d) {
    for (int32_t py = 0; py < p; py++, block += row_values, d += p)
        for (int32_t px = 0; px < p; px++) d[px] = t[block[px * C]];
}

/* Patch rows of grid row gy from the band. */
static void flush_band(const sink *s, int32_t gy) {
    const int32_t C = s->channels, p = s->patch, m = s->merge;
    const int64_t pp = (int64_t)p * p, row_len = C * pp, grid_w = s->width / p, row_values = (int64_t)s->width * C;
    const int released = p == 14 && C == 3; /* the released settings get unrolled loops */
    float *base = s->patches + ((int64_t)(gy / m) * grid_w * m + (gy % m) * m) * row_len;
    for (int64_t gx = 0; gx < grid_w; gx++) {
        float *dst = base + ((gx / m) * m * m + gx % m) * row_len;
        const uint8_t *block = s->band + gx * p * C;
        for (int32_t c = 0; c < C; c++) {
            if (released)
                patch_values(block + c, row_values, 14, 3, s->table + c * 256, dst + c * pp);
            else
                patch_values(block + c, row_values, p, C, s->table + c * 256, dst + c * pp);
        }
    }
}

/* Output row y, uint8 values [width * channels]. */
static void emit(const sink *s, int32_t y, const uint8_t *values) {
    const int64_t n = (int64_t)s->width * s->channels;
    if (s->rows) {
        memcpy(s->rows + y * n, values, (size_t)n);
        return;
    }
    memcpy(s->band + (y % s->patch) * n, values, (size_t)n);
    if (y % s->patch == s->patch - 1) flush_band(s, y / s->patch);
}

/* --- the resize ------------------------------------------------------------------------------ */

/* Eight rows through the horizontal pass: rows (stride apart) -> out (out_stride apart). */
static void horizontal_rows(const axis *ax, int32_t channels, const uint8_t *rows, int64_t stride, uint8_t *tin,
                            uint8_t *tout, uint8_t *out, int64_t out_stride) {
    to_lanes(rows, stride, (int64_t)ax->in_size * channels, tin);
    horizontal_lanes(ax, channels, tin, tout);
    from_lanes(tout, (int64_t)ax->out_size * channels, out, out_stride);
}

/*
 * Resize src ([height, width, channels], rows src_stride bytes apart) to out_height x out_width.
 * h_* (v_*) describe the horizontal (vertical) filter, NULL when that size does not change.
 * With a table, writes patch rows of patch * merge blocks (the output sizes are multiples of it)
 * into out as float32; without, uint8 rows. Returns 0, or -1 when memory runs out.
 */
int penguin_resize(const uint8_t *src, int64_t src_stride, int32_t height, int32_t width, int32_t channels,
                   int32_t out_height, int32_t out_width, int32_t vertical_first, const int32_t *h_first,
                   const int32_t *h_count, const int32_t *h_weights, int32_t h_ksize, const int32_t *v_first,
                   const int32_t *v_count, const int32_t *v_weights, int32_t v_ksize, const float *table,
                   int32_t patch, int32_t merge, void *out) {
    const axis hax = {width, out_width, h_ksize, h_first, h_count, h_weights};
    const axis vax = {height, out_height, v_ksize, v_first, v_count, v_weights};
    const int has_h = h_first != NULL, has_v = v_first != NULL;
    const int64_t in_row = (int64_t)width * channels, out_row = (int64_t)out_width * channels;
    const int64_t wide = in_row > out_row ? in_row : out_row;
    sink s = {out_width, channels, table ? NULL : out, table ? out : NULL, table, patch, merge, NULL};
    /* tiles of eight rows: before the horizontal pass, in lanes, and after it */
    uint8_t *tile = calloc((size_t)wide * LANES, 1);
    uint8_t *tin = malloc((size_t)in_row * LANES);
    uint8_t *tout = malloc((size_t)out_row * LANES);
    uint8_t *tile_out = malloc((size_t)out_row * LANES);
    uint8_t *mid = NULL;
    int status = -1;
    if (table) s.band = malloc((size_t)out_row * patch);
    if (!tile || !tin || !tout || !tile_out || (table && !s.band)) goto done;

    if (!has_v || !has_h || vertical_first) {
        /* eight output rows at a time: the vertical pass (or the source rows), then the horizontal pass */
        for (int32_t y0 = 0; y0 < out_height; y0 += LANES) {
            const int32_t n = out_height - y0 < LANES ? out_height - y0 : LANES;
            const uint8_t *rows = src + (int64_t)y0 * src_stride;
            int64_t stride = src_stride;
            if (has_v || n < LANES) {
                for (int32_t r = 0; r < n; r++) {
                    if (has_v)
                        vertical_row(src, src_stride, 0, in_row, &vax, y0 + r, tile + r * in_row);
                    else
                        memcpy(tile + r * in_row, src + (int64_t)(y0 + r) * src_stride, (size_t)in_row);
                }
                rows = tile;
                stride = in_row;
            }
            if (has_h) {
                horizontal_rows(&hax, channels, rows, stride, tin, tout, tile_out, out_row);
                rows = tile_out;
                stride = out_row;
            }
            for (int32_t r = 0; r < n; r++) emit(&s, y0 + r, rows + r * stride);
        }
    } else {
        /* horizontal first, over the source rows the vertical pass reads, eight at a time as needed */
        const int32_t lo = v_first[0], hi = v_first[out_height - 1] + v_count[out_height - 1];
        mid = malloc((size_t)(hi - lo + LANES) * out_row);
        if (!mid) goto done;
        int32_t ready = lo;
        for (int32_t y = 0; y < out_height; y++) {
            while (ready < v_first[y] + v_count[y]) {
                const int32_t n = hi - ready < LANES ? hi - ready : LANES;
                const uint8_t *rows = src + (int64_t)ready * src_stride;
                int64_t stride = src_stride;
                if (n < LANES) {
                    for (int32_t r = 0; r < n; r++)
                        memcpy(tile + r * in_row, rows + r * src_stride, (size_t)in_row);
                    rows = tile;
                    stride = in_row;
                }
                /* mid has room for a whole last tile */
                horizontal_rows(&hax, channels, rows, stride, tin, tout, mid + (int64_t)(ready - lo) * out_row, out_row);
                ready += n;
            }
            vertical_row(mid, out_row, lo, out_row, &vax, y, tile_out);
            emit(&s, y, tile_out);
        }
    }
    status = 0;
done:
    free(tile);
    free(tin);
    free(tout);
    free(tile_out);
    free(mid);
    free(s.band);
    return status;
}
