// A decode step's attention block in one call: from the fused QKV projection's output to the attention's
// output, rotating q and k in place, writing k and v into the paged cache and attending. It chains the ops
// that layers/rotary.py and layers/attention.py call one by one (pagoda::rotary_embedding_ and
// pagoda::paged_decode_attention, through the dispatcher), so it computes exactly what they compute; what it
// saves is the ~10 eager ops a layer spent between them on the Python side (slices, views, a split, three
// reshapes, the output's view), each ~1-3 us.
//
// The views into the QKV rows are made here without the dispatcher (at::from_blob over the projection's own
// memory, alive for the call): they are only read inside it.
//
// Built by `python -m pagoda.cpu_extension` with the other csrc files; registered as torch.ops.pagoda.*.

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <cstdint>
#include <utility>

namespace {

// The registered ops, looked up once (their libraries register them when this one loads), called boxed: a
// typed call must name each kernel's exact C++ parameter types, which are their files' business.
c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

// heads [rows, count, dim] of qkv's rows, starting at head `first`
at::Tensor heads_view(const at::Tensor& qkv, int64_t first, int64_t count, int64_t dim) {
  auto* base = static_cast<char*>(qkv.data_ptr()) + first * dim * qkv.element_size();
  return at::from_blob(base, {qkv.size(0), count, dim}, {qkv.stride(0), dim, 1}, qkv.options());
}

// qkv [N, (H + 2 Hkv) * D] (q heads, k heads, v heads; contiguous rows) -> attention output [N, H * D].
// q and k of qkv are rotated in place by cos / signed_sin [N, 1, R] (layers/rotary.py's tables, R <= D);
// the caches [blocks, block_size, Hkv, D] give Hkv and D; the rest is paged_decode_attention's.
at::Tensor rope_paged_decode_attention(at::Tensor qkv, const at::Tensor& cos, const at::Tensor& signed_sin,
                                       at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slot_mapping,
                                       const at::Tensor& query_start_loc, const at::Tensor& block_tables,
                                       const at::Tensor& seq_lens, int64_t num_heads, double scale,
                                       int64_t window, double softcap) {
  TORCH_CHECK(k_cache.dim() == 4, "rope_paged_decode_attention: caches [blocks, block_size, Hkv, D]");
  const int64_t num_kv_heads = k_cache.size(2), head_dim = k_cache.size(3);
  TORCH_CHECK(qkv.device().is_cpu() && qkv.dim() == 2 && qkv.stride(1) == 1 &&
                  qkv.size(1) == (num_heads + 2 * num_kv_heads) * head_dim,
              "rope_paged_decode_attention: qkv [N, (H + 2 Hkv) * D] with contiguous rows");
  at::Tensor qk = heads_view(qkv, 0, num_heads + num_kv_heads, head_dim);
  static const c10::OperatorHandle rotary = op("pagoda::rotary_embedding_");
  static const c10::OperatorHandle attention = op("pagoda::paged_decode_attention");
  torch::jit::Stack stack{qk, cos, signed_sin};
  rotary.callBoxed(stack);
  const at::Tensor query = heads_view(qkv, 0, num_heads, head_dim);
  const at::Tensor key = heads_view(qkv, num_heads, num_kv_heads, head_dim);
  const at::Tensor value = heads_view(qkv, num_heads + num_kv_heads, num_kv_heads, head_dim);
  stack = {query, key, value, k_cache, v_cache, slot_mapping, query_start_loc, block_tables, seq_lens, scale,
           window, softcap};
  attention.callBoxed(stack);
  const at::Tensor out = std::move(stack.at(0)).toTensor();
  TORCH_CHECK(out.is_contiguous(), "rope_paged_decode_attention: a contiguous attention output");
  // [N, H, D] as the output projection's rows [N, H * D]: the same memory, kept alive by the view's deleter
  return at::from_blob(
      out.data_ptr(), {out.size(0), num_heads * head_dim}, [keep = out](void*) mutable { keep.reset(); },
      out.options());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pagoda, m) {
  m.def(
      "rope_paged_decode_attention(Tensor(a!) qkv, Tensor cos, Tensor signed_sin, Tensor(b!) k_cache, "
      "Tensor(c!) v_cache, Tensor slot_mapping, Tensor query_start_loc, Tensor block_tables, Tensor seq_lens, "
      "int num_heads, float scale, int window, float softcap) -> Tensor");
}

TORCH_LIBRARY_IMPL(pagoda, CPU, m) { m.impl("rope_paged_decode_attention", &rope_paged_decode_attention); }
