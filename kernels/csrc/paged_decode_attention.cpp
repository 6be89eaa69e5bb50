// Paged attention for decode on the CPU (the loops are in paged_decode_attention.h): one query token per
// sequence, K/V read in place through the block table, grouped-query heads, softmax and sums in float32.
//
// q:            [num_seqs, num_heads, head_dim] float32, contiguous
// k_cache:      [num_kv_heads, num_blocks, block_size, head_dim] float32 / bfloat16 / float16, contiguous
// v_cache:      same as k_cache
// block_tables: [num_seqs, max_blocks] int64
// context_lens: [num_seqs] int64 (keys per sequence, the new token included)
// returns       [num_seqs, num_heads, head_dim] float32
#include "paged_decode_attention.h"

#include <ATen/Parallel.h>

#include <vector>

namespace {

template <typename cache_t, int HD>
void decode_kernel(const float* q, const cache_t* k_cache, const cache_t* v_cache, const int64_t* block_tables,
                   const int64_t* context_lens, float* out, int64_t num_seqs, int64_t num_heads,
                   int64_t num_kv_heads, int64_t num_blocks, int64_t block_size, int64_t max_blocks, float scale,
                   int64_t sliding_window) {
  const int64_t group = num_heads / num_kv_heads;
  int64_t longest = 0;
  for (int64_t s = 0; s < num_seqs; ++s) longest = std::max(longest, context_lens[s]);
  // One work item per (sequence, kv head): its query heads' scores, an exact softmax, the weighted sum of V.
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(longest * group), m(group), l(group), acc(group * HD);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / num_kv_heads, h = item % num_kv_heads;
      const int64_t ctx = context_lens[s];
      const int64_t* table = block_tables + s * max_blocks;
      const kvs::PagedRows<cache_t> k_rows{k_cache, table, h, num_blocks, block_size};
      const kvs::PagedRows<cache_t> v_rows{v_cache, table, h, num_blocks, block_size};
      const float* qs = q + (s * num_heads + h * group) * HD;
      kvs::attend_keys<cache_t, HD>(qs, group, k_rows, v_rows, kvs::first_key(ctx, sliding_window), ctx, scale,
                                    scores.data(), m.data(), l.data(), acc.data());
      float* o = out + (s * num_heads + h * group) * HD;
      for (int64_t g = 0; g < group; ++g) {
        const float inv = 1.f / l[g];
        for (int d = 0; d < HD; ++d) o[g * HD + d] = acc[g * HD + d] * inv;
      }
    }
  });
}

torch::Tensor paged_decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache,
                                     const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                                     const torch::Tensor& context_lens, double scale, int64_t sliding_window) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat32 && q.is_contiguous(),
              "q must be a contiguous float32 [num_seqs, num_heads, head_dim] tensor");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == v_cache.scalar_type(),
              "k_cache and v_cache must be contiguous [kv_heads, num_blocks, block_size, head_dim] tensors alike");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 && block_tables.is_contiguous() &&
              block_tables.dim() == 2 && block_tables.size(0) == q.size(0),
              "block_tables must be a contiguous int64 [num_seqs, max_blocks] tensor");
  TORCH_CHECK(context_lens.scalar_type() == torch::kInt64 && context_lens.numel() == q.size(0),
              "context_lens must be int64 [num_seqs]");
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu() &&
              block_tables.device().is_cpu() && context_lens.device().is_cpu(), "every tensor must be on the CPU");
  const int64_t num_kv_heads = k_cache.size(0), head_dim = k_cache.size(3);
  TORCH_CHECK(q.size(2) == head_dim && q.size(1) % num_kv_heads == 0, "q's heads/head_dim do not match the cache");
  auto out = torch::empty_like(q);
  if (q.size(0) == 0) return out;
  const auto lens = context_lens.contiguous();
  TORCH_CHECK(lens.min().item<int64_t>() >= 1, "every context_len must be >= 1");
  TORCH_CHECK(block_tables.size(1) * k_cache.size(2) >= lens.max().item<int64_t>(),
              "block_tables are too short for context_lens");
  // Padding entries are 0, so every entry (used or not) must name a block of the cache.
  TORCH_CHECK(block_tables.min().item<int64_t>() >= 0 && block_tables.max().item<int64_t>() < k_cache.size(1),
              "block_tables name blocks outside the cache");
  AT_DISPATCH_FLOATING_TYPES_AND2(torch::kBFloat16, torch::kHalf, k_cache.scalar_type(), "paged_decode", [&] {
    kvs::dispatch_head_dim(head_dim, [&](auto head_dim_constant) {
      constexpr int HD = decltype(head_dim_constant)::value;
      decode_kernel<scalar_t, HD>(q.data_ptr<float>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                                  block_tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<float>(),
                                  q.size(0), q.size(1), num_kv_heads, k_cache.size(1), k_cache.size(2),
                                  block_tables.size(1), static_cast<float>(scale), sliding_window);
    });
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "Paged decode attention (CPU)");
}
