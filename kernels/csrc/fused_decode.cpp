// The fused decode step on the CPU: every decoder layer of a decode-only step (each row one query token, any
// number of rows) in one call, the CPU's counterpart of the GPU's CUDA graphs. In eager mode a layer is ~40 torch
// ops launched from Python, and at batch 1 on a small model launching them costs more than the arithmetic.
//
// Per layer: input RMSNorm with the residual add fused, the q/k/v projection (+ biases), q/k RMSNorm (Qwen3),
// rotary (neox layout, from the model's cos|sin table), the K/V written into the paged cache at each row's slot,
// paged decode attention (GQA, sliding window), the o projection, the post-attention RMSNorm with the residual,
// the gate/up projection, silu(gate) * up, the down projection. It returns what the eager forward returns: the
// last layer's output plus the residual, before the final norm.
//
// Weights: kept quantized (q8g32 / q4g32, the panel layout of quant_gemm.h, one or several parts per projection)
// or float32 [in, out]. The quantized matmuls are quant_gemm.h's (activations quantized to int8 per 32, as the
// eager qlinear does), the attention is paged_decode_attention.h's, so the two paths agree to float rounding.
//
// Threads: one OpenMP parallel region for the whole step; each phase is a worksharing loop whose implicit barrier
// ends it (about ten barriers a layer), instead of a fork and join per op.
#include "paged_decode_attention.h"
#include "quant_gemm.h"

#include <ATen/Parallel.h>
#include <omp.h>

#include <limits>
#include <tuple>
#include <vector>

namespace {

using namespace kvs;

// (codes, scales, mins, supers, N): a QuantizedWeight's tensors (kernels/quant.py) and its out_features.
using PartSpec = std::tuple<torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>, c10::optional<torch::Tensor>,
                            int64_t>;
// (quantized parts in output order, float32 [in, out] weight, float32 [out] bias): parts or weight, not both.
using ProjSpec = std::tuple<std::vector<PartSpec>, c10::optional<torch::Tensor>, c10::optional<torch::Tensor>>;

// A run of output columns kept quantized.
struct QPart {
  std::vector<torch::Tensor> held;  // the weight's tensors, held so that w's pointers stay valid
  PanelWeight w;
  int64_t N = 0, col0 = 0, first_panel = 0;
};

QPart make_part(const PartSpec& spec, int64_t K, const std::string& what) {
  const auto& [codes, scales, mins, supers, N] = spec;
  QPart p;
  p.w = panel_weight(codes, scales, mins, supers, what);
  TORCH_CHECK(p.w.NB == (K + QK - 1) / QK, what, ": codes hold ", p.w.NB * QK, " inputs, expected ", K);
  TORCH_CHECK(N <= p.w.NP * NC && N > (p.w.NP - 1) * NC, what, ": N = ", N, " does not match ", p.w.NP, " panels");
  for (const auto& t : {c10::optional<torch::Tensor>(codes), c10::optional<torch::Tensor>(scales), mins, supers})
    if (t.has_value()) p.held.push_back(*t);
  p.N = N;
  return p;
}

torch::Tensor checked_f32(const torch::Tensor& t, torch::IntArrayRef shape, const std::string& what) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.device().is_cpu() && t.sizes() == shape,
              what, " must be a contiguous float32 CPU tensor of shape ", shape, ", got ", t.sizes());
  return t;
}

// One projection y[B, N] = x[B, K] @ W (+ bias).
struct Proj {
  int64_t K = 0, N = 0, NB = 0, panels = 0;
  std::vector<QPart> parts;  // quantized: consecutive runs of columns
  torch::Tensor weight, bias;
  const float* wf = nullptr;  // float32 [K, N]
  const float* bp = nullptr;

  bool quantized() const { return !parts.empty(); }
};

Proj make_proj(const ProjSpec& spec, int64_t K, int64_t N, const std::string& what) {
  const auto& [part_specs, weight, bias] = spec;
  Proj p;
  p.K = K;
  p.N = N;
  p.NB = (K + QK - 1) / QK;
  TORCH_CHECK(part_specs.empty() != !weight.has_value(), what, ": give quantized parts or a float weight");
  for (const auto& ps : part_specs) {
    QPart part = make_part(ps, K, what);
    part.col0 = p.parts.empty() ? 0 : p.parts.back().col0 + p.parts.back().N;
    part.first_panel = p.panels;
    p.panels += part.w.NP;
    p.parts.push_back(std::move(part));
  }
  if (!p.parts.empty())
    TORCH_CHECK(p.parts.back().col0 + p.parts.back().N == N, what, ": the parts hold ",
                p.parts.back().col0 + p.parts.back().N, " columns, expected ", N);
  if (weight.has_value()) {
    p.weight = checked_f32(*weight, {K, N}, what + " weight");
    p.wf = p.weight.data_ptr<float>();
  }
  if (bias.has_value()) {
    p.bias = checked_f32(*bias, {N}, what + " bias");
    p.bp = p.bias.data_ptr<float>();
  }
  return p;
}

// ---- float32 matmul: a tile of 16 columns against up to RM rows ------------------------------------------------

// y[r, n0 + c] = sum_k x[r, k] * w[k, n0 + c] (+ bias[n0 + c]) for r < R, c < nc (nc <= 16); w is [K, N].
template <int R>
void f32_tile(const float* x, int64_t ldx, const float* w, int64_t K, int64_t N, int64_t n0, int64_t nc,
              const float* bias, float* y, int64_t ldy) {
#ifdef KVQ_AVX2
  if (nc == 16) {
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    const float* wk = w + n0;
    for (int64_t k = 0; k < K; ++k, wk += N) {
      const __m256 w0 = _mm256_loadu_ps(wk), w1 = _mm256_loadu_ps(wk + 8);
      for (int r = 0; r < R; ++r) {
        const __m256 xv = _mm256_set1_ps(x[r * ldx + k]);
        acc[r][0] = _mm256_fmadd_ps(xv, w0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(xv, w1, acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      if (bias != nullptr) {
        acc[r][0] = _mm256_add_ps(acc[r][0], _mm256_loadu_ps(bias + n0));
        acc[r][1] = _mm256_add_ps(acc[r][1], _mm256_loadu_ps(bias + n0 + 8));
      }
      _mm256_storeu_ps(y + r * ldy + n0, acc[r][0]);
      _mm256_storeu_ps(y + r * ldy + n0 + 8, acc[r][1]);
    }
    return;
  }
#endif
  float acc[R][16] = {};
  for (int64_t k = 0; k < K; ++k) {
    const float* wk = w + k * N + n0;
    for (int r = 0; r < R; ++r) {
      const float xv = x[r * ldx + k];
      for (int64_t c = 0; c < nc; ++c) acc[r][c] += xv * wk[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < nc; ++c) y[r * ldy + n0 + c] = acc[r][c] + (bias != nullptr ? bias[n0 + c] : 0.f);
}

void f32_rows(const Proj& p, const float* x, int64_t m0, int64_t m1, int64_t n0, float* y) {
  const int64_t nc = std::min<int64_t>(16, p.N - n0);
  for (int64_t r0 = m0; r0 < m1; r0 += RM) {
    const float* xr = x + r0 * p.K;
    float* yr = y + r0 * p.N;
    switch (std::min<int64_t>(RM, m1 - r0)) {
      case 1: f32_tile<1>(xr, p.K, p.wf, p.K, p.N, n0, nc, p.bp, yr, p.N); break;
      case 2: f32_tile<2>(xr, p.K, p.wf, p.K, p.N, n0, nc, p.bp, yr, p.N); break;
      case 3: f32_tile<3>(xr, p.K, p.wf, p.K, p.N, n0, nc, p.bp, yr, p.N); break;
      default: f32_tile<4>(xr, p.K, p.wf, p.K, p.N, n0, nc, p.bp, yr, p.N); break;
    }
  }
}

// Called by every thread of the parallel region: y[B, N] = x @ W (+ bias); x as floats [B, K], or quantized
// (xq) for a quantized projection. Ends with the worksharing loop's barrier.
void project(const Proj& p, int64_t B, const float* x, const QuantizedRows& xq, float* y) {
  const int64_t groups = (B + MT - 1) / MT;
  if (p.quantized()) {
#pragma omp for schedule(static)
    for (int64_t item = 0; item < p.panels * groups; ++item) {
      const int64_t panel = item / groups, g = item % groups;
      size_t i = 0;
      while (i + 1 < p.parts.size() && p.parts[i + 1].first_panel <= panel) ++i;
      const QPart& part = p.parts[i];
      panel_rows(part.w, part.N, panel - part.first_panel, xq, g * MT,
                 std::min(B, (g + 1) * MT), p.bp != nullptr ? p.bp + part.col0 : nullptr, y, p.N, part.col0);
    }
  } else {
    const int64_t tiles = (p.N + 15) / 16;
#pragma omp for schedule(static)
    for (int64_t item = 0; item < tiles * groups; ++item) {
      const int64_t tile = item / groups, g = item % groups;
      f32_rows(p, x, g * MT, std::min(B, (g + 1) * MT), tile * 16, y);
    }
  }
}

// ---- elementwise --------------------------------------------------------------------------------------------

// out = norm(x) * w over n values, as the eager RMSNorm: x * rsqrt(mean(x^2) + eps), then times the weight.
inline void rms_norm(const float* x, const float* w, int64_t n, float eps, float* out) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * r);
}

// Rotate one head in place, neox layout: the first rot_dim values as two halves, by cos | sin of its position.
inline void rotate(float* x, const float* cos_sin, int64_t half) {
  const float* cs = cos_sin;
  const float* sn = cos_sin + half;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half];
    x[i] = x1 * cs[i] - x2 * sn[i];
    x[i + half] = x2 * cs[i] + x1 * sn[i];
  }
}

// silu(x) = x / (1 + exp(-x)), exp's argument capped where its float result would overflow.
inline float silu(float x) { return x / (1.f + fast_exp(std::min(-x, 88.f))); }

// ---- the step -----------------------------------------------------------------------------------------------

struct Layer {
  torch::Tensor input_norm, post_norm, q_norm, k_norm;  // q_norm, k_norm undefined unless Qwen3
  Proj qkv, o, gate_up, down;
};

class DecodeStep {
 public:
  DecodeStep(int64_t hidden, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t intermediate,
             double eps, double scale, int64_t sliding_window, const torch::Tensor& cos_sin)
      : H_(hidden), NH_(num_heads), KVH_(num_kv_heads), D_(head_dim), I_(intermediate), eps_(eps),
        scale_(scale), window_(sliding_window) {
    TORCH_CHECK(NH_ % KVH_ == 0, "num_heads must be a multiple of num_kv_heads");
    kvs::dispatch_head_dim(D_, [](auto) {});
    TORCH_CHECK(cos_sin.dim() == 2 && cos_sin.size(1) % 2 == 0 && cos_sin.size(1) <= D_,
                "cos_sin must be [max_positions, rot_dim] with an even rot_dim <= head_dim");
    cos_sin_ = checked_f32(cos_sin, cos_sin.sizes(), "cos_sin");
  }

  // The embedding table: float32 [vocab, hidden] (weight) or kept quantized (one part of N = vocab rows).
  void set_embedding(const c10::optional<torch::Tensor>& weight, const c10::optional<PartSpec>& quantized) {
    TORCH_CHECK(weight.has_value() != quantized.has_value(), "embedding: give a float table or a quantized one");
    if (weight.has_value()) {
      TORCH_CHECK(weight->dim() == 2, "embedding weight must be [vocab, hidden]");
      embed_f32_ = checked_f32(*weight, {weight->size(0), H_}, "embedding weight");
      vocab_ = weight->size(0);
    } else {
      embed_q_ = make_part(*quantized, H_, "embedding");
      vocab_ = embed_q_.N;
    }
  }

  void add_layer(const torch::Tensor& input_norm, const torch::Tensor& post_norm,
                 const c10::optional<torch::Tensor>& q_norm, const c10::optional<torch::Tensor>& k_norm,
                 const ProjSpec& qkv, const ProjSpec& o, const ProjSpec& gate_up, const ProjSpec& down) {
    const std::string what = "layer " + std::to_string(layers_.size());
    Layer l;
    l.input_norm = checked_f32(input_norm, {H_}, what + " input_norm");
    l.post_norm = checked_f32(post_norm, {H_}, what + " post_norm");
    TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), what, ": q_norm and k_norm come together");
    if (q_norm.has_value()) {
      l.q_norm = checked_f32(*q_norm, {D_}, what + " q_norm");
      l.k_norm = checked_f32(*k_norm, {D_}, what + " k_norm");
    }
    l.qkv = make_proj(qkv, H_, (NH_ + 2 * KVH_) * D_, what + " qkv_proj");
    l.o = make_proj(o, NH_ * D_, H_, what + " o_proj");
    l.gate_up = make_proj(gate_up, H_, 2 * I_, what + " gate_up_proj");
    l.down = make_proj(down, I_, H_, what + " down_proj");
    layers_.push_back(std::move(l));
  }

  // input_ids, positions, slot_mapping, context_lens: [B] int64; block_tables: [B, max_blocks] int64;
  // kv_cache: [2, num_layers, num_kv_heads, num_blocks, block_size, head_dim] -> hidden states [B, hidden].
  torch::Tensor run(const torch::Tensor& input_ids, const torch::Tensor& positions, const torch::Tensor& slot_mapping,
                    const torch::Tensor& block_tables, const torch::Tensor& context_lens,
                    const torch::Tensor& kv_cache) {
    TORCH_CHECK(vocab_ > 0 && !layers_.empty(), "the step has no embedding or no layers");
    const int64_t B = input_ids.numel();
    for (const auto* t : {&input_ids, &positions, &slot_mapping, &context_lens})
      TORCH_CHECK(t->scalar_type() == torch::kInt64 && t->is_contiguous() && t->dim() == 1 && t->numel() == B &&
                      t->device().is_cpu(),
                  "input_ids, positions, slot_mapping and context_lens must be contiguous int64 [B] CPU tensors");
    TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 && block_tables.is_contiguous() &&
                    block_tables.dim() == 2 && block_tables.size(0) == B && block_tables.device().is_cpu(),
                "block_tables must be a contiguous int64 [B, max_blocks] CPU tensor");
    const int64_t L = static_cast<int64_t>(layers_.size());
    TORCH_CHECK(kv_cache.dim() == 6 && kv_cache.is_contiguous() && kv_cache.device().is_cpu() &&
                    kv_cache.size(0) == 2 && kv_cache.size(1) == L && kv_cache.size(2) == KVH_ &&
                    kv_cache.size(5) == D_,
                "kv_cache must be a contiguous [2, num_layers, kv_heads, num_blocks, block_size, head_dim] tensor");
    const int64_t num_blocks = kv_cache.size(3), block_size = kv_cache.size(4), width = block_tables.size(1);
    // Every index is checked here, before any thread reads through it.
    const int64_t* ids = input_ids.data_ptr<int64_t>();
    const int64_t* pos = positions.data_ptr<int64_t>();
    const int64_t* slots = slot_mapping.data_ptr<int64_t>();
    const int64_t* lens = context_lens.data_ptr<int64_t>();
    const int64_t* tables = block_tables.data_ptr<int64_t>();
    int64_t longest = 0;
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(ids[b] >= 0 && ids[b] < vocab_, "input id ", ids[b], " is outside the vocabulary");
      TORCH_CHECK(pos[b] >= 0 && pos[b] < cos_sin_.size(0), "position ", pos[b], " is outside the rotary table");
      TORCH_CHECK(slots[b] >= 0 && slots[b] < num_blocks * block_size, "slot ", slots[b], " is outside the cache");
      TORCH_CHECK(lens[b] >= 1 && lens[b] <= width * block_size, "context_len ", lens[b],
                  " is not in [1, block_tables' width * block_size]");
      longest = std::max(longest, lens[b]);
    }
    for (int64_t i = 0; i < B * width; ++i)
      TORCH_CHECK(tables[i] >= 0 && tables[i] < num_blocks, "block_tables name blocks outside the cache");
    auto out = torch::empty({B, H_}, torch::dtype(torch::kFloat32));
    if (B == 0) return out;
    AT_DISPATCH_FLOATING_TYPES_AND2(torch::kBFloat16, torch::kHalf, kv_cache.scalar_type(), "fused_decode", [&] {
      kvs::dispatch_head_dim(D_, [&](auto head_dim_constant) {
        constexpr int HD = decltype(head_dim_constant)::value;
        run_impl<scalar_t, HD>(B, ids, pos, slots, tables, width, lens, longest, kv_cache.data_ptr<scalar_t>(),
                               num_blocks, block_size, out.data_ptr<float>());
      });
    });
    return out;
  }

 private:
  // Attention's split of each sequence's keys into chunks, so that a short batch with a long context still gives
  // every thread work: about 4 work items per thread, chunks of at least 32 keys.
  int64_t key_splits(int64_t B, int64_t longest, int threads) const {
    const int64_t items = B * KVH_;
    if (items >= 4 * threads) return 1;
    const int64_t want = (4 * threads + items - 1) / items;
    return std::max<int64_t>(1, std::min(want, longest / 32));
  }

  void embed(int64_t token, float* dst) const {
    if (embed_f32_.defined()) {
      std::memcpy(dst, embed_f32_.data_ptr<float>() + token * H_, H_ * sizeof(float));
      return;
    }
    embed_q_.w.dequantize_row(token, H_, dst);
  }

  template <typename cache_t, int HD>
  void run_impl(int64_t B, const int64_t* ids, const int64_t* pos, const int64_t* slots, const int64_t* tables,
                int64_t width, const int64_t* lens, int64_t longest, cache_t* kv, int64_t num_blocks,
                int64_t block_size, float* out) {
    const int threads = std::max(1, at::get_num_threads());
    const int64_t group = NH_ / KVH_, QKV = (NH_ + 2 * KVH_) * HD, rot_half = cos_sin_.size(1) / 2;
    const int64_t splits = key_splits(B, longest, threads);
    const int64_t max_chunk = (longest + splits - 1) / splits;
    const int64_t NBmax = (std::max({H_, NH_ * HD, I_}) + QK - 1) / QK;
    // Scratch, kept across steps (sized up only).
    grow(res_, B * H_);
    grow(h_, B * H_);
    grow(x_, B * std::max(H_, NH_ * HD));
    grow(qkv_, B * QKV);
    grow(gu_, B * 2 * I_);
    grow(act_, B * I_);
    grow(part_ml_, 2 * B * NH_ * splits);
    grow(part_acc_, B * NH_ * splits * HD);
    grow(xq_, B * NBmax * QK / 4 + 3 * B * NBmax);  // int8 codes, then d, s, qs
    scores_.resize(threads);
    for (auto& s : scores_) grow(s, max_chunk * group);
    float* xdp = reinterpret_cast<float*>(xq_.data() + B * NBmax * QK / 4);
    auto quantized = [&](int64_t K) {
      const int64_t NB = (K + QK - 1) / QK;
      return QuantizedRows{reinterpret_cast<int8_t*>(xq_.data()), xdp, xdp + B * NB,
                           reinterpret_cast<int32_t*>(xdp + 2 * B * NB), NB};
    };
    const QuantizedRows xq_h = quantized(H_), xq_o = quantized(NH_ * HD), xq_i = quantized(I_);
    float *res = res_.data(), *h = h_.data(), *x = x_.data(), *qkv = qkv_.data(), *gu = gu_.data();
    float *act = act_.data(), *part_m = part_ml_.data(), *part_l = part_m + B * NH_ * splits;
    float* part_acc = part_acc_.data();
    const float eps = static_cast<float>(eps_), scale = static_cast<float>(scale_);
    const float* cos_sin = cos_sin_.data_ptr<float>();
    const int64_t layer_stride = KVH_ * num_blocks * block_size * HD;  // one layer's K (or V) cache
    const int64_t L = static_cast<int64_t>(layers_.size());

#pragma omp parallel num_threads(threads)
    {
      const int tid = omp_get_thread_num();
      float* scores = scores_[tid].data();
#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; ++b) embed(ids[b], h + b * H_);

      for (int64_t li = 0; li < L; ++li) {
        const Layer& layer = layers_[li];
        cache_t* k_cache = kv + li * layer_stride;  // kv_cache[0, li]
        cache_t* v_cache = kv + (L + li) * layer_stride;  // kv_cache[1, li]
        // Input norm: the residual stream gains the previous layer's output first (the first layer's input is
        // the residual stream itself).
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; ++b) {
          float* r = res + b * H_;
          const float* hb = h + b * H_;
          if (li == 0) {
            std::memcpy(r, hb, H_ * sizeof(float));
          } else {
#pragma omp simd
            for (int64_t i = 0; i < H_; ++i) r[i] = hb[i] + r[i];
          }
          rms_norm(r, layer.input_norm.data_ptr<float>(), H_, eps, x + b * H_);
          if (layer.qkv.quantized()) xq_h.quantize_row(x + b * H_, H_, b);
        }
        project(layer.qkv, B, x, xq_h, qkv);
        // q/k norms, rotary, and the new K/V into the cache: one item per (row, query or kv head).
#pragma omp for schedule(static)
        for (int64_t item = 0; item < B * (NH_ + KVH_); ++item) {
          const int64_t b = item / (NH_ + KVH_), head = item % (NH_ + KVH_);
          float* v = qkv + b * QKV + head * HD;  // q head `head`, or k head `head - NH`
          const float* norm = head < NH_ ? (layer.q_norm.defined() ? layer.q_norm.data_ptr<float>() : nullptr)
                                         : (layer.k_norm.defined() ? layer.k_norm.data_ptr<float>() : nullptr);
          if (norm != nullptr) rms_norm(v, norm, HD, eps, v);
          rotate(v, cos_sin + pos[b] * 2 * rot_half, rot_half);
          if (head >= NH_) {
            const int64_t kh = head - NH_, slot = slots[b];
            const int64_t at = ((kh * num_blocks + slot / block_size) * block_size + slot % block_size) * HD;
            const float* vv = qkv + b * QKV + (NH_ + KVH_ + kh) * HD;
            for (int d = 0; d < HD; ++d) {
              k_cache[at + d] = static_cast<cache_t>(v[d]);
              v_cache[at + d] = static_cast<cache_t>(vv[d]);
            }
          }
        }
        // Attention: one item per (row, kv head, chunk of keys), each leaving its softmax partials.
#pragma omp for schedule(static)
        for (int64_t item = 0; item < B * KVH_ * splits; ++item) {
          const int64_t b = item / (KVH_ * splits), kh = item / splits % KVH_, c = item % splits;
          const int64_t ctx = lens[b], first = first_key(ctx, window_), n = ctx - first;
          const int64_t k0 = first + n * c / splits, k1 = first + n * (c + 1) / splits;
          const int64_t at = (b * NH_ + kh * group) * splits + c * group;  // partials of its group heads
          if (k0 == k1) {
            for (int64_t g = 0; g < group; ++g) part_l[at + g] = 0.f;
            continue;
          }
          const int64_t* table = tables + b * width;
          const PagedRows<cache_t> k_rows{k_cache, table, kh, num_blocks, block_size};
          const PagedRows<cache_t> v_rows{v_cache, table, kh, num_blocks, block_size};
          attend_keys<cache_t, HD>(qkv + b * QKV + kh * group * HD, group, k_rows, v_rows, k0, k1, scale, scores,
                                   part_m + at, part_l + at, part_acc + at * HD);
        }
        // Merge the chunks' partials into each row's attention output (x), quantized for the o projection.
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; ++b) {
          for (int64_t head = 0; head < NH_; ++head) {
            const int64_t kh = head / group, g = head % group;
            const int64_t at0 = (b * NH_ + kh * group) * splits + g;  // chunk c at at0 + c * group
            float* o = x + (b * NH_ + head) * HD;
            if (splits == 1) {
              const float inv = 1.f / part_l[at0];
              for (int d = 0; d < HD; ++d) o[d] = part_acc[at0 * HD + d] * inv;
              continue;
            }
            float mx = -std::numeric_limits<float>::infinity();
            for (int64_t c = 0; c < splits; ++c)
              if (part_l[at0 + c * group] > 0.f) mx = std::max(mx, part_m[at0 + c * group]);
            float sum = 0.f;
            alignas(64) float acc[HD] = {};
            for (int64_t c = 0; c < splits; ++c) {
              const int64_t at = at0 + c * group;
              if (part_l[at] == 0.f) continue;
              const float w = std::exp(part_m[at] - mx);
              sum += w * part_l[at];
              for (int d = 0; d < HD; ++d) acc[d] += w * part_acc[at * HD + d];
            }
            const float inv = 1.f / sum;
            for (int d = 0; d < HD; ++d) o[d] = acc[d] * inv;
          }
          if (layer.o.quantized()) xq_o.quantize_row(x + b * NH_ * HD, NH_ * HD, b);
        }
        project(layer.o, B, x, xq_o, h);
        // Post-attention norm, the attention output added into the residual stream first.
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; ++b) {
          float* r = res + b * H_;
          const float* hb = h + b * H_;
#pragma omp simd
          for (int64_t i = 0; i < H_; ++i) r[i] = hb[i] + r[i];
          rms_norm(r, layer.post_norm.data_ptr<float>(), H_, eps, x + b * H_);
          if (layer.gate_up.quantized()) xq_h.quantize_row(x + b * H_, H_, b);
        }
        project(layer.gate_up, B, x, xq_h, gu);
        // silu(gate) * up, 32 values (one quantization block) an item.
        const int64_t blocks = (I_ + QK - 1) / QK;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < B * blocks; ++item) {
          const int64_t b = item / blocks, blk = item % blocks;
          const float* gate = gu + b * 2 * I_;
          const float* up = gate + I_;
          float* a = act + b * I_;
          const int64_t i1 = std::min(I_, (blk + 1) * QK);
          int64_t i = blk * QK;
#ifdef KVS_ATTENTION_AVX2
          for (; i + 8 <= i1; i += 8) {
            const __m256 gv = _mm256_loadu_ps(gate + i);
            const __m256 e = fast_exp8(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), gv), _mm256_set1_ps(88.f)));
            const __m256 sv = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.f), e));
            _mm256_storeu_ps(a + i, _mm256_mul_ps(sv, _mm256_loadu_ps(up + i)));
          }
#endif
          for (; i < i1; ++i) a[i] = silu(gate[i]) * up[i];
          if (layer.down.quantized())
            quantize_blocks(a, I_, blk, blk + 1, xq_i.q + b * xq_i.NB * QK, xq_i.d + b * xq_i.NB,
                            xq_i.s + b * xq_i.NB, xq_i.qs + b * xq_i.NB);
        }
        project(layer.down, B, act, xq_i, h);
      }
#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; ++b) {
#pragma omp simd
        for (int64_t i = 0; i < H_; ++i) out[b * H_ + i] = h[b * H_ + i] + res[b * H_ + i];
      }
    }
  }

  template <typename T>
  static void grow(std::vector<T>& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  }

  const int64_t H_, NH_, KVH_, D_, I_;
  const double eps_, scale_;
  const int64_t window_;
  torch::Tensor cos_sin_;
  torch::Tensor embed_f32_;
  QPart embed_q_;
  int64_t vocab_ = 0;
  std::vector<Layer> layers_;
  std::vector<float> res_, h_, x_, qkv_, gu_, act_, part_ml_, part_acc_;
  std::vector<int32_t> xq_;
  std::vector<std::vector<float>> scores_;
};

// ---- the greedy pick ----------------------------------------------------------------------------------------

// The index of the largest of n values, the first one on ties; the first NaN if there is one (torch.argmax's
// answers). torch's argmax is a generic reduction, ~10x slower than this over a vocabulary at batch 1.
int64_t argmax_row(const float* x, int64_t n) {
  int64_t j = 0;
  float mx = -std::numeric_limits<float>::infinity();
  bool nan = false;
#ifdef KVS_ATTENTION_AVX2
  __m256 vmax = _mm256_set1_ps(mx);
  __m256 unordered = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const __m256 v = _mm256_loadu_ps(x + j);
    vmax = _mm256_max_ps(vmax, v);
    unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  nan = _mm256_movemask_ps(unordered) != 0;
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  mx = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
#endif
  for (; j < n; ++j) {
    nan = nan || std::isnan(x[j]);
    mx = std::max(mx, x[j]);
  }
  if (nan) {
    for (j = 0; !std::isnan(x[j]); ++j) {
    }
    return j;
  }
  j = 0;
#ifdef KVS_ATTENTION_AVX2
  const __m256 target = _mm256_set1_ps(mx);
  for (; j + 8 <= n; j += 8) {
    const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + j), target, _CMP_EQ_OQ));
    if (hit != 0) return j + __builtin_ctz(hit);
  }
#endif
  for (; j < n && x[j] != mx; ++j) {
  }
  return j < n ? j : 0;  // every value -inf (or n = 0): the first
}

// logits [B, V] float32 -> [B] int64, each row's argmax.
torch::Tensor argmax_rows(const torch::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == torch::kFloat32 && logits.device().is_cpu() &&
                  logits.stride(1) == 1,
              "logits must be a float32 CPU [B, V] tensor with contiguous rows");
  const int64_t B = logits.size(0), V = logits.size(1), ld = logits.stride(0);
  TORCH_CHECK(V > 0, "logits must have at least one column");
  auto out = torch::empty({B}, torch::dtype(torch::kInt64));
  const float* x = logits.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, B, std::max<int64_t>(1, 32768 / V), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) o[b] = argmax_row(x + b * ld, V);
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("argmax_rows", &argmax_rows, "each row's argmax (torch.argmax(dim=-1)'s answers)", py::arg("logits"));
  py::class_<DecodeStep>(m, "DecodeStep")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, double, int64_t, const torch::Tensor&>(),
           py::arg("hidden"), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"),
           py::arg("intermediate"), py::arg("eps"), py::arg("scale"), py::arg("sliding_window"), py::arg("cos_sin"))
      .def("set_embedding", &DecodeStep::set_embedding, py::arg("weight"), py::arg("quantized"))
      .def("add_layer", &DecodeStep::add_layer, py::arg("input_norm"), py::arg("post_norm"), py::arg("q_norm"),
           py::arg("k_norm"), py::arg("qkv"), py::arg("o"), py::arg("gate_up"), py::arg("down"))
      .def("run", &DecodeStep::run, py::arg("input_ids"), py::arg("positions"), py::arg("slot_mapping"),
           py::arg("block_tables"), py::arg("context_lens"), py::arg("kv_cache"),
           py::call_guard<py::gil_scoped_release>());
}
