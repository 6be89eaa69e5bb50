// Paged decode attention's inner loops, shared by the paged_decode_attention op and the fused decode step: one
// query token per sequence, K/V read in place through the block table (no gather into a padded copy), the query
// heads of a kv head together (they re-read the K/V rows the first one pulled into cache), softmax and sums in
// float32.
//
// Cache layout: [num_kv_heads, num_blocks, block_size, head_dim] per layer, float32 / bfloat16 / float16.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KVS_ATTENTION_AVX2 1
#endif
#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace kvs {

// exp for the softmax weights with arithmetic only, so the loop over a sequence's scores vectorises (std::exp
// does not without -ffast-math). Cephes' expf: a power-of-two range reduction and a degree-6 polynomial, within
// 2 ulp of std::exp for x <= 88; x below -87 underflows to 0.
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

// The first key a query at context length ctx attends to (a sliding window drops the older ones).
inline int64_t first_key(int64_t ctx, int64_t sliding_window) {
  return sliding_window > 0 ? std::max<int64_t>(0, ctx - sliding_window) : 0;
}

// Where one sequence's K or V rows live: its block table and one kv head's slice of the cache.
template <typename cache_t>
struct PagedRows {
  const cache_t* cache;  // this layer's [num_kv_heads, num_blocks, block_size, head_dim]
  const int64_t* table;  // the sequence's block table
  int64_t kv_head, num_blocks, block_size;
};

// Prefetch bytes [begin, end) into the caches.
inline void prefetch_bytes(const void* begin, const void* end) {
  for (const char* p = static_cast<const char*>(begin); p < static_cast<const char*>(end); p += 64)
    __builtin_prefetch(p, 0, 3);
}

#ifdef KVS_ATTENTION_AVX2
// fast_exp on 8 lanes, the same steps.
inline __m256 fast_exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(y, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

// out[t] = scale * dot(q, rows[t]) for the n rows of a row-major [n, HD] block.
template <int HD>
inline void dot_rows(const float* q, const float* rows, int64_t n, float scale, float* out) {
  int64_t t = 0;
#ifdef KVS_ATTENTION_AVX2
  // Four rows at a time: four independent accumulator chains, summed across lanes together.
  for (; t + 4 <= n; t += 4) {
    const float* r = rows + t * HD;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (int c = 0; c < HD; c += 8) {
      const __m256 qc = _mm256_loadu_ps(q + c);
      a0 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(r + c), a0);
      a1 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(r + HD + c), a1);
      a2 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(r + 2 * HD + c), a2);
      a3 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(r + 3 * HD + c), a3);
    }
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    const __m128 sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    _mm_storeu_ps(out + t, _mm_mul_ps(sums, _mm_set1_ps(scale)));
  }
  for (; t < n; ++t) {
    __m256 a = _mm256_setzero_ps();
    for (int c = 0; c < HD; c += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), _mm256_loadu_ps(rows + t * HD + c), a);
    out[t] = hsum(a) * scale;
  }
#else
  for (; t < n; ++t) {
    float dot = 0.f;
    for (int d = 0; d < HD; ++d) dot += q[d] * rows[t * HD + d];
    out[t] = dot * scale;
  }
#endif
}

// a[HD] += sum over t of w[t] * rows[t], for the n rows of a row-major [n, HD] block.
template <int HD>
inline void accumulate_rows(const float* w, const float* rows, int64_t n, float* a) {
#ifdef KVS_ATTENTION_AVX2
  constexpr int V = HD / 8 < 8 ? HD / 8 : 8;  // vectors of a held in registers at a time
  for (int c0 = 0; c0 < HD; c0 += 8 * V) {
    __m256 acc[V];
    for (int i = 0; i < V; ++i) acc[i] = _mm256_loadu_ps(a + c0 + 8 * i);
    for (int64_t t = 0; t < n; ++t) {
      const __m256 wt = _mm256_set1_ps(w[t]);
      const float* r = rows + t * HD + c0;
      for (int i = 0; i < V; ++i) acc[i] = _mm256_fmadd_ps(wt, _mm256_loadu_ps(r + 8 * i), acc[i]);
    }
    for (int i = 0; i < V; ++i) _mm256_storeu_ps(a + c0 + 8 * i, acc[i]);
  }
#else
  for (int64_t t = 0; t < n; ++t)
    for (int d = 0; d < HD; ++d) a[d] += w[t] * rows[t * HD + d];
#endif
}

// sc[j] = exp(sc[j] - max) for j < n; returns (max, the sum of the new sc).
inline std::pair<float, float> softmax_weights(float* sc, int64_t n) {
  int64_t j = 0;
  float mx = -std::numeric_limits<float>::infinity(), sum = 0.f;
#ifdef KVS_ATTENTION_AVX2
  __m256 vmax = _mm256_set1_ps(mx);
  for (; j + 8 <= n; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(sc + j));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  mx = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
#endif
  for (; j < n; ++j) mx = std::max(mx, sc[j]);
  j = 0;
#ifdef KVS_ATTENTION_AVX2
  const __m256 vmx = _mm256_set1_ps(mx);
  __m256 vsum = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const __m256 e = fast_exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + j), vmx));
    _mm256_storeu_ps(sc + j, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  sum = hsum(vsum);
#endif
  for (; j < n; ++j) {
    sc[j] = fast_exp(sc[j] - mx);
    sum += sc[j];
  }
  return {mx, sum};
}

// The rows lo <= t < hi of one block of a cache as float32 [hi - lo, HD]: a pointer into the cache when it holds
// float32, else converted into buf.
template <typename cache_t, int HD>
inline const float* block_rows(const cache_t* block, int64_t lo, int64_t hi, std::vector<float>& buf) {
  if constexpr (std::is_same_v<cache_t, float>) {
    return block + lo * HD;
  } else {
    const int64_t n = (hi - lo) * HD;
    if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
    int64_t i = 0;
#if defined(__F16C__)
    // float16 (the KV of weights kept quantized on the CPU): eight at a time in hardware. c10::Half's scalar
    // conversion does not vectorise, and it made a 64-sequence decode step 12% slower than float32 KV.
    if constexpr (std::is_same_v<cache_t, c10::Half>) {
      const auto* src = reinterpret_cast<const __m128i*>(block + lo * HD);
      for (; i + 8 <= n; i += 8) _mm256_storeu_ps(buf.data() + i, _mm256_cvtph_ps(_mm_loadu_si128(src + i / 8)));
    }
#endif
    for (; i < n; ++i) buf[i] = static_cast<float>(block[lo * HD + i]);
    return buf.data();
  }
}

// The `group` query heads q [group, HD] that share one kv head, over that head's keys k0 <= key < k1 of one
// sequence, softmax not yet normalised: for each query head g, m[g] = its largest score, l[g] = the sum of
// exp(score - m[g]) and acc[g * HD ..] = the sum of exp(score - m[g]) * v. scores: room for group * (k1 - k0)
// floats.
//
// Block by block, each block's rows serving every query head of the group while they sit in L1. The cache rows
// of a decode step are cold (the step streams far more weights than the caches hold): the next block's K rows
// and this block's V rows are prefetched ahead.
template <typename cache_t, int HD>
void attend_keys(const float* q, int64_t group, const PagedRows<cache_t>& k_rows, const PagedRows<cache_t>& v_rows,
                 int64_t k0, int64_t k1, float scale, float* scores, float* m, float* l, float* acc) {
  thread_local std::vector<float> buf;  // 16-bit caches: a block's rows as float32
  const int64_t n = k1 - k0, bs = k_rows.block_size;
  const int64_t b0 = k0 / bs, b1 = (k1 + bs - 1) / bs;
  // Rows lo <= t < hi of block b (of the sequence's table) are at base(b) + t * HD.
  auto base = [&](const PagedRows<cache_t>& r, int64_t b) {
    return r.cache + (r.kv_head * r.num_blocks + r.table[b]) * bs * HD;
  };
  auto lo_of = [&](int64_t b) { return std::max(k0, b * bs) - b * bs; };
  auto hi_of = [&](int64_t b) { return std::min(k1 - b * bs, bs); };
  prefetch_bytes(base(k_rows, b0) + lo_of(b0) * HD, base(k_rows, b0) + hi_of(b0) * HD);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t lo = lo_of(b), hi = hi_of(b), j0 = b * bs + lo - k0;
    if (b + 1 < b1) prefetch_bytes(base(k_rows, b + 1) + lo_of(b + 1) * HD, base(k_rows, b + 1) + hi_of(b + 1) * HD);
    prefetch_bytes(base(v_rows, b) + lo * HD, base(v_rows, b) + hi * HD);
    const float* rows = block_rows<cache_t, HD>(base(k_rows, b), lo, hi, buf);
    for (int64_t g = 0; g < group; ++g) dot_rows<HD>(q + g * HD, rows, hi - lo, scale, scores + g * n + j0);
  }
  for (int64_t g = 0; g < group; ++g) {
    std::tie(m[g], l[g]) = softmax_weights(scores + g * n, n);
    std::fill(acc + g * HD, acc + (g + 1) * HD, 0.f);
  }
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t lo = lo_of(b), hi = hi_of(b), j0 = b * bs + lo - k0;
    const float* rows = block_rows<cache_t, HD>(base(v_rows, b), lo, hi, buf);
    for (int64_t g = 0; g < group; ++g) accumulate_rows<HD>(scores + g * n + j0, rows, hi - lo, acc + g * HD);
  }
}

// The head sizes the kernels are instantiated for (a compile-time constant in them).
template <typename Fn>
inline void dispatch_head_dim(int64_t head_dim, Fn&& fn) {
  switch (head_dim) {
    case 16: fn(std::integral_constant<int, 16>{}); break;
    case 32: fn(std::integral_constant<int, 32>{}); break;
    case 64: fn(std::integral_constant<int, 64>{}); break;
    case 128: fn(std::integral_constant<int, 128>{}); break;
    default: TORCH_CHECK(false, "head_dim ", head_dim, " is not supported (16, 32, 64 or 128)");
  }
}

}  // namespace kvs
