/* Compiled inner loops of the codec (codec.py), bit-identical to its numpy reference.
 *
 * Encoding a bucketed payload is two passes over the gradient: one for the per-bucket statistic
 * (mean |x|, L2 norm or max |x|), one that normalises, draws the rounding noise, rounds onto the
 * level table and packs the codes. Decoding sums every rank's payload block by block, so each
 * output element is written once. numpy needs ~15 full-size temporaries for the same work.
 *
 * Bit-identical means: the same float32/float64 operations in the same order per element as
 * codec.py, so no -ffast-math and no contraction of a*b+c into an FMA (setup.py passes
 * -ffp-contract=off); bucket sums follow the lane order that quantize.bucket_statistic defines.
 *
 * Portable C that compilers vectorise, built for several x86-64 levels (target_clones), plus
 * hand-written AVX-512 for what compilers cannot vectorise well: the level search (a table
 * lookup per element, here a register permute), packing and unpacking, and the decoder's table
 * lookup. For the common shapes (float32 input, buckets of whole vectors, at most 4 bits when
 * decoding) the AVX-512 code takes each vector of elements from input to output in registers,
 * without the portable code's scratch blocks. tnq_set_vector_path(0) forces the portable code,
 * so tests cover both.
 *
 * Plain C with a C ABI, loaded with ctypes by native.py: no Python or numpy headers.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_AVX512_PATH 1
#endif

#define BLOCK 2048 /* elements per inner block: a multiple of 8 codes, L1-resident scratch */

#if defined(__GNUC__) && defined(__x86_64__) && !defined(TNQ_NO_CLONES)
/* One build runs on any x86-64 and uses the widest vectors the CPU has. */
#define HOT __attribute__((target_clones("default", "avx2", "arch=x86-64-v4")))
#else
#define HOT
#endif

#define INLINE static inline __attribute__((always_inline))

enum { STAT_MEAN_ABS = 0, STAT_L2 = 1, STAT_MAX_ABS = 2 };

/* ---- random numbers: rng.py's counter-based stream, element by element ---- */

INLINE uint32_t lowbias32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    x ^= x >> 16;
    return x;
}

/* ---- per-bucket statistic; non-finite elements count as zeros, as in codec.encode ---- */

/* LANES independent partial results per bucket, combined at the end: the float64 additions of
 * one bucket then run as vector operations instead of one serial chain. */
#define LANES 16

/* Elements ahead of the one in hand that the passes over a whole gradient ask the cache for:
 * measured on this project's VM (2 cores, 10.5M float32 elements), the hardware prefetcher
 * alone left the statistic pass at 7.5 ms and the quantizing pass at 15 ms, memory-bound;
 * with this, 2.4 and 10 ms. */
#define PREFETCH_AHEAD 2048

/* One finite magnitude into a lane's partial result: the running max, or the sum of squares or
 * of magnitudes. */
static inline double accumulate(double part, double a, int statistic) {
    if (statistic == STAT_MAX_ABS)
        return a > part ? a : part;
    return part + (statistic == STAT_L2 ? a * a : a);
}

/* out[b] = statistic of bucket b; returns the number of non-finite elements, so the caller
 * knows whether to collect them. */
#define DEFINE_STATISTIC(NAME, T)                                                              \
    HOT int64_t NAME(const T *x, int64_t n, int64_t bucket, int statistic, double *out) {      \
        int64_t nonfinite = 0;                                                                 \
        for (int64_t start = 0, b = 0; start < n; start += bucket, ++b) {                      \
            const int64_t count = start + bucket < n ? bucket : n - start;                     \
            const T *row = x + start;                                                          \
            double part[LANES] = {0};                                                          \
            int64_t bad = 0, i = 0;                                                            \
            for (; i + LANES <= count; i += LANES) {                                           \
                if (i + PREFETCH_AHEAD < count)                                                \
                    __builtin_prefetch(row + i + PREFETCH_AHEAD);                              \
                for (int j = 0; j < LANES; ++j) {                                              \
                    const double a = fabs((double)row[i + j]);                                 \
                    bad += !(a <= DBL_MAX);                                                    \
                    part[j] = accumulate(part[j], a <= DBL_MAX ? a : 0.0, statistic);          \
                }                                                                              \
            }                                                                                  \
            for (int j = 0; i < count; ++i, ++j) {                                             \
                const double a = fabs((double)row[i]);                                         \
                bad += !(a <= DBL_MAX);                                                        \
                part[j] = accumulate(part[j], a <= DBL_MAX ? a : 0.0, statistic);              \
            }                                                                                  \
            double acc = 0.0;                                                                  \
            for (int j = 0; j < LANES; ++j)                                                    \
                acc = statistic == STAT_MAX_ABS ? (part[j] > acc ? part[j] : acc)              \
                                                : acc + part[j];                               \
            if (statistic == STAT_L2)                                                          \
                acc = sqrt(acc);                                                               \
            else if (statistic == STAT_MEAN_ABS)                                               \
                acc /= (double)count;                                                          \
            out[b] = acc;                                                                      \
            nonfinite += bad;                                                                  \
        }                                                                                      \
        return nonfinite;                                                                      \
    }

DEFINE_STATISTIC(tnq_bucket_statistic_f32, float)
DEFINE_STATISTIC(tnq_bucket_statistic_f64, double)

/* ---- bit packing (packing.py): code i fills bits [i*b, (i+1)*b), LSB first ---- */

INLINE void pack_group(const uint8_t *codes, int bits, uint8_t *out) {
    uint64_t word = 0;
    for (int j = 0; j < 8; ++j) word |= (uint64_t)codes[j] << (j * bits);
    for (int j = 0; j < bits; ++j) out[j] = (uint8_t)(word >> (8 * j));
}

INLINE void unpack_group(const uint8_t *in, int bits, uint8_t *codes) {
    uint64_t word = 0;
    for (int j = 0; j < bits; ++j) word |= (uint64_t)in[j] << (8 * j);
    uint64_t mask = (1u << bits) - 1u;
    for (int j = 0; j < 8; ++j) codes[j] = (uint8_t)((word >> (j * bits)) & mask);
}

/* Packs count codes (count a multiple of 8, or the tail of the tensor) to out, which has room
 * for exactly ceil(count * bits / 8) bytes. */
INLINE void pack_codes_(const uint8_t *codes, int64_t count, int bits, uint8_t *out) {
    if (bits == 8) {
        memcpy(out, codes, (size_t)count);
        return;
    }
    int64_t full = count / 8;
    for (int64_t g = 0; g < full; ++g) pack_group(codes + 8 * g, bits, out + bits * g);
    int64_t rest = count - 8 * full;
    if (rest) {
        uint8_t tail_codes[8] = {0}, tail_bytes[8];
        memcpy(tail_codes, codes + 8 * full, (size_t)rest);
        pack_group(tail_codes, bits, tail_bytes);
        memcpy(out + bits * full, tail_bytes, (size_t)((rest * bits + 7) / 8));
    }
}

INLINE void unpack_codes_(const uint8_t *in, int64_t count, int bits, uint8_t *codes) {
    if (bits == 8) {
        memcpy(codes, in, (size_t)count);
        return;
    }
    int64_t full = count / 8;
    for (int64_t g = 0; g < full; ++g) unpack_group(in + bits * g, bits, codes + 8 * g);
    int64_t rest = count - 8 * full;
    if (rest) {
        uint8_t tail_bytes[8] = {0}, tail_codes[8];
        memcpy(tail_bytes, in + bits * full, (size_t)((rest * bits + 7) / 8));
        unpack_group(tail_bytes, bits, tail_codes);
        memcpy(codes + 8 * full, tail_codes, (size_t)rest);
    }
}

/* The same with bits a compile-time constant in each case, so the shifts are immediates. */
#define BITS_CASES(CALL) \
    switch (bits) { \
        case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break; \
        case 4: CALL(4); break; case 5: CALL(5); break; case 6: CALL(6); break; \
        case 7: CALL(7); break; default: CALL(8); \
    }

INLINE void pack_codes(const uint8_t *codes, int64_t count, int bits, uint8_t *out) {
#define PACK(B) pack_codes_(codes, count, B, out)
    BITS_CASES(PACK)
#undef PACK
}

INLINE void unpack_codes(const uint8_t *in, int64_t count, int bits, uint8_t *codes) {
#define UNPACK(B) unpack_codes_(in, count, B, codes)
    BITS_CASES(UNPACK)
#undef UNPACK
}

/* ---- stochastic rounding onto a sorted table (quantize.stochastic_round) ---- */

#define MAX_SMALL 16 /* tables up to this size take the compare-and-blend search */

/* A level table prepared for the cell search. cell = the last level <= v, clipped to
 * [0, size-2], which is searchsorted(side="right") - 1 as in quantize.stochastic_round; lo and
 * hi are table[cell] and table[cell + 1].
 * Small tables: count[k] (k >= 1) is level k for 1 <= k <= size-2, else +inf, so that
 * cell = #{k : count[k] <= v} and lo is the last of those; upper[k] is level k for
 * 1 <= k <= size-1, else the top level, so that hi is the first upper[k] > v (the top level if
 * none is). Large tables: padded is the table padded with +inf to a power of two, searched by
 * branchless bisection. */
typedef struct {
    const float *levels;
    int size, padded_size;
    float count[MAX_SMALL], upper[MAX_SMALL];
    float padded[256];
} LevelTable;

static void prepare_table(const float *levels, int size, LevelTable *t) {
    t->levels = levels;
    t->size = size;
    t->padded_size = 1;
    while (t->padded_size < size) t->padded_size *= 2;
    for (int k = 0; k < t->padded_size; ++k) t->padded[k] = k < size ? levels[k] : INFINITY;
    for (int k = 0; k < MAX_SMALL; ++k) {
        t->count[k] = k >= 1 && k <= size - 2 ? levels[k] : INFINITY;
        t->upper[k] = k >= 1 && k <= size - 1 ? levels[k] : levels[size - 1];
    }
}

/* One uniform [0, 1) draw per element index: rng.uniform_noise; 0.5 for every element when
 * rounding to the nearest level (codec: rounding="nearest"), which rounds up exactly when
 * p > 1/2. */
INLINE float noise_at(int64_t index, uint32_t key_lo, uint32_t step_word, int nearest) {
    if (nearest) return 0.5f;
    uint32_t r = (uint32_t)index * 0x9E3779B9u;
    r = lowbias32(r ^ key_lo);
    r = lowbias32(r ^ step_word);
    return (float)(int32_t)(r >> 8) * 0x1p-24f;
}

/* Tables of at most P <= MAX_SMALL levels (P a compile-time constant after inlining): every
 * step is a compare and a blend, so whole vectors of elements go through the table at once. */
INLINE void round_small(const float *v, int64_t count, int64_t first, const LevelTable *t,
                        const int P, uint32_t key_lo, uint32_t step_word, int nearest,
                        uint8_t *codes) {
    const float low = t->levels[0], high = t->levels[t->size - 1];
    for (int64_t i = 0; i < count; ++i) {
        float x = v[i] < low ? low : v[i];
        x = x > high ? high : x;
        int cell = 0;
        float lo = low, hi = high;
#pragma GCC unroll 16
        for (int k = 1; k < P; ++k) {
            int below = t->count[k] <= x;
            cell += below;
            lo = below ? t->count[k] : lo;
        }
#pragma GCC unroll 16
        for (int k = P - 1; k >= 1; --k) hi = t->upper[k] > x ? t->upper[k] : hi;
        float p = (x - lo) / (hi - lo);
        codes[i] = (uint8_t)(cell + (noise_at(first + i, key_lo, step_word, nearest) < p));
    }
}

INLINE void round_large(const float *v, int64_t count, int64_t first, const LevelTable *t,
                        uint32_t key_lo, uint32_t step_word, int nearest, uint8_t *codes) {
    const float *table = t->levels;
    const float low = table[0], high = table[t->size - 1];
    const int last = t->size - 2;
    for (int64_t i = 0; i < count; ++i) {
        float x = v[i] < low ? low : v[i];
        x = x > high ? high : x;
        int cell = 0;
        for (int step = t->padded_size / 2; step >= 1; step /= 2)
            cell += t->padded[cell + step] <= x ? step : 0;
        cell = cell < last ? cell : last;
        float lo = table[cell];
        float p = (x - lo) / (table[cell + 1] - lo);
        codes[i] = (uint8_t)(cell + (noise_at(first + i, key_lo, step_word, nearest) < p));
    }
}

/* ---- hand-written AVX-512 paths ---- */

#ifdef HAVE_AVX512_PATH
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))

static int vector_path = -1; /* -1: not decided yet, 0: portable, 1: AVX-512 */

static int use_avx512(void) {
    if (vector_path < 0) {
        __builtin_cpu_init();
        vector_path = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("bmi2"); /* the encoder packs with pext */
    }
    return vector_path;
}

AVX512 static inline __m512i lowbias32_x16(__m512i x) {
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32((int)0x7FEB352Du));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32((int)0x846CA68Bu));
    return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}

/* The level search of round_small/round_large for 16 elements in registers. The bisection
 * reads the padded table with a register permute (up to 32 levels) or a gather; every float
 * operation is the portable path's. */
typedef struct {
    int padded_size;
    __m512 low, high, table_lo, table_hi;
    __m512i last, key, step;
    int nearest;
    const float *padded;
} VectorTable;

AVX512 static VectorTable vector_table(const LevelTable *t, uint32_t key_lo, uint32_t step_word,
                                       int nearest) {
    VectorTable v;
    v.padded_size = t->padded_size;
    v.low = _mm512_set1_ps(t->levels[0]);
    v.high = _mm512_set1_ps(t->levels[t->size - 1]);
    v.table_lo = _mm512_loadu_ps(t->padded);
    v.table_hi = t->padded_size > 16 ? _mm512_loadu_ps(t->padded + 16) : v.table_lo;
    v.last = _mm512_set1_epi32(t->size - 2);
    v.key = _mm512_set1_epi32((int)key_lo);
    v.step = _mm512_set1_epi32((int)step_word);
    v.nearest = nearest;
    v.padded = t->padded;
    return v;
}

/* Codes (as 32-bit lanes) of 16 normalised values x whose noise indices are index..index+15. */
AVX512 static inline __m512i round16(const VectorTable *t, __m512 x, int64_t index) {
    const int P = t->padded_size;
    const __m512i one = _mm512_set1_epi32(1);
#define LOOKUP(i)                                                                              \
    (P <= 16 ? _mm512_permutexvar_ps(i, t->table_lo)                                           \
             : P <= 32 ? _mm512_permutex2var_ps(t->table_lo, i, t->table_hi)                   \
                       : _mm512_i32gather_ps(i, t->padded, 4))
    /* operands in this order keep x on ties, like the portable code (-0.0 stays -0.0) */
    x = _mm512_min_ps(t->high, _mm512_max_ps(t->low, x));
    __m512i cell = _mm512_setzero_si512();
    for (int width = P / 2; width >= 1; width /= 2) {
        __m512i candidate = _mm512_add_epi32(cell, _mm512_set1_epi32(width));
        __mmask16 below = _mm512_cmp_ps_mask(LOOKUP(candidate), x, _CMP_LE_OQ);
        cell = _mm512_mask_mov_epi32(cell, below, candidate);
    }
    cell = _mm512_min_epi32(cell, t->last);
    __m512 lo = LOOKUP(cell), hi = LOOKUP(_mm512_add_epi32(cell, one));
#undef LOOKUP
    __m512 p = _mm512_div_ps(_mm512_sub_ps(x, lo), _mm512_sub_ps(hi, lo));
    __m512 noise = _mm512_set1_ps(0.5f);
    if (!t->nearest) {
        __m512i r = _mm512_add_epi32(_mm512_set1_epi32((int)(uint32_t)index),
                                     _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
                                                       13, 14, 15));
        r = _mm512_mullo_epi32(r, _mm512_set1_epi32((int)0x9E3779B9u));
        r = lowbias32_x16(_mm512_xor_si512(r, t->key));
        r = lowbias32_x16(_mm512_xor_si512(r, t->step));
        noise = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(r, 8)),
                              _mm512_set1_ps(0x1p-24f));
    }
    __mmask16 up = _mm512_cmp_ps_mask(noise, p, _CMP_LT_OQ);
    return _mm512_mask_add_epi32(cell, up, cell, one);
}

/* round_small/round_large for 16 elements at a time; returns how many it did (a multiple of
 * 16), the caller finishes the rest. */
AVX512 static int64_t round_avx512(const float *v, int64_t count, int64_t first,
                                   const LevelTable *t, uint32_t key_lo, uint32_t step_word,
                                   int nearest, uint8_t *codes) {
    const VectorTable table = vector_table(t, key_lo, step_word, nearest);
    int64_t i = 0;
    for (; i + 16 <= count; i += 16)
        _mm_storeu_si128((__m128i *)(codes + i),
                         _mm512_cvtepi32_epi8(round16(&table, _mm512_loadu_ps(v + i), first + i)));
    return i;
}

/* tnq_quantize_pack_f32 in one pass for buckets of whole groups of 16: each group is loaded,
 * normalised, rounded and packed in registers (the portable path goes through a block of
 * normalised values and one of codes). Packing takes each 8 codes' low bits with pext (BMI2,
 * which every AVX-512 CPU has). Returns 0, doing nothing, for other buckets. */
AVX512 __attribute__((target("bmi2"))) static int quantize_pack_avx512(
    const float *x, int64_t n, int64_t bucket, const float *divisors, const float *offsets,
    const LevelTable *t, uint32_t key_lo, uint32_t step_word, int bits, int nearest,
    uint8_t *out) {
    if (bucket % 16 != 0)
        return 0;
    const VectorTable table = vector_table(t, key_lo, step_word, nearest);
    const uint64_t low_bits = 0x0101010101010101ull * ((1u << bits) - 1u);
    const int64_t out_size = (n * bits + 7) / 8;
    for (int64_t start = 0, k = 0; start < n; start += bucket, ++k) {
        const int64_t stop = start + bucket < n ? start + bucket : n;
        const __m512 divisor = _mm512_set1_ps(divisors[k]);
        const __m512 offset = _mm512_set1_ps(offsets ? offsets[k] : 0.0f);
        for (int64_t i = start; i < stop; i += 16) {
            const int count = stop - i < 16 ? (int)(stop - i) : 16;
            const __mmask16 live = (__mmask16)((1u << count) - 1u);
            if (i + PREFETCH_AHEAD < n)
                _mm_prefetch((const char *)(x + i + PREFETCH_AHEAD), _MM_HINT_T0);
            __m512 value = _mm512_maskz_loadu_ps(live, x + i);
            /* non-finite (NaN, +-Inf: fpclass 0x99) elements count as 0 */
            value = _mm512_maskz_mov_ps(~_mm512_fpclass_ps_mask(value, 0x99), value);
            if (offsets)
                value = _mm512_sub_ps(value, offset);
            /* lanes past the tensor's end pack as zero bits, as in packing.py */
            const __m128i codes = _mm_maskz_mov_epi8(
                live, _mm512_cvtepi32_epi8(round16(&table, _mm512_div_ps(value, divisor), i)));
            uint8_t *to = out + i / 8 * bits;
            if (bits == 8) {
                _mm_mask_storeu_epi8(to, live, codes);
                continue;
            }
            const uint64_t first8 = _pext_u64((uint64_t)_mm_cvtsi128_si64(codes), low_bits);
            const uint64_t next8 = _pext_u64((uint64_t)_mm_extract_epi64(codes, 1), low_bits);
            if (to + 2 * bits + 8 <= out + out_size) {
                /* 8-byte stores: the bytes past each group's are rewritten by the next one */
                memcpy(to, &first8, 8);
                memcpy(to + bits, &next8, 8);
            } else { /* the end of the payload: exactly its bytes */
                uint8_t bytes[16];
                memcpy(bytes, &first8, 8);
                memcpy(bytes + bits, &next8, 8);
                memcpy(to, bytes, (size_t)((count * bits + 7) / 8));
            }
        }
    }
    return 1;
}

/* acc[i] (= or +=) table[codes[i]] * scale (+ offset if shifted) for i < count, 8 at a time,
 * for codes of at most 4 bits (a 16-entry table in two registers, read by a permute); returns
 * how many it did. */
AVX512 static int64_t accumulate_avx512(const uint8_t *codes, int64_t count, const double *table,
                                        int bits, double scale, int shifted, double offset,
                                        int assign, double *acc) {
    double table16[16] = {0};
    memcpy(table16, table, sizeof(double) * ((size_t)1 << bits));
    const __m512d t_lo = _mm512_loadu_pd(table16), t_hi = _mm512_loadu_pd(table16 + 8);
    const __m512d s = _mm512_set1_pd(scale), o = _mm512_set1_pd(offset);
    int64_t i = 0;
    for (; i + 8 <= count; i += 8) {
        __m512i index = _mm512_cvtepu8_epi64(_mm_loadl_epi64((const __m128i *)(codes + i)));
        __m512d value = _mm512_mul_pd(_mm512_permutex2var_pd(t_lo, index, t_hi), s);
        if (shifted) value = _mm512_add_pd(value, o);
        if (!assign) value = _mm512_add_pd(_mm512_loadu_pd(acc + i), value);
        _mm512_storeu_pd(acc + i, value);
    }
    return i;
}

#define MAX_FAST_PAYLOADS 64

/* One payload as decode_sum_avx512 reads it: its codes, and its level table times the current
 * bucket's scale (plus offset) in two registers. */
typedef struct {
    __m512d lo, hi;     /* table[code] * scale (+ offset), codes 0-7 and 8-15 */
    __m512i shift, mask; /* code j of a group of 8 is (word >> shift[j]) & mask */
    const uint8_t *packed;
    int64_t packed_size, invalid;
    int bits, table_size;
} FastPayload;

/* Payload p's values of the 8 elements of group g (codes beyond the table counted in the live
 * lanes). */
AVX512 static inline __m512d group_values(FastPayload *p, int64_t g, __mmask8 live) {
    const int64_t byte = g * p->bits;
    uint64_t word = 0;
    if (byte + 8 <= p->packed_size)
        memcpy(&word, p->packed + byte, 8);
    else
        memcpy(&word, p->packed + byte, (size_t)(p->packed_size - byte));
    __m512i code = _mm512_and_si512(
        _mm512_srlv_epi64(_mm512_set1_epi64((long long)word), p->shift), p->mask);
    if (p->table_size < (1 << p->bits))
        p->invalid += __builtin_popcount(
            _mm512_mask_cmpge_epu64_mask(live, code, _mm512_set1_epi64(p->table_size)));
    return _mm512_permutex2var_pd(p->lo, code, p->hi);
}

/* The sum over payloads, in order, of their values of group g. */
AVX512 static inline __m512d group_sum(FastPayload *in, int payloads, int64_t g, __mmask8 live) {
    __m512d acc = group_values(&in[0], g, live);
    for (int p = 1; p < payloads; ++p) acc = _mm512_add_pd(acc, group_values(&in[p], g, live));
    return acc;
}

/* tnq_decode_sum for payloads of at most 4 bits and buckets of whole groups of 8 codes: each
 * group of 8 elements goes from the packed bytes to the output in registers (the portable path
 * unpacks into a scratch block, sums into a float64 block and converts that). The same float64
 * operations per element in the same order: table[code] * scale (+ offset), formed once per
 * bucket and level, then the payloads added in order, then times factor. */
AVX512 static int decode_sum_avx512(int payloads, const uint8_t *const *packed,
                                    const int *bits, const double *const *tables,
                                    const int *table_sizes, const double *const *scales,
                                    const double *const *offsets, int64_t n, int64_t bucket,
                                    double factor, float *out32, double *out64,
                                    int64_t *invalid) {
    if (bucket % 8 != 0 || payloads > MAX_FAST_PAYLOADS)
        return 0;
    FastPayload in[MAX_FAST_PAYLOADS];
    for (int p = 0; p < payloads; ++p) {
        const int b = bits[p];
        if (b > 4)
            return 0;
        in[p].packed = packed[p];
        in[p].packed_size = (n * b + 7) / 8;
        in[p].invalid = 0;
        in[p].bits = b;
        in[p].table_size = table_sizes[p];
        in[p].shift = _mm512_setr_epi64(0, b, 2 * b, 3 * b, 4 * b, 5 * b, 6 * b, 7 * b);
        in[p].mask = _mm512_set1_epi64((1 << b) - 1);
    }
    const __m512d f = _mm512_set1_pd(factor);
    for (int64_t start = 0, k = 0; start < n; start += bucket, ++k) {
        const int64_t stop = start + bucket < n ? start + bucket : n;
        for (int p = 0; p < payloads; ++p) {
            const double scale = scales[p][k], offset = offsets[p] ? offsets[p][k] : 0.0;
            double scaled[16];
            for (int c = 0; c < 16; ++c) {
                double value = tables[p][c & ((1 << in[p].bits) - 1)] * scale;
                scaled[c] = offsets[p] ? value + offset : value;
            }
            in[p].lo = _mm512_loadu_pd(scaled);
            in[p].hi = _mm512_loadu_pd(scaled + 8);
        }
        int64_t i = start;
        const int64_t full = start + (stop - start) / 8 * 8;
        if (out32)
            for (; i < full; i += 8)
                _mm256_storeu_ps(out32 + i, _mm512_cvtpd_ps(_mm512_mul_pd(
                                                group_sum(in, payloads, i / 8, 0xFF), f)));
        else
            for (; i < full; i += 8)
                _mm512_storeu_pd(out64 + i,
                                 _mm512_mul_pd(group_sum(in, payloads, i / 8, 0xFF), f));
        if (i < stop) { /* the tensor's last, partial group */
            const __mmask8 live = (__mmask8)((1u << (stop - i)) - 1u);
            const __m512d acc = _mm512_mul_pd(group_sum(in, payloads, i / 8, live), f);
            if (out32)
                _mm256_mask_storeu_ps(out32 + i, live, _mm512_cvtpd_ps(acc));
            else
                _mm512_mask_storeu_pd(out64 + i, live, acc);
        }
    }
    for (int p = 0; p < payloads; ++p) invalid[p] += in[p].invalid;
    return 1;
}
#else
static int use_avx512(void) { return 0; }
#endif

/* Selects the AVX-512 paths where the CPU has them (1, the default) or the portable code (0);
 * returns whether the AVX-512 paths are now in use. */
int tnq_set_vector_path(int avx512) {
#ifdef HAVE_AVX512_PATH
    vector_path = -1;
    if (!avx512 || !use_avx512()) vector_path = 0;
    return vector_path;
#else
    (void)avx512;
    return 0;
#endif
}

/* The SSE control register's flush-to-zero (bit 15) and denormals-are-zero (bit 6) flags.
 * TensorFlow sets both on its executor threads, where tf.numpy_function runs the codec, which
 * then read subnormal gradients as zeros (uncompressed TF keeps them). tnq_keep_denormals clears
 * them and returns the previous register, which tnq_restore_csr puts back. */
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
unsigned tnq_keep_denormals(void) {
    unsigned csr = _mm_getcsr();
    _mm_setcsr(csr & ~0x8040u);
    return csr;
}
void tnq_restore_csr(unsigned csr) { _mm_setcsr(csr); }
#else
unsigned tnq_keep_denormals(void) { return 0; }
void tnq_restore_csr(unsigned csr) { (void)csr; }
#endif

/* Codes for count normalised float32 values v, noise drawn for elements first..first+count-1. */
INLINE void round_block(const float *v, int64_t count, int64_t first, const LevelTable *t,
                        uint32_t key_lo, uint32_t step_word, int nearest, uint8_t *codes) {
#ifdef HAVE_AVX512_PATH
    if (use_avx512()) {
        int64_t done = round_avx512(v, count, first, t, key_lo, step_word, nearest, codes);
        v += done;
        count -= done;
        first += done;
        codes += done;
    }
#endif
    switch (t->padded_size) {
        case 2: round_small(v, count, first, t, 2, key_lo, step_word, nearest, codes); break;
        case 4: round_small(v, count, first, t, 4, key_lo, step_word, nearest, codes); break;
        case 8: round_small(v, count, first, t, 8, key_lo, step_word, nearest, codes); break;
        case 16: round_small(v, count, first, t, 16, key_lo, step_word, nearest, codes); break;
        default: round_large(v, count, first, t, key_lo, step_word, nearest, codes);
    }
}

/* The one-pass AVX-512 encoder, for float32 input where the CPU has AVX-512; returns 0 where
 * it did nothing. Pointers are void so that the float64 instance compiles (it never calls). */
static int fast_quantize_f32(const void *x, int64_t n, int64_t bucket, const void *divisors,
                             const void *offsets, const LevelTable *t, uint32_t key_lo,
                             uint32_t step_word, int bits, int nearest, uint8_t *out) {
#ifdef HAVE_AVX512_PATH
    return use_avx512() && quantize_pack_avx512(x, n, bucket, divisors, offsets, t, key_lo,
                                                step_word, bits, nearest, out);
#else
    (void)x, (void)n, (void)bucket, (void)divisors, (void)offsets, (void)t, (void)key_lo;
    (void)step_word, (void)bits, (void)nearest, (void)out;
    return 0;
#endif
}

/* Subtract the bucket's offset (offsets may be NULL: none), divide by its divisor (non-finite
 * elements become 0 first), round, pack: codec.encode's element-wise part. out must hold
 * ceil(n * bits / 8) bytes; size <= 256 levels. */
#define DEFINE_QUANTIZE(NAME, T)                                                               \
    HOT void NAME(const T *x, int64_t n, int64_t bucket, const T *divisors, const T *offsets,  \
                  const float *levels, int size, uint32_t key_lo, uint32_t key_hi,             \
                  uint32_t step, int bits, int nearest, uint8_t *out) {                        \
        float v[BLOCK];                                                                        \
        uint8_t codes[BLOCK];                                                                  \
        LevelTable table;                                                                      \
        prepare_table(levels, size, &table);                                                   \
        uint32_t step_word = lowbias32(step ^ key_hi);                                         \
        if (sizeof(T) == sizeof(float) &&                                                      \
            fast_quantize_f32(x, n, bucket, divisors, offsets, &table, key_lo, step_word, bits, \
                              nearest, out))                                                   \
            return;                                                                            \
        for (int64_t start = 0; start < n; start += BLOCK) {                                   \
            int64_t count = n - start < BLOCK ? n - start : BLOCK;                             \
            for (int64_t i = 0; i < count;) {                                                  \
                int64_t b = (start + i) / bucket;                                              \
                int64_t stop = (b + 1) * bucket - start;                                       \
                stop = stop < count ? stop : count;                                            \
                const T divisor = divisors[b];                                                 \
                if (offsets) {                                                                 \
                    const T offset = offsets[b];                                               \
                    for (; i < stop; ++i) {                                                    \
                        T value = x[start + i];                                                \
                        value = isfinite(value) ? value : (T)0;                                \
                        v[i] = (float)((value - offset) / divisor);                            \
                    }                                                                          \
                } else {                                                                       \
                    for (; i < stop; ++i) {                                                    \
                        T value = x[start + i];                                                \
                        value = isfinite(value) ? value : (T)0;                                \
                        v[i] = (float)(value / divisor);                                       \
                    }                                                                          \
                }                                                                              \
            }                                                                                  \
            round_block(v, count, start, &table, key_lo, step_word, nearest, codes);           \
            pack_codes(codes, count, bits, out + start / 8 * bits);                            \
        }                                                                                      \
    }

DEFINE_QUANTIZE(tnq_quantize_pack_f32, float)
DEFINE_QUANTIZE(tnq_quantize_pack_f64, double)

/* ---- decoding: sum of every rank's payload, times the reduction factor ---- */

/* For each element, sum over payloads p of tables[p][code] * scales[p][bucket] (+
 * offsets[p][bucket] where offsets[p] is not NULL) in float64, in payload order (as
 * codec.decode_sum), then multiply by factor and store as float32 (out32) or float64 (out64,
 * the other NULL). Payload p has its own bits[p] and level table, padded to 2**bits[p] entries;
 * codes at or beyond its table_sizes[p] levels (corrupted payloads) are counted in invalid[p]. */
HOT void tnq_decode_sum(int payloads, const uint8_t *const *packed, const int *bits,
                        const double *const *tables, const int *table_sizes,
                        const double *const *scales, const double *const *offsets, int64_t n,
                        int64_t bucket, double factor, float *out32, double *out64,
                        int64_t *invalid) {
    double acc[BLOCK];
    uint8_t codes[BLOCK];
    const int avx512 = use_avx512();
#ifdef HAVE_AVX512_PATH
    if (avx512 && decode_sum_avx512(payloads, packed, bits, tables, table_sizes, scales, offsets,
                                    n, bucket, factor, out32, out64, invalid))
        return;
#endif
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t count = n - start < BLOCK ? n - start : BLOCK;
        for (int p = 0; p < payloads; ++p) {
            const int b = bits[p], size = table_sizes[p];
            const double *table = tables[p];
            unpack_codes(packed[p] + start / 8 * b, count, b, codes);
            int64_t bad = 0;
            for (int64_t i = 0; i < count; ++i) bad += codes[i] >= size;
            invalid[p] += bad;
            for (int64_t i = 0; i < count;) {
                int64_t k = (start + i) / bucket;
                int64_t stop = (k + 1) * bucket - start;
                stop = stop < count ? stop : count;
                const double scale = scales[p][k];
                const int shifted = offsets[p] != NULL;
                const double offset = shifted ? offsets[p][k] : 0.0;
#ifdef HAVE_AVX512_PATH
                if (avx512 && b <= 4)
                    i += accumulate_avx512(codes + i, stop - i, table, b, scale, shifted,
                                           offset, p == 0, acc + i);
#endif
                for (; i < stop; ++i) {
                    double value = table[codes[i]] * scale;
                    if (shifted) value = value + offset;
                    acc[i] = p == 0 ? value : acc[i] + value;
                }
            }
        }
        if (out32)
            for (int64_t i = 0; i < count; ++i) out32[start + i] = (float)(acc[i] * factor);
        else
            for (int64_t i = 0; i < count; ++i) out64[start + i] = acc[i] * factor;
    }
}

/* ---- the rotated scheme (rotation.py, codec.encode_rotated) ---- */

/* Random signs as rotation.signs: element i is negative where bit i % 32 of
 * rng.random_words(i / 32) is set. sign_words fills out with the words that cover elements
 * first..first+count-1, starting with word first / 32. */
INLINE void sign_words(int64_t first, int64_t count, uint32_t key_lo, uint32_t step_word,
                       uint32_t *out) {
    const int64_t begin = first / 32, end = (first + count + 31) / 32;
    for (int64_t w = begin; w < end; ++w) {
        uint32_t r = lowbias32(((uint32_t)w * 0x9E3779B9u) ^ key_lo);
        out[w - begin] = lowbias32(r ^ step_word);
    }
}

/* Negate x[i] (element first + i) where its sign bit is set, with sign from sign_words(first,
 * ...): flipping a float's sign bit is exact negation. */
#ifdef HAVE_AVX512_PATH
/* flip_f32/flip_f64 for whole vectors at word boundaries: each sign bit masks one lane. */
AVX512 static void flip_f32_avx512(float *x, const uint32_t *sign, int64_t count) {
    const __m512i top = _mm512_set1_epi32((int)0x80000000u);
    for (int64_t i = 0; i < count; i += 16) {
        const __mmask16 m = (__mmask16)(sign[i / 32] >> (i % 32));
        const __m512i v = _mm512_loadu_si512(x + i);
        _mm512_storeu_si512(x + i, _mm512_mask_xor_epi32(v, m, v, top));
    }
}

AVX512 static void flip_f64_avx512(double *x, const uint32_t *sign, int64_t count) {
    const __m512i top = _mm512_set1_epi64((long long)0x8000000000000000ull);
    for (int64_t i = 0; i < count; i += 8) {
        const __mmask8 m = (__mmask8)(sign[i / 32] >> (i % 32));
        const __m512i v = _mm512_loadu_si512(x + i);
        _mm512_storeu_si512(x + i, _mm512_mask_xor_epi64(v, m, v, top));
    }
}
#define FLIP_FAST(FN, WIDTH)                                                                   \
    if (use_avx512() && first % 32 == 0 && count % WIDTH == 0) {                               \
        FN(x, sign, count);                                                                    \
        return;                                                                                \
    }
#else
#define FLIP_FAST(FN, WIDTH)
#endif

INLINE void flip_f32(float *x, const uint32_t *sign, int64_t first, int64_t count) {
    FLIP_FAST(flip_f32_avx512, 16)
    uint32_t *bits = (uint32_t *)x;
    const int64_t shift = first % 32;
    for (int64_t i = 0; i < count; ++i) {
        const int64_t j = i + shift;
        bits[i] ^= ((sign[j / 32] >> (j % 32)) & 1u) << 31;
    }
}

INLINE void flip_f64(double *x, const uint32_t *sign, int64_t first, int64_t count) {
    FLIP_FAST(flip_f64_avx512, 8)
    uint64_t *bits = (uint64_t *)x;
    const int64_t shift = first % 32;
    for (int64_t i = 0; i < count; ++i) {
        const int64_t j = i + shift;
        bits[i] ^= (uint64_t)((sign[j / 32] >> (j % 32)) & 1u) << 63;
    }
}

#ifdef HAVE_AVX512_PATH
/* The first stages of the transform within each vector: 16 floats (h = 1, 2, 4, 8) or 8
 * doubles (h = 1, 2, 4). Lane i with bit h clear takes x[i] + x[i + h], its partner
 * x[i - h] - x[i]: the swapped vector y gives x + y and y - x, the same IEEE operations as the
 * portable stages (addition commutes exactly). */
AVX512 static void hadamard_lanes_f32(float *x, int64_t n) {
    const __m512i swap1 = _mm512_set_epi32(14, 15, 12, 13, 10, 11, 8, 9, 6, 7, 4, 5, 2, 3, 0, 1);
    const __m512i swap2 = _mm512_set_epi32(13, 12, 15, 14, 9, 8, 11, 10, 5, 4, 7, 6, 1, 0, 3, 2);
    const __m512i swap4 = _mm512_set_epi32(11, 10, 9, 8, 15, 14, 13, 12, 3, 2, 1, 0, 7, 6, 5, 4);
    const __m512i swap8 = _mm512_set_epi32(7, 6, 5, 4, 3, 2, 1, 0, 15, 14, 13, 12, 11, 10, 9, 8);
    for (int64_t i = 0; i < n; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i), y;
        y = _mm512_permutexvar_ps(swap1, v);
        v = _mm512_mask_blend_ps(0xAAAA, _mm512_add_ps(v, y), _mm512_sub_ps(y, v));
        y = _mm512_permutexvar_ps(swap2, v);
        v = _mm512_mask_blend_ps(0xCCCC, _mm512_add_ps(v, y), _mm512_sub_ps(y, v));
        y = _mm512_permutexvar_ps(swap4, v);
        v = _mm512_mask_blend_ps(0xF0F0, _mm512_add_ps(v, y), _mm512_sub_ps(y, v));
        y = _mm512_permutexvar_ps(swap8, v);
        v = _mm512_mask_blend_ps(0xFF00, _mm512_add_ps(v, y), _mm512_sub_ps(y, v));
        _mm512_storeu_ps(x + i, v);
    }
}

/* dequantize's table lookup for full tables of at most 16 levels: a register permute (every
 * code indexes inside the table, so none is invalid). */
AVX512 static int64_t dequantize_avx512(const uint8_t *codes, int64_t count, const double *table,
                                        int bits, double scale, double *v) {
    double table16[16] = {0};
    memcpy(table16, table, sizeof(double) * ((size_t)1 << bits));
    const __m512d t_lo = _mm512_loadu_pd(table16), t_hi = _mm512_loadu_pd(table16 + 8);
    const __m512d s = _mm512_set1_pd(scale);
    for (int64_t i = 0; i < count; i += 8) {
        __m512i index = _mm512_cvtepu8_epi64(_mm_loadl_epi64((const __m128i *)(codes + i)));
        _mm512_storeu_pd(v + i, _mm512_mul_pd(_mm512_permutex2var_pd(t_lo, index, t_hi), s));
    }
    return 0;
}

/* unpack_codes + dequantize_f32 in registers for count (a multiple of 16) codes at packed,
 * levels the payload's table as float32 padded with zeros to 256 entries: pdep spreads each 8 codes' bits into 8 bytes (the inverse of the encoder's pext), a permute
 * (up to 16 levels) or a gather reads the table. end: the payload's end, never read past. */
AVX512 __attribute__((target("bmi2"))) static int64_t dequantize_packed_f32_avx512(
    const uint8_t *packed, const uint8_t *end, int64_t count, const float *levels, int size,
    int bits, float scale, float *v) {
    const uint64_t low_bits = 0x0101010101010101ull * ((1u << bits) - 1u);
    const __m512 lookup16 = _mm512_loadu_ps(levels), s = _mm512_set1_ps(scale);
    const __m512i limit = _mm512_set1_epi32(size);
    int64_t bad = 0;
    for (int64_t i = 0; i < count; i += 16) {
        uint64_t words[2];
        for (int half = 0; half < 2; ++half) {
            const uint8_t *from = packed + (i / 8 + half) * bits;
            uint64_t word = 0;
            if (from + 8 <= end)
                memcpy(&word, from, 8); /* a constant size: one load, not a call */
            else
                memcpy(&word, from, (size_t)(end - from));
            words[half] = _pdep_u64(word, low_bits);
        }
        const __m512i index = _mm512_cvtepu8_epi32(_mm_set_epi64x((long long)words[1],
                                                                  (long long)words[0]));
        bad += __builtin_popcount(_mm512_cmpge_epi32_mask(index, limit));
        const __m512 level = bits <= 4 ? _mm512_permutexvar_ps(index, lookup16)
                                       : _mm512_i32gather_ps(index, levels, 4);
        _mm512_storeu_ps(v + i, _mm512_mul_ps(level, s));
    }
    return bad;
}

/* Stages h = 1 to 128 of each block of 256 floats, the block in 16 registers: 4 stages within
 * each vector as in hadamard_lanes_f32, then 4 between vectors (vector k and k + d for d = 1, 2,
 * 4, 8, i.e. h = 16 d). One load and one store per element instead of one per stage. */
AVX512 static void hadamard_blocks256_f32(float *x, int64_t n) {
    const __m512i swap1 = _mm512_set_epi32(14, 15, 12, 13, 10, 11, 8, 9, 6, 7, 4, 5, 2, 3, 0, 1);
    const __m512i swap2 = _mm512_set_epi32(13, 12, 15, 14, 9, 8, 11, 10, 5, 4, 7, 6, 1, 0, 3, 2);
    const __m512i swap4 = _mm512_set_epi32(11, 10, 9, 8, 15, 14, 13, 12, 3, 2, 1, 0, 7, 6, 5, 4);
    const __m512i swap8 = _mm512_set_epi32(7, 6, 5, 4, 3, 2, 1, 0, 15, 14, 13, 12, 11, 10, 9, 8);
    /* lane i's partner is y = swapped x; x[i] + y where bit h of i is clear, y - x[i] where it
     * is set: one fused multiply-add of x by +-1 and y, exact in the product, so it rounds
     * once, as the portable addition or subtraction does (signed zeros included) */
    const __m512 sign1 = _mm512_setr_ps(1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1);
    const __m512 sign2 = _mm512_setr_ps(1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1);
    const __m512 sign4 = _mm512_setr_ps(1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1);
    const __m512 sign8 = _mm512_setr_ps(1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1, -1);
    for (int64_t start = 0; start < n; start += 256) {
        __m512 v[16];
#pragma GCC unroll 16
        for (int k = 0; k < 16; ++k) {
            __m512 a = _mm512_loadu_ps(x + start + 16 * k);
            a = _mm512_fmadd_ps(a, sign1, _mm512_permutexvar_ps(swap1, a));
            a = _mm512_fmadd_ps(a, sign2, _mm512_permutexvar_ps(swap2, a));
            a = _mm512_fmadd_ps(a, sign4, _mm512_permutexvar_ps(swap4, a));
            v[k] = _mm512_fmadd_ps(a, sign8, _mm512_permutexvar_ps(swap8, a));
        }
#pragma GCC unroll 4
        for (int d = 1; d < 16; d *= 2)
#pragma GCC unroll 16
            for (int k = 0; k < 16; ++k)
                if (!(k & d)) {
                    const __m512 a = v[k], b = v[k + d];
                    v[k] = _mm512_add_ps(a, b);
                    v[k + d] = _mm512_sub_ps(a, b);
                }
#pragma GCC unroll 16
        for (int k = 0; k < 16; ++k) _mm512_storeu_ps(x + start + 16 * k, v[k]);
    }
}

/* The last steps of the float32 rotated decoder for one bucket, in registers: each payload's
 * values (values32 + p * bucket) with its signs flipped (signs + p * words: sign_words from a
 * start that is a multiple of 32), summed in float64 in payload order, times factor, stored
 * to out32 or out64. live a multiple of 16. */
AVX512 static void sum_flipped_avx512(const float *values32, const uint32_t *signs, int64_t words,
                                      int payloads, int64_t bucket, int64_t live, double factor,
                                      float *out32, double *out64) {
    /* (payloads with an exponent take the portable sum) */
    const __m512i top = _mm512_set1_epi32((int)0x80000000u);
    const __m512d f = _mm512_set1_pd(factor);
    for (int64_t i = 0; i < live; i += 16) {
        __m512d lo = _mm512_setzero_pd(), hi = lo;
        for (int p = 0; p < payloads; ++p) {
            const __mmask16 m = (__mmask16)(signs[p * words + i / 32] >> (i % 32));
            __m512i v = _mm512_loadu_si512(values32 + p * bucket + i);
            const __m512 x = _mm512_castsi512_ps(_mm512_mask_xor_epi32(v, m, v, top));
            const __m512d x_lo = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
            const __m512d x_hi = _mm512_cvtps_pd(
                _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
            /* the first payload's values as they are (0.0 + x would turn -0.0 into +0.0) */
            lo = p == 0 ? x_lo : _mm512_add_pd(lo, x_lo);
            hi = p == 0 ? x_hi : _mm512_add_pd(hi, x_hi);
        }
        lo = _mm512_mul_pd(lo, f);
        hi = _mm512_mul_pd(hi, f);
        if (out32) {
            _mm256_storeu_ps(out32 + i, _mm512_cvtpd_ps(lo));
            _mm256_storeu_ps(out32 + i + 8, _mm512_cvtpd_ps(hi));
        } else {
            _mm512_storeu_pd(out64 + i, lo);
            _mm512_storeu_pd(out64 + i + 8, hi);
        }
    }
}

AVX512 static void hadamard_lanes_f64(double *x, int64_t n) {
    const __m512i swap1 = _mm512_set_epi64(6, 7, 4, 5, 2, 3, 0, 1);
    const __m512i swap2 = _mm512_set_epi64(5, 4, 7, 6, 1, 0, 3, 2);
    const __m512i swap4 = _mm512_set_epi64(3, 2, 1, 0, 7, 6, 5, 4);
    for (int64_t i = 0; i < n; i += 8) {
        __m512d v = _mm512_loadu_pd(x + i), y;
        y = _mm512_permutexvar_pd(swap1, v);
        v = _mm512_mask_blend_pd(0xAA, _mm512_add_pd(v, y), _mm512_sub_pd(y, v));
        y = _mm512_permutexvar_pd(swap2, v);
        v = _mm512_mask_blend_pd(0xCC, _mm512_add_pd(v, y), _mm512_sub_pd(y, v));
        y = _mm512_permutexvar_pd(swap4, v);
        v = _mm512_mask_blend_pd(0xF0, _mm512_add_pd(v, y), _mm512_sub_pd(y, v));
        _mm512_storeu_pd(x + i, v);
    }
}
#endif

/* Stages h, 2h, 4h, ... of the unnormalised Walsh-Hadamard transform of x[0..n) in place (n a
 * power of two): stage h turns x[i], x[i + h] (bit h of i clear) into their sum and difference,
 * as rotation.hadamard. Two stages per pass over the block (the second pairs the first's
 * outputs i, i + 2h and i + h, i + 3h: the same additions in the same order), so each element
 * is loaded and stored half as often; the inner loops vectorise for h of a vector or more. */
#define DEFINE_HADAMARD_STAGES(NAME, T)                                                        \
    INLINE void NAME(T *x, int64_t n, int64_t h) {                                             \
        for (; 4 * h <= n; h *= 4)                                                             \
            for (int64_t i = 0; i < n; i += 4 * h)                                             \
                for (int64_t j = i; j < i + h; ++j) {                                          \
                    const T a = x[j], b = x[j + h], c = x[j + 2 * h], d = x[j + 3 * h];        \
                    const T s0 = a + b, d0 = a - b, s1 = c + d, d1 = c - d;                    \
                    x[j] = s0 + s1;                                                            \
                    x[j + h] = d0 + d1;                                                        \
                    x[j + 2 * h] = s0 - s1;                                                    \
                    x[j + 3 * h] = d0 - d1;                                                    \
                }                                                                              \
        if (h < n)                                                                             \
            for (int64_t j = 0; j < h; ++j) {                                                  \
                const T a = x[j], b = x[j + h];                                                \
                x[j] = a + b;                                                                  \
                x[j + h] = a - b;                                                              \
            }                                                                                  \
    }

DEFINE_HADAMARD_STAGES(hadamard_stages_f32, float)
DEFINE_HADAMARD_STAGES(hadamard_stages_f64, double)

/* The whole transform: the first stages within vectors (hadamard_lanes) where the AVX-512 path
 * is on, then the rest. */
INLINE void hadamard_f32(float *x, int64_t n) {
#ifdef HAVE_AVX512_PATH
    if (use_avx512() && n >= 256) {
        hadamard_blocks256_f32(x, n);
        hadamard_stages_f32(x, n, 256);
        return;
    }
    if (use_avx512() && n >= 16) {
        hadamard_lanes_f32(x, n);
        hadamard_stages_f32(x, n, 16);
        return;
    }
#endif
    hadamard_stages_f32(x, n, 1);
}

INLINE void hadamard_f64(double *x, int64_t n) {
#ifdef HAVE_AVX512_PATH
    if (use_avx512() && n >= 8) {
        hadamard_lanes_f64(x, n);
        hadamard_stages_f64(x, n, 8);
        return;
    }
#endif
    hadamard_stages_f64(x, n, 1);
}

/* dequantize (below) in float32, for payloads of tensors narrower than float64: float32 levels
 * times the float32 scale (both were sent as float32). */
INLINE int64_t dequantize_f32(const uint8_t *codes, int64_t count, const double *table, int size,
                              float scale, float *v) {
    int64_t bad = 0;
    for (int64_t i = 0; i < count; ++i) bad += codes[i] >= size;
    for (int64_t i = 0; i < count; ++i) v[i] = (float)table[codes[i]] * scale;
    return bad;
}

/* v[i] = table[codes[i]] * scale for a rotated bucket (count a multiple of 8); returns the
 * number of codes at or beyond size (a corrupted payload). */
INLINE int64_t dequantize(const uint8_t *codes, int64_t count, const double *table, int size,
                          int bits, double scale, double *v) {
#ifdef HAVE_AVX512_PATH
    if (use_avx512() && bits <= 4 && size == 1 << bits)
        return dequantize_avx512(codes, count, table, bits, scale, v);
#endif
    (void)bits;
    int64_t bad = 0;
    for (int64_t i = 0; i < count; ++i) bad += codes[i] >= size;
    for (int64_t i = 0; i < count; ++i) v[i] = table[codes[i]] * scale;
    return bad;
}

/* The float64 sum of v[0..count) in quantize.lane_sums' order: lane j adds elements j,
 * j + LANES, ... (count a multiple of 8), then the lanes are added in order. */
INLINE double lane_sum(const double *v, int64_t count) {
    double part[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= count; i += LANES)
        for (int j = 0; j < LANES; ++j) part[j] += v[i + j];
    for (int j = 0; i < count; ++i, ++j) part[j] += v[i];
    double acc = 0.0;
    for (int j = 0; j < LANES; ++j) acc += part[j];
    return acc;
}

/* codec.encode_rotated's element loops, one bucket at a time in cache: non-finite elements
 * taken as 0 (and counted: the return value), rotate (signs, then the transform), the bucket's
 * L2 norm (norms[b]), divide by its RMS, round to the nearest level of the unit table, pack, and
 * <table[code], r> (dots[b]), all in quantize.lane_sums' order where they sum. x: the n coded
 * elements, taken as zero-padded to whole buckets (a power of two >= 8); with run_count > 0,
 * x's elements outside its runs (run_count (start, length) pairs, ascending and apart: its zero
 * runs), read around them (encoder.scan's runs, without tnq_gather_coded's copy). scratch:
 * bucket T for the rotated bucket, bucket float, bucket uint32 and bucket doubles; codes: bucket
 * bytes. out holds the packed codes of the padded buckets. */
#define DEFINE_ENCODE_ROTATED(NAME, T, HADAMARD, FLIP)                                         \
    HOT int64_t NAME(const T *x, int64_t n, int64_t bucket, uint32_t key_lo, uint32_t key_hi,  \
                     uint32_t step, const float *levels, int size, int bits, double *norms,    \
                     double *dots, void *scratch, uint8_t *codes, uint8_t *out,                \
                     const int64_t *runs, int64_t run_count) {                                 \
        const uint32_t step_word = lowbias32(step ^ key_hi);                                   \
        int64_t at = 0, run = 0; /* the next element of x to read, the next run to skip */    \
        T *row = (T *)scratch;                                                                 \
        float *v = (float *)(row + bucket);                                                    \
        uint32_t *sign = (uint32_t *)(v + bucket);                                             \
        double *wide = (double *)(sign + bucket);                                              \
        const double root = sqrt((double)bucket);                                              \
        LevelTable table;                                                                      \
        prepare_table(levels, size, &table);                                                   \
        int64_t nonfinite = 0;                                                                 \
        for (int64_t start = 0, b = 0; start < n; start += bucket, ++b) {                      \
            const int64_t live = n - start < bucket ? n - start : bucket;                      \
            for (int64_t i = 0; i < live;) {                                                   \
                const int64_t next = run < run_count ? runs[2 * run] : INT64_MAX;              \
                const int64_t take = next - at < live - i ? next - at : live - i;              \
                for (int64_t j = 0; j < take; ++j) {                                           \
                    const T value = x[at + j];                                                 \
                    const int finite = isfinite(value);                                        \
                    nonfinite += !finite;                                                      \
                    row[i + j] = finite ? value : (T)0;                                        \
                }                                                                              \
                i += take;                                                                     \
                at += take;                                                                    \
                if (at == next) at += runs[2 * run++ + 1];                                     \
            }                                                                                  \
            memset(row + live, 0, (size_t)(bucket - live) * sizeof(T));                        \
            sign_words(start, bucket, key_lo, step_word, sign);                                \
            FLIP(row, sign, start, bucket);                                                    \
            HADAMARD(row, bucket);                                                             \
            for (int64_t i = 0; i < bucket; ++i) wide[i] = (double)row[i] * (double)row[i];    \
            const double norm = sqrt(lane_sum(wide, bucket));                                  \
            const T divisor = (T)(norm != 0.0 ? norm / root : 1.0);                            \
            for (int64_t i = 0; i < bucket; ++i) v[i] = (float)(row[i] / divisor);             \
            round_block(v, bucket, 0, &table, 0, 0, 1, codes);                                 \
            for (int64_t i = 0; i < bucket; ++i)                                               \
                wide[i] = (double)levels[codes[i]] * (double)row[i];                           \
            norms[b] = norm;                                                                   \
            dots[b] = lane_sum(wide, bucket);                                                  \
            pack_codes(codes, bucket, bits, out + start / 8 * bits);                           \
        }                                                                                      \
        return nonfinite;                                                                      \
    }

DEFINE_ENCODE_ROTATED(tnq_encode_rotated_f32, float, hadamard_f32, flip_f32)
DEFINE_ENCODE_ROTATED(tnq_encode_rotated_f64, double, hadamard_f64, flip_f64)

/* A decoded float32 value as float64, times 2**exponent (exact, as numpy's ldexp). */
INLINE double scaled_value(float value, int exponent) {
    return exponent ? ldexp((double)value, exponent) : (double)value;
}

/* Each payload's level table as 256 float32 levels (levels32 + 256 * p; zeros past its size),
 * for the float32 dequantizers. */
INLINE void float_levels(int payloads, const double *const *tables, const int *table_sizes,
                         float *levels32) {
    for (int p = 0; p < payloads; ++p)
        for (int k = 0; k < 256; ++k)
            levels32[256 * p + k] = k < table_sizes[p] ? (float)tables[p][k] : 0.0f;
}

/* One bucket of one payload of the rotated scheme decoded, the bucket of coded elements
 * start..start+live-1 (start a multiple of bucket; packed_size: the payload's packed bytes):
 * scale * table[code] for the whole bucket, the inverse transform, then the signs of its first
 * live elements (unless defer_flip: sign holds their words for the caller), in float32 into v32
 * (single) or in float64 into v, times 2**exponent where it is not 0 (float32: the caller's
 * scaled_value). Returns the number of codes beyond the table (a corrupted payload). */
INLINE int64_t decode_rotated_bucket(const uint8_t *packed, int64_t packed_size, int b,
                                     const double *table, int table_size, const float *levels32,
                                     double scale, uint32_t key_lo, uint32_t key_hi,
                                     uint32_t step, int exponent, int64_t start, int64_t live,
                                     int64_t bucket, int single, int defer_flip, uint32_t *sign,
                                     uint8_t *codes, float *v32, double *v) {
    int64_t invalid;
    sign_words(start, live, key_lo, lowbias32(step ^ key_hi), sign);
    const uint8_t *from = packed + start / 8 * b;
    if (single) {
#ifdef HAVE_AVX512_PATH
        if (use_avx512() && bucket % 16 == 0)
            invalid = dequantize_packed_f32_avx512(from, packed + packed_size, bucket, levels32,
                                                   table_size, b, (float)scale, v32);
        else
#endif
        {
            (void)levels32;
            (void)packed_size;
            unpack_codes(from, bucket, b, codes);
            invalid = dequantize_f32(codes, bucket, table, table_size, (float)scale, v32);
        }
        hadamard_f32(v32, bucket);
        if (!defer_flip)
            flip_f32(v32, sign, start, live);
        return invalid;
    }
    unpack_codes(from, bucket, b, codes);
    invalid = dequantize(codes, bucket, table, table_size, b, scale, v);
    hadamard_f64(v, bucket);
    flip_f64(v, sign, start, live);
    if (exponent)
        for (int64_t i = 0; i < live; ++i) v[i] = ldexp(v[i], exponent);
    return invalid;
}

/* codec.decode_sum for payloads of the rotated scheme: per bucket, each payload's
 * scale * table[code], inverse-rotated with its sender's signs (keys_lo, keys_hi, steps), in
 * float32 (single: tensors narrower than float64) or float64, times 2**exponents[p] (ldexp, only
 * where it is not 0: codec.SAFE_NORMS), summed in float64 in payload order, times factor, stored as float32 (out32) or float64 (out64). n is the tensor's element
 * count; payloads code whole buckets (bucket a power of two, >= 8, so each bucket's codes start
 * on a byte). scratch: 2 * bucket doubles, bucket uint32, and per payload 256 + bucket floats
 * and bucket / 32 + 1 uint32; codes: bucket bytes. */
HOT void tnq_rotated_decode_sum(int payloads, const uint8_t *const *packed, const int *bits,
                                const double *const *tables, const int *table_sizes,
                                const double *const *scales, const uint32_t *keys_lo,
                                const uint32_t *keys_hi, const uint32_t *steps,
                                const int *exponents, int64_t n,
                                int64_t bucket, int single, double factor, float *out32,
                                double *out64, int64_t *invalid, void *scratch, uint8_t *codes) {
    double *acc = (double *)scratch, *v = acc + bucket;
    float *v32; /* each float32 payload's bucket, in values32 */
    uint32_t *sign = (uint32_t *)(v + bucket);
    float *levels32 = (float *)(sign + bucket); /* each payload's table, as float32 */
    float *values32 = levels32 + 256 * payloads; /* float32 payloads: each one's bucket */
    const int64_t words = bucket / 32 + 1;
    uint32_t *signs = (uint32_t *)(values32 + bucket * payloads); /* and its sign words */
    int scaled = 0;
    for (int p = 0; p < payloads; ++p) scaled |= exponents[p] != 0;
#ifdef HAVE_AVX512_PATH
    const int fused = single && !scaled && use_avx512() && bucket % 32 == 0;
#else
    const int fused = 0;
#endif
    float_levels(payloads, tables, table_sizes, levels32);
    const int64_t padded = (n + bucket - 1) / bucket * bucket;
    for (int64_t start = 0, k = 0; start < n; start += bucket, ++k) {
        const int64_t live = n - start < bucket ? n - start : bucket;
        for (int p = 0; p < payloads; ++p) {
            if (fused)
                sign = signs + p * words;
            v32 = values32 + p * bucket;
            invalid[p] += decode_rotated_bucket(
                packed[p], (padded * bits[p] + 7) / 8, bits[p], tables[p], table_sizes[p],
                levels32 + 256 * p, scales[p][k], keys_lo[p], keys_hi[p], steps[p],
                exponents[p], start, live, bucket, single, fused, sign, codes, v32, v);
            if (single)
                continue;
            if (p == 0)
                memcpy(acc, v, (size_t)live * sizeof(double));
            else
                for (int64_t i = 0; i < live; ++i) acc[i] += v[i];
        }
#ifdef HAVE_AVX512_PATH
        if (fused && live % 16 == 0) {
            sum_flipped_avx512(values32, signs, words, payloads, bucket, live, factor,
                               out32 ? out32 + start : NULL, out64 ? out64 + start : NULL);
            continue;
        }
#endif
        if (fused) /* the tensor's last, partial bucket */
            for (int p = 0; p < payloads; ++p)
                flip_f32(values32 + p * bucket, signs + p * words, start, live);
        if (single) { /* the float64 sum of the payloads' buckets, in payload order */
            int64_t i = 0;
            for (; i + 8 <= live; i += 8) {
                double a[8];
                for (int j = 0; j < 8; ++j) a[j] = scaled_value(values32[i + j], exponents[0]);
                for (int p = 1; p < payloads; ++p)
                    for (int j = 0; j < 8; ++j)
                        a[j] += scaled_value(values32[p * bucket + i + j], exponents[p]);
                for (int j = 0; j < 8; ++j) acc[i + j] = a[j];
            }
            for (; i < live; ++i) {
                double a = scaled_value(values32[i], exponents[0]);
                for (int p = 1; p < payloads; ++p)
                    a += scaled_value(values32[p * bucket + i], exponents[p]);
                acc[i] = a;
            }
        }
        if (out32)
            for (int64_t i = 0; i < live; ++i) out32[start + i] = (float)(acc[i] * factor);
        else
            for (int64_t i = 0; i < live; ++i) out64[start + i] = acc[i] * factor;
    }
}

/* tnq_rotated_decode_sum for payloads with zero runs: payload p codes only the coded_numels[p]
 * elements outside its own runs (runs[p]: run_counts[p] (start, length) pairs, ascending,
 * disjoint, within n), so the payloads' buckets cover different elements of the tensor. The
 * tensor is summed a chunk of RUNS_CHUNK elements at a time, in cache: each payload's values
 * for the chunk (0 inside its runs, its next coded elements outside them, from the one bucket
 * it holds decoded) set (the first payload) or added to a float64 chunk, in payload order, then
 * times factor to out32 or out64: the float64 sums, and so the bits, that decoding each payload
 * alone and adding it around its runs (tnq_spread_sum) gives, without a float64 pass over the
 * whole tensor per payload. scratch: RUNS_CHUNK doubles, bucket uint32, per payload 256 floats,
 * bucket doubles and a RunCursor; codes: bucket bytes. */
#define RUNS_CHUNK 4096
typedef struct {
    int64_t run;     /* the first of the payload's runs not yet passed */
    int64_t coded;   /* its coded elements taken so far */
    int64_t decoded; /* the bucket held decoded in its values, -1: none */
} RunCursor;

HOT void tnq_rotated_decode_runs_sum(int payloads, const uint8_t *const *packed,
                                     const int *bits, const double *const *tables,
                                     const int *table_sizes, const double *const *scales,
                                     const uint32_t *keys_lo, const uint32_t *keys_hi,
                                     const uint32_t *steps, const int *exponents,
                                     const int64_t *const *runs, const int64_t *run_counts,
                                     const int64_t *coded_numels, int64_t n, int64_t bucket,
                                     int single, double factor, float *out32, double *out64,
                                     int64_t *invalid, void *scratch, uint8_t *codes) {
    double *acc = (double *)scratch;
    uint32_t *sign = (uint32_t *)(acc + RUNS_CHUNK);
    float *levels32 = (float *)(sign + bucket);
    double *values = (double *)(levels32 + 256 * payloads); /* a bucket per payload */
    RunCursor *cursors = (RunCursor *)(values + bucket * payloads);
    float_levels(payloads, tables, table_sizes, levels32);
    for (int p = 0; p < payloads; ++p) {
        cursors[p].run = 0;
        cursors[p].coded = 0;
        cursors[p].decoded = -1;
    }
    for (int64_t chunk = 0; chunk < n; chunk += RUNS_CHUNK) {
        const int64_t end = n - chunk < RUNS_CHUNK ? n : chunk + RUNS_CHUNK;
        for (int p = 0; p < payloads; ++p) {
            RunCursor *c = cursors + p;
            const int64_t *r = runs[p];
            const int64_t padded = (coded_numels[p] + bucket - 1) / bucket * bucket;
            double *v = values + p * bucket;
            float *v32 = (float *)v;
            for (int64_t i = chunk; i < end;) {
                if (c->run < run_counts[p] && i >= r[2 * c->run]) { /* inside a run: zeros */
                    const int64_t run_end = r[2 * c->run] + r[2 * c->run + 1];
                    const int64_t stop = run_end < end ? run_end : end;
                    if (p == 0)
                        memset(acc + (i - chunk), 0, (size_t)(stop - i) * sizeof(double));
                    i = stop;
                    c->run += i == run_end;
                    continue;
                }
                const int64_t next = c->run < run_counts[p] ? r[2 * c->run] : n;
                const int64_t stop = next < end ? next : end;
                while (i < stop) { /* coded elements, a bucket of them at a time */
                    const int64_t k = c->coded / bucket, offset = c->coded - k * bucket;
                    if (k != c->decoded) {
                        const int64_t start = k * bucket;
                        const int64_t live = coded_numels[p] - start < bucket
                                                 ? coded_numels[p] - start : bucket;
                        invalid[p] += decode_rotated_bucket(
                            packed[p], (padded * bits[p] + 7) / 8, bits[p], tables[p],
                            table_sizes[p], levels32 + 256 * p, scales[p][k], keys_lo[p],
                            keys_hi[p], steps[p], exponents[p], start, live, bucket, single, 0,
                            sign, codes, v32, v);
                        c->decoded = k;
                    }
                    const int64_t take = stop - i < bucket - offset ? stop - i : bucket - offset;
                    double *into = acc + (i - chunk);
                    if (single && p == 0)
                        for (int64_t j = 0; j < take; ++j)
                            into[j] = scaled_value(v32[offset + j], exponents[p]);
                    else if (single)
                        for (int64_t j = 0; j < take; ++j)
                            into[j] += scaled_value(v32[offset + j], exponents[p]);
                    else if (p == 0)
                        memcpy(into, v + offset, (size_t)take * sizeof(double));
                    else
                        for (int64_t j = 0; j < take; ++j) into[j] += v[offset + j];
                    i += take;
                    c->coded += take;
                }
            }
        }
        if (out32)
            for (int64_t i = chunk; i < end; ++i) out32[i] = (float)(acc[i - chunk] * factor);
        else
            for (int64_t i = chunk; i < end; ++i) out64[i] = acc[i - chunk] * factor;
    }
}

/* One streaming pass over x[0..n) for the payload's header and zero-run section: the largest
 * |finite element| (to *amax, as a double; 0 if none) and the runs of at least min_run
 * consecutive exact zeros (+0 or -0; NaN is not zero), whose (start, length) pairs, in order, go
 * to runs[0..2*capacity). Returns the number of runs found, which may exceed capacity: callers
 * count first with capacity 0, then fill. Each block of ZERO_SCAN elements is reduced by a min
 * and a max the compiler vectorizes; only blocks holding a zero are walked one by one. Bits are
 * compared with the sign masked off (finite non-negative floats order as their bits). */
#define ZERO_SCAN 64
#define ZERO_STRIDE 16 /* elements a run grows by while it goes on (then one by one) */
#define DEFINE_SCAN(NAME, T, U, MASK, INF)                                                     \
    HOT int64_t NAME(const void *data, int64_t n, int64_t min_run, int64_t *runs,              \
                     int64_t capacity, double *amax) {                                         \
        const U *u = (const U *)data;                                                          \
        U most = 0;                                                                            \
        int64_t count = 0, i = 0, window = (min_run + 1) / 2;                                  \
        if (window < 1) window = 1;                                                            \
        while (i < n) {                                                                        \
            int64_t stop = i + ZERO_SCAN < n ? i + ZERO_SCAN : n;                              \
            U least = (U)~(U)0, block_most = 0;                                                \
            for (int64_t j = i; j < stop; j++) {                                               \
                U m = u[j] & (MASK);                                                           \
                U finite = m & (U)-(U)(m < (INF)); /* (a select GCC 12 would not vectorize) */ \
                least = m < least ? m : least;                                                 \
                block_most = finite > block_most ? finite : block_most;                        \
            }                                                                                  \
            most = block_most > most ? block_most : most;                                      \
            if (least != 0) {                                                                  \
                i = stop;                                                                      \
                continue;                                                                      \
            }                                                                                  \
            /* A run of min_run or more zeros holds a whole window of W = ceil(min_run / 2)   \
             * elements aligned to a multiple of W: test those windows (no branch per element, \
             * where zeros lie scattered, as ReLU makes them) and grow each all-zero one to its \
             * maximal run, which may start before this block or go on past it. */             \
            int64_t end = stop, w = (i + window - 1) / window * window;                        \
            while (w < stop && w + window <= n) {                                              \
                U any = 0;                                                                     \
                for (int64_t k = w; k < w + window; k++) any |= u[k] & (MASK);                 \
                if (any != 0) {                                                                \
                    w += window;                                                               \
                    continue;                                                                  \
                }                                                                              \
                int64_t start = w, after = w + window;                                         \
                while (start > 0 && (u[start - 1] & (MASK)) == 0) start--;                     \
                while (after + ZERO_STRIDE <= n) { /* long runs: a vector at a time */          \
                    U ahead = 0;                                                               \
                    for (int64_t k = after; k < after + ZERO_STRIDE; k++)                      \
                        ahead |= u[k] & (MASK);                                                \
                    if (ahead != 0) break;                                                     \
                    after += ZERO_STRIDE;                                                      \
                }                                                                              \
                while (after < n && (u[after] & (MASK)) == 0) after++;                         \
                if (after - start >= min_run) {                                                \
                    if (count < capacity) {                                                    \
                        runs[2 * count] = start;                                               \
                        runs[2 * count + 1] = after - start;                                   \
                    }                                                                          \
                    count++;                                                                   \
                }                                                                              \
                end = after > end ? after : end;                                               \
                w = (after + window - 1) / window * window;                                    \
            }                                                                                  \
            i = end;                                                                           \
        }                                                                                      \
        T largest;                                                                             \
        memcpy(&largest, &most, sizeof largest);                                               \
        *amax = (double)largest;                                                               \
        return count;                                                                          \
    }
DEFINE_SCAN(tnq_scan_f32, float, uint32_t, 0x7FFFFFFFu, 0x7F800000u)
DEFINE_SCAN(tnq_scan_f64, double, uint64_t, 0x7FFFFFFFFFFFFFFFull, 0x7FF0000000000000ull)

/* The elements of x[0..n) outside its zero runs (count (start, length) pairs, ascending,
 * disjoint, within n; encoder.scan), in order, to out: the coded elements encoder.encode
 * quantizes. A copy per gap between runs, where numpy's boolean mask tests every element. */
#define DEFINE_GATHER_CODED(NAME, T)                                                           \
    HOT void NAME(const void *data, int64_t n, const int64_t *runs, int64_t count,             \
                  void *into) {                                                                \
        const T *x = (const T *)data;                                                          \
        T *out = (T *)into;                                                                    \
        int64_t from = 0;                                                                      \
        for (int64_t r = 0; r <= count; ++r) {                                                 \
            const int64_t stop = r < count ? runs[2 * r] : n;                                  \
            memcpy(out, x + from, (size_t)(stop - from) * sizeof(T));                          \
            out += stop - from;                                                                \
            if (r < count) from = stop + runs[2 * r + 1];                                      \
        }                                                                                      \
    }
DEFINE_GATHER_CODED(tnq_gather_coded_f32, float)
DEFINE_GATHER_CODED(tnq_gather_coded_f64, double)

/* decoder.decode_sum's sum of payloads with zero runs: one payload's decoded coded elements
 * (coded, float64, in order) added into acc[0..n) at the elements outside its runs (as
 * tnq_gather_coded took them). first: the payload starts the sum, so acc is set, not added
 * to, and its elements inside the runs are set to 0. */
HOT void tnq_spread_sum(const double *coded, int64_t n, const int64_t *runs, int64_t count,
                        double *acc, int first) {
    int64_t from = 0;
    for (int64_t r = 0; r <= count; ++r) {
        const int64_t stop = r < count ? runs[2 * r] : n;
        if (first)
            memcpy(acc + from, coded, (size_t)(stop - from) * sizeof(double));
        else
            for (int64_t i = from; i < stop; ++i) acc[i] += coded[i - from];
        coded += stop - from;
        if (r < count) {
            from = stop + runs[2 * r + 1];
            if (first) memset(acc + stop, 0, (size_t)runs[2 * r + 1] * sizeof(double));
        }
    }
}

#ifdef TNQ_PYTHON_MODULE
/* setup.py builds this file as a Python extension so that pip places it in the package; it is
 * importable, but its functions are reached through ctypes (native.py). */
#include <Python.h>

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "_native", "Compiled codec loops; see horovod_tnq/core/native.py.",
    -1, NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&native_module); }
#endif
