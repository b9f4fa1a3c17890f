// C interface between the pure-CUDA kernels (quant_cuda.cu, no torch headers, fast to compile)
// and the torch op binding (quant_cuda_binding.cpp).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// dtype codes
enum { GLMCTL_F32 = 0, GLMCTL_F16 = 1, GLMCTL_BF16 = 2 };

typedef struct {
  const void* x;       // [m, k] activations, xtype, contiguous
  const int8_t* qw;    // [n, k/2] (INT4, canonical packing) or [n, k] (INT8)
  const void* scale;   // [n] or [n, ngroups], stype
  const void* bias;    // [n] btype, or NULL
  void* out;           // [m, n] xtype
  int64_t m, n, k;
  int64_t ngroups;     // 1 = one scale per row
  int bits;            // 4 or 8
  int xtype, stype, btype;
} glmctl_qargs;

// 1 when the tensor-core kernel handles these arguments (dtype, alignment, k and group size).
int glmctl_mma_supported(const glmctl_qargs* a);

// Tensor-core kernel (dequantize in registers, mma.sync m16n8k16, fp32 accumulation, exact scales).
// rt: 16-row tiles per block, ks: k-slices per block (rt*ks warps); 0 = heuristic.
cudaError_t glmctl_launch_mma(const glmctl_qargs* a, int rt, int ks, cudaStream_t stream);

// CUDA-core fallback for any shape, group size, alignment and dtype (fp32 activations too).
cudaError_t glmctl_launch_simt(const glmctl_qargs* a, cudaStream_t stream);

// Dequantize rows [row0, row0 + rows) into w_hi (and w_lo, the rounding remainder, if not NULL),
// both [rows, ldw] of wtype; element (r, c) at w[r * ldw + c].
cudaError_t glmctl_launch_dequant(const int8_t* qw, const void* scale, int stype, int64_t n, int64_t k,
                                  int64_t ngroups, int bits, int64_t row0, int64_t rows, void* w_hi,
                                  void* w_lo, int64_t ldw, int wtype, cudaStream_t stream);

// "archs=800,860,890,900 cudart=13000": what this library was compiled for.
const char* glmctl_cuda_build_info(void);

#ifdef __cplusplus
}
#endif
