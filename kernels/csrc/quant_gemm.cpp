// Weight-only quantized matmuls on the CPU: y[M, N] = x[M, K] @ W^T (+ bias), W kept quantized per 32 weights.
// The formats, the weight layout and the inner loops are in quant_gemm.h; this is the op that drives them.
//
// x: [M, K] float32 contiguous, K <= the weight's padded K (the tail of the last block is read as zeros).
#include "quant_gemm.h"

#include <ATen/Parallel.h>

#include <vector>

namespace {

using namespace kvs;

torch::Tensor qlinear(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                      const c10::optional<torch::Tensor>& mins, const c10::optional<torch::Tensor>& supers, int64_t N,
                      const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.device().is_cpu(),
              "x must be a contiguous float32 [M, K] CPU tensor");
  const PanelWeight w = panel_weight(codes, scales, mins, supers, "the weight");
  const int64_t NP = w.NP, NB = w.NB;
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(holds_k(w, K), "x has ", K, " columns; the weight holds ", NB * QK);
  TORCH_CHECK(N <= NP * NC && N > (NP - 1) * NC, "N = ", N, " does not match ", NP, " panels of 8 columns");
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() && bias->numel() == N,
                "bias must be contiguous float32 [N]");
  auto y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;

  // Quantized activations in scratch memory kept by the calling thread: no allocator round trips per call. It
  // keeps the largest size seen: 44 bytes per 32 values of x (a 2048-token prefill at K = 8192: 23 MB).
  thread_local std::vector<int32_t> scratch;
  const size_t need = size_t(M * NB) * (QK / 4 + 3);
  if (scratch.size() < need) scratch.resize(need);
  float* xdp = reinterpret_cast<float*>(scratch.data() + M * NB * (QK / 4));
  const QuantizedRows xr{reinterpret_cast<int8_t*>(scratch.data()), xdp, xdp + M * NB,
                         reinterpret_cast<int32_t*>(xdp + 2 * M * NB), NB};
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 65536 / (NB * QK)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) xr.quantize_row(xp + m * K, K, m);
  });

  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();

  // Work items: (panel, group of up to MT rows), panel-major so that a thread's consecutive items reuse the
  // panel from cache. Splitting rows too keeps both cores busy when N is only a panel or two.
  const int64_t groups = (M + MT - 1) / MT;
  const int64_t per_item = NC * std::min(M, MT) * NB * QK;                // multiply-adds in one item
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / per_item);  // ~64k MACs before a fork pays
  at::parallel_for(0, NP * groups, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t p = item / groups, g = item % groups;
      panel_rows(w, N, p, xr, g * MT, std::min(M, (g + 1) * MT), bp, yp, N, 0);
    }
  });
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qlinear", &qlinear, "y = x @ W^T (+ bias), W in q8g32 (mins, supers None), q4g32 (supers None) or q4k panels",
        py::arg("x"), py::arg("codes"), py::arg("scales"), py::arg("mins"), py::arg("supers"), py::arg("N"),
        py::arg("bias"));
}
