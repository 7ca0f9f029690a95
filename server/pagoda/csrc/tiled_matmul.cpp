// 4- and 8-bit grouped-quantized weights times a few rows of activations (decode steps) with AVX-512 VNNI's
// int8 dot products, on the CPU:
//
//     out[m, n] = sum_g scale[n, g] * (sum_{k in g} x[m, k] * q[n, k]) + offset[n, g] * (sum_{k in g} x[m, k])
//
// q is 0..15 (4 bits) or an int8. Each activation row's group of 32 (or 64) inputs becomes 14-bit fixed
// point, x = v * 2^-e with |v| < 2^14 and e from the group's largest magnitude, split into two bytes (signed
// v = 256 * hi + lo against 4-bit weights; unsigned v + 2^14 against 8-bit ones, the group's weight sum
// times 2^14 taken back off); `vpdpbusd` multiplies the weight bytes with both and sums in int32, exactly.
// A bfloat16 activation is exact in this form unless it is more than 2^6 times smaller than its group's
// largest; a smaller one is rounded to 2^-14 of that largest value (32x finer than the largest value's own
// bfloat16 rounding). The group's integer sum is then scaled in float32 (scale * 2^-e), and the offset
// (Q4_1's minimum, Q4_0's -8 * scale) multiplies the group's float32 activation sum, which every output row
// shares.
//
// One int8 dot product does 64 multiply-adds where a float32 FMA does 16 and `vdpbf16ps` 32 (tried first:
// no faster than torch's int4 kernel), which is what makes this faster than torch's int4 kernel
// (`_weight_int4pack_mm_for_cpu`) and grouped_matmul at 1..8 rows; numbers in
// `pagoda.quantization.cpu_kernels.kernel_for`.
//
// Layout (`pagoda.quantization.cpu_kernels.TiledWeight`, made once at load time): tiles of 16 output rows, so
// that one 512-bit register holds 16 rows times 4 inputs and no sum runs across a register; a tile's groups
// one after another, each as its runs of 32 inputs (64-byte loads whose byte 4 * i + b holds row i's inputs:
// 4 bits, 4 loads: 8 * L + b in the low nibble and 8 * L + 4 + b in the high one; 8 bits, 8 loads: 4 * L +
// b), then the group's 16 scales and (when there are offsets) 16 offsets as float16, and for 8 bits the 16
// rows' sums of q over the group as int16. A task streams its tiles as one sequential run of bytes. Tasks
// run on torch's intra-op threads.
//
// An x86-64-v3 build (AVX2, FMA, F16C: an AVX2 host's image) runs the same layout and fixed point with
// 256-bit int16 dot products instead (`vpmaddwd`, below), the same sums exactly.
//
// Built by `python -m pagoda.cpu_extension`; registered as torch.ops.pagoda.tiled_matmul, and
// torch.ops.pagoda.tiled_matmul_isa, which names the code the build has ("avx512vnni", "avx2", or "" when
// it has neither: then tiled_matmul raises and the engine keeps its other kernels).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kTileRows = 16, kRun = 32;

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr bool kBuilt = true;
constexpr int64_t kBlockRows = 8;
// how far ahead of its loads a task asks for its weights: the hardware prefetchers stop at 4 KiB pages
// (measured: 1.0-1.2x faster than without, on weights streaming from L3)
constexpr int64_t kPrefetchBytes = 4096;

// activations' offset to unsigned bytes when the weights are the signed operand (8 bits)
constexpr int kBias = 1 << 14;

struct Layout {
  int64_t k, groups, group_size, group_bytes, tile_bytes;
};

// The activations in the kernel's form: bytes lo and hi [M, K] (v = 256 * hi + lo), and per group [M, G]
// the factor 2^-e and the float32 sum.
struct Activations {
  std::vector<int8_t> lo, hi;
  std::vector<float> factor, sum;
};

// Unsigned (for 8-bit weights, which are the signed operand): u = v + 2^14 = 256 * hi + lo, bytes 0..255
// and 0..127; the kernel takes 2^14 times the weights' group sum back off.
inline __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
inline __m512 load16(const at::BFloat16* x) {  // bfloat16 is float32's upper half
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

template <bool Unsigned, typename T>
Activations split(const T* x, int64_t m, int64_t k, int64_t x_stride, int64_t group_size) {
  const int64_t groups = k / group_size, chunks = group_size / 16;
  Activations a{std::vector<int8_t>(m * k), std::vector<int8_t>(m * k), std::vector<float>(m * groups),
                std::vector<float>(m * groups)};
  __m512 values[4];  // a group: at most 64 inputs
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t g = 0; g < groups; ++g) {
      __m512 amax = _mm512_setzero_ps(), sum = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c) {
        values[c] = load16(x + i * x_stride + g * group_size + 16 * c);
        amax = _mm512_max_ps(amax, _mm512_abs_ps(values[c]));
        sum = _mm512_add_ps(sum, values[c]);
      }
      const float largest = _mm512_reduce_max_ps(amax);
      // |x| * 2^e < 2^14, so hi = round(v / 256) stays within a signed byte
      const int e = largest > 0.f && std::isfinite(largest) ? 13 - std::ilogb(largest) : 0;
      const float up = std::ldexp(1.f, e);
      for (int64_t c = 0; c < chunks; ++c) {
        // a power of two: an exact product, rounded to the nearest integer (even on ties)
        __m512i v = _mm512_cvt_roundps_epi32(_mm512_mul_ps(values[c], _mm512_set1_ps(up)),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m512i lo, hi;
        if constexpr (Unsigned) {  // bytes of v + 2^14
          v = _mm512_add_epi32(v, _mm512_set1_epi32(kBias));
          lo = v;  // its low byte, as the narrowing below keeps it
          hi = _mm512_srli_epi32(v, 8);
        } else {  // v = 256 * hi + lo, both signed bytes
          const __m512i c128 = _mm512_set1_epi32(128);
          lo = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(v, c128), _mm512_set1_epi32(255)), c128);
          hi = _mm512_srai_epi32(_mm512_sub_epi32(v, lo), 8);
        }
        const int64_t at = i * k + g * group_size + 16 * c;
        _mm_storeu_si128(reinterpret_cast<__m128i*>(a.lo.data() + at), _mm512_cvtepi32_epi8(lo));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(a.hi.data() + at), _mm512_cvtepi32_epi8(hi));
      }
      // a non-finite activation (the sum catches NaN, which max may drop) makes its row's outputs NaN,
      // as float arithmetic would, not garbage
      const float total = _mm512_reduce_add_ps(sum);
      const bool finite = std::isfinite(largest) && std::isfinite(total);
      a.factor[i * groups + g] = finite ? 1.f / up : std::numeric_limits<float>::quiet_NaN();
      a.sum[i * groups + g] = total;
    }
  }
  return a;
}

inline void store(float* out, __m512 v) { _mm512_storeu_ps(out, v); }
inline void store(at::BFloat16* out, __m512 v) {
  // round to nearest even, as torch rounds float32 to bfloat16
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(rounded));
}

// One tile (output rows n0 .. n0 + 16, `out` pointing at row m0's n0) for activation rows m0 .. m0 + MB. J:
// independent accumulators per activation row and byte half, so that one row keeps enough dot products in
// flight to hide their latency.
template <int Bits, int MB, bool HasOffset, typename T>
void tile(const uint8_t* w, const Layout& l, const Activations& a, int64_t m0, T* out, int64_t n_total) {
  constexpr int J = MB == 1 ? 2 : 1;
  constexpr int64_t run_bytes = kTileRows * kRun * Bits / 8;
  const __m512i mask = _mm512_set1_epi8(15);
  const int64_t runs = l.group_size / kRun, k_total = l.k;
  const int8_t* lo = a.lo.data() + m0 * k_total;
  const int8_t* hi = a.hi.data() + m0 * k_total;
  const float* factor = a.factor.data() + m0 * l.groups;
  const float* sum = a.sum.data() + m0 * l.groups;
  __m512 total[MB];
  for (auto& t : total) t = _mm512_setzero_ps();
  for (int64_t g = 0; g < l.groups; ++g) {
    const uint8_t* group = w + g * l.group_bytes;
    __m512i acc_lo[MB][J], acc_hi[MB][J];
    for (int m = 0; m < MB; ++m) {
      std::fill(acc_lo[m], acc_lo[m] + J, _mm512_setzero_si512());
      std::fill(acc_hi[m], acc_hi[m] + J, _mm512_setzero_si512());
    }
    for (int64_t r = 0; r < runs; ++r) {
      const uint8_t* run = group + r * run_bytes;
      const int64_t k0 = g * l.group_size + r * kRun;
#pragma GCC unroll 8
      for (int load = 0; load < Bits; ++load) {
        const __m512i raw = _mm512_loadu_si512(run + 64 * load);
        __builtin_prefetch(run + 64 * load + kPrefetchBytes, 0, 3);  // past the end: a hint, never a fault
        constexpr int halves = Bits == 4 ? 2 : 1;
        __m512i q[2] = {raw, raw};
        if constexpr (Bits == 4) {
          q[0] = _mm512_and_si512(raw, mask);
          q[1] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), mask);
        }
#pragma GCC unroll 2
        for (int h = 0; h < halves; ++h) {
          // inputs k .. k + 3 of every row in the register
          const int64_t k = k0 + (Bits == 4 ? 8 * load + 4 * h : 4 * load);
          const int j = (load * halves + h) % J;
#pragma GCC unroll 8
          for (int m = 0; m < MB; ++m) {
            int32_t x_lo, x_hi;
            std::memcpy(&x_lo, lo + m * k_total + k, 4);
            std::memcpy(&x_hi, hi + m * k_total + k, 4);
            const __m512i b_lo = _mm512_set1_epi32(x_lo), b_hi = _mm512_set1_epi32(x_hi);
            if constexpr (Bits == 4) {  // unsigned weights, signed activations
              acc_lo[m][j] = _mm512_dpbusd_epi32(acc_lo[m][j], q[h], b_lo);
              acc_hi[m][j] = _mm512_dpbusd_epi32(acc_hi[m][j], q[h], b_hi);
            } else {  // unsigned activations, signed weights
              acc_lo[m][j] = _mm512_dpbusd_epi32(acc_lo[m][j], b_lo, q[h]);
              acc_hi[m][j] = _mm512_dpbusd_epi32(acc_hi[m][j], b_hi, q[h]);
            }
          }
        }
      }
    }
    const uint8_t* tail = group + runs * run_bytes;
    const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tail)));
    __m512 offset = _mm512_setzero_ps();
    if constexpr (HasOffset) offset = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tail + 32)));
    __m512i weight_sum = _mm512_setzero_si512();  // 8 bits: 2^14 * the rows' sums of q over the group
    if constexpr (Bits == 8) {
      const auto* sums = reinterpret_cast<const __m256i*>(tail + (HasOffset ? 64 : 32));
      weight_sum = _mm512_slli_epi32(_mm512_cvtepi16_epi32(_mm256_loadu_si256(sums)), 14);
    }
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      __m512i dot_lo = acc_lo[m][0], dot_hi = acc_hi[m][0];
      for (int j = 1; j < J; ++j) {
        dot_lo = _mm512_add_epi32(dot_lo, acc_lo[m][j]);
        dot_hi = _mm512_add_epi32(dot_hi, acc_hi[m][j]);
      }
      __m512i dot_v = _mm512_add_epi32(_mm512_slli_epi32(dot_hi, 8), dot_lo);
      if constexpr (Bits == 8) dot_v = _mm512_sub_epi32(dot_v, weight_sum);
      // |sum v * q| < 2^14 * 15 * 64 (4 bits, exact in float32) or 2^14 * 128 * 64 (8 bits, within its rounding)
      const __m512 dot = _mm512_cvtepi32_ps(dot_v);
      total[m] = _mm512_fmadd_ps(dot, _mm512_mul_ps(scale, _mm512_set1_ps(factor[m * l.groups + g])), total[m]);
      if constexpr (HasOffset) total[m] = _mm512_fmadd_ps(offset, _mm512_set1_ps(sum[m * l.groups + g]), total[m]);
    }
  }
  for (int m = 0; m < MB; ++m) store(out + m * n_total, total[m]);
}

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// x86-64-v3 (AVX2, FMA, F16C; no AVX-512, no VNNI): the same layout and the same 14-bit fixed point v, kept
// as int16 and multiplied with `vpmaddwd` (16-bit pairs summed into int32, exact: |v| <= 2^14 and |q| <=
// 128) instead of as two bytes: `vpmaddubsw` would need both bytes (two products plus a widening `vpmaddwd`
// each, and its int16 pair sums saturate for 8-bit weights against unsigned activation bytes), while one
// `vpmaddwd` on the widened weights does the same integer sum in fewer instructions. A 16-byte quarter of
// a 64-byte load (4 rows times 4 inputs) widens into one 256-bit register; the rows' two int32 halves are
// summed once per group. v being signed, the 8-bit tiles' weight sums (the AVX-512 code's correction for
// its unsigned activations) go unread.
constexpr bool kBuilt = true;
constexpr int64_t kBlockRows = 3;  // activation rows per pass: 4 accumulators each, within 16 registers

struct Layout {
  int64_t k, groups, group_size, group_bytes, tile_bytes;
};

// The activations in the kernel's form: v [M, K] as int16, and per group [M, G] the factor 2^-e and the
// float32 sum.
struct Activations {
  std::vector<int16_t> v;
  std::vector<float> factor, sum;
};

inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
inline __m256 load8(const at::BFloat16* x) {  // bfloat16 is float32's upper half
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

inline float reduce_max(__m256 v) {
  __m128 r = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  r = _mm_max_ps(r, _mm_movehl_ps(r, r));
  return _mm_cvtss_f32(_mm_max_ss(r, _mm_shuffle_ps(r, r, 1)));
}

inline float reduce_add(__m256 v) {
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  return _mm_cvtss_f32(_mm_add_ss(r, _mm_shuffle_ps(r, r, 1)));
}

template <typename T>
Activations split(const T* x, int64_t m, int64_t k, int64_t x_stride, int64_t group_size) {
  const int64_t groups = k / group_size, chunks = group_size / 8;
  Activations a{std::vector<int16_t>(m * k), std::vector<float>(m * groups), std::vector<float>(m * groups)};
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 values[8];  // a group: at most 64 inputs
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t g = 0; g < groups; ++g) {
      __m256 amax = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c) {
        values[c] = load8(x + i * x_stride + g * group_size + 8 * c);
        amax = _mm256_max_ps(amax, _mm256_and_ps(values[c], magnitude));
        sum = _mm256_add_ps(sum, values[c]);
      }
      const float largest = reduce_max(amax);
      // |x| * 2^e < 2^14: v fits int16 (the AVX-512 path's 256 * hi + lo, as one number)
      const int e = largest > 0.f && std::isfinite(largest) ? 13 - std::ilogb(largest) : 0;
      const float up = std::ldexp(1.f, e);
      for (int64_t c = 0; c < chunks; ++c) {
        // a power of two: an exact product, rounded to the nearest integer (even on ties: MXCSR's default)
        const __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(values[c], _mm256_set1_ps(up)));
        const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(v, v), 0x08);  // v0..7 in the low half
        _mm_storeu_si128(reinterpret_cast<__m128i*>(a.v.data() + i * k + g * group_size + 8 * c),
                         _mm256_castsi256_si128(packed));
      }
      // a non-finite activation (the sum catches NaN, which max may drop) makes its row's outputs NaN
      const float total = reduce_add(sum);
      const bool finite = std::isfinite(largest) && std::isfinite(total);
      a.factor[i * groups + g] = finite ? 1.f / up : std::numeric_limits<float>::quiet_NaN();
      a.sum[i * groups + g] = total;
    }
  }
  return a;
}

inline void store(float* out, __m256 v) { _mm256_storeu_ps(out, v); }
inline void store(at::BFloat16* out, __m256 v) {
  // round to nearest even, as torch rounds float32 to bfloat16
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_castsi256_si128(packed));
}

// 16 rows' int32 sums from the four quarters' accumulators (lanes: row 4s + r's two pair sums, rows 4s,
// 4s + 1 in the low 128 bits, 4s + 2, 4s + 3 in the high ones): rows 0..7 and 8..15.
inline __m256i rows_of(__m256i q0, __m256i q1) {
  return _mm256_permutevar8x32_epi32(_mm256_hadd_epi32(q0, q1), _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7));
}

// One tile (output rows n0 .. n0 + 16, `out` pointing at row m0's n0) for activation rows m0 .. m0 + MB.
template <int Bits, int MB, bool HasOffset, typename T>
void tile(const uint8_t* w, const Layout& l, const Activations& a, int64_t m0, T* out, int64_t n_total) {
  constexpr int64_t run_bytes = kTileRows * kRun * Bits / 8;
  const __m256i mask = _mm256_set1_epi16(15);
  const int64_t runs = l.group_size / kRun, k_total = l.k;
  const int16_t* v = a.v.data() + m0 * k_total;
  const float* factor = a.factor.data() + m0 * l.groups;
  const float* sum = a.sum.data() + m0 * l.groups;
  __m256 total[MB][2];
  for (auto& t : total) t[0] = t[1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < l.groups; ++g) {
    const uint8_t* group = w + g * l.group_bytes;
    __m256i acc[MB][4];
    for (auto& row : acc) std::fill(row, row + 4, _mm256_setzero_si256());
    for (int64_t r = 0; r < runs; ++r) {
      const uint8_t* run = group + r * run_bytes;
      const int64_t k0 = g * l.group_size + r * kRun;
#pragma GCC unroll 8
      for (int load = 0; load < Bits; ++load) {
        __builtin_prefetch(run + 64 * load + 4096, 0, 3);  // past the end: a hint, never a fault
#pragma GCC unroll 4
        for (int s = 0; s < 4; ++s) {  // rows 4s .. 4s + 3
          const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(run + 64 * load + 16 * s));
          if constexpr (Bits == 4) {
            const __m256i wide = _mm256_cvtepu8_epi16(bytes);
            const __m256i q0 = _mm256_and_si256(wide, mask), q1 = _mm256_srli_epi16(wide, 4);
            const int64_t k = k0 + 8 * load;  // q0: inputs k .. k + 3; q1: k + 4 .. k + 7
#pragma GCC unroll 4
            for (int m = 0; m < MB; ++m) {
              int64_t x0, x1;
              std::memcpy(&x0, v + m * k_total + k, 8);
              std::memcpy(&x1, v + m * k_total + k + 4, 8);
              acc[m][s] = _mm256_add_epi32(acc[m][s], _mm256_madd_epi16(q0, _mm256_set1_epi64x(x0)));
              acc[m][s] = _mm256_add_epi32(acc[m][s], _mm256_madd_epi16(q1, _mm256_set1_epi64x(x1)));
            }
          } else {
            const __m256i q = _mm256_cvtepi8_epi16(bytes);
            const int64_t k = k0 + 4 * load;
#pragma GCC unroll 4
            for (int m = 0; m < MB; ++m) {
              int64_t x;
              std::memcpy(&x, v + m * k_total + k, 8);
              acc[m][s] = _mm256_add_epi32(acc[m][s], _mm256_madd_epi16(q, _mm256_set1_epi64x(x)));
            }
          }
        }
      }
    }
    const uint8_t* tail = group + runs * run_bytes;
    const __m256 scale[2] = {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tail))),
                             _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tail + 16)))};
    __m256 offset[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    if constexpr (HasOffset) {
      offset[0] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tail + 32)));
      offset[1] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tail + 48)));
    }
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) {
      // |sum v * q| <= 2^14 * 15 * 64 (4 bits, exact in float32) or 2^14 * 128 * 64 (8 bits, within its rounding)
      const __m256i dot[2] = {rows_of(acc[m][0], acc[m][1]), rows_of(acc[m][2], acc[m][3])};
      const __m256 f = _mm256_set1_ps(factor[m * l.groups + g]);
      for (int h = 0; h < 2; ++h) {
        total[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[h]), _mm256_mul_ps(scale[h], f), total[m][h]);
        if constexpr (HasOffset) {
          total[m][h] = _mm256_fmadd_ps(offset[h], _mm256_set1_ps(sum[m * l.groups + g]), total[m][h]);
        }
      }
    }
  }
  for (int m = 0; m < MB; ++m) {
    store(out + m * n_total, total[m][0]);
    store(out + m * n_total + 8, total[m][1]);
  }
}
#else
constexpr bool kBuilt = false;
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) || defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
template <int Bits, bool HasOffset, typename T>
void tile_rows(int64_t mb, const uint8_t* w, const Layout& l, const Activations& a, int64_t m0, T* out, int64_t n) {
  switch (mb) {
    case 1: return tile<Bits, 1, HasOffset, T>(w, l, a, m0, out, n);
    case 2: return tile<Bits, 2, HasOffset, T>(w, l, a, m0, out, n);
    case 3: return tile<Bits, 3, HasOffset, T>(w, l, a, m0, out, n);
    case 4: return tile<Bits, 4, HasOffset, T>(w, l, a, m0, out, n);
    case 5: return tile<Bits, 5, HasOffset, T>(w, l, a, m0, out, n);
    case 6: return tile<Bits, 6, HasOffset, T>(w, l, a, m0, out, n);
    case 7: return tile<Bits, 7, HasOffset, T>(w, l, a, m0, out, n);
    case 8: return tile<Bits, 8, HasOffset, T>(w, l, a, m0, out, n);
    default: TORCH_CHECK(false, "tiled_matmul: bad activation block ", mb);
  }
}

// the activations as the build's kernel takes them for `Bits`-bit weights
template <int Bits, typename T>
Activations split_for(const T* x, int64_t m, int64_t k, int64_t x_stride, int64_t group_size) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  return split<Bits == 8>(x, m, k, x_stride, group_size);  // unsigned against 8-bit weights
#else
  return split(x, m, k, x_stride, group_size);
#endif
}

template <int Bits, bool HasOffset, typename T>
void compute(const uint8_t* w, const Layout& l, const Activations& a, int64_t m_total, T* out, int64_t n_total) {
  at::parallel_for(0, n_total / kTileRows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      // every block of activation rows while the tile's weights are in L1
      for (int64_t m0 = 0; m0 < m_total; m0 += kBlockRows) {
        const int64_t mb = std::min(kBlockRows, m_total - m0);
        tile_rows<Bits, HasOffset, T>(mb, w + t * l.tile_bytes, l, a, m0, out + m0 * n_total + t * kTileRows, n_total);
      }
    }
  });
}
#endif

// x [M, K] (float32 or bfloat16, rows contiguous) @ the tiled weight's transpose -> [M, N] in x's dtype.
// w: uint8 [N / 16, tile bytes] in the layout above for `bits` (4 or 8); group_size: 32 or 64.
at::Tensor tiled_matmul(const at::Tensor& x, const at::Tensor& w, int64_t bits, int64_t group_size,
                        bool has_offset) {
  TORCH_CHECK(kBuilt, "tiled_matmul: this build has neither AVX-512 VNNI nor AVX2 (see tiled_matmul_isa)");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "tiled_matmul runs on the CPU");
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat) &&
                  x.stride(1) == 1,
              "tiled_matmul: x must be float32 or bfloat16 [M, K] with contiguous rows");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(),
              "tiled_matmul: w must be contiguous uint8 [N / 16, tile bytes]");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0) * kTileRows;
  TORCH_CHECK(bits == 4 || bits == 8, "tiled_matmul: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(group_size == 32 || group_size == 64, "tiled_matmul: groups must be of 32 or 64 inputs, got ",
              group_size);
  TORCH_CHECK(k % group_size == 0, "tiled_matmul: groups of ", group_size, " inputs do not tile rows of ", k);
  // the runs, then float16 scales, offsets, and (8 bits) int16 weight sums of 16 rows
  const int64_t groups = k / group_size,
                group_bytes = group_size * kTileRows * bits / 8 + 32 * (1 + has_offset + (bits == 8));
  TORCH_CHECK(w.size(1) == groups * group_bytes, "tiled_matmul: tiles of ", w.size(1), " bytes do not hold ",
              groups, " groups of ", group_size, " inputs (", group_bytes, " bytes each)");
  at::Tensor out = at::empty({m, n}, x.options());
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) || defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  const Layout l{k, groups, group_size, group_bytes, w.size(1)};
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const auto run = [&](const auto* typed_x, auto* typed_out) {
    if (bits == 4) {
      const Activations a = split_for<4>(typed_x, m, k, x.stride(0), group_size);
      has_offset ? compute<4, true>(wp, l, a, m, typed_out, n) : compute<4, false>(wp, l, a, m, typed_out, n);
    } else {
      const Activations a = split_for<8>(typed_x, m, k, x.stride(0), group_size);
      has_offset ? compute<8, true>(wp, l, a, m, typed_out, n) : compute<8, false>(wp, l, a, m, typed_out, n);
    }
  };
  if (x.scalar_type() == at::kFloat) {
    run(x.data_ptr<float>(), out.data_ptr<float>());
  } else {
    run(x.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>());
  }
#endif
  return out;
}

std::string tiled_matmul_isa() {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  return "avx512vnni";
#else
  return kBuilt ? "avx2" : "";
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pagoda, m) {
  m.def("tiled_matmul(Tensor x, Tensor w, int bits, int group_size, bool has_offset) -> Tensor");
  m.def("tiled_matmul_isa() -> str", &tiled_matmul_isa);
}

TORCH_LIBRARY_IMPL(pagoda, CPU, m) { m.impl("tiled_matmul", &tiled_matmul); }
