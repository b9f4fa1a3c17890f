// torch binding of the CUDA kernels (quant_cuda.cu): registers the CUDA implementation of
// glmctl::quant_linear (schema defined by the CPU library, quant_cpu.cpp) and a few CUDA-only
// helper ops.  Only c10/cuda headers are used (ATen/cuda/CUDAContext.h would pull in cuBLAS /
// cuSPARSE headers that a bare CUDA toolkit lacks); cuBLAS is reached through at::mm.
//
// Paths (the `path` argument; 0 = automatic):
//   1  tensor-core kernel: dequantize in registers, never materialise the weight (small m)
//   2  dequantize to x.dtype + cuBLAS (large m; bf16 uses an exact hi/lo split, see below)
//   3  CUDA-core fallback (any shape / group size / alignment / dtype)

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <Python.h>

#include <algorithm>
#include <atomic>
#include <string>

#include "quant_cuda.h"

namespace glmctl {
namespace {

// m above which the automatic choice leaves the tensor-core kernel for dequantize + cuBLAS.
// The fused kernel reads the packed weight once per 32-token block (later blocks hit L2), so
// it stays ahead of a cuBLAS call that first writes and re-reads a 16-bit copy of the weight
// until the GEMM itself dominates.  fp16 dequantizes straight to fp16 (one GEMM); bf16 needs
// the hi/lo split (a GEMM of twice the depth) to keep fp32-level accuracy, so it switches later.
// bench/gpu_check.py times both paths at m = 64..256 on the card at hand (column "auto" vs
// "fused" vs "dequant") to confirm these constants.
constexpr int64_t kFusedMaxMHalf = 64;
constexpr int64_t kFusedMaxMBf16 = 256;
constexpr int64_t kFusedMaxMSimt = 32;  // fp32 activations / unsupported layouts: CUDA-core kernel
constexpr int64_t kDequantChunkBytes = int64_t(512) << 20;

std::atomic<int> g_rt{0}, g_ks{0};

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return GLMCTL_F32;
    case at::kHalf: return GLMCTL_F16;
    case at::kBFloat16: return GLMCTL_BF16;
    default: TORCH_CHECK(false, "glmctl::quant_linear: unsupported dtype ", t);
  }
  return -1;
}

at::Tensor quant_linear_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                             const c10::optional<at::Tensor>& bias, int64_t bits, int64_t path) {
  TORCH_CHECK(bits == 4 || bits == 8, "glmctl::quant_linear: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(x.dim() >= 1, "glmctl::quant_linear: x must have at least one dimension");
  TORCH_CHECK(qweight.dim() == 2, "glmctl::quant_linear: qweight must be 2-D [n, k/2] or [n, k]");
  TORCH_CHECK(qweight.scalar_type() == at::kChar || qweight.scalar_type() == at::kByte,
              "glmctl::quant_linear: qweight must be int8, got ", qweight.scalar_type());
  TORCH_CHECK(x.is_cuda() && qweight.device() == x.device() && scale.device() == x.device(),
              "glmctl::quant_linear (CUDA): x, qweight and scale must be on the same CUDA device");
  const int xt = dtype_code(x.scalar_type());
  const int st = dtype_code(scale.scalar_type());
  const int64_t k = x.size(-1);
  const int64_t n = qweight.size(0);
  const int64_t qcols = qweight.size(1);
  TORCH_CHECK((bits == 4 ? qcols * 2 : qcols) == k, "glmctl::quant_linear: x has ", k, " input features but the INT",
              bits, " weight has ", qcols, " columns");
  TORCH_CHECK(scale.dim() == 1 || scale.dim() == 2, "glmctl::quant_linear: scale must be [n] or [n, k/G]");
  TORCH_CHECK(scale.size(0) == n, "glmctl::quant_linear: scale has ", scale.size(0), " rows, weight has ", n);
  const int64_t ng = scale.dim() == 2 ? scale.size(1) : 1;
  TORCH_CHECK(ng >= 1 && k % ng == 0, "glmctl::quant_linear: ", ng, " scale groups do not divide ", k, " columns");

  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x2d = x.reshape({-1, k}).contiguous();
  const at::Tensor qw = qweight.contiguous();
  const at::Tensor sc = scale.contiguous();
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device() == x.device(), "glmctl::quant_linear: bias must be on x's device");
    TORCH_CHECK(bias->numel() == n, "glmctl::quant_linear: bias has ", bias->numel(), " elements, expected ", n);
    b = bias->reshape({n}).contiguous();
    dtype_code(b.scalar_type());
  }
  const int64_t m = x2d.size(0);
  auto out_shape = x.sizes().vec();
  out_shape.back() = n;
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out.reshape(out_shape);
  if (k == 0) {
    if (b.defined()) out.copy_(b.unsqueeze(0).expand({m, n}));
    else out.zero_();
    return out.reshape(out_shape);
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  glmctl_qargs a;
  a.x = x2d.data_ptr();
  a.qw = reinterpret_cast<const int8_t*>(qw.data_ptr());
  a.scale = sc.data_ptr();
  a.bias = b.defined() ? b.data_ptr() : nullptr;
  a.out = out.data_ptr();
  a.m = m;
  a.n = n;
  a.k = k;
  a.ngroups = ng;
  a.bits = static_cast<int>(bits);
  a.xtype = xt;
  a.stype = st;
  a.btype = b.defined() ? dtype_code(b.scalar_type()) : GLMCTL_F32;

  const bool mma_ok = glmctl_mma_supported(&a) != 0;
  if (path == 0) {
    if (mma_ok) path = m <= (xt == GLMCTL_BF16 ? kFusedMaxMBf16 : kFusedMaxMHalf) ? 1 : 2;
    else path = m <= kFusedMaxMSimt ? 3 : 2;
  }
  TORCH_CHECK(path >= 1 && path <= 3, "glmctl::quant_linear: path must be 0..3, got ", path);
  if (path == 1 && !mma_ok) path = 3;

  if (path == 1) {
    C10_CUDA_CHECK(glmctl_launch_mma(&a, g_rt.load(), g_ks.load(), stream));
    return out.reshape(out_shape);
  }
  if (path == 3) {
    C10_CUDA_CHECK(glmctl_launch_simt(&a, stream));
    return out.reshape(out_shape);
  }

  // Dequantize + cuBLAS.  bf16: W = W_hi + W_lo (both bf16, exact to ~2^-16) and one GEMM of
  // [x, x] (m x 2k) with [W_hi, W_lo]^T, so accumulation stays fp32 inside cuBLAS.
  const bool split = xt == GLMCTL_BF16;
  const int64_t depth = split ? 2 * k : k;
  const at::Tensor xin = split ? at::cat({x2d, x2d}, 1) : x2d;
  const int64_t esize = x.element_size();
  const int64_t rows_per_chunk = std::max<int64_t>(1, std::min<int64_t>(n, kDequantChunkBytes / (depth * esize)));
  at::Tensor w = at::empty({rows_per_chunk, depth}, x.options());
  const at::Tensor bcast = b.defined() ? b.to(x.scalar_type()) : at::Tensor();
  for (int64_t r0 = 0; r0 < n; r0 += rows_per_chunk) {
    const int64_t nr = std::min(rows_per_chunk, n - r0);
    char* wp = static_cast<char*>(w.data_ptr());
    C10_CUDA_CHECK(glmctl_launch_dequant(a.qw, a.scale, st, n, k, ng, a.bits, r0, nr, wp,
                                         split ? wp + k * esize : nullptr, depth, xt, stream));
    const at::Tensor wt = w.narrow(0, 0, nr).t();
    if (nr == n) {
      if (bcast.defined()) at::addmm_out(out, bcast, xin, wt);
      else at::mm_out(out, xin, wt);
    } else {
      at::Tensor y = bcast.defined() ? at::addmm(bcast.narrow(0, r0, nr), xin, wt) : at::mm(xin, wt);
      out.narrow(1, r0, nr).copy_(y);
    }
  }
  return out.reshape(out_shape);
}

std::string cuda_build_info() {
  return std::string(glmctl_cuda_build_info()) + " fused_max_m=" + std::to_string(kFusedMaxMHalf) + "/" +
         std::to_string(kFusedMaxMBf16) + "(fp16/bf16)";
}

void cuda_tune(int64_t rt, int64_t ks) {
  g_rt.store(static_cast<int>(rt));
  g_ks.store(static_cast<int>(ks));
}

}  // namespace
}  // namespace glmctl

TORCH_LIBRARY_FRAGMENT(glmctl, m) {
  m.def("cuda_build_info() -> str", &glmctl::cuda_build_info);
  m.def("cuda_tune(int rt, int ks) -> ()", &glmctl::cuda_tune);
}

TORCH_LIBRARY_IMPL(glmctl, CUDA, m) { m.impl("quant_linear", &glmctl::quant_linear_cuda); }

static struct PyModuleDef glmctl_cuda_module = {PyModuleDef_HEAD_INIT, "_cuda",
                                                "glmctl CUDA quantized-linear kernels (torch.ops.glmctl)", -1,
                                                nullptr};

PyMODINIT_FUNC PyInit__cuda(void) { return PyModule_Create(&glmctl_cuda_module); }
