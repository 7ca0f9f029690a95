// Decode attention over the paged KV cache, on the CPU, reading each sequence's blocks where they lie:
// for steps whose sequences bring a few new tokens each (decodes, speculative verification).
//
// The torch path gathers every sequence's blocks into a padded contiguous copy and runs SDPA over it;
// at 32 sequences that copy and the padding are 40% of a decode step. Here each (sequence, KV head) task
// walks its block table and computes, in float32, the scores of every query row it owns (the sequence's
// new tokens times the query heads that share the KV head: each key is loaded once for all of them),
// their softmax, and the weighted sum of the values. Tasks run on torch's intra-op threads. A long
// prefill chunk is a matrix product that SDPA does far better: it stays on the torch path. The step's new keys and values are written to their slots first, as the
// torch path does (`write_kv`), so the whole batch's K/V is in place before anyone attends.
//
// Built by `python -m pagoda.attention.cpu_kernels` (make install); registered as torch.ops.pagoda.*.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <math.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

// glibc's vector expf (libmvec), so the softmax loop vectorizes: math.h declares it only under
// -ffast-math, which would also change how the rest of this file rounds.
extern "C" float expf(float) noexcept __attribute__((simd("notinbranch")));

namespace {

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

template <typename T>
void attend(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
            const at::Tensor& query_start_loc, const at::Tensor& block_tables, const at::Tensor& seq_lens,
            double scale, int64_t window, double softcap, at::Tensor& out) {
  const int64_t num_seqs = seq_lens.size(0), num_heads = query.size(1), head_dim = query.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads;
  const T* q_base = query.data_ptr<T>();
  const T* k_base = k_cache.data_ptr<T>();
  const T* v_base = v_cache.data_ptr<T>();
  T* out_base = out.data_ptr<T>();
  const int32_t* starts = query_start_loc.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int64_t table_stride = block_tables.stride(0);
  const float cap = static_cast<float>(softcap);
  constexpr float kMasked = -std::numeric_limits<float>::infinity();

  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q, acc, scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t seq = task / num_kv_heads, kv_head = task % num_kv_heads;
      const int64_t q_start = starts[seq], q_len = starts[seq + 1] - q_start;
      const int64_t len = lens[seq], context = len - q_len;  // query i sits at position context + i
      // rows are (query i, head g of the group); the earliest query's window bounds every row's keys
      const int64_t rows = q_len * group;
      const int64_t first = window > 0 ? std::max<int64_t>(0, context - window + 1) : 0;
      const int64_t n = len - first;
      const int32_t* table = tables + seq * table_stride;
      q.resize(rows * head_dim);
      acc.assign(rows * head_dim, 0.f);
      scores.resize(rows * n);
      for (int64_t i = 0; i < q_len; ++i) {
        for (int64_t g = 0; g < group; ++g) {
          const T* row = q_base + (q_start + i) * query.stride(0) + (kv_head * group + g) * query.stride(1);
          float* dst = q.data() + (i * group + g) * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) dst[d] = static_cast<float>(row[d]);
        }
      }
      for (int64_t t = first; t < len; ++t) {
        const T* key = k_base + table[t / block_size] * k_cache.stride(0) + (t % block_size) * k_cache.stride(1) +
                       kv_head * k_cache.stride(2);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t pos = context + r / group;
          if (t > pos || (window > 0 && t <= pos - window)) {  // causal, and the sliding window
            scores[r * n + (t - first)] = kMasked;
            continue;
          }
          const float* qr = q.data() + r * head_dim;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < head_dim; ++d) dot += qr[d] * static_cast<float>(key[d]);
          scores[r * n + (t - first)] = dot * static_cast<float>(scale);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {  // every row sees at least its own token: the max is finite
        float* s = scores.data() + r * n;
        if (cap > 0.f) {
          for (int64_t i = 0; i < n; ++i) s[i] = cap * std::tanh(s[i] / cap);  // tanh(-inf) = -1: re-mask
        }
        const int64_t pos = context + r / group;
        float max = kMasked;
        for (int64_t i = 0; i < n; ++i) {
          const int64_t t = first + i;
          if (t > pos || (window > 0 && t <= pos - window)) s[i] = kMasked;
          max = std::max(max, s[i]);
        }
        float sum = 0.f;
        for (int64_t i = 0; i < n; ++i) {
          s[i] = expf(s[i] - max);
          sum += s[i];
        }
        const float inv = 1.f / sum;
        for (int64_t i = 0; i < n; ++i) s[i] *= inv;
      }
      for (int64_t t = first; t < len; ++t) {
        const T* value = v_base + table[t / block_size] * v_cache.stride(0) +
                         (t % block_size) * v_cache.stride(1) + kv_head * v_cache.stride(2);
        for (int64_t r = 0; r < rows; ++r) {
          const float p = scores[r * n + (t - first)];
          if (p == 0.f) continue;  // masked
          float* a = acc.data() + r * head_dim;
#pragma omp simd
          for (int64_t d = 0; d < head_dim; ++d) a[d] += p * static_cast<float>(value[d]);
        }
      }
      for (int64_t i = 0; i < q_len; ++i) {
        for (int64_t g = 0; g < group; ++g) {
          T* dst = out_base + (q_start + i) * out.stride(0) + (kv_head * group + g) * out.stride(1);
          const float* a = acc.data() + (i * group + g) * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) dst[d] = static_cast<T>(a[d]);
        }
      }
    }
  });
}

void check(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& k_cache,
           const at::Tensor& v_cache, const at::Tensor& slot_mapping, const at::Tensor& query_start_loc,
           const at::Tensor& block_tables, const at::Tensor& seq_lens) {
  for (const at::Tensor* t : {&query, &key, &value, &k_cache, &v_cache}) {
    TORCH_CHECK(t->device().is_cpu(), "paged_decode_attention runs on the CPU");
    TORCH_CHECK(t->scalar_type() == k_cache.scalar_type(), "query, key, value and the caches share a dtype");
    TORCH_CHECK(t->stride(-1) == 1, "the head dimension must be contiguous");
  }
  TORCH_CHECK(query.dim() == 3 && key.dim() == 3 && k_cache.dim() == 4, "query/key/value [N, H, D], caches [B, S, Hkv, D]");
  TORCH_CHECK(query.size(1) % k_cache.size(2) == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(key.size(0) == query.size(0) && slot_mapping.size(0) == query.size(0), "a key and a slot per query");
  TORCH_CHECK(query_start_loc.size(0) == seq_lens.size(0) + 1 && block_tables.size(0) == seq_lens.size(0),
              "query_start_loc, block_tables and seq_lens describe the same sequences");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong, "slot_mapping is int64");
  TORCH_CHECK(query_start_loc.scalar_type() == at::kInt && block_tables.scalar_type() == at::kInt &&
                  seq_lens.scalar_type() == at::kInt,
              "query_start_loc, block_tables and seq_lens are int32");
  TORCH_CHECK(block_tables.stride(1) == 1 && seq_lens.is_contiguous() && slot_mapping.is_contiguous() &&
                  query_start_loc.is_contiguous(),
              "block_tables rows, seq_lens, query_start_loc and slot_mapping must be contiguous");
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
    attend<scalar_t>(query, k_cache, v_cache, query_start_loc, block_tables, seq_lens, scale, window, softcap, out);
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
