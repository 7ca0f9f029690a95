// The decoder layer's element-wise ops on the CPU, each one call instead of several eager torch ops: the
// residual add and RMSNorm, SiLU(gate) * up, and the rotation of q and k. At one sequence a decode step
// ran 823 eager ops of ~4 us each (SmolLM2-135M, 30 layers); with these it runs 582.
//
// Each computes the floats that the torch path of pagoda/layers computes, bit for bit: the same operations
// rounded in the same places, and where torch's own kernels choose an order or an approximation, the same
// one (its cascade sum for RMSNorm's mean of squares, its vectorised exp for SiLU), as the CPU capability
// torch dispatches to (AVX-512 or AVX2) does it. So no multiply-add may fuse here: every product rounds
// before it is added, as in torch's separate ops.
//
// Built by `python -m pagoda.cpu_extension` (make install); registered as torch.ops.pagoda.*.

#pragma GCC optimize("fp-contract=off")

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <ATen/core/Tensor.h>
#include <ATen/Version.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

namespace {

// Torch's CPU capability (the ATEN_CPU_CAPABILITY it dispatches its kernels to): "AVX512", "AVX2", ...
const std::string& capability() {
  static const std::string name = at::get_cpu_capability();
  return name;
}

// The float lanes of torch's Vectorized<float> in its kernels registered for AVX-512 too (silu).
int64_t float_lanes() { return capability() == "AVX512" ? 16 : 8; }  // AVX2 and the generic build: 32 bytes

// Whether its vector loops compute exp with the AVX2/AVX-512 polynomial (the generic build calls std::exp).
bool vectorized_exp() { return capability() == "AVX512" || capability() == "AVX2"; }

// Bit casts by memcpy: GCC vectorises these loops, not std::bit_cast's
inline float from_bits(uint32_t bits) {
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

inline uint32_t to_bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits;
}

// Conversions that vectorise (c10::BFloat16's own go through a branchy scalar path), rounding as it does:
// to nearest even, NaN to a quiet NaN.
template <typename T>
inline float f32(T v) {
  return static_cast<float>(v);
}

template <>
inline float f32(c10::BFloat16 v) {
  return from_bits(static_cast<uint32_t>(v.x) << 16);
}


template <typename T>
inline T to(float v) {
  return static_cast<T>(v);
}

template <>
inline c10::BFloat16 to(float v) {
  const uint32_t bits = to_bits(v);
  const uint16_t rounded = v != v ? 0x7FC0 : static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
  return c10::BFloat16(rounded, c10::BFloat16::from_bits());
}

// v rounded to T, back in float32: where torch's op ends and the next one reads its output
template <typename T>
inline float rounded(float v) {
  return f32(to<T>(v));
}

// Rows or elements below which torch's element-wise loops stay on one thread (at::internal::GRAIN_SIZE):
// a decode step's handful of rows is not worth waking the pool.
constexpr int64_t kGrain = at::internal::GRAIN_SIZE;

// ---------------------------------------------------------------------------------------------------------
// RMSNorm: torch.sum's cascade over a contiguous row (aten/src/ATen/native/cpu/SumKernel.cpp), lane by lane

int64_t ceil_log2(int64_t x) {
  if (x <= 2) return 1;
  return 64 - __builtin_clzll(static_cast<uint64_t>(x - 1));
}

// The sum of n floats as torch sums a contiguous row of them with W-lane vectors (W = 1: its scalar loop,
// for rows shorter than a vector): the row as vectors, four interleaved accumulators (multi_row_sum) whose
// partial sums cascade up to four levels, the leftover vectors into the first, the four summed, then the
// leftover scalars and the lanes, in that order.
template <int W>
float cascade_sum(const float* x, int64_t n) {
  constexpr int64_t kRows = 4, kLevels = 4;
  const int64_t vectors = n / W, size = vectors / kRows;
  const int64_t level_power = std::max<int64_t>(4, ceil_log2(size) / kLevels);
  const int64_t level_step = int64_t{1} << level_power, level_mask = level_step - 1;
  float acc[kLevels][kRows][W] = {};
  auto add = [x](float* a, int64_t vector) {
    for (int l = 0; l < W; ++l) a[l] += x[vector * W + l];
  };
  int64_t i = 0;
  while (i + level_step <= size) {
    for (int64_t j = 0; j < level_step; ++j, ++i) {
      for (int64_t k = 0; k < kRows; ++k) add(acc[0][k], i * kRows + k);
    }
    for (int64_t j = 1; j < kLevels; ++j) {
      for (int64_t k = 0; k < kRows; ++k) {
        for (int l = 0; l < W; ++l) {
          acc[j][k][l] += acc[j - 1][k][l];
          acc[j - 1][k][l] = 0.f;
        }
      }
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < size; ++i) {
    for (int64_t k = 0; k < kRows; ++k) add(acc[0][k], i * kRows + k);
  }
  for (int64_t j = 1; j < kLevels; ++j) {
    for (int64_t k = 0; k < kRows; ++k) {
      for (int l = 0; l < W; ++l) acc[0][k][l] += acc[j][k][l];
    }
  }
  for (int64_t v = size * kRows; v < vectors; ++v) add(acc[0][0], v);
  for (int64_t k = 1; k < kRows; ++k) {
    for (int l = 0; l < W; ++l) acc[0][0][l] += acc[0][k][l];
  }
  if constexpr (W == 1) return acc[0][0][0];
  float total = 0.f;
  for (int64_t k = vectors * W; k < n; ++k) total += x[k];
  for (int l = 0; l < W; ++l) total += acc[0][0][l];
  return total;
}

// torch registers its sum kernel for AVX2 only (REGISTER_DISPATCH, not ALSO_REGISTER_AVX512_DISPATCH):
// 8 float lanes on every x86 capability, the generic build's 32-byte vectors included.
constexpr int64_t kSumLanes = 8;

float row_sum(const float* x, int64_t n) {
  return n < kSumLanes ? cascade_sum<1>(x, n) : cascade_sum<kSumLanes>(x, n);
}

// One row of the norm, as layers/norm.py computes it: F.rms_norm in float32 (x * rsqrt(mean(x^2) + eps)),
// rounded to T, then Llama's w * that in T; or Gemma's that * (1 + w) in float32, rounded to T once.
// x holds the row in float32 (the residual sum already rounded to T); squares is scratch.
template <typename T>
void norm_row(const float* x, const T* weight, int64_t n, float eps, bool unit_offset, float* squares,
              T* out) {
  for (int64_t i = 0; i < n; ++i) squares[i] = x[i] * x[i];
  float mean = row_sum(squares, n) / static_cast<float>(n);
  const float rstd = 1.f / std::sqrt(mean + eps);
  for (int64_t i = 0; i < n; ++i) {
    const float normed = x[i] * rstd;
    const float w = f32(weight[i]);
    out[i] = to<T>(unit_offset ? normed * (1.f + w) : rounded<T>(normed) * w);
  }
}

void check_rows(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), op, " runs on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, op, ": rows [N, D] with contiguous D");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous(),
              op, ": a contiguous weight of D values");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": the weight in the activations' dtype");
}

// RMSNorm of x [N, D] into out; with a residual [N, D], of x + residual (rounded to the dtype), written into
// sum as well. Each row is read whole before its outputs are written: out may be x, and sum the residual.
void add_rms_norm_into(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
                       double eps, bool unit_offset, at::Tensor& out, at::Tensor& sum) {
  check_rows(x, weight, "add_rms_norm");
  if (residual) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->stride(1) == 1 &&
                    residual->scalar_type() == x.scalar_type() && residual->device().is_cpu(),
                "add_rms_norm: the residual has x's shape, dtype and contiguous rows");
  }
  const int64_t rows = x.size(0), dim = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    const scalar_t* w = weight.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / dim), [&](int64_t begin, int64_t end) {
      std::vector<float> row(dim), squares(dim);
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* in = x.data_ptr<scalar_t>() + r * x.stride(0);
        if (residual) {
          const scalar_t* res = residual->data_ptr<scalar_t>() + r * residual->stride(0);
          scalar_t* total = sum.data_ptr<scalar_t>() + r * sum.stride(0);
          for (int64_t i = 0; i < dim; ++i) {
            total[i] = to<scalar_t>(f32(in[i]) + f32(res[i]));
            row[i] = f32(total[i]);
          }
        } else {
          for (int64_t i = 0; i < dim; ++i) row[i] = f32(in[i]);
        }
        norm_row(row.data(), w, dim, static_cast<float>(eps), unit_offset, squares.data(),
                 out.data_ptr<scalar_t>() + r * out.stride(0));
      }
    });
  });
}

// -> (norm, sum), sum undefined without a residual.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                const at::Tensor& weight, double eps, bool unit_offset) {
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor sum = residual ? at::empty(x.sizes(), x.options()) : at::Tensor();
  add_rms_norm_into(x, residual, weight, eps, unit_offset, out, sum);
  return {out, sum};
}

// In place, for a caller whose x and residual are its own scratch (the decoder's residual stream): x becomes
// the norm of x + residual, residual that sum. No allocation.
void add_rms_norm_(at::Tensor x, at::Tensor residual, const at::Tensor& weight, double eps, bool unit_offset) {
  TORCH_CHECK(x.dim() == 2 && residual.dim() == 2 && x.stride(1) == 1 && residual.stride(1) == 1,
              "add_rms_norm_: rows [N, D] with contiguous D");
  add_rms_norm_into(x, residual, weight, eps, unit_offset, x, residual);
}

// ---------------------------------------------------------------------------------------------------------
// SiLU(gate) * up, bfloat16: torch's silu computes x / (1 + exp(-x)) in float32, its vector loop with
// Vectorized::exp_u20 (a polynomial, ported below) and the elements past the last whole pair of vectors
// with the scalar std::exp; silu's output rounds to bfloat16, then the product with up rounds again.
// (Its float32 loop takes another exp, not matched here: float32 stays on the torch path.)

// Vectorized<float>::exp_u20 of ATen's AVX2/AVX-512 vectors, one lane.
inline float exp_u20(float x) {
  constexpr float kLn2 = 0.693147182f, kLog2e = 1.44269502f;  // the bit patterns ATen sets
  const float ln_flt_min = from_bits(0xc2aeac50u), ln_flt_max = from_bits(0x42b17218u);
  const bool underflow = x < ln_flt_min;
  // _mm_min/max_ps return their second operand when either is NaN
  float src = x < ln_flt_max ? x : ln_flt_max;
  src = src > ln_flt_min ? src : ln_flt_min;
  // floor(v), |v| < 130, in a form GCC vectorises (std::floor, or a select of floats, it does not here)
  const float v = std::fma(src, kLog2e, 0.5f);
  const int32_t truncated = static_cast<int32_t>(v);
  const float fx = static_cast<float>(truncated - static_cast<int32_t>(static_cast<float>(truncated) > v));
  const float r = std::fma(-fx, kLn2, src);
  float y = std::fma(r, 0.00828929059f, 0.0418978221f);
  y = std::fma(r, y, 0.166676521f);
  y = std::fma(r, y, 0.499991506f);
  y = std::fma(r, y, 0.999999701f);
  y = std::fma(r, y, 1.f);
  // fx - 1 is a whole number: truncating it is the vector code's conversion in the current rounding mode
  const uint32_t pow_bits = static_cast<uint32_t>(static_cast<int32_t>(fx - 1.f) + 127) << 23;
  const float two_pow = from_bits(underflow ? 0u : pow_bits);
  return y * two_pow * 2.f;
}

inline float bf16_to_float(uint16_t bits) { return from_bits(static_cast<uint32_t>(bits) << 16); }

inline uint16_t float_to_bf16(float v) {  // to nearest even, NaN to a quiet NaN, as c10::BFloat16
  const uint32_t bits = to_bits(v);
  const uint32_t rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16;
  return static_cast<uint16_t>(v != v ? 0x7FC0u : rounded);
}

// n bfloat16 outputs (as raw bits: GCC vectorises loads of uint16_t, not of c10::BFloat16), the first
// `vectorized` of them with exp_u20, the rest with std::exp
void silu_mul_segment(const uint16_t* gate, const uint16_t* up, uint16_t* out, int64_t n, int64_t vectorized) {
  for (int64_t i = 0; i < vectorized; ++i) {
    const float g = bf16_to_float(gate[i]);
    const float act = bf16_to_float(float_to_bf16(g / (1.f + exp_u20(-g))));
    out[i] = float_to_bf16(act * bf16_to_float(up[i]));
  }
  for (int64_t i = vectorized; i < n; ++i) {
    const float g = bf16_to_float(gate[i]);
    const float act = bf16_to_float(float_to_bf16(g / (1.f + std::exp(-g))));
    out[i] = float_to_bf16(act * bf16_to_float(up[i]));
  }
}

// x [N, 2I] = [gate | up] -> [N, I]. torch's element-wise loop walks the N * I outputs in row pieces: whole
// rows, except where at::parallel_for cut its range (over GRAIN_SIZE elements, into one piece a thread),
// and each piece vectorises from its own start. The same pieces here, so every element takes the same exp.
at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "silu_and_mul runs on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) % 2 == 0, "silu_and_mul: x [N, 2I], contiguous rows");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "silu_and_mul: bfloat16");
  const int64_t rows = x.size(0), width = x.size(1) / 2, numel = rows * width;
  at::Tensor out = at::empty({rows, width}, x.options());
  int64_t pieces = 1;
  if (numel >= at::internal::GRAIN_SIZE && at::get_num_threads() > 1 && !at::in_parallel_region()) {
    pieces = std::min<int64_t>(at::get_num_threads(), (numel + at::internal::GRAIN_SIZE - 1) / at::internal::GRAIN_SIZE);
  }
  const int64_t chunk = (numel + pieces - 1) / pieces;
  const bool vector_exp = vectorized_exp();
  {
    // two Vectorized<BFloat16> a step: 64 bytes on AVX2, 128 on AVX-512
    const int64_t vector_step = 2 * float_lanes() * 4 / static_cast<int64_t>(sizeof(uint16_t));
    const auto* in = reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>());
    auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>());
    at::parallel_for(0, pieces, 1, [&](int64_t first, int64_t last) {
      for (int64_t p = first; p < last; ++p) {
        const int64_t end = std::min(numel, (p + 1) * chunk);
        for (int64_t i = p * chunk; i < end;) {
          const int64_t row = i / width, col = i % width, n = std::min(width - col, end - i);
          const uint16_t* gate = in + row * x.stride(0) + col;
          silu_mul_segment(gate, gate + width, dst + i, n, vector_exp ? n - n % vector_step : 0);
          i += n;
        }
      }
    });
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// RoPE, in place: heads [N, H, D] (q and k heads of the projection's output, a strided view), the first R
// dims of each head rotated by cos and signed_sin [N, R] or [N, 1, R] (the tables of layers/rotary.py, in
// the heads' dtype): x * cos + roll(x, R / 2) * signed_sin, each product rounded to the dtype, then their sum.
void rotary_embedding_(at::Tensor heads, const at::Tensor& cos, const at::Tensor& signed_sin) {
  TORCH_CHECK(heads.device().is_cpu() && cos.device().is_cpu() && signed_sin.device().is_cpu(),
              "rotary_embedding_ runs on the CPU");
  TORCH_CHECK(heads.dim() == 3 && heads.stride(2) == 1, "rotary_embedding_: heads [N, H, D], contiguous D");
  const int64_t rot = cos.size(-1);
  TORCH_CHECK(cos.sizes() == signed_sin.sizes() && cos.size(0) == heads.size(0) &&
                  cos.numel() == heads.size(0) * rot && rot <= heads.size(2) && rot % 2 == 0,
              "rotary_embedding_: cos and signed_sin [N, R] or [N, 1, R], R even and at most D");
  TORCH_CHECK(cos.is_contiguous() && signed_sin.is_contiguous() && cos.scalar_type() == heads.scalar_type() &&
                  signed_sin.scalar_type() == heads.scalar_type(),
              "rotary_embedding_: contiguous tables in the heads' dtype");
  const int64_t tokens = heads.size(0), num_heads = heads.size(1), half = rot / 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, heads.scalar_type(), "rotary_embedding_", [&] {
    at::parallel_for(0, tokens, std::max<int64_t>(1, kGrain / (num_heads * rot)), [&](int64_t begin, int64_t end) {
      std::vector<float> x(rot);
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* c = cos.data_ptr<scalar_t>() + t * rot;
        const scalar_t* s = signed_sin.data_ptr<scalar_t>() + t * rot;
        for (int64_t h = 0; h < num_heads; ++h) {
          scalar_t* head = heads.data_ptr<scalar_t>() + t * heads.stride(0) + h * heads.stride(1);
          for (int64_t i = 0; i < rot; ++i) x[i] = f32(head[i]);
          for (int64_t i = 0; i < half; ++i) {
            head[i] = to<scalar_t>(rounded<scalar_t>(x[i] * f32(c[i])) + rounded<scalar_t>(x[i + half] * f32(s[i])));
          }
          for (int64_t i = half; i < rot; ++i) {
            head[i] = to<scalar_t>(rounded<scalar_t>(x[i] * f32(c[i])) + rounded<scalar_t>(x[i - half] * f32(s[i])));
          }
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pagoda, m) {
  m.def("add_rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps, bool unit_offset) -> (Tensor, Tensor)");
  m.def("add_rms_norm_(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps, bool unit_offset) -> ()");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("rotary_embedding_(Tensor(a!) heads, Tensor cos, Tensor signed_sin) -> ()");
}

TORCH_LIBRARY_IMPL(pagoda, CPU, m) {
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("add_rms_norm_", &add_rms_norm_);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rotary_embedding_", &rotary_embedding_);
}
