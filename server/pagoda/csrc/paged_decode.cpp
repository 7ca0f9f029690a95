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
// Built by `python -m pagoda.cpu_extension` (make install); registered as torch.ops.pagoda.*.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <math.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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

// Keys scored per pass: their dot products with one query row accumulate in kTokens independent vectors of
// 16 lanes, one horizontal sum each at the end; one dot at a time was bound by each sum's latency.
constexpr int64_t kTokens = 8;
constexpr int64_t kLanes = 16;

// out[j] = q . keys[j] for j < m. keys holds kTokens rows of head_dim floats; rows past m hold whatever
// the last pass left (their dots are computed, so the loops have fixed trip counts, and dropped).
inline void dots(const float* q, const float* keys, int64_t head_dim, int64_t m, float* out) {
  float acc[kTokens][kLanes] = {};
  const int64_t whole = head_dim - head_dim % kLanes;
  for (int64_t c = 0; c < whole; c += kLanes) {
    for (int64_t j = 0; j < kTokens; ++j) {
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) acc[j][l] += q[c + l] * keys[j * head_dim + c + l];
    }
  }
  for (int64_t j = 0; j < m; ++j) {
    float sum = 0.f;
    for (int64_t d = whole; d < head_dim; ++d) sum += q[d] * keys[j * head_dim + d];
#pragma omp simd reduction(+ : sum)
    for (int64_t l = 0; l < kLanes; ++l) sum += acc[j][l];
    out[j] = sum;
  }
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
  const float cap = static_cast<float>(softcap);
  constexpr float kMasked = -std::numeric_limits<float>::infinity();

  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q, acc, scores, keys(kTokens * head_dim, 0.f);
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
          const T* row = q_base + (q_start + i) * q_token_stride + (kv_head * group + g) * q_head_stride;
          float* dst = q.data() + (i * group + g) * head_dim;
          to_float(row, dst, head_dim);
        }
      }
      for (int64_t t0 = first; t0 < len; t0 += kTokens) {
        const int64_t m = std::min<int64_t>(kTokens, len - t0);
        for (int64_t j = 0; j < m; ++j) {  // the next keys in float32, each loaded once for every row
          to_float(k_pages.at(table, t0 + j, kv_head), keys.data() + j * head_dim, head_dim);
        }
        for (int64_t r = 0; r < rows; ++r) {
          dots(q.data() + r * head_dim, keys.data(), head_dim, m, scores.data() + r * n + (t0 - first));
        }
      }
      for (int64_t r = 0; r < rows; ++r) {  // every row sees at least its own token: the max is finite
        float* s = scores.data() + r * n;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) s[i] *= static_cast<float>(scale);
        if (cap > 0.f) {
          for (int64_t i = 0; i < n; ++i) s[i] = cap * std::tanh(s[i] / cap);
        }
        // the keys this row may not see: after its own position (causal), before its window
        const int64_t pos = context + r / group;
        const int64_t visible_from = window > 0 ? std::max<int64_t>(first, pos - window + 1) : first;
        std::fill(s, s + (visible_from - first), kMasked);
        std::fill(s + (pos + 1 - first), s + n, kMasked);
        const float max = *std::max_element(s, s + n);
        float sum = 0.f;
        for (int64_t i = 0; i < n; ++i) {
          s[i] = expf(s[i] - max);
          sum += s[i];
        }
        const float inv = 1.f / sum;
        for (int64_t i = 0; i < n; ++i) s[i] *= inv;
      }
      for (int64_t t = first; t < len; ++t) {
        to_float(v_pages.at(table, t, kv_head), keys.data(), head_dim);  // (the keys' buffer, free now)
        const float* value = keys.data();
        for (int64_t r = 0; r < rows; ++r) {
          const float p = scores[r * n + (t - first)];
          if (p == 0.f) continue;  // masked
          float* a = acc.data() + r * head_dim;
#pragma omp simd
          for (int64_t d = 0; d < head_dim; ++d) a[d] += p * value[d];
        }
      }
      for (int64_t i = 0; i < q_len; ++i) {
        for (int64_t g = 0; g < group; ++g) {
          T* dst = out_base + (q_start + i) * out_token_stride + (kv_head * group + g) * out_head_stride;
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
  TORCH_CHECK((k_cache.size(1) & (k_cache.size(1) - 1)) == 0, "the block size must be a power of two");
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
  // Every cache read stays inside the pool: each sequence's queries, context and blocks are consistent.
  const int32_t* starts = query_start_loc.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int64_t block_size = k_cache.size(1), num_blocks = k_cache.size(0), width = block_tables.size(1);
  TORCH_CHECK(starts[0] == 0 && starts[seq_lens.size(0)] == query.size(0), "query_start_loc must span the queries");
  for (int64_t i = 0; i < seq_lens.size(0); ++i) {
    const int64_t q_len = starts[i + 1] - starts[i], used = (lens[i] + block_size - 1) / block_size;
    TORCH_CHECK(q_len >= 1 && lens[i] >= q_len && used <= width, "sequence ", i, ": inconsistent lengths");
    for (int64_t b = 0; b < used; ++b) {
      const int32_t block = tables[i * block_tables.stride(0) + b];
      TORCH_CHECK(block >= 0 && block < num_blocks, "sequence ", i, ": block ", block, " outside the cache");
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
