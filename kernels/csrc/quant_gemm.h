// Weight-only quantized matmuls on the CPU: y[M, N] = x[M, K] @ W^T (+ bias), W kept quantized per 32 weights.
//
// The approach is llama.cpp's: each row of x is quantized to int8 per block of 32 (one float scale per block, and
// for q4g32 the block's float sum of x for the min term), then weights and activations meet in int8 dot products
// (vpmaddubsw / vpmaddwd), and each block's integer dot is scaled once in float.
// q4g32 is computed as d * (q - 8) * x + (m + 8d) * sum(x): centred codes, so the error that quantizing x brings is
// as small as q8g32's (with q in 0..15 as they are, d * q is about twice as large as w on average).
//
// Weight layout (kernels/quant.py writes it): columns in panels of 8, each panel a run of 32-weight blocks.
//   q8g32 codes  int8  [N/8, K/32, 256]: within a block, for t in 0..7, for column c in 0..7, the 4 codes
//                                        k = 4t..4t+3 of column c (32 bytes per t).
//   q4g32 codes  uint8 [N/8, K/32, 128]: for p in 0..3, for column c, for j in 0..3, one byte holding
//                                        code(k = 8p + j) in its low nibble and code(k = 8p + 4 + j) in its high one.
//   q4k codes    as q4g32's.
//   scales (d), mins (m, q4g32 only) float16 [N/8, K/32, 8]: one per column of the panel and block.
//   q4k: scales (s) and mins (t) uint8 [N/8, K/32, 8], supers float16 [N/8, K/256, 16]: D of the 8 columns, then
//        their Dm; d = D * s and m = -(Dm * t) (GGUF Q4_K's sub-block scales under its super-block ones).
//   q8g32: w = d * q (q in -128..127);  q4g32, q4k: w = d * q + m (q in 0..15).
// Why this interleave: one 32-byte vector holds 4 consecutive k of 8 columns, so multiplying it with 4 bytes of x
// broadcast to every lane leaves, after vpmaddubsw + vpmaddwd, one int32 per column: no horizontal sums, and
// each x block's scale multiplies 8 columns at once. It is the idea of llama.cpp's repacked Q4_0x8 blocks.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define KVQ_AVX2 1
// AVX512-VNNI's vpdpbusd on 256-bit vectors (AVX512VL): an int8 dot product of 4 pairs added to an int32 lane in one
// instruction, where AVX2 takes vpmaddubsw, vpmaddwd and vpaddd. Same integers either way (AVX2's int16 sums never
// saturate here), so the results are bit for bit the same; the decode step, which is about as much instructions
// as memory traffic at batch 1 on two cores, runs fewer of them.
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && !defined(KVQ_NO_VNNI)
#define KVQ_VNNI 1
#endif
#endif

namespace kvs {

constexpr int64_t QK = 32;        // weights per block (one scale)
constexpr int64_t NC = 8;         // columns per panel
constexpr int64_t Q8_BYTES = 256;  // one block of a panel: 8 columns x 32 codes
constexpr int64_t Q4_BYTES = 128;
constexpr int64_t QK_SUPER = 8;   // q4k: blocks per super-block
constexpr int RM = 4;             // rows of x per pass over a panel: each weight vector is used RM times
constexpr int64_t MT = 16;        // rows of x per work item (a panel against up to MT rows)
// Software prefetch distance into a thread's weight stream: 10-25% faster on cold weights (measured at 1 thread
// on the 576->49152 head and 8192->2048) than leaving it to the hardware prefetcher alone.
constexpr int64_t PREFETCH_BYTES = 4096;

#ifdef KVQ_AVX2
// Finish v here: without this GCC computes all R rows' products of a block first and sums them later, spilling
// them to the stack (2x slower at R = 4).
#define KVQ_SETTLE(v) asm volatile("" : "+x"(v))
#endif

inline float half_to_float(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// ---- activations --------------------------------------------------------------------------------------------

// One block of 32 floats -> 32 int8 with scale d = amax / 127 (round to nearest even, as llama.cpp's q8_0),
// the block's float sum s and the sum of its codes qs.
inline void quantize_block(const float* src, int8_t* q, float* d, float* s, int32_t* qs) {
#ifdef KVQ_AVX2
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 v[4];
  for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(src + 8 * i);
  __m256 a = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                           _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  const float amax = _mm_cvtss_f32(h);
  __m256 t = _mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3]));
  __m128 u = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
  u = _mm_add_ps(u, _mm_movehl_ps(u, u));
  u = _mm_add_ss(u, _mm_movehdup_ps(u));
  *s = _mm_cvtss_f32(u);
  *d = amax / 127.f;
  const __m256 id = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v[0], id));
  __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v[1], id));
  __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v[2], id));
  __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v[3], id));
  // packs work within 128-bit lanes: the int32 groups come out as 0a 1a 2a 3a 0b 1b 2b 3b; put them in order.
  __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
  p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), p);
  const __m256i w = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), p), _mm256_set1_epi16(1));
  __m128i z = _mm_add_epi32(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
  z = _mm_add_epi32(z, _mm_shuffle_epi32(z, 0x4E));
  z = _mm_add_epi32(z, _mm_shuffle_epi32(z, 0xB1));
  *qs = _mm_cvtsi128_si32(z);
#else
  float amax = 0.f, sum = 0.f;
  for (int j = 0; j < QK; ++j) {
    amax = std::max(amax, std::fabs(src[j]));
    sum += src[j];
  }
  *s = sum;
  *d = amax / 127.f;
  const float id = amax > 0.f ? 127.f / amax : 0.f;
  int32_t total = 0;
  for (int j = 0; j < QK; ++j) {
    q[j] = static_cast<int8_t>(std::nearbyint(src[j] * id));
    total += q[j];
  }
  *qs = total;
#endif
}

// Blocks b0 <= b < b1 of one row of x (K floats) -> xq [NB*32] int8 codes and xd, xs, xqs [NB] per block.
// Columns past K count as zeros.
inline void quantize_blocks(const float* row, int64_t K, int64_t b0, int64_t b1, int8_t* xq, float* xd, float* xs,
                            int32_t* xqs) {
  for (int64_t b = b0; b < b1; ++b) {
    if ((b + 1) * QK <= K) {
      quantize_block(row + b * QK, xq + b * QK, xd + b, xs + b, xqs + b);
    } else {
      float tail[QK] = {};
      for (int64_t k = b * QK; k < K; ++k) tail[k - b * QK] = row[k];
      quantize_block(tail, xq + b * QK, xd + b, xs + b, xqs + b);
    }
  }
}

// Quantized activations: M rows of NB blocks each.
struct QuantizedRows {
  int8_t* q;     // [M, NB*32]
  float* d;      // [M, NB]  scales
  float* s;      // [M, NB]  float sums of x per block
  int32_t* qs;   // [M, NB]  sums of the int8 codes per block
  int64_t NB;

  void quantize_row(const float* row, int64_t K, int64_t m) const {
    quantize_blocks(row, K, 0, NB, q + m * NB * QK, d + m * NB, s + m * NB, qs + m * NB);
  }
};

// ---- one panel (8 columns) against R rows of x: out[r * 8 + c] ---------------------------------------------

struct Rows {
  const int8_t* q;  // [R, NB*32]
  const float* d;   // [R, NB]
  const float* s;   // [R, NB]  float sums of x per block
  const int32_t* qs;  // [R, NB]  sums of the int8 codes per block
  int64_t NB;
};

// A 4-bit panel's d and m per block, for its 8 columns: stored (q4g32) or computed from q4k's two levels.
struct Q4G32Scales {
  const uint16_t* d;  // [NB, 8] float16
  const uint16_t* m;
  float d_at(int64_t b, int64_t c) const { return half_to_float(d[b * NC + c]); }
  float m_at(int64_t b, int64_t c) const { return half_to_float(m[b * NC + c]); }
#ifdef KVQ_AVX2
  void load(int64_t b, __m256* dv, __m256* mv) const {
    *dv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + b * NC)));
    *mv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m + b * NC)));
  }
#endif
};

struct Q4KScales {
  const uint8_t* s;        // [NB, 8]
  const uint8_t* t;        // [NB, 8]
  const uint16_t* supers;  // [NB/8, 16] float16: D x 8, then Dm x 8
  // One float32 product each, as ggml computes d = D * sc and m = dmin * m.
  float d_at(int64_t b, int64_t c) const { return half_to_float(supers[b / QK_SUPER * 2 * NC + c]) * s[b * NC + c]; }
  float m_at(int64_t b, int64_t c) const {
    return -(half_to_float(supers[b / QK_SUPER * 2 * NC + NC + c]) * t[b * NC + c]);
  }
#ifdef KVQ_AVX2
  void load(int64_t b, __m256* dv, __m256* mv) const {
    const uint16_t* sup = supers + b / QK_SUPER * 2 * NC;
    const __m256 big_d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sup)));
    const __m256 big_m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sup + NC)));
    const __m256 sv = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + b * NC))));
    const __m256 tv = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(t + b * NC))));
    *dv = _mm256_mul_ps(big_d, sv);
    *mv = _mm256_xor_ps(_mm256_mul_ps(big_m, tv), _mm256_set1_ps(-0.0f));  // -(Dm * t), exactly
  }
#endif
};

#ifdef KVQ_AVX2

template <int R>
void q8_panel(const int8_t* w, const uint16_t* wd, const Rows& x, float* out) {
  [[maybe_unused]] const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < x.NB; ++b) {
    const int8_t* wb = w + b * Q8_BYTES;
    for (int line = 0; line < Q8_BYTES; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(wb + PREFETCH_BYTES + line), _MM_HINT_T0);
    __m256i isum[R];
    for (int r = 0; r < R; ++r) isum[r] = _mm256_setzero_si256();
    // Half a block (4 vectors of 8 columns x 4 k) in registers at a time, each used by all R rows.
    for (int half = 0; half < 2; ++half) {
      __m256i wv[4], aw[4];
      for (int t = 0; t < 4; ++t) {
        wv[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 128 * half + 32 * t));
        // vpmaddubsw wants one unsigned operand: |w| times x carrying w's sign. |w| <= 128 and |x| <= 127,
        // so a pair sums to at most 32512 and never saturates.
        aw[t] = _mm256_sign_epi8(wv[t], wv[t]);
      }
      for (int r = 0; r < R; ++r) {
        const int8_t* xb = x.q + (r * x.NB + b) * QK + 16 * half;
        __m256i s = isum[r];
        for (int t = 0; t < 4; ++t) {
          const __m256i xv = _mm256_set1_epi32(load_i32(xb + 4 * t));
#ifdef KVQ_VNNI
          s = _mm256_dpbusd_epi32(s, aw[t], _mm256_sign_epi8(xv, wv[t]));
#else
          const __m256i p = _mm256_maddubs_epi16(aw[t], _mm256_sign_epi8(xv, wv[t]));
          s = _mm256_add_epi32(s, _mm256_madd_epi16(p, ones));
#endif
        }
        KVQ_SETTLE(s);
        isum[r] = s;
      }
    }
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wd + b * NC)));
    for (int r = 0; r < R; ++r) {
      const __m256 scale = _mm256_mul_ps(dw, _mm256_set1_ps(x.d[r * x.NB + b]));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), scale, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + r * NC, acc[r]);
}

template <int R, typename Scales>
void q4_panel(const uint8_t* w, const Scales& scales, const Rows& x, float* out) {
  [[maybe_unused]] const __m256i ones = _mm256_set1_epi16(1);
  const __m256i low = _mm256_set1_epi8(0x0F);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < x.NB; ++b) {
    const uint8_t* wb = w + b * Q4_BYTES;
    for (int line = 0; line < Q4_BYTES; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(wb + PREFETCH_BYTES + line), _MM_HINT_T0);
    // Codes are 0..15, so a vpmaddubsw pair is at most 2*15*127 = 3810 and the block's 8 of them add up in
    // int16 (<= 30480) before one vpmaddwd. Vector t holds k = 4t..4t+3: the low nibbles of bytes 32p.. are
    // t = 2p, the high ones t = 2p + 1.
    // The block's 8 code vectors (8 columns x 4 k each) in registers, each used by all R rows.
    __m256i wv[8];
    for (int p = 0; p < 4; ++p) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 32 * p));
      wv[2 * p] = _mm256_and_si256(raw, low);
      wv[2 * p + 1] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
    }
    __m256i isum[R];  // per row: sum over the block of q * x_q, one int32 per column
    for (int r = 0; r < R; ++r) {
      const int8_t* xb = x.q + (r * x.NB + b) * QK;
#ifdef KVQ_VNNI
      // Two accumulators: one chain of 8 dependent vpdpbusd would wait on its latency at R = 1.
      __m256i even = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wv[0], _mm256_set1_epi32(load_i32(xb)));
      __m256i odd = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wv[1], _mm256_set1_epi32(load_i32(xb + 4)));
      for (int t = 2; t < 8; t += 2) {
        even = _mm256_dpbusd_epi32(even, wv[t], _mm256_set1_epi32(load_i32(xb + 4 * t)));
        odd = _mm256_dpbusd_epi32(odd, wv[t + 1], _mm256_set1_epi32(load_i32(xb + 4 * t + 4)));
      }
      __m256i s = _mm256_add_epi32(even, odd);
#else
      __m256i s = _mm256_maddubs_epi16(wv[0], _mm256_set1_epi32(load_i32(xb)));
      for (int t = 1; t < 8; ++t)
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(wv[t], _mm256_set1_epi32(load_i32(xb + 4 * t))));
      s = _mm256_madd_epi16(s, ones);
#endif
      KVQ_SETTLE(s);
      isum[r] = s;
    }
    __m256 dw, mw;
    scales.load(b, &dw, &mw);
    const __m256 mw8 = _mm256_fmadd_ps(dw, _mm256_set1_ps(8.f), mw);  // m + 8d
    for (int r = 0; r < R; ++r) {
      const int64_t i = r * x.NB + b;
      // sum (q - 8) * x_q, exact in int32
      const __m256i idot = _mm256_sub_epi32(isum[r], _mm256_set1_epi32(8 * x.qs[i]));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(idot), _mm256_mul_ps(dw, _mm256_set1_ps(x.d[i])), acc[r]);
      acc[r] = _mm256_fmadd_ps(mw8, _mm256_set1_ps(x.s[i]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + r * NC, acc[r]);
}

#else  // portable scalar path, same arithmetic: integer dots per block, float per block

template <int R>
void q8_panel(const int8_t* w, const uint16_t* wd, const Rows& x, float* out) {
  float acc[R][NC] = {};
  for (int64_t b = 0; b < x.NB; ++b) {
    const int8_t* wb = w + b * Q8_BYTES;
    for (int r = 0; r < R; ++r) {
      const int8_t* xb = x.q + (r * x.NB + b) * QK;
      for (int c = 0; c < NC; ++c) {
        int32_t dot = 0;
        for (int t = 0; t < 8; ++t)
          for (int j = 0; j < 4; ++j) dot += int32_t(wb[32 * t + 4 * c + j]) * xb[4 * t + j];
        acc[r][c] += float(dot) * (half_to_float(wd[b * NC + c]) * x.d[r * x.NB + b]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c) out[r * NC + c] = acc[r][c];
}

template <int R, typename Scales>
void q4_panel(const uint8_t* w, const Scales& scales, const Rows& x, float* out) {
  float acc[R][NC] = {};
  for (int64_t b = 0; b < x.NB; ++b) {
    const uint8_t* wb = w + b * Q4_BYTES;
    for (int r = 0; r < R; ++r) {
      const int8_t* xb = x.q + (r * x.NB + b) * QK;
      for (int c = 0; c < NC; ++c) {
        int32_t dot = 0;
        for (int p = 0; p < 4; ++p)
          for (int j = 0; j < 4; ++j) {
            const uint8_t byte = wb[32 * p + 4 * c + j];
            dot += int32_t(byte & 0x0F) * xb[8 * p + j] + int32_t(byte >> 4) * xb[8 * p + 4 + j];
          }
        const float d = scales.d_at(b, c);
        dot -= 8 * x.qs[r * x.NB + b];
        acc[r][c] += float(dot) * (d * x.d[r * x.NB + b]);
        acc[r][c] += (scales.m_at(b, c) + 8.f * d) * x.s[r * x.NB + b];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c) out[r * NC + c] = acc[r][c];
}

#endif

// ---- a weight: its tensors checked, and its panels ---------------------------------------------------------

enum class Format { q8g32, q4g32, q4k };

// A weight in the panel layout (kernels/quant.py): pointers into tensors the caller keeps alive.
struct PanelWeight {
  Format format = Format::q8g32;
  const void* codes = nullptr;
  const void* scales = nullptr;   // float16 (q8g32, q4g32) or uint8 (q4k) [NP, NB, 8]
  const void* mins = nullptr;     // q4g32: float16, q4k: uint8 [NP, NB, 8]; q8g32: null
  const uint16_t* supers = nullptr;  // q4k: float16 [NP, NB/8, 16]
  int64_t NP = 0, NB = 0;

  const uint16_t* half(const void* p, int64_t panel) const {
    return static_cast<const uint16_t*>(p) + panel * NB * NC;
  }
  const uint8_t* byte(const void* p, int64_t panel) const { return static_cast<const uint8_t*>(p) + panel * NB * NC; }
  Q4G32Scales q4g32_scales(int64_t panel) const { return {half(scales, panel), half(mins, panel)}; }
  Q4KScales q4k_scales(int64_t panel) const {
    return {byte(scales, panel), byte(mins, panel), supers + panel * (NB / QK_SUPER) * 2 * NC};
  }

  // Row n of the weight (column c of panel n / 8), dequantized: K floats into dst (w = d * q (+ m), as the torch
  // twin computes it: d * q is exact in float32, so a fused multiply-add would round the same).
  void dequantize_row(int64_t n, int64_t K, float* dst) const {
    const int64_t p = n / NC, c = n % NC;
    for (int64_t b = 0; b * QK < K; ++b) {
      float w[QK];
      if (format == Format::q8g32) {
        const int8_t* bytes = static_cast<const int8_t*>(codes) + (p * NB + b) * Q8_BYTES;
        const float d = half_to_float(half(scales, p)[b * NC + c]);
        for (int t = 0; t < 8; ++t)
          for (int j = 0; j < 4; ++j) w[4 * t + j] = static_cast<float>(bytes[32 * t + 4 * c + j]) * d;
      } else {
        const uint8_t* bytes = static_cast<const uint8_t*>(codes) + (p * NB + b) * Q4_BYTES;
        float d, m;
        if (format == Format::q4g32) {
          const Q4G32Scales sc = q4g32_scales(p);
          d = sc.d_at(b, c), m = sc.m_at(b, c);
        } else {
          const Q4KScales sc = q4k_scales(p);
          d = sc.d_at(b, c), m = sc.m_at(b, c);
        }
        for (int pp = 0; pp < 4; ++pp)
          for (int j = 0; j < 4; ++j) {
            const uint8_t byte = bytes[32 * pp + 4 * c + j];
            w[8 * pp + j] = static_cast<float>(byte & 0x0F) * d + m;
            w[8 * pp + 4 + j] = static_cast<float>(byte >> 4) * d + m;
          }
      }
      std::memcpy(dst + b * QK, w, std::min<int64_t>(QK, K - b * QK) * sizeof(float));
    }
  }
};

// The weight's tensors as kernels/quant.py's QuantizedWeight holds them, checked; its format follows from which are
// given (supers: q4k; mins alone: q4g32; neither: q8g32). what names the weight in errors.
inline PanelWeight panel_weight(const torch::Tensor& codes, const torch::Tensor& scales,
                                const c10::optional<torch::Tensor>& mins, const c10::optional<torch::Tensor>& supers,
                                const std::string& what) {
  PanelWeight w;
  w.format = supers.has_value() ? Format::q4k : mins.has_value() ? Format::q4g32 : Format::q8g32;
  const bool q8 = w.format == Format::q8g32, q4k = w.format == Format::q4k;
  TORCH_CHECK(codes.dim() == 3 && codes.is_contiguous() && codes.device().is_cpu() &&
                  codes.size(2) == (q8 ? Q8_BYTES : Q4_BYTES) &&
                  codes.scalar_type() == (q8 ? torch::kInt8 : torch::kUInt8),
              what, ": codes must be contiguous CPU [N/8, K/32, ", q8 ? "256] int8" : "128] uint8");
  w.NP = codes.size(0), w.NB = codes.size(1);
  const auto scale_type = q4k ? torch::kUInt8 : torch::kHalf;
  const char* scale_name = q4k ? "uint8" : "float16";
  TORCH_CHECK(scales.scalar_type() == scale_type && scales.is_contiguous() &&
                  scales.sizes() == torch::IntArrayRef({w.NP, w.NB, NC}),
              what, ": scales must be contiguous ", scale_name, " [N/8, K/32, 8]");
  if (!q8)
    TORCH_CHECK(mins->scalar_type() == scale_type && mins->is_contiguous() && mins->sizes() == scales.sizes(),
                what, ": mins must be contiguous ", scale_name, " [N/8, K/32, 8]");
  if (q4k) {
    TORCH_CHECK(w.NB % QK_SUPER == 0 && supers->scalar_type() == torch::kHalf && supers->is_contiguous() &&
                    supers->sizes() == torch::IntArrayRef({w.NP, w.NB / QK_SUPER, 2 * NC}),
                what, ": supers must be contiguous float16 [N/8, K/256, 16] (K a multiple of 256)");
    w.supers = reinterpret_cast<const uint16_t*>(supers->data_ptr<at::Half>());
  }
  w.codes = codes.data_ptr();
  w.scales = scales.data_ptr();
  w.mins = q8 ? nullptr : mins->data_ptr();
  return w;
}

// Whether x's K columns fit the weight's blocks: K past the last whole block but one (q4k: super-block).
inline bool holds_k(const PanelWeight& w, int64_t K) {
  const int64_t unit = w.format == Format::q4k ? QK * QK_SUPER : QK;
  return K <= w.NB * QK && K > w.NB * QK - unit;
}

// ---- a work item: one panel against rows m0 <= m < m1 -------------------------------------------------------

// Panel p of a weight against rows m0..m1 of the quantized activations, into y (row stride ldy) at columns
// col0 + 8p.., only the first N of the weight's columns, plus bias[8p + c] when given.
inline void panel_rows(const PanelWeight& w, int64_t N, int64_t p, const QuantizedRows& x, int64_t m0, int64_t m1,
                       const float* bias, float* y, int64_t ldy, int64_t col0) {
  const int64_t NB = x.NB, n0 = p * NC, nc = std::min(NC, N - n0);
  alignas(32) float tile[RM * NC];
  for (int64_t r0 = m0; r0 < m1; r0 += RM) {
    const int64_t rows = std::min<int64_t>(RM, m1 - r0);
    const Rows xr{x.q + r0 * NB * QK, x.d + r0 * NB, x.s + r0 * NB, x.qs + r0 * NB, NB};
    auto run = [&](auto r_constant) {
      constexpr int R = decltype(r_constant)::value;
      switch (w.format) {
        case Format::q8g32:
          q8_panel<R>(static_cast<const int8_t*>(w.codes) + p * NB * Q8_BYTES, w.half(w.scales, p), xr, tile);
          break;
        case Format::q4g32:
          q4_panel<R>(static_cast<const uint8_t*>(w.codes) + p * NB * Q4_BYTES, w.q4g32_scales(p), xr, tile);
          break;
        case Format::q4k:
          q4_panel<R>(static_cast<const uint8_t*>(w.codes) + p * NB * Q4_BYTES, w.q4k_scales(p), xr, tile);
          break;
      }
    };
    switch (rows) {
      case 1: run(std::integral_constant<int, 1>{}); break;
      case 2: run(std::integral_constant<int, 2>{}); break;
      case 3: run(std::integral_constant<int, 3>{}); break;
      default: run(std::integral_constant<int, 4>{}); break;
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* dst = y + (r0 + r) * ldy + col0 + n0;
      for (int64_t c = 0; c < nc; ++c) dst[c] = tile[r * NC + c] + (bias ? bias[n0 + c] : 0.f);
    }
  }
}

}  // namespace kvs
