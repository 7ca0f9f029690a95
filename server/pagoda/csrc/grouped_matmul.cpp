// Grouped-quantized weights times a few rows of activations (decode steps), on the CPU:
//
//     out[m, n] = sum_k x[m, k] * (q[n, k] * scale[n, k / G] + offset[n, k / G])
//
// At a few rows this product is bound by reading the weights: each output row's integers, scales and
// offsets are streamed once, dequantized in registers to the float32 values `GroupQuantized.dequantize`
// gives (the same product and sum, rounded the same way; on AVX-512 a 4-bit group's 16 possible values are
// computed once and looked up), and multiplied with every activation row at once, in float32 (activations
// are widened, never quantized). 8-bit weights are stored as they come (int8 [N, K]); 4-bit ones two to a
// byte, each run of 64 inputs as 32 bytes whose low nibbles are inputs 0..31 and high nibbles 32..63, so a
// load and a mask or a shift give inputs in order.
//
// The arithmetic works on 16 floats at a time: one AVX-512 register where the build targets it, two AVX2
// ones for x86-64-v3 (the image's target), plain loops elsewhere. A task owns a few output rows (more when
// there are fewer activation rows, so that enough independent accumulators hide the FMA latency) and asks
// for the next tiles' bytes ahead; tasks run on torch's intra-op threads. Which weights take this kernel
// rather than torch's: `pagoda.quantization.cpu_kernels.prefers_grouped_kernel`.
//
// Built by `python -m pagoda.cpu_extension` (make install); registered as torch.ops.pagoda.grouped_matmul.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

// 16 floats, in one AVX-512 register or two AVX2 ones, with a plain fallback for other targets
// (intrinsics: g++'s vector extensions lower the byte-to-float conversions to scalar code).
constexpr int kLanes = 16;
#if defined(__AVX512F__)
struct F16 {
  __m512 v;
};
inline F16 zero() { return {_mm512_setzero_ps()}; }
inline F16 load_floats(const float* p) { return {_mm512_loadu_ps(p)}; }
inline F16 fma(F16 a, F16 b, F16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline F16 fma(F16 a, float b, F16 c) { return {_mm512_fmadd_ps(a.v, _mm512_set1_ps(b), c.v)}; }
inline F16 mul(F16 a, F16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline F16 add(F16 a, F16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline F16 broadcast(float b) { return {_mm512_set1_ps(b)}; }
inline float hsum(F16 a) { return _mm512_reduce_add_ps(a.v); }
inline F16 from_int8(const uint8_t* p) {
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
}
inline F16 from_uint8(__m128i b) { return {_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b))}; }
#elif defined(__AVX2__)
struct F16 {
  __m256 a, b;
};
inline F16 zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline F16 load_floats(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline F16 fma(F16 a, F16 b, F16 c) { return {_mm256_fmadd_ps(a.a, b.a, c.a), _mm256_fmadd_ps(a.b, b.b, c.b)}; }
inline F16 fma(F16 a, float b, F16 c) {
  const __m256 s = _mm256_set1_ps(b);
  return {_mm256_fmadd_ps(a.a, s, c.a), _mm256_fmadd_ps(a.b, s, c.b)};
}
inline F16 mul(F16 a, F16 b) { return {_mm256_mul_ps(a.a, b.a), _mm256_mul_ps(a.b, b.b)}; }
inline F16 add(F16 a, F16 b) { return {_mm256_add_ps(a.a, b.a), _mm256_add_ps(a.b, b.b)}; }
inline F16 broadcast(float b) { return {_mm256_set1_ps(b), _mm256_set1_ps(b)}; }
inline float hsum(F16 a) {
  const __m256 s = _mm256_add_ps(a.a, a.b);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}
inline F16 from_int8(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)))};
}
inline F16 from_uint8(__m128i b) {
  return {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)))};
}
#else  // other targets: plain loops
struct F16 {
  float v[kLanes];
};
inline F16 zero() { return {}; }
inline F16 load_floats(const float* p) {
  F16 r;
  std::memcpy(r.v, p, sizeof(r.v));
  return r;
}
inline F16 fma(F16 a, F16 b, F16 c) {
  for (int i = 0; i < kLanes; ++i) c.v[i] += a.v[i] * b.v[i];
  return c;
}
inline F16 fma(F16 a, float b, F16 c) {
  for (int i = 0; i < kLanes; ++i) c.v[i] += a.v[i] * b;
  return c;
}
inline F16 mul(F16 a, F16 b) {
  for (int i = 0; i < kLanes; ++i) a.v[i] *= b.v[i];
  return a;
}
inline F16 add(F16 a, F16 b) {
  for (int i = 0; i < kLanes; ++i) a.v[i] += b.v[i];
  return a;
}
inline F16 broadcast(float b) {
  F16 r;
  std::fill(r.v, r.v + kLanes, b);
  return r;
}
inline float hsum(F16 a) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += a.v[i];
  return s;
}
inline F16 from_int8(const uint8_t* p) {
  F16 r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = static_cast<int8_t>(p[i]);
  return r;
}
inline void from_nibbles(const uint8_t* p, F16& lo, F16& hi) {
  for (int i = 0; i < kLanes; ++i) {
    lo.v[i] = p[i] & 15;
    hi.v[i] = p[i] >> 4;
  }
}
#endif

#if defined(__AVX2__)
// the 16 low and the 16 high nibbles of 16 bytes, as floats
inline void from_nibbles(const uint8_t* p, F16& lo, F16& hi) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), mask = _mm_set1_epi8(15);
  lo = from_uint8(_mm_and_si128(b, mask));
  hi = from_uint8(_mm_and_si128(_mm_srli_epi16(b, 4), mask));
}
#endif

// q * scale + offset, rounded as `GroupQuantized.dequantize` rounds it (a product, then a sum)
template <bool HasOffset>
inline F16 dequantize(F16 q, float scale, float offset) {
  F16 w = mul(q, broadcast(scale));
  return HasOffset ? add(w, broadcast(offset)) : w;
}

// A run of 64 4-bit weights (32 bytes, see the layout): inputs 0..15, 16..31 (scale and offset lo), 32..47
// and 48..63 (hi), dequantized.
#if defined(__AVX512F__)
// Each half's 16 possible values are computed once (a table, by the same product and sum) and looked up by
// the nibbles: a byte widened to 32 bits indexes with its low nibble (vpermps reads 4 bits), shifted with
// its high one.
template <bool HasOffset>
inline void dequantize_run(const uint8_t* bytes, float s_lo, float o_lo, float s_hi, float o_hi, F16& w0, F16& w1,
                           F16& w2, F16& w3) {
  const __m512 values = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 lo = dequantize<HasOffset>(F16{values}, s_lo, o_lo).v, hi = dequantize<HasOffset>(F16{values}, s_hi, o_hi).v;
  const __m512i b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  const __m512i b1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + 16)));
  w0.v = _mm512_permutexvar_ps(b0, lo);
  w1.v = _mm512_permutexvar_ps(b1, lo);
  w2.v = _mm512_permutexvar_ps(_mm512_srli_epi32(b0, 4), hi);
  w3.v = _mm512_permutexvar_ps(_mm512_srli_epi32(b1, 4), hi);
}
#else
template <bool HasOffset>
inline void dequantize_run(const uint8_t* bytes, float s_lo, float o_lo, float s_hi, float o_hi, F16& w0, F16& w1,
                           F16& w2, F16& w3) {
  from_nibbles(bytes, w0, w2);
  from_nibbles(bytes + 16, w1, w3);
  w0 = dequantize<HasOffset>(w0, s_lo, o_lo);
  w1 = dequantize<HasOffset>(w1, s_lo, o_lo);
  w2 = dequantize<HasOffset>(w2, s_hi, o_hi);
  w3 = dequantize<HasOffset>(w3, s_hi, o_hi);
}
#endif

// Accumulators (of 16 floats) a task keeps in registers: AVX-512 has 32 registers of that width, AVX2 16
// of half of it.
#if defined(__AVX512F__)
constexpr int kAccumulators = 16, kBlockRows = 8;
#else
constexpr int kAccumulators = 4, kBlockRows = 4;
#endif

struct Weight {
  const uint8_t* q;     // [N, row_bytes]
  const float* scale;   // [N, groups]
  const float* offset;  // [N, groups] or null
  int64_t row_bytes, groups, group_size;
};

// Inputs per unit: the weights of one 16-byte load (8 bits), of one 32-byte run (4 bits: see the layout).
template <int Bits>
constexpr int64_t kUnit = Bits == 8 ? 16 : 64;

// Rows n0 .. n0 + NR of the output for activation rows m0 .. m0 + MB (out: [M, N], row m0 first). Each
// run of 16 weights is dequantized once, w = q * scale + offset (the reference's float32 values), and
// multiplied with every activation row.
template <int Bits, bool HasOffset, int MB, int NR, typename T>
void tile(const Weight& w, const float* x, int64_t k_total, int64_t n0, T* out, int64_t n_total) {
  F16 acc[NR][MB];
  for (auto& row : acc) std::fill(row, row + MB, zero());
  constexpr int64_t unit = kUnit<Bits>, half = Bits == 8 ? unit : unit / 2;
  // the groups of the unit's two halves, advanced by counting (a division per unit costs more than it)
  int64_t g_lo = 0, g_hi = half / w.group_size, lo_end = w.group_size, hi_end = (g_hi + 1) * w.group_size;
  for (int64_t k = 0; k < k_total; k += unit) {
    while (k >= lo_end) {
      ++g_lo;
      lo_end += w.group_size;
    }
    while (k + half >= hi_end) {
      ++g_hi;
      hi_end += w.group_size;
    }
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      const int64_t row = n0 + r;
      const uint8_t* bytes = w.q + row * w.row_bytes + k * Bits / 8;
      // the next tile's same bytes, a tile's time ahead (past the weight's end: a hint, never a fault)
      __builtin_prefetch(bytes + 2 * NR * w.row_bytes, 0, 3);
      const float s_lo = w.scale[row * w.groups + g_lo], o_lo = HasOffset ? w.offset[row * w.groups + g_lo] : 0.f;
      if constexpr (Bits == 8) {
        const F16 wv = dequantize<HasOffset>(from_int8(bytes), s_lo, o_lo);
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) acc[r][m] = fma(wv, load_floats(x + m * k_total + k), acc[r][m]);
      } else {
        const float s_hi = w.scale[row * w.groups + g_hi], o_hi = HasOffset ? w.offset[row * w.groups + g_hi] : 0.f;
        F16 w0, w1, w2, w3;
        dequantize_run<HasOffset>(bytes, s_lo, o_lo, s_hi, o_hi, w0, w1, w2, w3);
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) {
          const float* xm = x + m * k_total + k;
          acc[r][m] = fma(w0, load_floats(xm), acc[r][m]);
          acc[r][m] = fma(w1, load_floats(xm + 16), acc[r][m]);
          acc[r][m] = fma(w2, load_floats(xm + 32), acc[r][m]);
          acc[r][m] = fma(w3, load_floats(xm + 48), acc[r][m]);
        }
      }
    }
  }
  for (int r = 0; r < NR; ++r) {
    for (int m = 0; m < MB; ++m) out[m * n_total + n0 + r] = static_cast<T>(hsum(acc[r][m]));
  }
}

// Asks for rows [first, last)'s scales and offsets ahead of their tile (`tile` asks for their weights as it
// goes): a tile reads its rows side by side, more streams at once than the hardware prefetchers follow,
// and a model's weights come from memory (2x slower without, measured), not from the cache.
inline void prefetch(const Weight& w, int64_t first, int64_t last) {
  const auto lines = [](const void* start, int64_t bytes) {
    for (int64_t offset = 0; offset < bytes; offset += 64) {
      __builtin_prefetch(static_cast<const char*>(start) + offset, 0, 3);
    }
  };
  if (last <= first) return;
  lines(w.scale + first * w.groups, (last - first) * w.groups * 4);
  if (w.offset != nullptr) lines(w.offset + first * w.groups, (last - first) * w.groups * 4);
}

// Output rows [begin, end) for activation rows m0 .. m0 + MB: tiles of as many rows as the accumulators
// allow, then single rows.
template <int Bits, bool HasOffset, int MB, typename T>
void rows(const Weight& w, const float* x, int64_t k_total, int64_t begin, int64_t end, T* out, int64_t n) {
  constexpr int NR = std::max(1, kAccumulators / MB);
  int64_t row = begin;
  for (; row + NR <= end; row += NR) {
    prefetch(w, row + 2 * NR, std::min<int64_t>(end, row + 3 * NR));
    tile<Bits, HasOffset, MB, NR, T>(w, x, k_total, row, out, n);
  }
  for (; row < end; ++row) tile<Bits, HasOffset, MB, 1, T>(w, x, k_total, row, out, n);
}

template <int Bits, bool HasOffset, typename T>
void rows_for_block(int64_t mb, const Weight& w, const float* x, int64_t k_total, int64_t begin, int64_t end, T* out,
                    int64_t n) {
  static_assert(kBlockRows <= 8);
  switch (mb) {
    case 1: return rows<Bits, HasOffset, 1, T>(w, x, k_total, begin, end, out, n);
    case 2: return rows<Bits, HasOffset, 2, T>(w, x, k_total, begin, end, out, n);
    case 3: return rows<Bits, HasOffset, 3, T>(w, x, k_total, begin, end, out, n);
    case 4: return rows<Bits, HasOffset, 4, T>(w, x, k_total, begin, end, out, n);
#if defined(__AVX512F__)
    case 5: return rows<Bits, HasOffset, 5, T>(w, x, k_total, begin, end, out, n);
    case 6: return rows<Bits, HasOffset, 6, T>(w, x, k_total, begin, end, out, n);
    case 7: return rows<Bits, HasOffset, 7, T>(w, x, k_total, begin, end, out, n);
    case 8: return rows<Bits, HasOffset, 8, T>(w, x, k_total, begin, end, out, n);
#endif
    default: TORCH_CHECK(false, "grouped_matmul: bad activation block ", mb);
  }
}

template <int Bits, bool HasOffset, typename T>
void compute(const Weight& w, const float* x, int64_t m_total, int64_t k_total, int64_t n, T* out) {
  // Output rows per task: enough that a task streams some KiB of weights, so the threads' start-up is
  // paid once per matmul rather than per tile.
  const int64_t grain = std::max<int64_t>(16, (1 << 14) / std::max<int64_t>(1, w.row_bytes));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    // activation rows in blocks the accumulators hold; a block's weight rows are still in L1 for the next
    for (int64_t chunk = begin; chunk < end; chunk += 32) {
      const int64_t chunk_end = std::min(end, chunk + 32);
      for (int64_t m0 = 0; m0 < m_total; m0 += kBlockRows) {
        const int64_t mb = std::min<int64_t>(kBlockRows, m_total - m0);
        rows_for_block<Bits, HasOffset, T>(mb, w, x + m0 * k_total, k_total, chunk, chunk_end, out + m0 * n, n);
      }
    }
  });
}

void check(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
           const std::optional<at::Tensor>& offset, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "grouped_matmul: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(x.device().is_cpu() && q.device().is_cpu() && scale.device().is_cpu(),
              "grouped_matmul runs on the CPU");
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && scale.dim() == 2, "grouped_matmul: x [M, K], q [N, *], scale [N, groups]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "grouped_matmul: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(q.scalar_type() == (bits == 8 ? at::kChar : at::kByte),
              "grouped_matmul: q must be int8 for 8 bits, uint8 (two per byte) for 4");
  TORCH_CHECK(scale.scalar_type() == at::kFloat, "grouped_matmul: scale must be float32");
  TORCH_CHECK(q.is_contiguous() && scale.is_contiguous(), "grouped_matmul: q and scale must be contiguous");
  const int64_t k = bits == 8 ? q.size(1) : 2 * q.size(1);
  TORCH_CHECK(x.size(1) == k, "grouped_matmul: x has ", x.size(1), " inputs, the weight ", k);
  TORCH_CHECK(scale.size(0) == q.size(0) && scale.size(1) > 0 && k % scale.size(1) == 0,
              "grouped_matmul: scales ", scale.sizes(), " do not tile the weight's ", q.size(0), " x ", k);
  // scales change at most once per half of a unit (16 inputs for 8 bits, 64 for 4)
  const int64_t group = k / scale.size(1);
  if (bits == 8) {
    TORCH_CHECK(group % 16 == 0, "grouped_matmul: 8-bit groups must be multiples of 16 inputs, got ", group);
  } else {
    TORCH_CHECK(group % 32 == 0 && k % 64 == 0, "grouped_matmul: 4-bit weights need groups of a multiple of 32 "
                "inputs and rows of a multiple of 64, got groups of ", group, " in ", k);
  }
  if (offset.has_value()) {
    TORCH_CHECK(offset->device().is_cpu() && offset->scalar_type() == at::kFloat && offset->is_contiguous() &&
                    offset->sizes() == scale.sizes(),
                "grouped_matmul: offset must be contiguous float32 of the scales' shape");
  }
}

// x [M, K] (float32 or bfloat16) @ the weight's transpose -> [M, N] in x's dtype. q: int8 [N, K] for
// bits 8, uint8 [N, K / 2] packed as above for bits 4; scale, offset: float32 [N, K / G].
at::Tensor grouped_matmul(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                          const std::optional<at::Tensor>& offset, int64_t bits) {
  check(x, q, scale, offset, bits);
  const int64_t m = x.size(0), k = x.size(1), n = q.size(0), groups = scale.size(1), group = k / groups;
  const Weight w{reinterpret_cast<const uint8_t*>(q.data_ptr()), scale.data_ptr<float>(),
                 offset.has_value() ? offset->data_ptr<float>() : nullptr, q.size(1), groups, group};
  at::Tensor out = at::empty({m, n}, x.options());
  // the activations in float32, contiguous (KiB: they stay in the cache)
  std::vector<float> xf(m * k);
  const auto run = [&](auto* typed_out) {
    using scalar_t = std::remove_pointer_t<decltype(typed_out)>;
    const scalar_t* src = x.data_ptr<scalar_t>();
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < k; ++j) xf[i * k + j] = static_cast<float>(src[i * x.stride(0) + j * x.stride(1)]);
    }
    if (bits == 8) {
      offset.has_value() ? compute<8, true>(w, xf.data(), m, k, n, typed_out)
                         : compute<8, false>(w, xf.data(), m, k, n, typed_out);
    } else {
      offset.has_value() ? compute<4, true>(w, xf.data(), m, k, n, typed_out)
                         : compute<4, false>(w, xf.data(), m, k, n, typed_out);
    }
  };
  if (x.scalar_type() == at::kFloat) {
    run(out.data_ptr<float>());
  } else {
    run(out.data_ptr<at::BFloat16>());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pagoda, m) {
  m.def("grouped_matmul(Tensor x, Tensor q, Tensor scale, Tensor? offset, int bits) -> Tensor");
}

TORCH_LIBRARY_IMPL(pagoda, CPU, m) { m.impl("grouped_matmul", &grouped_matmul); }
