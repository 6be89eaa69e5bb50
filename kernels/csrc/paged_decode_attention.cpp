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
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

// exp for the softmax weights with arithmetic only, so the loop over a sequence's scores vectorises (std::exp
// does not without -ffast-math). Cephes' expf: a power-of-two range reduction and a degree-6 polynomial, within
// 2 ulp of std::exp for the x <= 0 a softmax sees; x below -87 underflows to 0.
inline float fast_exp(float x) {
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return y * two_n;
}

// A cache row of HD values as float32: a pointer straight into the cache when it already holds float32.
template <typename cache_t, int HD>
inline const float* load_row(const cache_t* src, float* dst) {
  if constexpr (std::is_same_v<cache_t, float>) {
    return src;
  } else {
    for (int d = 0; d < HD; ++d) dst[d] = static_cast<float>(src[d]);
    return dst;
  }
}

// head_dim is a template parameter so that a query, a row and an accumulator each fit in vector registers.
template <typename cache_t, int HD>
void decode_kernel(const float* q, const cache_t* k_cache, const cache_t* v_cache, const int64_t* block_tables,
                   const int64_t* context_lens, float* out, int64_t num_seqs, int64_t num_heads,
                   int64_t num_kv_heads, int64_t num_blocks, int64_t block_size, int64_t max_blocks, float scale,
                   int64_t sliding_window) {
  const int64_t group = num_heads / num_kv_heads;
  int64_t longest = 0;
  for (int64_t s = 0; s < num_seqs; ++s) longest = std::max(longest, context_lens[s]);
  // One work item per (sequence, kv head). For each of its query heads: all scores, an exact softmax, then
  // the weighted sum of V. The query heads after the first re-read K/V rows that the first pulled into cache.
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(longest);
    alignas(64) float row[HD];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / num_kv_heads, h = item % num_kv_heads;
      const int64_t ctx = context_lens[s];
      const int64_t first = sliding_window > 0 ? std::max<int64_t>(0, ctx - sliding_window) : 0;
      const int64_t n = ctx - first;
      const int64_t* table = block_tables + s * max_blocks;
      auto for_each_row = [&](const cache_t* cache, auto&& fn) {
        int64_t j = 0;
        for (int64_t b = first / block_size; b * block_size < ctx; ++b) {
          const int64_t lo = std::max(first, b * block_size) - b * block_size;
          const int64_t hi = std::min(ctx - b * block_size, block_size);
          const cache_t* base = cache + (h * num_blocks + table[b]) * block_size * HD;
          for (int64_t t = lo; t < hi; ++t) fn(j++, load_row<cache_t, HD>(base + t * HD, row));
        }
      };
      for (int64_t g = 0; g < group; ++g) {
        const int64_t head = h * group + g;
        alignas(64) float qg[HD];
        for (int d = 0; d < HD; ++d) qg[d] = q[(s * num_heads + head) * HD + d] * scale;
        float* sc = scores.data();
        for_each_row(k_cache, [&](int64_t j, const float* kr) {
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int d = 0; d < HD; ++d) dot += qg[d] * kr[d];
          sc[j] = dot;
        });
        const float mx = *std::max_element(sc, sc + n);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < n; ++j) {
          sc[j] = fast_exp(sc[j] - mx);
          sum += sc[j];
        }
        alignas(64) float acc[HD] = {};
        for_each_row(v_cache, [&](int64_t j, const float* vr) {
          const float w = sc[j];
#pragma omp simd
          for (int d = 0; d < HD; ++d) acc[d] += w * vr[d];
        });
        const float inv = 1.f / sum;
        float* o = out + (s * num_heads + head) * HD;
        for (int d = 0; d < HD; ++d) o[d] = acc[d] * inv;
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
    auto run = [&](auto head_dim_constant) {
      constexpr int HD = decltype(head_dim_constant)::value;
      decode_kernel<scalar_t, HD>(q.data_ptr<float>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                                  block_tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<float>(),
                                  q.size(0), q.size(1), num_kv_heads, k_cache.size(1), k_cache.size(2),
                                  block_tables.size(1), static_cast<float>(scale), sliding_window);
    };
    switch (head_dim) {
      case 16: run(std::integral_constant<int, 16>{}); break;
      case 32: run(std::integral_constant<int, 32>{}); break;
      case 64: run(std::integral_constant<int, 64>{}); break;
      case 128: run(std::integral_constant<int, 128>{}); break;
      default: TORCH_CHECK(false, "head_dim ", head_dim, " is not supported (16, 32, 64 or 128)");
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "Paged decode attention (CPU)");
}
