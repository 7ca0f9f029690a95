// Decode attention over the paged KV cache, on the CPU, reading each sequence's blocks where they lie:
// for steps whose sequences bring a few new tokens each (decodes, speculative verification).
//
// The torch path gathers every sequence's blocks into a padded contiguous copy and runs SDPA over it; here
// each task walks a range of one sequence's keys for a few KV heads (those side by side in a cache row, so
// that a task streams whole stretches of the cache), for every query row that shares each head (the
// sequence's new tokens times the query heads of the group: each key is loaded once for all of them).
// Keys come 16 at a time: widened to float32 once, scored for each row as 16 partial-sum vectors folded into
// one vector of 16 scores (a transpose-and-add tree, no horizontal sum per dot), then an online softmax
// (flash-decoding: a running max and sum per row, no buffer of scores) weights the 16 values. When a step
// has too few sequences to keep every thread busy, long contexts are cut into chunks whose
// partial results (max, sum, weighted values) are merged by their log-sum-exp. Threads pull tasks, longest
// first, from a shared counter, so unequal contexts do not leave a thread idle.
//
// The arithmetic is float32 throughout, on 16-float vectors written with GCC's vector extensions: g++ maps them
// to one AVX-512 register, two AVX2 registers (-march=x86-64-v3, the image's build) or NEON quads. A long
// prefill chunk is a matrix product that SDPA does far better: it stays on the torch path. The step's new keys
// and values are written to their slots first, as the torch path does (`write_kv`), so the whole batch's K/V
// is in place before anyone attends.
//
// Built by `python -m pagoda.cpu_extension` (make install); registered as torch.ops.pagoda.*.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

// 16-float vectors pass between inline functions of this file only: their ABI without AVX-512 does not matter.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace {

// ---------------------------------------------------------------------------------------------------------
// 16 floats

constexpr int64_t kLanes = 16;
typedef float Vec __attribute__((vector_size(64)));
typedef int32_t IVec __attribute__((vector_size(64)));
typedef uint32_t UVec __attribute__((vector_size(64)));
typedef uint16_t U16Vec __attribute__((vector_size(32)));
typedef float Half8 __attribute__((vector_size(32)));
typedef float Quarter4 __attribute__((vector_size(16)));

constexpr float kInf = std::numeric_limits<float>::infinity();

inline Vec splat(float s) { return Vec{} + s; }
inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }
template <typename V>
inline V vmax(V a, V b) {
  return a > b ? a : b;
}
inline Vec vmin(Vec a, Vec b) { return a < b ? a : b; }

// a * b + c in one rounding where the machine has FMA (g++ contracts nothing under -std=c++20).
inline Vec fmadd(Vec a, Vec b, Vec c) {
#if defined(__AVX512F__)
  return (Vec)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
  const Half8 lo = _mm256_fmadd_ps(__builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7),
                                   __builtin_shufflevector(b, b, 0, 1, 2, 3, 4, 5, 6, 7),
                                   __builtin_shufflevector(c, c, 0, 1, 2, 3, 4, 5, 6, 7));
  const Half8 hi = _mm256_fmadd_ps(__builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15),
                                   __builtin_shufflevector(b, b, 8, 9, 10, 11, 12, 13, 14, 15),
                                   __builtin_shufflevector(c, c, 8, 9, 10, 11, 12, 13, 14, 15));
  return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#else
  return a * b + c;
#endif
}

inline float hmax(Vec v) {
  const Half8 h = vmax(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7),
                       __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
  const Quarter4 q = vmax(__builtin_shufflevector(h, h, 0, 1, 2, 3), __builtin_shufflevector(h, h, 4, 5, 6, 7));
  return std::max(std::max(q[0], q[2]), std::max(q[1], q[3]));
}

inline float hsum(Vec v) {
  const Half8 h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const Quarter4 q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
}

// e^x, Cephes' single-precision polynomial (about 1 ulp); 0 below -87.3 (e^-inf = 0: masked scores).
inline Vec vexp(Vec x) {
  const Vec xc = vmin(vmax(x, splat(-87.33654f)), splat(88.37626f));
  const Vec magic = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  const Vec shifted = fmadd(xc, splat(1.44269504088896341f), magic);
  const Vec n = shifted - magic;
  Vec r = fmadd(n, splat(-0.693359375f), xc);
  r = fmadd(n, splat(2.12194440e-4f), r);
  Vec p = splat(1.9875691500e-4f);
  p = fmadd(p, r, splat(1.3981999507e-3f));
  p = fmadd(p, r, splat(8.3334519073e-3f));
  p = fmadd(p, r, splat(4.1665795894e-2f));
  p = fmadd(p, r, splat(1.6666665459e-1f));
  p = fmadd(p, r, splat(5.0000001201e-1f));
  p = fmadd(p, r * r, r + 1.f);
  const IVec bits = (__builtin_convertvector(n, IVec) + 127) << 23;
  const Vec e = p * (Vec)bits;
  return x < splat(-87.33654f) ? splat(0.f) : e;
}

// tanh through e^(-2|x|), with x's sign: no overflow, and accurate to a few float32 ulps of 1.
inline Vec vtanh(Vec x) {
  const Vec ax = vmax(x, -x);
  const Vec t = vexp(splat(-2.f) * ax);
  const Vec y = (1.f - t) / (1.f + t);
  return x < splat(0.f) ? -y : y;
}

// The 16 dot products whose partial sums (over 16-lane slices of head_dim) are part[0..15]: lane j of the
// result is the sum of part[j]'s lanes. Pairs are folded level by level, each level a shuffle of two vectors
// into two and one add: within 128-bit lanes first (unpack-like), then across them, so AVX-512 and AVX2 both
// get single-instruction shuffles.
inline Vec fold(Vec a, Vec b) {  // lanes 4q + {0, 1, 2, 3}: a, b, a, b summed over pairs of quarter q
  return __builtin_shufflevector(a, b, 0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12, 28, 13, 29) +
         __builtin_shufflevector(a, b, 2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27, 14, 30, 15, 31);
}
inline Vec fold2(Vec c, Vec d) {  // quarter q of the result: 4 dots' sums over quarter q of the inputs
  return __builtin_shufflevector(c, d, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
         __builtin_shufflevector(c, d, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
}
inline Vec fold_quarters(Vec e, Vec f) {  // quarters: e's (0+1), e's (2+3), f's (0+1), f's (2+3)
  return __builtin_shufflevector(e, f, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
         __builtin_shufflevector(e, f, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
}
inline Vec reduce16(const Vec* part) {
  Vec four[4];
  for (int i = 0; i < 4; ++i) {
    four[i] = fold2(fold(part[4 * i], part[4 * i + 1]), fold(part[4 * i + 2], part[4 * i + 3]));
  }
  return fold_quarters(fold_quarters(four[0], four[1]), fold_quarters(four[2], four[3]));
}

// ---------------------------------------------------------------------------------------------------------
// Cache rows in float32

inline Vec combine(Half8 lo, Half8 hi) {
  return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}

// 16 values from src, in float32 registers.
template <typename T>
inline Vec widen16(const T* src) {
  Vec v;
  for (int i = 0; i < kLanes; ++i) v[i] = static_cast<float>(src[i]);
  return v;
}

template <>
inline Vec widen16(const float* src) {
  return load(src);
}

template <>
inline Vec widen16(const c10::BFloat16* src) {  // bfloat16 is float32's top half
#if defined(__AVX512F__)
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  return (Vec)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
#elif defined(__AVX2__)
  const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
  const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 8));
  return combine(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(lo), 16)),
                 _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(hi), 16)));
#else
  U16Vec half;
  std::memcpy(&half, src, sizeof(half));
  return (Vec)(__builtin_convertvector(half, UVec) << 16);
#endif
}

#if defined(__AVX512F__) || defined(__F16C__)
template <>
inline Vec widen16(const c10::Half* src) {
#if defined(__AVX512F__)
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
#else
  return combine(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))),
                 _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 8))));
#endif
}
#endif

// n values of a row in float32, zero-padded to `padded` (a multiple of 16).
template <typename T>
inline void widen_row(const T* src, float* dst, int64_t n, int64_t padded) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store(dst + i, widen16(src + i));
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  for (; i < padded; ++i) dst[i] = 0.f;
}

// A layer's K or V cache [blocks, block_size, heads, head_dim]: where token t of a block table lies. Strides
// and the block size (a power of two: a shift and a mask, no division) read once, outside the loops.
template <typename T>
struct PagedCache {
  const T* base;
  int64_t block_stride, slot_stride, head_stride, mask;
  int shift;

  explicit PagedCache(const at::Tensor& cache)
      : base(cache.data_ptr<T>()),
        block_stride(cache.stride(0)),
        slot_stride(cache.stride(1)),
        head_stride(cache.stride(2)),
        mask(cache.size(1) - 1),
        shift(__builtin_ctzll(static_cast<uint64_t>(cache.size(1)))) {}

  const T* at(const int32_t* table, int64_t t, int64_t head) const {
    return base + table[t >> shift] * block_stride + (t & mask) * slot_stride + head * head_stride;
  }
};

constexpr int64_t kMaxHeadDim = 256;
// The rows of a block past the range's end: zeros (finite, and masked), never the cache past the context.
alignas(64) constexpr float kZeros[kMaxHeadDim] = {};

// ---------------------------------------------------------------------------------------------------------
// One task: keys [begin, end) of one sequence, one KV head, every query row of its group

// The step, as every task reads it.
template <typename T>
struct Step {
  const T* query;
  int64_t q_token_stride, q_head_stride;
  PagedCache<T> keys, values;
  const int32_t *starts, *tables, *lens;
  int64_t table_stride;
  int64_t group, head_dim;
  float scale, cap;
  int64_t window;

  int64_t q_len(int64_t seq) const { return starts[seq + 1] - starts[seq]; }
  int64_t context(int64_t seq) const { return lens[seq] - q_len(seq); }  // query i sits at context + i
  // the keys any of the sequence's queries may see: its earliest query's window bounds them all
  int64_t first_key(int64_t seq) const { return window > 0 ? std::max<int64_t>(0, context(seq) - window + 1) : 0; }
};

// Query rows scored together, each key loaded once for all: a KV head's group (3 for SmolLM2) in one pass,
// larger groups 4 at a time.
constexpr int64_t kRowTile = 4;

// bfloat16 keys scored where they lie, two dimensions per instruction (AVX512-BF16: products of bfloat16 are
// exact in float32, summed in float32, as widening them first would). Elsewhere keys are widened to float32.
#if defined(__AVX512BF16__)
template <typename T>
constexpr bool kDotBF16 = std::is_same_v<T, c10::BFloat16>;
#else
template <typename T>
constexpr bool kDotBF16 = false;
#endif

// A task's buffers and running softmax, per query row: max, sum (as 16 lanes, summed at the end) and
// weighted values.
struct Partial {
  std::vector<float> q, keys, probs, acc, maxes;
  std::vector<uint16_t> q_bf16;
  std::vector<uint8_t> values;  // a short head's values padded to whole vectors (head_dim % 16 != 0)
  std::vector<Vec> sums;

  void reset(int64_t rows, int64_t padded_dim, int64_t value_bytes) {
    q.resize(rows * padded_dim);
    q_bf16.resize(rows * (padded_dim + kLanes));  // (bfloat16 pairs: whole 32s)
    keys.assign(kLanes * padded_dim, 0.f);
    values.assign(kLanes * padded_dim * value_bytes, 0);
    probs.resize(rows * kLanes);
    acc.assign(rows * padded_dim, 0.f);
    maxes.assign(rows, -kInf);
    sums.assign(rows, Vec{});
  }
};

// The first `lines` 64-byte lines from row on, into L1.
template <typename T>
__attribute__((always_inline)) inline void prefetch_lines(const T* row, int lines) {
  for (int l = 0; l < lines; ++l) __builtin_prefetch(reinterpret_cast<const char*>(row) + 64 * l, 0, 3);
}
template <typename T>  // the same, into L2 (prefetcht2)
__attribute__((always_inline)) inline void prefetch_lines_l2(const T* row, int lines) {
  for (int l = 0; l < lines; ++l) __builtin_prefetch(reinterpret_cast<const char*>(row) + 64 * l, 0, 1);
}

template <int NC>  // q . keys[j] for 16 rows of widened keys, NC slices of 16 floats each (zero-padded)
__attribute__((always_inline)) inline Vec score16(const float* q, const float* keys) {
  constexpr int64_t dim = NC * kLanes;
  Vec qv[NC];
  for (int c = 0; c < NC; ++c) qv[c] = load(q + c * kLanes);
  Vec part[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    Vec a = qv[0] * load(keys + j * dim);
    for (int c = 1; c < NC; ++c) a = fmadd(qv[c], load(keys + j * dim + c * kLanes), a);
    part[j] = a;
  }
  return reduce16(part);
}

#if defined(__AVX512BF16__)
// q_r . key[j] for 16 bfloat16 rows in the cache and R query rows (q_stride apart) at once: each slice of a
// key loaded once for all R. q: 32-wide slices, zero-padded; each slice of a key loaded under its mask (the
// head's dimensions: never the next head's values, which may not be finite), unless the head is whole slices
// (`whole`: a plain load, one instruction fewer per slice). Four keys' partial sums per row are folded as
// soon as they are done, so that R rows' sums stay in registers.
template <int NC, bool whole, int R>
__attribute__((always_inline)) inline void score16_bf16(const uint16_t* q, int64_t q_stride,
                                                        const c10::BFloat16* const* keys,
                                                        const __mmask32* slices,
                                                        const c10::BFloat16* const* next, int lines, Vec* s) {
  constexpr int CB = (NC + 1) / 2;
  __m512bh qv[R][CB];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < CB; ++c) qv[r][c] = (__m512bh)_mm512_loadu_si512(q + r * q_stride + 32 * c);
  }
  Vec four[R][4];
  for (int i = 0; i < 4; ++i) {
    Vec part[R][4];
    for (int jj = 0; jj < 4; ++jj) {
      const int j = 4 * i + jj;
      __m512 a[R];
      for (int r = 0; r < R; ++r) a[r] = _mm512_setzero_ps();
      for (int c = 0; c < CB; ++c) {
        const __m512i k = whole ? _mm512_loadu_si512(keys[j] + 32 * c) : _mm512_maskz_loadu_epi16(slices[c], keys[j] + 32 * c);
        for (int r = 0; r < R; ++r) a[r] = _mm512_dpbf16_ps(a[r], qv[r][c], (__m512bh)k);
      }
      if (next) prefetch_lines(next[j], lines);  // the next block's key j, on its way
      for (int r = 0; r < R; ++r) part[r][jj] = a[r];
    }
    for (int r = 0; r < R; ++r) four[r][i] = fold2(fold(part[r][0], part[r][1]), fold(part[r][2], part[r][3]));
  }
  for (int r = 0; r < R; ++r) {
    s[r] = fold_quarters(fold_quarters(four[r][0], four[r][1]), fold_quarters(four[r][2], four[r][3]));
  }
}


template <int NC, bool whole>
__attribute__((always_inline)) inline void score_rows_bf16(int64_t n, const uint16_t* q, int64_t q_stride,
                                                           const c10::BFloat16* const* keys,
                                                           const __mmask32* slices,
                                                           const c10::BFloat16* const* next, int lines, Vec* s) {
  switch (n) {
    case 1: return score16_bf16<NC, whole, 1>(q, q_stride, keys, slices, next, lines, s);
    case 2: return score16_bf16<NC, whole, 2>(q, q_stride, keys, slices, next, lines, s);
    case 3: return score16_bf16<NC, whole, 3>(q, q_stride, keys, slices, next, lines, s);
    default: return score16_bf16<NC, whole, 4>(q, q_stride, keys, slices, next, lines, s);
  }
}
#endif

// bfloat16 values widened two vectors at a time: 16 pairs loaded as 32-bit lanes, the even dimensions shifted
// up and the odd ones masked in place (no shuffles). The sums then hold each 32 dimensions as their 16 even
// ones, then their 16 odd ones, put back in order when written out.
template <typename T, int NC>
constexpr bool kEvenOdd = std::is_same_v<T, c10::BFloat16> && NC % 2 == 0;

template <typename T, int NC>
__attribute__((always_inline)) inline void widen_values(const T* row, Vec* v) {
  if constexpr (kEvenOdd<T, NC>) {
    for (int c = 0; c < NC; c += 2) {
      UVec pairs;
      std::memcpy(&pairs, row + c * kLanes, sizeof(pairs));
      v[c] = (Vec)(pairs << 16);
      v[c + 1] = (Vec)(pairs & 0xFFFF0000u);
    }
  } else {
    for (int c = 0; c < NC; ++c) v[c] = widen16(row + c * kLanes);
  }
}

// acc[r] += sum_j probs[r][j] * values[j] for `rows` rows: the values widened once per tile of rows whose
// sums stay in registers.
template <typename T, int NC>
__attribute__((always_inline)) inline void accumulate(float* acc, const float* probs, int64_t rows,
                                                      const T* const* values, const T* const* next, int lines) {
  constexpr int64_t dim = NC * kLanes;
  constexpr int TR = NC >= 16 ? 1 : 16 / NC;
  for (int64_t r0 = 0; r0 < rows; r0 += TR) {
    const int64_t n = std::min<int64_t>(TR, rows - r0);
    Vec a[TR][NC];
    for (int r = 0; r < TR; ++r) {
      if (r >= n) break;
      for (int c = 0; c < NC; ++c) a[r][c] = load(acc + (r0 + r) * dim + c * kLanes);
    }
    for (int j = 0; j < kLanes; ++j) {
      Vec v[NC];
      widen_values<T, NC>(values[j], v);
      if (next && r0 == 0) prefetch_lines(next[j], lines);  // the next block's value j, on its way
      for (int r = 0; r < TR; ++r) {
        if (r >= n) break;
        const Vec p = splat(probs[(r0 + r) * kLanes + j]);
        for (int c = 0; c < NC; ++c) a[r][c] = fmadd(p, v[c], a[r][c]);
      }
    }
    for (int r = 0; r < TR; ++r) {
      if (r >= n) break;
      for (int c = 0; c < NC; ++c) store(acc + (r0 + r) * dim + c * kLanes, a[r][c]);
    }
  }
}

// A row of weighted values, divided by its sum, in the output's dtype and dimension order.
template <typename T, int NC>
inline void write_row(T* dst, const float* acc, float inv, int64_t head_dim) {
  if constexpr (kEvenOdd<T, NC>) {
    for (int64_t d = 0; d < head_dim; ++d) {
      const int64_t block = d & ~int64_t{31}, i = (d & 31) >> 1, odd = d & 1;
      dst[d] = static_cast<T>(acc[block + odd * kLanes + i] * inv);
    }
  } else {
    for (int64_t d = 0; d < head_dim; ++d) dst[d] = static_cast<T>(acc[d] * inv);
  }
}

template <typename T>
inline void prefetch(const T* row, int64_t n) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(p + b);
}

#if defined(__AVX512BF16__)
// The common case in one tight loop: a bfloat16 cache of whole 32-wide slices in cache blocks of 16 keys or
// more (a block of keys is one base and a stride), and a KV head's R query rows in one tile (GQA decodes,
// short verifications). Per block of 16 keys and KV head: the R rows' scores (as score16_bf16 folds them),
// their online softmax, and the weighted values summed in registers. The rows' masks come from bounds worked
// out once per range (no division per block), and blocks that every row sees whole skip them. The same
// operations in the same order as attend_range's general loop: the same floats. It reads K/V at the core's memory-parallelism limit (~8 GB/s on one thread here): the next
// block into L1 row by row as the current one is computed, the one after into L2.
template <int NC, int R>
__attribute__((always_inline)) inline void score_block_bf16(const __m512bh (&qv)[R][NC / 2],
                                                            const c10::BFloat16* keys, int64_t stride,
                                                            const c10::BFloat16* next, int lines, Vec* s) {
  constexpr int CB = NC / 2;
  Vec four[R][4];
  for (int i = 0; i < 4; ++i) {
    Vec part[R][4];
    for (int jj = 0; jj < 4; ++jj) {
      const c10::BFloat16* key = keys + (4 * i + jj) * stride;
      __m512 a[R];
      for (int r = 0; r < R; ++r) a[r] = _mm512_setzero_ps();
      for (int c = 0; c < CB; ++c) {
        const __m512bh k = (__m512bh)_mm512_loadu_si512(key + 32 * c);
        for (int r = 0; r < R; ++r) a[r] = _mm512_dpbf16_ps(a[r], qv[r][c], k);
      }
      if (next) prefetch_lines(next + (4 * i + jj) * stride, lines);
      for (int r = 0; r < R; ++r) part[r][jj] = a[r];
    }
    for (int r = 0; r < R; ++r) four[r][i] = fold2(fold(part[r][0], part[r][1]), fold(part[r][2], part[r][3]));
  }
  for (int r = 0; r < R; ++r) {
    s[r] = fold_quarters(fold_quarters(four[r][0], four[r][1]), fold_quarters(four[r][2], four[r][3]));
  }
}

template <int NC, int R>
void attend_blocks_bf16(const Step<c10::BFloat16>& step, const int32_t* table, int64_t context, int64_t h0,
                        int64_t nh, int64_t begin, int64_t end, Partial& part) {
  using T = c10::BFloat16;
  constexpr int64_t dim = NC * kLanes;
  constexpr int CB = NC / 2;
  constexpr int lines = CB;  // 64-byte lines a head's row spans (32 bfloat16 a slice)
  const int64_t k_stride = step.keys.slot_stride, v_stride = step.values.slot_stride;
  // the keys row k may see, [lo, hi]: from its window's start (and the range's), up to its own position
  int64_t lo[R], hi[R], all_lo = begin, all_hi = end - 1;
  for (int k = 0; k < R; ++k) {
    const int64_t pos = context + k / step.group;
    hi[k] = std::min<int64_t>(pos, end - 1);
    lo[k] = std::max<int64_t>(begin, step.window > 0 ? pos - step.window + 1 : 0);
    all_lo = std::max(all_lo, lo[k]);
    all_hi = std::min(all_hi, hi[k]);
  }
  const IVec iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  alignas(64) float probs[R * kLanes];
  for (int64_t hh = 0; hh < nh; ++hh) {  // the first block's rows of every head, on their way
    for (int64_t j = 0; j < std::min(kLanes, end - (begin & ~(kLanes - 1))); ++j) {
      prefetch_lines(step.keys.at(table, (begin & ~(kLanes - 1)) + j, h0 + hh), lines);
      prefetch_lines(step.values.at(table, (begin & ~(kLanes - 1)) + j, h0 + hh), lines);
    }
  }
  for (int64_t t0 = begin & ~(kLanes - 1); t0 < end; t0 += kLanes) {
    const int64_t m = std::min<int64_t>(kLanes, end - t0);
    const bool whole = t0 >= all_lo && t0 + kLanes - 1 <= all_hi;  // every row sees all 16 keys
    const bool has_next = t0 + kLanes < end;
    for (int64_t hh = 0; hh < nh; ++hh) {
      const int64_t r0 = hh * R;
      const T* keys = step.keys.at(table, t0, h0 + hh);
      const T* values = step.values.at(table, t0, h0 + hh);
      const T* next_k = has_next ? step.keys.at(table, t0 + kLanes, h0 + hh) : nullptr;
      const T* next_v = has_next ? step.values.at(table, t0 + kLanes, h0 + hh) : nullptr;
      const bool has_far = t0 + 2 * kLanes < end;
      const T* far_k = has_far ? step.keys.at(table, t0 + 2 * kLanes, h0 + hh) : nullptr;
      const T* far_v = has_far ? step.values.at(table, t0 + 2 * kLanes, h0 + hh) : nullptr;
      __m512bh qv[R][CB];
      for (int r = 0; r < R; ++r) {
        for (int c = 0; c < CB; ++c) {
          qv[r][c] = (__m512bh)_mm512_loadu_si512(part.q_bf16.data() + (r0 + r) * (dim + kLanes) + 32 * c);
        }
      }
      Vec scores[R];
      score_block_bf16<NC, R>(qv, keys, k_stride, next_k, lines, scores);
      Vec acc[R][NC];
      for (int r = 0; r < R; ++r) {
        for (int c = 0; c < NC; ++c) acc[r][c] = load(part.acc.data() + (r0 + r) * dim + c * kLanes);
      }
      bool any = false;
      for (int k = 0; k < R; ++k) {
        Vec s = scores[k] * step.scale;
        if (step.cap > 0.f) s = step.cap * vtanh(s / step.cap);
        if (!whole) {
          const IVec t = iota + static_cast<int32_t>(t0);
          s = (t >= IVec{} + static_cast<int32_t>(lo[k])) & (t <= IVec{} + static_cast<int32_t>(hi[k])) ? s : splat(-kInf);
        }
        const float block_max = hmax(s);
        if (block_max == -kInf) {  // nothing here for this row
          store(probs + k * kLanes, Vec{});
          continue;
        }
        float& max = part.maxes[r0 + k];
        if (block_max > max) {  // rescale what the earlier blocks summed to the new max
          const float correction = std::exp(max - block_max);  // e^-inf = 0 on the first visible block
          part.sums[r0 + k] *= correction;
          for (int c = 0; c < NC; ++c) acc[k][c] *= correction;
          max = block_max;
        }
        const Vec p = vexp(s - max);
        part.sums[r0 + k] += p;
        store(probs + k * kLanes, p);
        any = true;
      }
      if (!any) continue;
      // rows past the context's end (j >= m) may hold anything: never read
      for (int64_t j = 0; j < m; ++j) {
        Vec v[NC];
        widen_values<T, NC>(values + j * v_stride, v);
        if (next_v) prefetch_lines(next_v + j * v_stride, lines);
        if (far_k) {  // the block after the next one, into L2: more lines in flight than L1's fill buffers hold
          prefetch_lines_l2(far_k + j * k_stride, lines);
          prefetch_lines_l2(far_v + j * v_stride, lines);
        }
        for (int r = 0; r < R; ++r) {
          const Vec p = splat(probs[r * kLanes + j]);
          for (int c = 0; c < NC; ++c) acc[r][c] = fmadd(p, v[c], acc[r][c]);
        }
      }
      for (int r = 0; r < R; ++r) {
        for (int c = 0; c < NC; ++c) store(part.acc.data() + (r0 + r) * dim + c * kLanes, acc[r][c]);
      }
    }
  }
}
#endif

template <typename T, int NC>
void attend_range(const Step<T>& step, int64_t seq, int64_t h0, int64_t nh, int64_t begin, int64_t end,
                  Partial& part) {
  constexpr int64_t dim = NC * kLanes;
  const int64_t q_len = step.q_len(seq), context = step.context(seq), group = step.group;
  const int64_t head_rows = q_len * group, head_dim = step.head_dim;  // rows per KV head
  const bool short_head = head_dim != dim;  // (a head_dim this build has no kernel of its own for)
  const int32_t* table = step.tables + seq * step.table_stride;
  const T* zeros = reinterpret_cast<const T*>(kZeros);
  part.reset(nh * head_rows, dim, short_head ? sizeof(T) : 0);
  T* padded_values = reinterpret_cast<T*>(part.values.data());
  for (int64_t hh = 0; hh < nh; ++hh) {  // rows are (KV head, query i, head g of its group), zero-padded
    for (int64_t i = 0; i < q_len; ++i) {
      for (int64_t g = 0; g < group; ++g) {
        const int64_t r = hh * head_rows + i * group + g;
        const T* src = step.query + (step.starts[seq] + i) * step.q_token_stride +
                       ((h0 + hh) * group + g) * step.q_head_stride;
        if constexpr (kDotBF16<T>) {
          uint16_t* dst = part.q_bf16.data() + r * (dim + kLanes);
          std::memcpy(dst, src, head_dim * sizeof(T));
          std::fill(dst + head_dim, dst + dim + kLanes, uint16_t{0});
        } else {
          widen_row(src, part.q.data() + r * dim, head_dim, dim);
        }
      }
    }
  }
#if defined(__AVX512BF16__)
  __mmask32 slices[(NC + 1) / 2];  // which of each 32-wide slice's dimensions are the head's
  for (int64_t c = 0; c < (NC + 1) / 2; ++c) {
    const int64_t width = std::clamp<int64_t>(head_dim - 32 * c, 0, 32);
    slices[c] = width == 32 ? ~__mmask32{0} : (__mmask32{1} << width) - 1;
  }
#endif
  // Blocks of 16 keys start at multiples of 16, so that with cache blocks of 16 or more each lies in one
  // cache block: its rows a stride apart. The keys before `begin` it brings are valid tokens, masked.
  const bool one_block = step.keys.mask + 1 >= kLanes && step.values.mask + 1 >= kLanes;
#if defined(__AVX512BF16__)
  if constexpr (kDotBF16<T> && NC % 2 == 0) {
    if (!short_head && one_block && head_rows <= kRowTile) {
      switch (head_rows) {
        case 1: return attend_blocks_bf16<NC, 1>(step, table, context, h0, nh, begin, end, part);
        case 2: return attend_blocks_bf16<NC, 2>(step, table, context, h0, nh, begin, end, part);
        case 3: return attend_blocks_bf16<NC, 3>(step, table, context, h0, nh, begin, end, part);
        default: return attend_blocks_bf16<NC, 4>(step, table, context, h0, nh, begin, end, part);
      }
    }
  }
#endif
  const int64_t aligned = begin & ~(kLanes - 1);
  auto rows_at = [&](const PagedCache<T>& cache, int64_t t0, int64_t head, const T** out) {
    const int64_t m = std::min(kLanes, end - t0);  // past the range's end: zeros (and masked)
    if (one_block) {
      const T* row = cache.at(table, t0, head);
      for (int64_t j = 0; j < kLanes; ++j) out[j] = j < m ? row + j * cache.slot_stride : zeros;
    } else {
      for (int64_t j = 0; j < kLanes; ++j) out[j] = j < m ? cache.at(table, t0 + j, head) : zeros;
    }
  };
  // The next blocks' keys and values on their way while this one is computed: a block of keys lies in a
  // shuffled cache block, which the hardware's prefetchers cannot foresee; its heads' slices of each row
  // are side by side.
  auto prefetch_block = [&](int64_t t0) {
    if (t0 >= end) return;
    const T* rows[kLanes];
    for (const PagedCache<T>* cache : {&step.keys, &step.values}) {
      rows_at(*cache, t0, h0, rows);
      for (int64_t j = 0; j < std::min(kLanes, end - t0); ++j) prefetch(rows[j], (nh - 1) * cache->head_stride + head_dim);
    }
  };
  // Each later block's rows are prefetched one at a time while the block before it is computed (its keys'
  // lines as the first row scores, its values' as they are weighed): spread out, the prefetches never wait
  // for a free line-fill buffer with the work behind them; a burst of a whole block's lines stalled it.
  const int lines = static_cast<int>((head_dim * static_cast<int64_t>(sizeof(T)) + 63) / 64);
  prefetch_block(aligned);
  const T* next_keys[kLanes];
  const T* next_values[kLanes];
  const IVec iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const T* keys[kLanes];
  const T* values[kLanes];
  for (int64_t t0 = aligned; t0 < end; t0 += kLanes) {
    const int64_t m = std::min<int64_t>(kLanes, end - t0);
    const bool has_next = t0 + kLanes < end;
    for (int64_t hh = 0; hh < nh; ++hh) {
      rows_at(step.keys, t0, h0 + hh, keys);
      rows_at(step.values, t0, h0 + hh, values);
      if (has_next) {
        rows_at(step.keys, t0 + kLanes, h0 + hh, next_keys);
        rows_at(step.values, t0 + kLanes, h0 + hh, next_values);
      }
      const T* const* next_k = has_next ? next_keys : nullptr;  // until the first row has scored
      if constexpr (!kDotBF16<T>) {
        for (int64_t j = 0; j < kLanes; ++j) {
          widen_row(keys[j], part.keys.data() + j * dim, head_dim, dim);
          if (next_k) prefetch_lines(next_k[j], lines);
        }
        next_k = nullptr;
      }
      bool any = false;
      for (int64_t hr0 = 0; hr0 < head_rows; hr0 += kRowTile) {  // a tile of rows scored together
        const int64_t n = std::min(kRowTile, head_rows - hr0), r0 = hh * head_rows + hr0;
        int64_t lo[kRowTile], hi[kRowTile];
        bool seen = false;
        for (int64_t k = 0; k < n; ++k) {
          // the keys row r0 + k may see: up to its own position (causal), from its window's start
          const int64_t pos = context + (hr0 + k) / group;
          lo[k] = std::max<int64_t>(begin, step.window > 0 ? pos - step.window + 1 : 0);
          hi[k] = std::min<int64_t>(pos, t0 + m - 1);
          seen |= hi[k] >= t0 && lo[k] <= t0 + m - 1;
        }
        if (!seen) {  // nothing here for these rows
          for (int64_t k = 0; k < n; ++k) store(part.probs.data() + (r0 + k) * kLanes, Vec{});
          continue;
        }
        Vec scores[kRowTile];
#if defined(__AVX512BF16__)
        if constexpr (kDotBF16<T>) {
          const uint16_t* q = part.q_bf16.data() + r0 * (dim + kLanes);
          if (NC % 2 == 0 && !short_head) {
            score_rows_bf16<NC, true>(n, q, dim + kLanes, keys, slices, next_k, lines, scores);
          } else {
            score_rows_bf16<NC, false>(n, q, dim + kLanes, keys, slices, next_k, lines, scores);
          }
          next_k = nullptr;
        } else
#endif
        {
          for (int64_t k = 0; k < n; ++k) scores[k] = score16<NC>(part.q.data() + (r0 + k) * dim, part.keys.data());
        }
        for (int64_t k = 0; k < n; ++k) {
          const int64_t r = r0 + k;
          float* probs = part.probs.data() + r * kLanes;
          if (hi[k] < t0 || lo[k] > t0 + m - 1) {  // nothing here for this row
            store(probs, Vec{});
            continue;
          }
          Vec s = scores[k] * step.scale;
          if (step.cap > 0.f) s = step.cap * vtanh(s / step.cap);
          if (lo[k] > t0 || hi[k] < t0 + kLanes - 1) {
            const IVec t = iota + static_cast<int32_t>(t0);
            s = (t >= IVec{} + static_cast<int32_t>(lo[k])) & (t <= IVec{} + static_cast<int32_t>(hi[k])) ? s : splat(-kInf);
          }
          float& max = part.maxes[r];
          const float block_max = hmax(s);
          if (block_max > max) {  // rescale what the earlier blocks summed to the new max
            const float correction = std::exp(max - block_max);  // e^-inf = 0 on the first visible block
            part.sums[r] *= correction;
            float* acc = part.acc.data() + r * dim;
            for (int64_t d = 0; d < dim; d += kLanes) store(acc + d, load(acc + d) * correction);
            max = block_max;
          }
          const Vec p = vexp(s - max);
          part.sums[r] += p;
          store(probs, p);
          any = true;
        }
      }
      if (!any) continue;
      if (short_head) {  // whole vectors of values: copies padded with zeros
        for (int64_t j = 0; j < m; ++j) {
          std::copy_n(values[j], head_dim, padded_values + j * dim);
          values[j] = padded_values + j * dim;
        }
        for (int64_t j = m; j < kLanes; ++j) values[j] = padded_values + j * dim;  // (zeros since reset)
      }
      const int64_t r0 = hh * head_rows;
      accumulate<T, NC>(part.acc.data() + r0 * dim, part.probs.data() + r0 * kLanes, head_rows, values,
                        has_next ? next_values : nullptr, lines);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// The step: tasks, threads, merge

// Key-heads (keys times KV heads) per task when a step's sequences are too few to share out: below this, a
// task costs more to start and merge than it saves.
constexpr int64_t kMinChunk = 128;
// Tasks per thread to aim for, so that pulling them longest first evens the threads out.
constexpr int64_t kTasksPerThread = 8;
// A task's KV heads: side by side in each cache row, as many as fit in this many bytes of a row. One task
// streams whole stretches of the cache (which the prefetchers follow, and no other task re-reads) and keeps
// more independent rows in flight than one head's group gives it.
constexpr int64_t kHeadBlockBytes = 1024;

struct Task {
  int32_t seq, kv_head, heads, begin, end;  // KV heads kv_head .. kv_head + heads
  int32_t state;  // -1: the whole range, written to the output; else its slot among the partial states
};

struct Merge {
  int32_t seq, kv_head, heads, first_state, count;
};

struct Plan {
  std::vector<Task> tasks;
  std::vector<Merge> merges;
  std::vector<float> states;  // per partial state: maxes[rows], sums[rows], acc[rows * dim]
  int64_t head_block = 1;     // KV heads per task (the last block of a row may hold fewer)
};

template <typename T>
void plan_tasks(const Step<T>& step, int64_t num_seqs, int64_t num_kv_heads, int64_t threads, Plan& plan) {
  plan.tasks.clear();
  plan.merges.clear();
  const int64_t row_bytes = num_kv_heads * step.head_dim * static_cast<int64_t>(sizeof(T));
  const int64_t head_blocks = (row_bytes + kHeadBlockBytes - 1) / kHeadBlockBytes;
  const int64_t hb = (num_kv_heads + head_blocks - 1) / head_blocks;
  plan.head_block = hb;
  int64_t total = 0;
  for (int64_t seq = 0; seq < num_seqs; ++seq) total += step.lens[seq] - step.first_key(seq);
  total *= num_kv_heads;
  const int64_t target = threads > 1 ? kTasksPerThread * threads : 1;
  const int64_t per_task = std::max(kMinChunk, total / target);  // key-heads
  int64_t chunk = ((per_task + hb - 1) / hb + kLanes - 1) / kLanes * kLanes;  // keys
  if (threads <= 1) chunk = std::numeric_limits<int32_t>::max();
  int32_t states = 0;
  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    const int64_t first = step.first_key(seq), len = step.lens[seq], n = len - first;
    // about equal pieces rather than one short tail, cut at multiples of 16 keys (where blocks of keys start)
    const int64_t pieces = (n + chunk - 1) / chunk, base = first & ~(kLanes - 1);
    const int64_t size = ((len - base + pieces - 1) / pieces + kLanes - 1) / kLanes * kLanes;
    const int64_t count = (len - base + size - 1) / size;
    for (int64_t h = 0; h < num_kv_heads; h += hb) {
      const int32_t heads = static_cast<int32_t>(std::min(hb, num_kv_heads - h));
      if (count == 1) {
        plan.tasks.push_back({int32_t(seq), int32_t(h), heads, int32_t(first), int32_t(len), -1});
        continue;
      }
      plan.merges.push_back({int32_t(seq), int32_t(h), heads, states, int32_t(count)});
      for (int64_t k = 0; k < count; ++k) {
        const int64_t b = std::max(first, base + k * size), e = std::min(len, base + (k + 1) * size);
        plan.tasks.push_back({int32_t(seq), int32_t(h), heads, int32_t(b), int32_t(e), states++});
      }
    }
  }
  std::sort(plan.tasks.begin(), plan.tasks.end(), [](const Task& a, const Task& b) {  // longest first
    const int32_t na = (a.end - a.begin) * a.heads, nb = (b.end - b.begin) * b.heads;
    return na != nb ? na > nb : (a.seq != b.seq ? a.seq < b.seq : (a.kv_head != b.kv_head ? a.kv_head < b.kv_head : a.begin < b.begin));
  });
}

template <typename T, int NC>
void attend(const Step<T>& step, int64_t num_seqs, int64_t num_kv_heads, at::Tensor& out) {
  constexpr int64_t dim = NC * kLanes;
  thread_local Plan this_threads_plan;  // reused from step to step: no allocation once warm
  Plan& plan = this_threads_plan;       // (the workers see the caller's, not their own)
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  plan_tasks(step, num_seqs, num_kv_heads, threads, plan);
  const int64_t max_rows = [&] {
    int64_t q = 0;
    for (int64_t seq = 0; seq < num_seqs; ++seq) q = std::max(q, step.q_len(seq));
    return q * step.group * plan.head_block;
  }();
  const int64_t state_size = max_rows * (dim + 2);
  int64_t num_states = 0;
  for (const Merge& m : plan.merges) num_states += m.count;
  if (static_cast<int64_t>(plan.states.size()) < num_states * state_size) plan.states.resize(num_states * state_size);

  T* out_base = out.data_ptr<T>();
  const int64_t out_token_stride = out.stride(0), out_head_stride = out.stride(1);
  // row r of a task over KV heads from kv_head on: (head kv_head + r / head_rows, query i, head g of its group)
  auto out_row = [&](int64_t seq, int64_t kv_head, int64_t r) {
    const int64_t head_rows = step.q_len(seq) * step.group, hr = r % head_rows;
    const int64_t i = hr / step.group, g = hr % step.group;
    return out_base + (step.starts[seq] + i) * out_token_stride +
           ((kv_head + r / head_rows) * step.group + g) * out_head_stride;
  };
  auto write = [&](T* dst, const float* acc, float inv) { write_row<T, NC>(dst, acc, inv, step.head_dim); };

  const int64_t num_tasks = static_cast<int64_t>(plan.tasks.size());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, num_tasks), 1, [&](int64_t, int64_t) {
    thread_local Partial part;
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < num_tasks;
         i = next.fetch_add(1, std::memory_order_relaxed)) {
      const Task& task = plan.tasks[i];
      attend_range<T, NC>(step, task.seq, task.kv_head, task.heads, task.begin, task.end, part);
      const int64_t rows = step.q_len(task.seq) * step.group * task.heads;
      if (task.state < 0) {  // every row sees at least its own token: its sum is positive
        for (int64_t r = 0; r < rows; ++r) {
          write(out_row(task.seq, task.kv_head, r), part.acc.data() + r * dim, 1.f / hsum(part.sums[r]));
        }
        continue;
      }
      float* state = plan.states.data() + task.state * state_size;
      for (int64_t r = 0; r < rows; ++r) {
        state[r] = part.maxes[r];
        state[max_rows + r] = hsum(part.sums[r]);
      }
      std::copy_n(part.acc.data(), rows * dim, state + 2 * max_rows);
    }
  });

  // pieces of a split range, each over its own max: rescaled to their common max and summed
  for (const Merge& m : plan.merges) {
    const int64_t rows = step.q_len(m.seq) * step.group * m.heads;
    for (int64_t r = 0; r < rows; ++r) {
      float max = -kInf;
      for (int64_t k = 0; k < m.count; ++k) max = std::max(max, plan.states[(m.first_state + k) * state_size + r]);
      float sum = 0.f;
      alignas(64) float acc[dim] = {};
      for (int64_t k = 0; k < m.count; ++k) {
        const float* state = plan.states.data() + (m.first_state + k) * state_size;
        if (state[r] == -kInf) continue;  // this piece held no key the row may see
        const float w = std::exp(state[r] - max);
        sum += w * state[max_rows + r];
        const float* a = state + 2 * max_rows + r * dim;
        for (int64_t d = 0; d < dim; ++d) acc[d] += w * a[d];
      }
      write(out_row(m.seq, m.kv_head, r), acc, 1.f / sum);
    }
  }
}

// head_dim padded to a multiple of 16 among these widths (the few sizes models use; more would only grow the
// library): the kernel instantiated for it.
template <typename T>
void dispatch(const Step<T>& step, int64_t num_seqs, int64_t num_kv_heads, at::Tensor& out) {
  const int64_t slices = (step.head_dim + kLanes - 1) / kLanes;
  if (slices <= 1) return attend<T, 1>(step, num_seqs, num_kv_heads, out);
  if (slices <= 2) return attend<T, 2>(step, num_seqs, num_kv_heads, out);
  if (slices <= 3) return attend<T, 3>(step, num_seqs, num_kv_heads, out);
  if (slices <= 4) return attend<T, 4>(step, num_seqs, num_kv_heads, out);
  if (slices <= 5) return attend<T, 5>(step, num_seqs, num_kv_heads, out);
  if (slices <= 6) return attend<T, 6>(step, num_seqs, num_kv_heads, out);
  if (slices <= 8) return attend<T, 8>(step, num_seqs, num_kv_heads, out);
  if (slices <= 12) return attend<T, 12>(step, num_seqs, num_kv_heads, out);
  return attend<T, 16>(step, num_seqs, num_kv_heads, out);
}

#if !defined(__AVX512F__)
// Without AVX-512, g++ lowers the 16-float vectors' shuffles above lane by lane: there the kernel is this one,
// in 8-float vectors (AVX2 and FMA in an x86-64-v3 build). One task per sequence and KV head; 8 keys per
// pass, each row's 8 dots summed horizontally at once; an online softmax (no scores buffer); float32 K and V
// rows read where they lie, others widened once per pass for every row of the group.
extern "C" float expf(float) noexcept __attribute__((simd("notinbranch")));

namespace portable {

// n values in float32. c10::BFloat16's own conversion does not vectorize; its bits shifted up do.
template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <>
inline void to_float(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t widened = static_cast<uint32_t>(bits[i]) << 16;
    std::memcpy(dst + i, &widened, sizeof(float));
  }
}

constexpr int64_t kTokens = 8;  // keys per pass

// s[j] = q . keys[j] for the pass's kTokens keys (a pass's missing keys point at kZeros).
inline void dots(const float* q, const float* const* keys, int64_t head_dim, float* s) {
  int64_t d = 0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc[kTokens];
  for (__m256& a : acc) a = _mm256_setzero_ps();
  for (; d + 8 <= head_dim; d += 8) {
    const __m256 qv = _mm256_loadu_ps(q + d);
    for (int64_t j = 0; j < kTokens; ++j) acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(keys[j] + d), acc[j]);
  }
  // the 8 horizontal sums together: lanes (0-3 | 4-7) of a0123 hold keys 0-3's halves, of a4567 keys 4-7's
  const __m256 a0123 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
  const __m256 a4567 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
  _mm256_storeu_ps(s, _mm256_add_ps(_mm256_permute2f128_ps(a0123, a4567, 0x20),
                                    _mm256_permute2f128_ps(a0123, a4567, 0x31)));
#else
  for (int64_t j = 0; j < kTokens; ++j) s[j] = 0.f;
#endif
  for (; d < head_dim; ++d) {
    for (int64_t j = 0; j < kTokens; ++j) s[j] += q[d] * keys[j][d];
  }
}

// a = a * corr + sum_j p[j] * values[j], one pass over a per kTokens values.
inline void accumulate(float* a, float corr, const float* p, const float* const* values, int64_t head_dim) {
  int64_t d = 0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 pv[kTokens];
  for (int64_t j = 0; j < kTokens; ++j) pv[j] = _mm256_set1_ps(p[j]);
  const __m256 cv = _mm256_set1_ps(corr);
  for (; d + 8 <= head_dim; d += 8) {
    __m256 x = _mm256_mul_ps(_mm256_loadu_ps(a + d), cv);
    for (int64_t j = 0; j < kTokens; ++j) x = _mm256_fmadd_ps(pv[j], _mm256_loadu_ps(values[j] + d), x);
    _mm256_storeu_ps(a + d, x);
  }
#endif
  for (; d < head_dim; ++d) {
    float x = a[d] * corr;
    for (int64_t j = 0; j < kTokens; ++j) x += p[j] * values[j][d];
    a[d] = x;
  }
}

// One row at a time, a few lines ahead: a whole pass's rows at once stall on the line-fill buffers.
template <typename T>
inline void prefetch_row(const T* row, int64_t head_dim) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < head_dim * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(p + b);
}

template <typename T>
void attend(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
            const at::Tensor& query_start_loc, const at::Tensor& block_tables, const at::Tensor& seq_lens,
            double scale, int64_t window, double softcap, at::Tensor& out) {
  const int64_t num_seqs = seq_lens.size(0), num_heads = query.size(1), head_dim = query.size(2);
  const int64_t num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads;
  const T* q_base = query.data_ptr<T>();
  const int64_t q_token_stride = query.stride(0), q_head_stride = query.stride(1);
  const PagedCache<T> k_pages(k_cache), v_pages(v_cache);
  T* out_base = out.data_ptr<T>();
  const int64_t out_token_stride = out.stride(0), out_head_stride = out.stride(1);
  const int32_t* starts = query_start_loc.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int64_t table_stride = block_tables.stride(0);
  const float cap = static_cast<float>(softcap), scale_f = static_cast<float>(scale);
  constexpr bool kInPlace = std::is_same_v<T, float>;

  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q, acc, maxes, sums, keys(kInPlace ? 0 : kTokens * head_dim),
        values(kInPlace ? 0 : kTokens * head_dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t seq = task / num_kv_heads, kv_head = task % num_kv_heads;
      const int64_t q_start = starts[seq], q_len = starts[seq + 1] - q_start;
      const int64_t len = lens[seq], context = len - q_len;  // query i sits at position context + i
      // rows are (query i, head g of the group); the earliest query's window bounds every row's keys
      const int64_t rows = q_len * group;
      const int64_t first = window > 0 ? std::max<int64_t>(0, context - window + 1) : 0;
      const int32_t* table = tables + seq * table_stride;
      q.resize(rows * head_dim);
      acc.assign(rows * head_dim, 0.f);
      maxes.assign(rows, -kInf);
      sums.assign(rows, 0.f);
      for (int64_t i = 0; i < q_len; ++i) {
        for (int64_t g = 0; g < group; ++g) {
          const T* row = q_base + (q_start + i) * q_token_stride + (kv_head * group + g) * q_head_stride;
          to_float(row, q.data() + (i * group + g) * head_dim, head_dim);
        }
      }
      for (int64_t t0 = first; t0 < len; t0 += kTokens) {
        const int64_t m = std::min<int64_t>(kTokens, len - t0);
        const float* kp[kTokens];
        const float* vp[kTokens];
        for (int64_t j = 0; j < kTokens; ++j) {
          if (j >= m) {  // past the context: zeros, masked below
            kp[j] = vp[j] = kZeros;
            continue;
          }
          const T* k_row = k_pages.at(table, t0 + j, kv_head);
          const T* v_row = v_pages.at(table, t0 + j, kv_head);
          if constexpr (kInPlace) {
            kp[j] = k_row;
            vp[j] = v_row;
          } else {
            to_float(k_row, keys.data() + j * head_dim, head_dim);
            to_float(v_row, values.data() + j * head_dim, head_dim);
            kp[j] = keys.data() + j * head_dim;
            vp[j] = values.data() + j * head_dim;
          }
          if (t0 + kTokens + j < len) {  // the next pass's row j
            prefetch_row(k_pages.at(table, t0 + kTokens + j, kv_head), head_dim);
            prefetch_row(v_pages.at(table, t0 + kTokens + j, kv_head), head_dim);
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          float s[kTokens];
          dots(q.data() + r * head_dim, kp, head_dim, s);
          // the keys this row may see: up to its own position (causal), within its window
          const int64_t pos = context + r / group;
          const int64_t visible_from = window > 0 ? std::max<int64_t>(first, pos - window + 1) : first;
          float chunk_max = -kInf;
          for (int64_t j = 0; j < kTokens; ++j) {
            const int64_t t = t0 + j;
            float x = s[j] * scale_f;
            if (cap > 0.f) x = cap * std::tanh(x / cap);
            s[j] = (j < m && t <= pos && t >= visible_from) ? x : -kInf;
            chunk_max = std::max(chunk_max, s[j]);
          }
          if (chunk_max == -kInf) continue;  // nothing this row sees in this pass
          const float new_max = std::max(maxes[r], chunk_max);
          const float corr = expf(maxes[r] - new_max);  // 0 on the row's first visible pass
          float chunk_sum = 0.f;
#pragma omp simd reduction(+ : chunk_sum)
          for (int64_t j = 0; j < kTokens; ++j) {
            s[j] = expf(s[j] - new_max);  // masked: 0
            chunk_sum += s[j];
          }
          sums[r] = sums[r] * corr + chunk_sum;
          maxes[r] = new_max;
          accumulate(acc.data() + r * head_dim, corr, s, vp, head_dim);
        }
      }
      for (int64_t i = 0; i < q_len; ++i) {  // every row sees at least its own token: its sum is positive
        for (int64_t g = 0; g < group; ++g) {
          const int64_t r = i * group + g;
          T* dst = out_base + (q_start + i) * out_token_stride + (kv_head * group + g) * out_head_stride;
          const float* a = acc.data() + r * head_dim;
          const float inv = 1.f / sums[r];
          for (int64_t d = 0; d < head_dim; ++d) dst[d] = static_cast<T>(a[d] * inv);
        }
      }
    }
  });
}

}  // namespace portable
#endif

template <typename T>
void write_slots(const at::Tensor& src, at::Tensor& cache, const int64_t* slots, int64_t num_tokens) {
  const int64_t block_size = cache.size(1), heads = cache.size(2), head_dim = cache.size(3);
  const T* in = src.data_ptr<T>();
  T* base = cache.data_ptr<T>();
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t slot = slots[t];
    if (slot < 0) continue;  // padding
    T* dst = base + (slot / block_size) * cache.stride(0) + (slot % block_size) * cache.stride(1);
    const T* row = in + t * src.stride(0);
    for (int64_t h = 0; h < heads; ++h) {
      std::copy_n(row + h * src.stride(1), head_dim, dst + h * cache.stride(2));
    }
  }
}

void check(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& k_cache,
           const at::Tensor& v_cache, const at::Tensor& slot_mapping, const at::Tensor& query_start_loc,
           const at::Tensor& block_tables, const at::Tensor& seq_lens) {
  for (const at::Tensor* t : {&query, &key, &value, &k_cache, &v_cache}) {
    TORCH_CHECK(t->device().is_cpu(), "paged_decode_attention runs on the CPU");
    TORCH_CHECK(t->scalar_type() == k_cache.scalar_type(), "query, key, value and the caches share a dtype");
    TORCH_CHECK(t->stride(-1) == 1, "the head dimension must be contiguous");
  }
  TORCH_CHECK(query.dim() == 3 && key.dim() == 3 && value.dim() == 3 && k_cache.dim() == 4,
              "query/key/value [N, H, D], caches [B, S, Hkv, D]");
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "the K and V caches have one shape");
  const int64_t head_dim = k_cache.size(3), num_kv_heads = k_cache.size(2);
  TORCH_CHECK(query.size(2) == head_dim && key.size(2) == head_dim && value.size(2) == head_dim &&
                  key.size(1) == num_kv_heads && value.size(1) == num_kv_heads,
              "query, key and value have the caches' head dim, key and value their KV heads");
  TORCH_CHECK(head_dim <= kMaxHeadDim, "head dims up to ", kMaxHeadDim);
  TORCH_CHECK(query.size(1) % num_kv_heads == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK((k_cache.size(1) & (k_cache.size(1) - 1)) == 0, "the block size must be a power of two");
  TORCH_CHECK(key.size(0) == query.size(0) && value.size(0) == query.size(0) &&
                  slot_mapping.size(0) == query.size(0),
              "a key and a slot per query");
  TORCH_CHECK(query_start_loc.size(0) == seq_lens.size(0) + 1 && block_tables.size(0) == seq_lens.size(0),
              "query_start_loc, block_tables and seq_lens describe the same sequences");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong, "slot_mapping is int64");
  TORCH_CHECK(query_start_loc.scalar_type() == at::kInt && block_tables.scalar_type() == at::kInt &&
                  seq_lens.scalar_type() == at::kInt,
              "query_start_loc, block_tables and seq_lens are int32");
  TORCH_CHECK(block_tables.stride(1) == 1 && seq_lens.is_contiguous() && slot_mapping.is_contiguous() &&
                  query_start_loc.is_contiguous(),
              "block_tables rows, seq_lens, query_start_loc and slot_mapping must be contiguous");
  // Every cache write and read stays inside the pool: slots, each sequence's queries, context and blocks.
  const int64_t block_size = k_cache.size(1), num_blocks = k_cache.size(0), width = block_tables.size(1);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < slot_mapping.size(0); ++t) {
    TORCH_CHECK(slots[t] < num_blocks * block_size, "slot ", slots[t], " outside the cache");
  }
  const int32_t* starts = query_start_loc.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  TORCH_CHECK(starts[0] == 0 && starts[seq_lens.size(0)] == query.size(0), "query_start_loc must span the queries");
  for (int64_t i = 0; i < seq_lens.size(0); ++i) {
    const int64_t q_len = starts[i + 1] - starts[i], used = (lens[i] + block_size - 1) / block_size;
    TORCH_CHECK(q_len >= 1 && lens[i] >= q_len && used <= width, "sequence ", i, ": inconsistent lengths");
    const int32_t* row = tables + i * block_tables.stride(0);
    bool inside = true;
    for (int64_t b = 0; b < used; ++b) inside &= row[b] >= 0 && row[b] < num_blocks;  // no branch per block
    if (!inside) {
      for (int64_t b = 0; b < used; ++b) {
        TORCH_CHECK(row[b] >= 0 && row[b] < num_blocks, "sequence ", i, ": block ", row[b], " outside the cache");
      }
    }
  }
}

// Writes key/value [N, Hkv, D] at slot_mapping[N], then attends: sequence i's queries (flat rows
// query_start_loc[i] .. query_start_loc[i + 1] of query [N, H, D]), the last ones of its seq_lens[i]
// tokens, each causally over the context before it (its last `window` tokens if window > 0).
at::Tensor paged_decode_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                  at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slot_mapping,
                                  const at::Tensor& query_start_loc, const at::Tensor& block_tables,
                                  const at::Tensor& seq_lens, double scale, int64_t window, double softcap) {
  check(query, key, value, k_cache, v_cache, slot_mapping, query_start_loc, block_tables, seq_lens);
  at::Tensor out = at::empty(query.sizes(), query.options());
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "paged_decode_attention", [&] {
    write_slots<scalar_t>(key, k_cache, slots, key.size(0));
    write_slots<scalar_t>(value, v_cache, slots, value.size(0));
    const Step<scalar_t> step{
        query.data_ptr<scalar_t>(), query.stride(0), query.stride(1),
        PagedCache<scalar_t>(k_cache), PagedCache<scalar_t>(v_cache),
        query_start_loc.data_ptr<int32_t>(), block_tables.data_ptr<int32_t>(), seq_lens.data_ptr<int32_t>(),
        block_tables.stride(0), query.size(1) / k_cache.size(2), query.size(2),
        static_cast<float>(scale), static_cast<float>(softcap), window,
    };
#if defined(__AVX512F__)
    dispatch(step, seq_lens.size(0), k_cache.size(2), out);
#else
    portable::attend<scalar_t>(query, k_cache, v_cache, query_start_loc, block_tables, seq_lens, scale, window,
                               softcap, out);
#endif
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(pagoda, m) {
  m.def(
      "paged_decode_attention(Tensor query, Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor slot_mapping, Tensor query_start_loc, Tensor block_tables, Tensor seq_lens, float scale, int window, "
      "float softcap) -> Tensor");
}

TORCH_LIBRARY_IMPL(pagoda, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
