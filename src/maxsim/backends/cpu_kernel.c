/* MaxSim scores on x86-64 CPUs with AVX2, FMA and F16C: float32, float16 or bfloat16 queries and documents
 * of the same dtype, or packed documents of int8 / float8 e4m3 codes with a float32 scale per token; float32
 * scores (float32 arithmetic on the exactly widened inputs, codes times their scale) and optionally the
 * int32 argmax.
 *
 * The query tokens come packed in columns of 16 lanes, [P, Qn, G, D, 16] (lane = query token), so one
 * step over the embedding axis k is two vector loads of the queries, one broadcast of each document
 * token's k-th value and two fused multiply-adds per document token: a tile of 6 document tokens by 16
 * query tokens holds 12 accumulators, as a GEMM micro-kernel does. Each tile's similarities are folded into
 * the query tokens' running maxima at once: nothing of size Lq x Ld is ever stored.
 *
 * Queries are read through their strides (and packed, once per call); documents are a padded [P, Dn, Ld]
 * view (any strides but a contiguous embedding axis, an optional byte mask, 1 = real token) or packed
 * sequences (each document's first token and its length), scored BLOCK tokens at a
 * time by every query of their group; 16-bit and quantized blocks are first widened into a float32 buffer.
 * Work is split over (group, document) items between OpenMP threads; the Python caller holds no lock
 * meanwhile.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16 /* query tokens per column group: two 8-float vectors */
#define ROWS 6   /* document tokens per tile */
#define PREFETCH_ROWS (4 * ROWS) /* float32 rows prefetched ahead of the tile (see score_document) */
#define MAX_THREADS 256
#define NORMALIZE_EPS 1e-12f
#define BLOCK 512 /* document tokens scored by every query before the next ones (2 KiB a token at most) */
enum { FLOAT32 = 0, FLOAT16 = 1, BFLOAT16 = 2, INT8 = 3, FLOAT8_E4M3 = 4 }; /* dtype codes (q: the first three) */
static float E4M3_VALUES[256]; /* every float8 e4m3fn code's value, filled when the module loads */

typedef struct {
    const float *q_columns;  /* [P, Qn, G, D, LANES], packed by pack_queries */
    const uint8_t *q_real;   /* [P, Qn, G * LANES], 1 = a real query token */
    int64_t P, Qn, G, D, Dn, Lq; /* groups, queries and documents per group, lane groups, sizes */
    const void *d;           /* document tokens (d_type), each contiguous over D */
    int d_type;
    int64_t d_stride[3];     /* of d as [P, Dn, Ld] (padded documents), in elements; [2]: between tokens */
    int64_t Ld;              /* tokens per padded document; the longest packed one */
    const int64_t *d_start;  /* NULL (padded), or [P * Dn] first token of each packed document */
    const int64_t *d_len;    /* NULL (padded), or [P * Dn] tokens of each packed document */
    int64_t d_tokens;        /* packed documents: the tokens of d */
    const float *d_scales;   /* NULL, or (INT8 / FLOAT8_E4M3 packed documents) [d_tokens]: token t is d[t] * d_scales[t] */
    const uint8_t *d_mask;   /* NULL, or a byte per padded token, strides d_mask_stride */
    int64_t d_mask_stride[3];
    int normalize;   /* divide each similarity by its document token's norm (queries come normalized) */
    float *out;      /* [P, Qn, Dn] */
    int32_t *argmax; /* NULL, or [P, Qn, Dn, Lq]: the first winning token, -1 where no real token won */
    int64_t first, last; /* this worker's items p * Dn + n */
    int failed;
} Job;

#define AVX2 __attribute__((target("avx2,fma")))
#define AVX2_F16C __attribute__((target("avx2,fma,f16c")))
#define INLINE static inline __attribute__((always_inline))

/* Similarities of R document tokens (rows, the first at index t) and one column group of 16 query tokens,
 * folded into the group's running maxima (best), NaN flags (nan) and, with ARGMAX, winning indices (index:
 * the first real token while none is larger, then the first strictly larger, the first NaN for good); rows
 * that are masked out take no part. */
INLINE AVX2 void tile(const int R, const int ARGMAX, const float *const *rows, int64_t t,
                      const float *inverse_norm, const uint8_t *real, const float *columns, int64_t D,
                      float *best, float *nan, int32_t *index)
{
    __m256 acc[ROWS][2];
#pragma GCC unroll 6
    for (int r = 0; r < R; r++) {
        acc[r][0] = _mm256_setzero_ps();
        acc[r][1] = _mm256_setzero_ps();
    }
#pragma GCC unroll 4
    for (int64_t k = 0; k < D; k++) {
        const __m256 c0 = _mm256_loadu_ps(columns + k * LANES);
        const __m256 c1 = _mm256_loadu_ps(columns + k * LANES + 8);
#pragma GCC unroll 6
        for (int r = 0; r < R; r++) {
            const __m256 b = _mm256_broadcast_ss(rows[r] + k);
            acc[r][0] = _mm256_fmadd_ps(b, c0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(b, c1, acc[r][1]);
        }
    }
    __m256 best0 = _mm256_loadu_ps(best), best1 = _mm256_loadu_ps(best + 8);
    __m256 nan0 = _mm256_loadu_ps(nan), nan1 = _mm256_loadu_ps(nan + 8);
    __m256 index0 = _mm256_setzero_ps(), index1 = _mm256_setzero_ps(); /* int32 bits */
    if (ARGMAX) {
        index0 = _mm256_loadu_ps((const float *)index);
        index1 = _mm256_loadu_ps((const float *)index + 8);
    }
#pragma GCC unroll 6
    for (int r = 0; r < R; r++) {
        if (!real[r])
            continue;
        const __m256 scale = _mm256_set1_ps(inverse_norm[r]);
        const __m256 s0 = _mm256_mul_ps(acc[r][0], scale), s1 = _mm256_mul_ps(acc[r][1], scale);
        const __m256 is_nan0 = _mm256_cmp_ps(s0, s0, _CMP_UNORD_Q), is_nan1 = _mm256_cmp_ps(s1, s1, _CMP_UNORD_Q);
        if (ARGMAX) {
            const __m256i none = _mm256_set1_epi32(-1);
            const __m256 here = _mm256_castsi256_ps(_mm256_set1_epi32((int32_t)(t + r)));
            const __m256 unset0 = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_castps_si256(index0), none));
            const __m256 unset1 = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_castps_si256(index1), none));
            const __m256 wins0 = _mm256_or_ps(_mm256_or_ps(_mm256_cmp_ps(s0, best0, _CMP_GT_OQ), is_nan0), unset0);
            const __m256 wins1 = _mm256_or_ps(_mm256_or_ps(_mm256_cmp_ps(s1, best1, _CMP_GT_OQ), is_nan1), unset1);
            index0 = _mm256_blendv_ps(index0, here, _mm256_andnot_ps(nan0, wins0));
            index1 = _mm256_blendv_ps(index1, here, _mm256_andnot_ps(nan1, wins1));
        }
        nan0 = _mm256_or_ps(nan0, is_nan0);
        nan1 = _mm256_or_ps(nan1, is_nan1);
        best0 = _mm256_max_ps(best0, s0);
        best1 = _mm256_max_ps(best1, s1);
    }
    if (ARGMAX) {
        _mm256_storeu_ps((float *)index, index0);
        _mm256_storeu_ps((float *)index + 8, index1);
    }
    _mm256_storeu_ps(best, best0);
    _mm256_storeu_ps(best + 8, best1);
    _mm256_storeu_ps(nan, nan0);
    _mm256_storeu_ps(nan + 8, nan1);
}

/* The value of a float8 e4m3fn code: 4 exponent bits (bias 7), 3 mantissa bits, no infinity, NaN at
 * S.1111.111. */
static float e4m3_value(uint8_t code)
{
    const int exponent = (code >> 3) & 15, mantissa = code & 7;
    float magnitude;
    if (exponent == 15 && mantissa == 7)
        magnitude = NAN;
    else if (exponent == 0)
        magnitude = ldexpf((float)mantissa, -9); /* subnormal: mantissa / 8 * 2^-6 */
    else
        magnitude = ldexpf(1.0f + mantissa / 8.0f, exponent - 7);
    return code & 128 ? -magnitude : magnitude;
}

/* Bytes per element of a dtype. */
static int element_size(int dtype) { return dtype == FLOAT32 ? 4 : dtype >= INT8 ? 1 : 2; }

/* Element i of x (dtype) as float32 (a quantized code as its value, unscaled). */
static AVX2_F16C float element(const void *x, int dtype, int64_t i)
{
    if (dtype == FLOAT32)
        return ((const float *)x)[i];
    if (dtype == INT8)
        return (float)((const int8_t *)x)[i];
    if (dtype == FLOAT8_E4M3)
        return E4M3_VALUES[((const uint8_t *)x)[i]];
    const uint16_t h = ((const uint16_t *)x)[i];
    if (dtype == FLOAT16)
        return _cvtsh_ss(h);
    const uint32_t bits = (uint32_t)h << 16;
    float out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

/* Token x (D elements of a dtype other than FLOAT32) as float32 times scale (1 but for quantized codes)
 * into out: 8 at a time, then element by element. An e4m3 code's bits moved to a float16's exponent and
 * mantissa places are a float16 of the code's value times 2^-8 (the biases differ by 8; subnormals too), so
 * F16C widens it and 2^8 joins the scale (exact: a power of two); its NaN code (S.1111.111) is set apart. */
static AVX2_F16C void widen(const void *x, int dtype, int64_t D, float scale, float *out)
{
    const __m256 scales = _mm256_set1_ps(dtype == FLOAT8_E4M3 ? scale * 256.0f : scale);
    int64_t k = 0;
    for (; k + 8 <= D; k += 8) {
        __m256 wide;
        if (dtype == INT8) {
            const __m128i bytes = _mm_loadl_epi64((const __m128i *)((const uint8_t *)x + k));
            wide = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
        } else if (dtype == FLOAT8_E4M3) {
            const __m128i codes = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)((const uint8_t *)x + k)));
            const __m128i magnitude = _mm_and_si128(codes, _mm_set1_epi16(0x7F));
            const __m128i sign = _mm_slli_epi16(_mm_and_si128(codes, _mm_set1_epi16(0x80)), 8);
            const __m256 is_nan = _mm256_castsi256_ps(
                _mm256_cvtepi16_epi32(_mm_cmpeq_epi16(magnitude, _mm_set1_epi16(0x7F))));
            wide = _mm256_cvtph_ps(_mm_or_si128(sign, _mm_slli_epi16(magnitude, 7)));
            wide = _mm256_blendv_ps(wide, _mm256_set1_ps(NAN), is_nan);
        } else {
            const __m128i half = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + k));
            wide = dtype == FLOAT16 ? _mm256_cvtph_ps(half)
                                    : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
        }
        _mm256_storeu_ps(out + k, _mm256_mul_ps(wide, scales));
    }
    for (; k < D; k++)
        out[k] = element(x, dtype, k) * scale;
}

/* The element offset in d of document item's first token: a padded document's by the strides, a packed
 * one's from d_start (as given: only prefetches read there without the checks of score_document). */
static int64_t first_token(const Job *job, int64_t item)
{
    if (job->d_start != NULL)
        return job->d_start[item] * job->d_stride[2];
    return item / job->Dn * job->d_stride[0] + item % job->Dn * job->d_stride[1];
}

/* Scores (and argmax) of every query of group p against document item (p, n), BLOCK tokens at a time (each
 * block's tokens stay in cache for all the queries). Per worker: best, nan: Qn * G * LANES floats, index:
 * Qn * G * LANES int32, inverse_norm, real: Ld each, widened: BLOCK * D floats (float16/bfloat16 documents). */
static AVX2_F16C void score_document(const Job *job, int64_t item, float *best, float *nan, int32_t *index,
                                     float *inverse_norm, uint8_t *real, float *widened)
{
    const int64_t p = item / job->Dn, n = item % job->Dn, D = job->D, G = job->G, lanes = G * LANES;
    const int64_t stride = job->d_stride[2], size = element_size(job->d_type);
    int64_t len = job->Ld, offset = first_token(job, item);
    const float *scales = NULL; /* of this document's tokens (quantized packed documents) */
    if (job->d_len != NULL) { /* at most Ld tokens, none for offsets outside d (validate=False): no stray read */
        const int64_t start = job->d_start[item];
        len = job->d_len[item] < job->Ld ? job->d_len[item] : job->Ld;
        if (start < 0 || len < 0 || start > job->d_tokens - len)
            len = 0;
        offset = len > 0 ? start * stride : 0;
        if (job->d_scales != NULL && len > 0)
            scales = job->d_scales + start;
    }
    const char *doc = (const char *)job->d + size * offset;
    /* this worker's next document (its first tokens are prefetched while this one's last are scored) */
    const char *next = item + 1 < job->last ? (const char *)job->d + size * first_token(job, item + 1) : doc;
    if (job->d_mask == NULL) {
        memset(real, 1, len);
    } else {
        const uint8_t *mask = job->d_mask + p * job->d_mask_stride[0] + n * job->d_mask_stride[1];
        for (int64_t t = 0; t < len; t++)
            real[t] = mask[t * job->d_mask_stride[2]] != 0;
    }
    while (len > 0 && !real[len - 1]) /* the padding after the last real token costs no tile */
        len--;
    for (int64_t lane = 0; lane < job->Qn * lanes; lane++) {
        best[lane] = -INFINITY;
        nan[lane] = 0.0f;
        index[lane] = -1;
    }
    for (int64_t b0 = 0; b0 < len; b0 += BLOCK) {
        const int64_t nb = len - b0 < BLOCK ? len - b0 : BLOCK;
        /* the block's tokens as float32 rows: read in place, or widened into this worker's buffer */
        const float *block = (const float *)(doc + size * b0 * stride);
        int64_t row_stride = stride;
        if (job->d_type != FLOAT32) {
            for (int64_t t = 0; t < nb; t++)
                widen(doc + size * (b0 + t) * stride, job->d_type, D, scales == NULL ? 1.0f : scales[b0 + t],
                      widened + t * D);
            block = widened;
            row_stride = D;
        }
        for (int64_t t = 0; t < nb; t++) {
            inverse_norm[b0 + t] = 1.0f;
            if (job->normalize) {
                float squares = 0.0f;
                for (int64_t k = 0; k < D; k++)
                    squares += block[t * row_stride + k] * block[t * row_stride + k];
                inverse_norm[b0 + t] = 1.0f / fmaxf(sqrtf(squares), NORMALIZE_EPS);
            }
        }
        for (int64_t i = 0; i < job->Qn; i++) {
            const int64_t query = p * job->Qn + i;
            for (int64_t t = 0; t < nb; t += ROWS) {
                const int R = nb - t < ROWS ? (int)(nb - t) : ROWS;
                const int64_t token = b0 + t;
                const float *rows[ROWS];
                for (int r = 0; r < R; r++)
                    rows[r] = block + (t + r) * row_stride;
                /* Into L2, while the first query scores this tile: float32 rows PREFETCH_ROWS ahead (the
                 * hardware prefetchers miss 6 row streams that far apart), or the next block's rows at this
                 * tile's place, to be widened (its widening pass then reads from cache); past this
                 * document's last scored token, the next document's first rows (padded documents do not
                 * follow each other). Into L1 instead, the float32 one-query call measured 1.3x slower (34
                 * against 26 ms, 1000 x 512 tokens, 2 cores). Prefetches never fault. */
                if (i == 0) {
                    int64_t row = b0 + t + (job->d_type == FLOAT32 ? PREFETCH_ROWS : BLOCK);
                    const char *source = doc;
                    if (row >= len) {
                        row = job->d_type == FLOAT32 ? row - len : t;
                        source = next;
                    }
                    for (int r = 0; r < ROWS; r++)
                        for (int64_t k = 0; k < D * size; k += 64)
                            _mm_prefetch(source + size * (row + r) * stride + k, _MM_HINT_T1);
                }
                for (int64_t g = 0; g < G; g++) {
                    const float *columns = job->q_columns + (query * G + g) * D * LANES;
                    float *b = best + i * lanes + g * LANES, *f = nan + i * lanes + g * LANES;
                    int32_t *x = index + i * lanes + g * LANES;
/* one specialised, fully unrolled tile per row count and argmax flag */
#define TILE(rows_, argmax_)                                                                                \
    tile(rows_, argmax_, rows, token, inverse_norm + token, real + token, columns, D, b, f, x)
#define TILES(argmax_)                                                                                      \
    switch (R) {                                                                                            \
    case 6: TILE(6, argmax_); break;                                                                        \
    case 5: TILE(5, argmax_); break;                                                                        \
    case 4: TILE(4, argmax_); break;                                                                        \
    case 3: TILE(3, argmax_); break;                                                                        \
    case 2: TILE(2, argmax_); break;                                                                        \
    default: TILE(1, argmax_); break;                                                                       \
    }
                    if (job->argmax != NULL) {
                        TILES(1)
                    } else {
                        TILES(0)
                    }
#undef TILES
#undef TILE
                }
            }
        }
    }
    for (int64_t i = 0; i < job->Qn; i++) {
        const int64_t query = p * job->Qn + i;
        const uint8_t *q_real = job->q_real + query * lanes;
        double score = 0.0;
        for (int64_t lane = 0; lane < lanes; lane++) {
            if (q_real[lane])
                score += nan[i * lanes + lane] != 0.0f ? NAN : (double)best[i * lanes + lane];
        }
        job->out[query * job->Dn + n] = (float)score;
        if (job->argmax != NULL) {
            int32_t *argmax = job->argmax + (query * job->Dn + n) * job->Lq;
            for (int64_t lane = 0; lane < job->Lq; lane++)
                argmax[lane] = q_real[lane] ? index[i * lanes + lane] : -1;
        }
    }
}

static void run_job(Job *job)
{
    const int64_t lanes = job->Qn * job->G * LANES;
    float *best = malloc(sizeof(float) * lanes * 2);
    int32_t *index = malloc(sizeof(int32_t) * lanes);
    float *inverse_norm = malloc(sizeof(float) * (job->Ld + 1));
    uint8_t *real = malloc(job->Ld + 1);
    float *widened = job->d_type == FLOAT32 ? NULL : malloc(sizeof(float) * BLOCK * job->D);
    if (best == NULL || index == NULL || inverse_norm == NULL || real == NULL ||
        (job->d_type != FLOAT32 && widened == NULL)) {
        job->failed = 1;
    } else {
        for (int64_t item = job->first; item < job->last; item++)
            score_document(job, item, best, best + lanes, index, inverse_norm, real, widened);
    }
    free(best);
    free(index);
    free(inverse_norm);
    free(real);
    free(widened);
}

static PyObject *supported(PyObject *self, PyObject *args)
{
    __builtin_cpu_init();
    return PyBool_FromLong(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                           __builtin_cpu_supports("f16c"));
}

/* The queries as the tiles read them: columns of LANES query tokens, [P, Qn, G, D, LANES], zero past each
 * query's tokens and L2-normalized when asked, and a byte per lane, 1 for a real token. Query (p, i) is a
 * strided q [P, Qn, Lq, D] (element strides q_stride) with an optional byte mask [P, Qn, Lq] (strides
 * q_mask_stride), or, with q_start / q_len (int64 [P * Qn]), q_len[p * Qn + i] packed tokens from token
 * q_start[p * Qn + i] of q [q_tokens, D] (strides q_stride[2], q_stride[3]). */
static AVX2_F16C void pack_queries(const void *q, int q_type, const int64_t *q_stride, const uint8_t *q_mask,
                                   const int64_t *q_mask_stride, const int64_t *q_start, const int64_t *q_len,
                                   int64_t q_tokens, int64_t P, int64_t Qn, int64_t Lq, int64_t D, int64_t G,
                                   int normalize, float *columns, uint8_t *real)
{
    for (int64_t query = 0; query < P * Qn; query++) {
        const int64_t p = query / Qn, i = query % Qn;
        int64_t tokens = Lq, first = p * q_stride[0] + i * q_stride[1];
        if (q_start != NULL) { /* at most Lq tokens, none for offsets outside q (validate=False) */
            tokens = q_len[query] < Lq ? q_len[query] : Lq;
            if (q_start[query] < 0 || tokens < 0 || q_start[query] > q_tokens - tokens)
                tokens = 0;
            first = tokens > 0 ? q_start[query] * q_stride[2] : 0;
        }
        for (int64_t lane = 0; lane < G * LANES; lane++) {
            float *column = columns + (query * G + lane / LANES) * D * LANES + lane % LANES;
            const int64_t token = first + lane * q_stride[2];
            float scale = lane < tokens ? 1.0f : 0.0f;
            if (lane < tokens && normalize) {
                float squares = 0.0f;
                for (int64_t k = 0; k < D; k++) {
                    const float x = element(q, q_type, token + k * q_stride[3]);
                    squares += x * x;
                }
                scale = 1.0f / fmaxf(sqrtf(squares), NORMALIZE_EPS);
            }
            for (int64_t k = 0; k < D; k++)
                column[k * LANES] = scale == 0.0f ? 0.0f : element(q, q_type, token + k * q_stride[3]) * scale;
            real[query * G * LANES + lane] =
                lane < tokens && (q_mask == NULL ||
                                  q_mask[p * q_mask_stride[0] + i * q_mask_stride[1] + lane * q_mask_stride[2]]);
        }
    }
}

/* score((q, q_stride[4]), (q_mask, q_mask_stride[3]), (q_start, q_len, q_tokens), (d, d_stride[3]),
 *       (d_mask, d_mask_stride[3]), (d_start, d_len, d_tokens, d_scales), q_type, d_type, P, Qn, Dn, Lq, Ld, D,
 *       normalize, out, argmax, threads)
 * Addresses are integers (0: no mask, no argmax, no scales; q_start = q_len = 0 for strided queries,
 * d_start = d_len = 0 for padded documents; pack_queries and Job say how each is read), strides are in
 * elements; q_type is FLOAT32, FLOAT16 or BFLOAT16 and d_type the same, or INT8 / FLOAT8_E4M3 for packed
 * documents with d_scales; the masks are bytes; d's embedding axis is contiguous. Scores are float32,
 * accumulated in float32 from the exactly widened inputs. */
static PyObject *score(PyObject *self, PyObject *args)
{
    unsigned long long q, q_mask, q_start, q_len, d, d_mask, d_start, d_len, d_scales, out, argmax;
    long long q_stride[4], q_mask_stride[3], d_stride[3], d_mask_stride[3], q_tokens, d_tokens;
    long long P, Qn, Dn, Lq, Ld, D;
    int q_type, d_type, normalize, threads;
    if (!PyArg_ParseTuple(args, "(K(LLLL))(K(LLL))(KKL)(K(LLL))(K(LLL))(KKLK)iiLLLLLLpKKi", &q, &q_stride[0],
                          &q_stride[1], &q_stride[2], &q_stride[3], &q_mask, &q_mask_stride[0],
                          &q_mask_stride[1], &q_mask_stride[2], &q_start, &q_len, &q_tokens, &d, &d_stride[0],
                          &d_stride[1], &d_stride[2], &d_mask, &d_mask_stride[0], &d_mask_stride[1],
                          &d_mask_stride[2], &d_start, &d_len, &d_tokens, &d_scales, &q_type, &d_type, &P, &Qn,
                          &Dn, &Lq, &Ld, &D, &normalize, &out, &argmax, &threads))
        return NULL;
    if (q_type != FLOAT32 && q_type != FLOAT16 && q_type != BFLOAT16) {
        PyErr_Format(PyExc_ValueError, "q_type must be 0 (float32), 1 (float16) or 2 (bfloat16), got %d", q_type);
        return NULL;
    }
    const int quantized = d_type == INT8 || d_type == FLOAT8_E4M3;
    if (!(d_type == q_type || (quantized && d_scales != 0 && d_len != 0))) {
        PyErr_Format(PyExc_ValueError,
                     "d_type must be q_type (%d), or 3 (int8) / 4 (float8 e4m3) for packed documents with scales, "
                     "got %d",
                     q_type, d_type);
        return NULL;
    }
    const int64_t items = P * Dn, G = (Lq + LANES - 1) / LANES;
    if (threads < 1)
        threads = 1;
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    if (threads > items)
        threads = items > 0 ? (int)items : 1;
    Job jobs[MAX_THREADS];
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    float *columns = malloc(sizeof(float) * (P * Qn * G * D * LANES + 1));
    uint8_t *real = malloc(P * Qn * G * LANES + 1);
    if (columns == NULL || real == NULL) {
        failed = 1;
    } else {
        const int64_t qs[4] = {q_stride[0], q_stride[1], q_stride[2], q_stride[3]};
        const int64_t qms[3] = {q_mask_stride[0], q_mask_stride[1], q_mask_stride[2]};
        pack_queries((const void *)q, q_type, qs, (const uint8_t *)q_mask, qms, (const int64_t *)q_start,
                     (const int64_t *)q_len, q_tokens, P, Qn, Lq, D, G, normalize, columns, real);
        for (int w = 0; w < threads; w++)
            jobs[w] = (Job){
                .q_columns = columns, .q_real = real, .P = P, .Qn = Qn, .G = G, .D = D, .Dn = Dn, .Lq = Lq,
                .d = (const void *)d, .d_type = d_type, .d_stride = {d_stride[0], d_stride[1], d_stride[2]}, .Ld = Ld,
                .d_start = (const int64_t *)d_start, .d_len = (const int64_t *)d_len, .d_tokens = d_tokens,
                .d_scales = quantized ? (const float *)d_scales : NULL,
                .d_mask = (const uint8_t *)d_mask,
                .d_mask_stride = {d_mask_stride[0], d_mask_stride[1], d_mask_stride[2]},
                .normalize = normalize, .out = (float *)out, .argmax = (int32_t *)argmax,
                .first = items * w / threads, .last = items * (w + 1) / threads, .failed = 0,
            };
        /* torch's own OpenMP runtime when torch is loaded (libgomp.so.1 resolves to its copy): the threads
         * of its last parallel region, still spinning, take this work instead of competing with it */
#pragma omp parallel for schedule(static) num_threads(threads) reduction(| : failed)
        for (int w = 0; w < threads; w++) {
            run_job(&jobs[w]);
            failed |= jobs[w].failed;
        }
    }
    free(columns);
    free(real);
    Py_END_ALLOW_THREADS
    if (failed)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* The tokens of one side of the backward: strided [P, N, L, D] (start NULL) or packed (row start[p * N + n]
 * + t of x [tokens, D], strides stride[2], stride[3]); inverse: NULL, or a float32 inverse norm per row
 * (normalize), indexed as the gradient's rows are. */
typedef struct {
    const void *x;
    int64_t stride[4];
    const int64_t *start;
    int64_t tokens, N, L;
    const float *inverse;
} Side;

/* Token t of sequence (p, n) of a side: its gradient row (-1 outside a packed side's sequences or tokens)
 * and its offset in elements. */
static int64_t side_row(const Side *s, int64_t p, int64_t n, int64_t t, int64_t *offset)
{
    if (s->start == NULL) {
        *offset = p * s->stride[0] + n * s->stride[1] + t * s->stride[2];
        return (p * s->N + n) * s->L + t;
    }
    if (n < 0 || n >= s->N)
        return -1;
    const int64_t row = s->start[p * s->N + n] + t;
    *offset = row * s->stride[2];
    return row >= 0 && row < s->tokens ? row : -1;
}

/* out[0:D] += weight * (the token's row as float32, times its inverse norm with normalize). */
static AVX2_F16C void add_row(const Side *s, int dtype, int64_t row, int64_t offset, int64_t D, float weight,
                              float *tmp, float *out)
{
    const float scale = s->inverse == NULL ? weight : weight * s->inverse[row];
    if (s->stride[3] == 1 && dtype != FLOAT32) {
        widen((const char *)s->x + element_size(dtype) * offset, dtype, D, scale, tmp);
    } else {
        for (int64_t k = 0; k < D; k++)
            tmp[k] = element(s->x, dtype, offset + k * s->stride[3]) * scale;
    }
    for (int64_t k = 0; k < D; k++)
        out[k] += tmp[k];
}

/* Listed pairs of packed sequences (all NULL for every pair of every group): pair e is query q_ids[e] and
 * document d_ids[e]; the pairs of query i are q_order[q_first[i] .. q_first[i + 1]], in pair order, and those
 * of document n d_order[d_first[n] .. d_first[n + 1]]. */
typedef struct {
    const int64_t *q_ids, *d_ids, *q_order, *q_first, *d_order, *d_first;
} Pairs;

/* The k-th pair of an item of the backward and the sequence on its other side: for every pair, item (p, i)
 * of a side whose groups hold N sequences faces sequence k of the other side (pair index (p * N + i) * M + k,
 * M the other side's count, or (p * M + k) * N + i for documents); listed, the pairs of the item in order. */
static int64_t pair_of(const Pairs *pairs, int documents, int64_t owner, int64_t k, int64_t N, int64_t M,
                       int64_t *other)
{
    if (pairs->q_ids == NULL) {
        const int64_t p = owner / N, i = owner % N;
        *other = k;
        return documents ? (p * M + k) * N + i : (p * N + i) * M + k;
    }
    const int64_t e = documents ? pairs->d_order[pairs->d_first[owner] + k] : pairs->q_order[pairs->q_first[owner] + k];
    *other = documents ? pairs->q_ids[e] : pairs->d_ids[e];
    return e;
}

/* The gradient rows of one item, summed over its pairs and then query tokens in order: query (p, qi)
 * (documents 0: its dq rows gather the documents' winning rows) or document (p, n) (documents 1: its dd rows
 * gather the query rows that won them), into out (dq or dd, [rows, D]); winners, weights as gradients says. */
static AVX2_F16C void item_gradient(const Side *qs, const Side *ds, const Pairs *pairs, int documents, int dtype,
                                    const int32_t *winners, const float *weights, int64_t owner, int64_t D,
                                    float *tmp, float *out)
{
    const int64_t N = documents ? ds->N : qs->N, M = documents ? qs->N : ds->N, Lq = qs->L, Ld = ds->L;
    const int64_t p = owner / N, mine = owner % N;
    const int64_t *first = documents ? pairs->d_first : pairs->q_first;
    const int64_t count = pairs->q_ids == NULL ? M : first[owner + 1] - first[owner];
    for (int64_t k = 0; k < count; k++) {
        int64_t other;
        const int64_t e = pair_of(pairs, documents, owner, k, N, M, &other);
        const int64_t qi = documents ? other : mine, n = documents ? mine : other;
        const int32_t *won = winners + e * Lq;
        for (int64_t i = 0; i < Lq; i++) {
            int64_t q_offset = 0, d_offset = 0;
            if (won[i] < 0 || won[i] >= Ld)
                continue;
            const int64_t q_row = side_row(qs, p, qi, i, &q_offset), d_row = side_row(ds, p, n, won[i], &d_offset);
            if (q_row < 0 || d_row < 0)
                continue;
            if (documents)
                add_row(qs, dtype, q_row, q_offset, D, weights[e], tmp, out + d_row * D);
            else
                add_row(ds, dtype, d_row, d_offset, D, weights[e], tmp, out + q_row * D);
        }
    }
}

/* gradients((q, q_stride[4], q_start, q_tokens, q_inverse), (d, d_stride[4], d_start, d_tokens, d_inverse),
 *           dtype, argmax, grad, (q_ids, d_ids, q_order, q_first, d_order, d_first), P, Qn, Dn, Lq, Ld, D, dq, dd,
 *           threads)
 * The backward of the scores from their argmax (int32 [pairs, Lq], -1: no gradient) and gradient (float32
 * [pairs]), both contiguous: dq[row(p, qi, i)] += w * d[row(p, n, a)] and dd[row(p, n, a)] += w * q[row(p, qi,
 * i)] with w = grad[e], a = argmax[e, i] for each pair e = (p, qi, n), into zeroed float32 [rows, D] (dq, dd:
 * 0 when not needed). Pairs: every (qi, n) of every group p (pair (p * Qn + qi) * Dn + n; Pairs all 0), or
 * listed pairs of packed sequences (P = 1; Pairs says which). Each dq row is summed over its pairs in order by
 * one thread (items: queries), each dd row over its pairs, then query tokens, in order (items: documents):
 * deterministic. Rows as Side says. */
static PyObject *gradients(PyObject *self, PyObject *args)
{
    unsigned long long q, q_start, q_inverse, d, d_start, d_inverse, argmax, grad, dq, dd;
    unsigned long long q_ids, d_ids, q_order, q_first, d_order, d_first;
    long long q_stride[4], d_stride[4], q_tokens, d_tokens, P, Qn, Dn, Lq, Ld, D;
    int dtype, threads;
    if (!PyArg_ParseTuple(args, "(K(LLLL)KLK)(K(LLLL)KLK)iKK(KKKKKK)LLLLLLKKi", &q, &q_stride[0], &q_stride[1],
                          &q_stride[2], &q_stride[3], &q_start, &q_tokens, &q_inverse, &d, &d_stride[0],
                          &d_stride[1], &d_stride[2], &d_stride[3], &d_start, &d_tokens, &d_inverse, &dtype,
                          &argmax, &grad, &q_ids, &d_ids, &q_order, &q_first, &d_order, &d_first, &P, &Qn, &Dn,
                          &Lq, &Ld, &D, &dq, &dd, &threads))
        return NULL;
    if (dtype != FLOAT32 && dtype != FLOAT16 && dtype != BFLOAT16) {
        PyErr_Format(PyExc_ValueError, "dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got %d", dtype);
        return NULL;
    }
    const int listed = q_ids != 0;
    if (listed && (q_start == 0 || d_start == 0 || P != 1 || !d_ids || !q_order || !q_first || !d_order || !d_first)) {
        PyErr_SetString(PyExc_ValueError, "listed pairs take packed sequences (one group) and every pair array");
        return NULL;
    }
    const Side qs = {(const void *)q, {q_stride[0], q_stride[1], q_stride[2], q_stride[3]},
                     (const int64_t *)q_start, q_tokens, Qn, Lq, (const float *)q_inverse};
    const Side ds = {(const void *)d, {d_stride[0], d_stride[1], d_stride[2], d_stride[3]},
                     (const int64_t *)d_start, d_tokens, Dn, Ld, (const float *)d_inverse};
    const Pairs pairs = {(const int64_t *)q_ids, (const int64_t *)d_ids, (const int64_t *)q_order,
                         (const int64_t *)q_first, (const int64_t *)d_order, (const int64_t *)d_first};
    const int32_t *winners = (const int32_t *)argmax;
    const float *weights = (const float *)grad;
    float *dq_rows = (float *)dq, *dd_rows = (float *)dd;
    int failed = 0;
    threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *tmp = malloc(sizeof(float) * (D + 1));
        if (tmp == NULL)
            failed = 1;
        for (int documents = 0; documents < 2; documents++) { /* dq over queries, then dd over documents */
            float *out = documents ? dd_rows : dq_rows;
            if (out == NULL)
                continue;
#pragma omp for schedule(static)
            for (int64_t owner = 0; owner < P * (documents ? Dn : Qn); owner++)
                if (tmp != NULL)
                    item_gradient(&qs, &ds, &pairs, documents, dtype, winners, weights, owner, D, tmp, out);
        }
        free(tmp);
    }
    Py_END_ALLOW_THREADS
    if (failed)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"supported", supported, METH_NOARGS, "Whether this CPU has AVX2, FMA and F16C."},
    {"score", score, METH_VARARGS, "MaxSim scores (and argmax) of strided queries against strided documents."},
    {"gradients", gradients, METH_VARARGS, "dq and dd of the scores from their argmax (deterministic)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_kernel", NULL, -1, methods};

PyMODINIT_FUNC PyInit__cpu_kernel(void)
{
    for (int code = 0; code < 256; code++)
        E4M3_VALUES[code] = e4m3_value((uint8_t)code);
    return PyModule_Create(&module);
}
