// Paged attention for decode on the CPU: one query token per sequence, K/V read in place through the block
// table (no gather into a padded copy), grouped-query heads, softmax and sums in float32.
//
// q:            [num_seqs, num_heads, head_dim] float32, contiguous
// k_cache:      [num_kv_heads, num_blocks, block_size, head_dim] float32 / bfloat16 / float16, contiguous
// v_cache:      same as k_cache
// block_tables: [num_seqs, max_blocks] int64
// context_lens: [num_seqs] int64 (keys per sequence, the new token included)
// returns       [num_seqs, num_heads, head_dim] float32
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

// Loads head_dim values of the cache as float32 into dst, or points straight at them when they already are.
template <typename cache_t>
inline const float* load_row(const cache_t* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<cache_t, float>) {
    return src;
  } else {
    for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<float>(src[d]);
    return dst;
  }
}

template <typename cache_t>
void decode_kernel(const float* q, const cache_t* k_cache, const cache_t* v_cache, const int64_t* block_tables,
                   const int64_t* context_lens, float* out, int64_t num_seqs, int64_t num_heads,
                   int64_t num_kv_heads, int64_t num_blocks, int64_t block_size, int64_t head_dim,
                   int64_t max_blocks, float scale, int64_t sliding_window) {
  const int64_t group = num_heads / num_kv_heads;
  // One work item per (sequence, kv head): its query heads share every K/V row it reads, so each row is read
  // from memory once. Keys are taken a block at a time: scores for the block, one rescale of the running sums
  // (online softmax), then the block's V rows weighted into the accumulators.
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * head_dim), acc(group * head_dim), row(head_dim);
    std::vector<float> p(group * block_size), run_max(group), run_sum(group);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / num_kv_heads, h = item % num_kv_heads;
      const int64_t ctx = context_lens[s];
      const int64_t first = sliding_window > 0 ? std::max<int64_t>(0, ctx - sliding_window) : 0;
      const float* qs = q + (s * num_heads + h * group) * head_dim;
      for (int64_t i = 0; i < group * head_dim; ++i) qf[i] = qs[i] * scale;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(run_max.begin(), run_max.end(), -std::numeric_limits<float>::infinity());
      std::fill(run_sum.begin(), run_sum.end(), 0.f);
      const int64_t* table = block_tables + s * max_blocks;
      for (int64_t b = first / block_size; b * block_size < ctx; ++b) {
        const int64_t lo = std::max(first, b * block_size) - b * block_size;
        const int64_t hi = std::min(ctx - b * block_size, block_size);
        const int64_t base = (h * num_blocks + table[b]) * block_size * head_dim;
        for (int64_t t = lo; t < hi; ++t) {
          const float* kr = load_row(k_cache + base + t * head_dim, row.data(), head_dim);
          for (int64_t g = 0; g < group; ++g) {
            const float* qg = qf.data() + g * head_dim;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * kr[d];
            p[g * block_size + t] = dot;
          }
        }
        for (int64_t g = 0; g < group; ++g) {
          float* pg = p.data() + g * block_size;
          float mx = run_max[g];
          for (int64_t t = lo; t < hi; ++t) mx = std::max(mx, pg[t]);
          const float correction = std::exp(run_max[g] - mx);  // exp(-inf) = 0 on the first block
          run_max[g] = mx;
          float sum = 0.f;
          for (int64_t t = lo; t < hi; ++t) sum += (pg[t] = std::exp(pg[t] - mx));
          run_sum[g] = run_sum[g] * correction + sum;
          float* ag = acc.data() + g * head_dim;
          if (correction != 1.f) {
            for (int64_t d = 0; d < head_dim; ++d) ag[d] *= correction;
          }
        }
        for (int64_t t = lo; t < hi; ++t) {
          const float* vr = load_row(v_cache + base + t * head_dim, row.data(), head_dim);
          for (int64_t g = 0; g < group; ++g) {
            const float w = p[g * block_size + t];
            float* ag = acc.data() + g * head_dim;
#pragma omp simd
            for (int64_t d = 0; d < head_dim; ++d) ag[d] += w * vr[d];
          }
        }
      }
      float* os = out + (s * num_heads + h * group) * head_dim;
      for (int64_t g = 0; g < group; ++g) {
        const float inv = 1.f / run_sum[g];
        for (int64_t d = 0; d < head_dim; ++d) os[g * head_dim + d] = acc[g * head_dim + d] * inv;
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
  const int64_t num_kv_heads = k_cache.size(0), head_dim = k_cache.size(3);
  TORCH_CHECK(q.size(2) == head_dim && q.size(1) % num_kv_heads == 0, "q's heads/head_dim do not match the cache");
  const auto lens = context_lens.contiguous();
  TORCH_CHECK(block_tables.size(1) * k_cache.size(2) >= lens.max().item<int64_t>() || q.size(0) == 0,
              "block_tables are too short for context_lens");
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(torch::kBFloat16, torch::kHalf, k_cache.scalar_type(), "paged_decode", [&] {
    decode_kernel<scalar_t>(q.data_ptr<float>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                            block_tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<float>(),
                            q.size(0), q.size(1), num_kv_heads, k_cache.size(1), k_cache.size(2), head_dim,
                            block_tables.size(1), static_cast<float>(scale), sliding_window);
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "Paged decode attention (CPU)");
}
