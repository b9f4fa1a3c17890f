// CUDA kernels for weight-only INT4/INT8 linears, y = x · dequant(qweight, scale)^T + bias.
// Pure CUDA (no torch headers): the torch binding is quant_cuda_binding.cpp.
//
// 1. wo_mma_kernel — tensor cores, any m (best for small m: memory bound).
//    The product is computed transposed, D = W · x^T, so W rows fill the 16-row M side of
//    mma.sync.m16n8k16 and tokens fill the 8-wide N side (m = 1..8 wastes little).
//    * Weights stay in the canonical layout: each warp streams its 16-row tile with 16-byte
//      cp.async copies (zero-filled out of bounds) through a 4-stage shared-memory ring; a row
//      stride of 80 bytes makes the ldmatrix reads bank-conflict free.
//    * ldmatrix hands lane (g = lane/4, t = lane%4) the 4-byte word t of every 16-byte chunk of
//      rows g and g+8, i.e. 8 consecutive INT4 columns (4 INT8 columns).  A dot product does not
//      care about the order of k, so each lane feeds the mma its own columns: the A and B
//      fragments are built with the same column permutation (B from x with byte_perm), and no
//      data moves between lanes.
//    * Dequantization is exact: a nibble/byte becomes the fp16/bf16 integer q with one LOP3 and
//      one HSUB2 (magic-number trick), the mma multiplies exact q by x with fp32 accumulation,
//      and scales are applied in fp32 — per group on a partial sum of each 32 (INT4) / 16 (INT8)
//      column chunk, or once per row at the end.  So bf16 results match the fp32 reference.
//    * A block holds rt row tiles x ks k-slices (one warp each); k-slices are reduced through
//      shared memory, so few-row shapes still fill every SM without atomics or a second kernel.
//      Blocks of the same row tile and different token blocks are adjacent in the grid, so their
//      weight reads hit L2.
// 2. wo_simt_kernel — CUDA cores, any shape / group size / alignment / dtype (fp32 x too).
// 3. dequant_kernel — expands the weight to fp16/bf16/fp32 for the large-m cuBLAS path (bf16
//    gets a hi/lo split so one GEMM over [x, x] · [W_hi, W_lo]^T stays exact to fp32 level).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "quant_cuda.h"

namespace {

constexpr int kStages = 4;
constexpr int kTileBytes = 64;    // bytes of one weight row per k-tile (4 chunks of 16 bytes)
constexpr int kRowStride = 80;    // shared-memory stride of a tile row (16-byte pad: no bank conflicts)
constexpr int kWarpSmem = kStages * 16 * kRowStride;
constexpr int kMaxWarps = 8;

__device__ __forceinline__ float ldf(const void* p, int64_t i, int type) {
  if (type == GLMCTL_F16) return __half2float(__ushort_as_half(__ldg(static_cast<const unsigned short*>(p) + i)));
  if (type == GLMCTL_BF16)
    return __bfloat162float(__ushort_as_bfloat16(__ldg(static_cast<const unsigned short*>(p) + i)));
  return __ldg(static_cast<const float*>(p) + i);
}

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }

template <typename T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_f<float>(float v) { return v; }

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two signed nibbles (bits [sh, sh+4) and [sh+16, sh+20) of w) -> packed pair of exact integers.
// (nib ^ 8) is the nibble biased by +8; OR-ing it into the mantissa of 1024 (fp16) / 128 (bf16)
// gives 1024 + q + 8 exactly, and one packed subtraction leaves q.
template <typename T>
__device__ __forceinline__ uint32_t int4pair(uint32_t w, int sh);
template <>
__device__ __forceinline__ uint32_t int4pair<__half>(uint32_t w, int sh) {
  uint32_t v = ((w >> sh) & 0x000F000Fu) ^ 0x64086408u;
  __half2 h = __hsub2(*reinterpret_cast<__half2*>(&v), __half2(__ushort_as_half(0x6408), __ushort_as_half(0x6408)));
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t int4pair<__nv_bfloat16>(uint32_t w, int sh) {
  uint32_t v = ((w >> sh) & 0x000F000Fu) ^ 0x43084308u;
  __nv_bfloat162 h = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&v),
                             __nv_bfloat162(__ushort_as_bfloat16(0x4308), __ushort_as_bfloat16(0x4308)));
  return *reinterpret_cast<uint32_t*>(&h);
}

// Bytes b_lo and b_hi (selected by byte_perm selector sel = 0x4240 for (b0, b2), 0x4341 for
// (b1, b3)) of w -> packed pair of exact integers.
template <typename T>
__device__ __forceinline__ uint32_t int8pair(uint32_t w, uint32_t sel);
template <>
__device__ __forceinline__ uint32_t int8pair<__half>(uint32_t w, uint32_t sel) {
  // [b, 0x64] per half = 1024 + unsigned byte; flipping bit 7 makes it 1024 + q + 128.
  uint32_t v = __byte_perm(w, 0x64646464u, sel) ^ 0x00800080u;
  __half2 h = __hsub2(*reinterpret_cast<__half2*>(&v), __half2(__ushort_as_half(0x6480), __ushort_as_half(0x6480)));
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t int8pair<__nv_bfloat16>(uint32_t w, uint32_t sel) {
  const int s0 = (sel & 0xF) * 8, s1 = ((sel >> 8) & 0xF) * 8;  // bit offsets of the two bytes
  const float lo = static_cast<float>(static_cast<int8_t>((w >> s0) & 0xFF));
  const float hi = static_cast<float>(static_cast<int8_t>((w >> s1) & 0xFF));
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

struct MmaParams {
  const void* x;
  const int8_t* qw;
  const void* scale;
  const void* bias;
  void* out;
  int64_t m, n, k, ngroups, row_bytes, ntiles;
  uint32_t group_magic;  // ceil(2^32 / group_size) (exact for col < k)
  int stype, btype;
  int rt, ks;
};

// Grid: x = token blocks of 8*NT rows, y = blocks of rt 16-row weight tiles.
template <typename T, int BITS, int NT, bool GROUPED>
__global__ void __launch_bounds__(kMaxWarps * 32) wo_mma_kernel(const MmaParams p) {
  extern __shared__ __align__(16) uint8_t smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int rt_i = warp % p.rt, ks_i = warp / p.rt;
  const int g = lane >> 2, t = lane & 3;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.y) * p.rt + rt_i) * 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * (8 * NT);
  const T* x = static_cast<const T*>(p.x);
  uint8_t* wsm = smem + warp * kWarpSmem;

  const int64_t count = ks_i < p.ntiles ? (p.ntiles - ks_i + p.ks - 1) / p.ks : 0;

  // This lane's two 16-byte copies of every tile: rows id/4, chunk id%4 for id = lane, lane+32.
  const int8_t* gsrc[2];
  bool rowok[2];
  uint32_t soff[2];
  int choff[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int id = lane + 32 * j, r = id >> 2, c = id & 3;
    rowok[j] = row0 + r < p.n;
    gsrc[j] = p.qw + (rowok[j] ? row0 + r : 0) * p.row_bytes + c * 16;
    soff[j] = r * kRowStride + c * 16;
    choff[j] = c * 16;
  }
  const uint32_t wsm_u32 = smem_u32(wsm);
  auto issue = [&](int64_t i) {
    const int64_t kt = ks_i + i * p.ks;
    const uint32_t sbase = wsm_u32 + static_cast<uint32_t>(i % kStages) * (16 * kRowStride);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const bool ok = rowok[j] && kt * kTileBytes + choff[j] < p.row_bytes;
      cp_async16(sbase + soff[j], ok ? static_cast<const void*>(gsrc[j] + kt * kTileBytes) : p.qw, ok ? 16 : 0);
    }
  };

  // Scale rows (clamped: rows >= n are computed on zeros and never stored).
  const int64_t sr0 = min(row0 + g, p.n - 1), sr1 = min(row0 + g + 8, p.n - 1);
  // x rows of this lane's B fragments (clamped; columns of D beyond m are never stored).
  int64_t xrow[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) xrow[j] = min(m0 + 8 * j + g, p.m - 1) * p.k;

  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < count) issue(s);
    cp_async_commit();
  }
  const int lm_row = (lane & 7) + 8 * ((lane >> 3) & 1);  // ldmatrix: lanes 0-7 / 8-15 / 16-23 / 24-31
  const int lm_chunk = lane >> 4;                         // supply rows of matrices 0 / 1 / 2 / 3

  for (int64_t i = 0; i < count; ++i) {
    if (i + kStages - 1 < count) issue(i + kStages - 1);
    cp_async_commit();
    cp_async_wait<kStages - 1>();
    __syncwarp();
    const uint32_t st = wsm_u32 + static_cast<uint32_t>(i % kStages) * (16 * kRowStride);
    const int64_t kt = ks_i + i * p.ks;
#pragma unroll
    for (int cp = 0; cp < 2; ++cp) {
      uint32_t a4[4];  // rows 0-7 / 8-15 of chunk 2cp, rows 0-7 / 8-15 of chunk 2cp+1
      ldmatrix_x4(a4, st + lm_row * kRowStride + (2 * cp + lm_chunk) * 16);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t byte_off = kt * kTileBytes + (2 * cp + h) * 16;
        if (byte_off >= p.row_bytes) break;  // uniform across the warp
        const uint32_t wg = a4[2 * h], wg8 = a4[2 * h + 1];  // rows g and g+8
        float part[NT][4];
        if (GROUPED) {
#pragma unroll
          for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) part[j][e] = 0.f;
        }
        int64_t col0;
        // Accumulate this chunk into part (group scales follow) or straight into acc (row scales).
        auto chunk = [&](float(&dst)[NT][4]) {
          if (BITS == 4) {
            col0 = byte_off * 2;  // chunk = 32 columns; this lane has columns col0 + 8t .. +7
            const uint32_t a_s0[4] = {int4pair<T>(wg, 4), int4pair<T>(wg8, 4), int4pair<T>(wg, 0),
                                      int4pair<T>(wg8, 0)};
            const uint32_t a_s1[4] = {int4pair<T>(wg, 12), int4pair<T>(wg8, 12), int4pair<T>(wg, 8),
                                      int4pair<T>(wg8, 8)};
#pragma unroll
            for (int j = 0; j < NT; ++j) {
              const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + xrow[j] + col0 + 8 * t));
              // k-step 0 pairs columns (0,4) and (1,5); k-step 1 pairs (2,6) and (3,7).
              mma16816<T>(dst[j], a_s0, __byte_perm(xv.x, xv.z, 0x5410), __byte_perm(xv.x, xv.z, 0x7632));
              mma16816<T>(dst[j], a_s1, __byte_perm(xv.y, xv.w, 0x5410), __byte_perm(xv.y, xv.w, 0x7632));
            }
          } else {
            col0 = byte_off;  // chunk = 16 columns; this lane has columns col0 + 4t .. +3
            const uint32_t a_s[4] = {int8pair<T>(wg, 0x4240), int8pair<T>(wg8, 0x4240), int8pair<T>(wg, 0x4341),
                                     int8pair<T>(wg8, 0x4341)};
#pragma unroll
            for (int j = 0; j < NT; ++j) {
              const uint2 xv = __ldg(reinterpret_cast<const uint2*>(x + xrow[j] + col0 + 4 * t));
              // pairs columns (0,2) and (1,3)
              mma16816<T>(dst[j], a_s, __byte_perm(xv.x, xv.y, 0x5410), __byte_perm(xv.x, xv.y, 0x7632));
            }
          }
        };
        if (GROUPED) chunk(part);
        else chunk(acc);
        if (GROUPED) {
          const int64_t grp = __umulhi(static_cast<uint32_t>(col0), p.group_magic);
          const float s0 = ldf(p.scale, sr0 * p.ngroups + grp, p.stype);
          const float s1 = ldf(p.scale, sr1 * p.ngroups + grp, p.stype);
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            acc[j][0] = fmaf(part[j][0], s0, acc[j][0]);
            acc[j][1] = fmaf(part[j][1], s0, acc[j][1]);
            acc[j][2] = fmaf(part[j][2], s1, acc[j][2]);
            acc[j][3] = fmaf(part[j][3], s1, acc[j][3]);
          }
        }
      }
    }
    __syncwarp();
  }
  cp_async_wait_all();
  if (!GROUPED) {
    const float s0 = ldf(p.scale, sr0, p.stype), s1 = ldf(p.scale, sr1, p.stype);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      acc[j][0] *= s0;
      acc[j][1] *= s0;
      acc[j][2] *= s1;
      acc[j][3] *= s1;
    }
  }

  // Reduce the k-slices of each row tile through shared memory.
  if (p.ks > 1) {
    __syncthreads();  // every warp is done with its pipeline buffers
    float* red = reinterpret_cast<float*>(smem);
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) red[(warp * NT * 4 + j * 4 + e) * 32 + lane] = acc[j][e];
    __syncthreads();
    if (ks_i != 0) return;
    for (int s = 1; s < p.ks; ++s) {
      const int w2 = s * p.rt + rt_i;
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[j][e] += red[(w2 * NT * 4 + j * 4 + e) * 32 + lane];
    }
  }

  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int64_t r = row0 + g + (e >= 2 ? 8 : 0);
    if (r >= p.n) continue;
    const float b = p.bias ? ldf(p.bias, r, p.btype) : 0.f;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int64_t xr = m0 + 8 * j + 2 * t + (e & 1);
      if (xr < p.m) out[xr * p.n + r] = from_f<T>(acc[j][e] + b);
    }
  }
}

// ---- CUDA-core fallback: one warp per weight row, 8 token rows per block --------------------
constexpr int kSimtRows = 8;

template <typename T>
__global__ void __launch_bounds__(256) wo_simt_kernel(glmctl_qargs a, int64_t gsize) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * 8 + (threadIdx.x >> 5);
  if (r >= a.n) return;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kSimtRows;
  const int rows = static_cast<int>(a.m - m0 < kSimtRows ? a.m - m0 : kSimtRows);
  const T* x = static_cast<const T*>(a.x);
  const int64_t row_bytes = a.bits == 4 ? a.k / 2 : a.k;
  const int8_t* q = a.qw + r * row_bytes;
  float acc[kSimtRows];
#pragma unroll
  for (int i = 0; i < kSimtRows; ++i) acc[i] = 0.f;
  for (int64_t c = lane; c < a.k; c += 32) {
    int v;
    if (a.bits == 4) {
      const int b = q[c >> 1];
      v = (c & 1) ? ((b & 0xF) ^ 8) - 8 : (((b >> 4) & 0xF) ^ 8) - 8;
    } else {
      v = q[c];
    }
    const float w = static_cast<float>(v) * ldf(a.scale, r * a.ngroups + c / gsize, a.stype);
#pragma unroll
    for (int i = 0; i < kSimtRows; ++i)
      if (i < rows) acc[i] = fmaf(w, to_f<T>(x[(m0 + i) * a.k + c]), acc[i]);
  }
#pragma unroll
  for (int i = 0; i < kSimtRows; ++i) {
    float v = acc[i];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    acc[i] = v;
  }
  if (lane == 0) {
    const float b = a.bias ? ldf(a.bias, r, a.btype) : 0.f;
    T* out = static_cast<T*>(a.out);
    for (int i = 0; i < rows; ++i) out[(m0 + i) * a.n + r] = from_f<T>(acc[i] + b);
  }
}

// ---- dequantize (large-m path) ----------------------------------------------------------------
template <typename T>
struct Vec8;  // 8 elements of T, stored with 16-byte (32-byte for float) accesses
template <>
struct Vec8<__half> {
  __device__ static void store(__half* p, const float (&v)[8]) {
    __half2 h[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<uint4*>(h);
  }
};
template <>
struct Vec8<__nv_bfloat16> {
  __device__ static void store(__nv_bfloat16* p, const float (&v)[8]) {
    __nv_bfloat162 h[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<uint4*>(h);
  }
};
template <>
struct Vec8<float> {
  __device__ static void store(float* p, const float (&v)[8]) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
};

// One block per weight row (grid-stride).  vec: 8 columns per thread with one scale, 32-bit
// (INT4) / 64-bit (INT8) loads and 16-byte stores (host checked k, G, ldw and alignment).
template <typename T>
__global__ void __launch_bounds__(256) dequant_kernel(const int8_t* qw, const void* scale, int stype, int64_t k,
                                                      int64_t ngroups, int bits, int64_t row0, int64_t rows,
                                                      T* w_hi, T* w_lo, int64_t ldw, bool vec) {
  const int64_t gsize = k / ngroups;
  const int64_t row_bytes = bits == 4 ? k / 2 : k;
  for (int64_t rr = blockIdx.x; rr < rows; rr += gridDim.x) {
    const int64_t r = row0 + rr;
    const int8_t* q = qw + r * row_bytes;
    if (vec) {
      const int g32 = static_cast<int>(gsize);
      for (int c = threadIdx.x * 8; c < k; c += blockDim.x * 8) {
        const float sc = ldf(scale, r * ngroups + c / g32, stype);
        float v[8];
        if (bits == 4) {
          const uint32_t w = *reinterpret_cast<const uint32_t*>(q + c / 2);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int b = (w >> (8 * i)) & 0xFF;
            v[2 * i] = static_cast<float>((((b >> 4) & 0xF) ^ 8) - 8) * sc;
            v[2 * i + 1] = static_cast<float>(((b & 0xF) ^ 8) - 8) * sc;
          }
        } else {
          const uint2 w = *reinterpret_cast<const uint2*>(q + c);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            v[i] = static_cast<float>(static_cast<int8_t>((w.x >> (8 * i)) & 0xFF)) * sc;
            v[4 + i] = static_cast<float>(static_cast<int8_t>((w.y >> (8 * i)) & 0xFF)) * sc;
          }
        }
        float hi[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) hi[i] = to_f<T>(from_f<T>(v[i]));
        Vec8<T>::store(w_hi + rr * ldw + c, hi);
        if (w_lo) {
          float lo[8];
#pragma unroll
          for (int i = 0; i < 8; ++i) lo[i] = v[i] - hi[i];
          Vec8<T>::store(w_lo + rr * ldw + c, lo);
        }
      }
      continue;
    }
    for (int64_t c = threadIdx.x; c < k; c += blockDim.x) {
      int v;
      if (bits == 4) {
        const int b = q[c >> 1];
        v = (c & 1) ? ((b & 0xF) ^ 8) - 8 : (((b >> 4) & 0xF) ^ 8) - 8;
      } else {
        v = q[c];
      }
      const float w = static_cast<float>(v) * ldf(scale, r * ngroups + c / gsize, stype);
      const T h = from_f<T>(w);
      w_hi[rr * ldw + c] = h;
      if (w_lo) w_lo[rr * ldw + c] = from_f<T>(w - to_f<T>(h));
    }
  }
}

struct DevInfo {
  int sms = 0;
};
DevInfo g_dev[64];

int num_sms() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 132;
  if (!g_dev[dev].sms) {
    int v = 0;
    cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev);
    g_dev[dev].sms = v > 0 ? v : 132;
  }
  return g_dev[dev].sms;
}

uint32_t group_magic(int64_t gsize) {
  return static_cast<uint32_t>(((uint64_t(1) << 32) + static_cast<uint64_t>(gsize) - 1) / static_cast<uint64_t>(gsize));
}

template <typename T, int BITS, int NT, bool GROUPED>
cudaError_t launch_mma_t(const MmaParams& p, int mblocks, int rblocks, cudaStream_t stream) {
  const int warps = p.rt * p.ks;
  const size_t smem_pipe = static_cast<size_t>(warps) * kWarpSmem;
  const size_t smem_red = p.ks > 1 ? static_cast<size_t>(warps) * NT * 4 * 32 * sizeof(float) : 0;
  const size_t smem = smem_pipe > smem_red ? smem_pipe : smem_red;
  wo_mma_kernel<T, BITS, NT, GROUPED><<<dim3(mblocks, rblocks), warps * 32, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int BITS>
cudaError_t launch_mma_nt(const MmaParams& p, int nt, bool grouped, int mblocks, int rblocks, cudaStream_t s) {
#define GLMCTL_NT(N)                                                              \
  case N:                                                                         \
    return grouped ? launch_mma_t<T, BITS, N, true>(p, mblocks, rblocks, s)      \
                   : launch_mma_t<T, BITS, N, false>(p, mblocks, rblocks, s);
  switch (nt) {
    GLMCTL_NT(1)
    GLMCTL_NT(2)
    GLMCTL_NT(4)
    default: return cudaErrorInvalidValue;
  }
#undef GLMCTL_NT
}

}  // namespace

extern "C" int glmctl_mma_supported(const glmctl_qargs* a) {
  if (a->xtype != GLMCTL_F16 && a->xtype != GLMCTL_BF16) return 0;
  if (a->bits != 4 && a->bits != 8) return 0;
  if (a->m <= 0 || a->n <= 0 || a->k <= 0 || a->ngroups < 1 || a->k % a->ngroups) return 0;
  const int64_t chunk_cols = a->bits == 4 ? 32 : 16;
  if (a->k % chunk_cols) return 0;
  const int64_t gsize = a->k / a->ngroups;
  if (a->ngroups > 1 && (gsize % chunk_cols || static_cast<uint64_t>(a->k) * static_cast<uint64_t>(gsize) >= (uint64_t(1) << 32)))
    return 0;
  if (reinterpret_cast<uintptr_t>(a->qw) % 16) return 0;
  if (reinterpret_cast<uintptr_t>(a->x) % (a->bits == 4 ? 16 : 8)) return 0;
  if ((a->n + 15) / 16 > 65535) return 0;
  return 1;
}

extern "C" cudaError_t glmctl_launch_mma(const glmctl_qargs* a, int rt, int ks, cudaStream_t stream) {
  if (!glmctl_mma_supported(a)) return cudaErrorInvalidValue;
  MmaParams p;
  p.x = a->x;
  p.qw = a->qw;
  p.scale = a->scale;
  p.bias = a->bias;
  p.out = a->out;
  p.m = a->m;
  p.n = a->n;
  p.k = a->k;
  p.ngroups = a->ngroups;
  p.row_bytes = a->bits == 4 ? a->k / 2 : a->k;
  p.ntiles = (p.row_bytes + kTileBytes - 1) / kTileBytes;
  p.group_magic = group_magic(a->k / a->ngroups);
  p.stype = a->stype;
  p.btype = a->btype;
  // Token tile: 8 * nt rows per block (nt = 1, 2, 4); larger m runs several token blocks, whose
  // weight reads then come from L2.
  const int nt = a->m <= 8 ? 1 : a->m <= 16 ? 2 : 4;
  const int64_t mblocks = (a->m + 8 * nt - 1) / (8 * nt);
  if (mblocks > 0x7fffffff) return cudaErrorInvalidValue;
  const int64_t tiles = (a->n + 15) / 16;
  const int64_t sms = num_sms();
  // k-slices per block depend on the weight shape only (never on m), so every token row is
  // summed in the same order whatever the batch: results do not depend on batch composition.
  if (ks <= 0) ks = tiles < 4 * sms ? kMaxWarps : kMaxWarps / 2;
  if (ks > p.ntiles) ks = static_cast<int>(p.ntiles);
  if (ks < 1) ks = 1;
  if (ks > kMaxWarps) ks = kMaxWarps;
  if (rt <= 0) {
    // More row tiles per block share x through L1 when there are several token tiles, as long
    // as the grid still has two blocks per SM.
    const int64_t want = 2 * sms;
    rt = 1;
    if (nt >= 2 && mblocks * ((tiles + 1) / 2) >= want) rt = 2;
    if (nt >= 4 && mblocks * ((tiles + 3) / 4) >= want) rt = 4;
  }
  while (rt > 1 && rt * ks > kMaxWarps) rt /= 2;
  if (rt * ks > kMaxWarps) rt = 1;
  p.rt = rt;
  p.ks = ks;
  const int64_t rblocks = (tiles + rt - 1) / rt;
  if (rblocks > 65535) return cudaErrorInvalidValue;
  const bool grouped = a->ngroups > 1;
  if (a->xtype == GLMCTL_F16)
    return a->bits == 4 ? launch_mma_nt<__half, 4>(p, nt, grouped, (int)mblocks, (int)rblocks, stream)
                        : launch_mma_nt<__half, 8>(p, nt, grouped, (int)mblocks, (int)rblocks, stream);
  return a->bits == 4 ? launch_mma_nt<__nv_bfloat16, 4>(p, nt, grouped, (int)mblocks, (int)rblocks, stream)
                      : launch_mma_nt<__nv_bfloat16, 8>(p, nt, grouped, (int)mblocks, (int)rblocks, stream);
}

extern "C" cudaError_t glmctl_launch_simt(const glmctl_qargs* a, cudaStream_t stream) {
  if (a->m <= 0 || a->n <= 0) return cudaSuccess;
  const int64_t gsize = a->k / a->ngroups;
  const int64_t rblocks = (a->n + 7) / 8;
  const int64_t mblocks = (a->m + kSimtRows - 1) / kSimtRows;
  if (rblocks > 0x7fffffff || mblocks > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(rblocks), static_cast<unsigned>(mblocks));
  switch (a->xtype) {
    case GLMCTL_F16: wo_simt_kernel<__half><<<grid, 256, 0, stream>>>(*a, gsize); break;
    case GLMCTL_BF16: wo_simt_kernel<__nv_bfloat16><<<grid, 256, 0, stream>>>(*a, gsize); break;
    case GLMCTL_F32: wo_simt_kernel<float><<<grid, 256, 0, stream>>>(*a, gsize); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

extern "C" cudaError_t glmctl_launch_dequant(const int8_t* qw, const void* scale, int stype, int64_t n, int64_t k,
                                             int64_t ngroups, int bits, int64_t row0, int64_t rows, void* w_hi,
                                             void* w_lo, int64_t ldw, int wtype, cudaStream_t stream) {
  if (rows <= 0 || k <= 0) return cudaSuccess;
  if (row0 < 0 || row0 + rows > n) return cudaErrorInvalidValue;
  const int blocks = static_cast<int>(rows < 65535 * 8 ? rows : 65535 * 8);
  const int64_t gsize = k / ngroups;
  const int esize = wtype == GLMCTL_F32 ? 4 : 2;
  const uintptr_t align = 16;
  const bool vec = k % 8 == 0 && gsize % 8 == 0 && ldw % 8 == 0 && k < (int64_t(1) << 30) &&
                   reinterpret_cast<uintptr_t>(qw) % 8 == 0 && reinterpret_cast<uintptr_t>(w_hi) % align == 0 &&
                   (w_lo == nullptr || reinterpret_cast<uintptr_t>(w_lo) % align == 0) && (ldw * esize) % 16 == 0;
  switch (wtype) {
    case GLMCTL_F16:
      dequant_kernel<__half><<<blocks, 256, 0, stream>>>(qw, scale, stype, k, ngroups, bits, row0, rows,
                                                         static_cast<__half*>(w_hi), static_cast<__half*>(w_lo), ldw,
                                                         vec);
      break;
    case GLMCTL_BF16:
      dequant_kernel<__nv_bfloat16><<<blocks, 256, 0, stream>>>(qw, scale, stype, k, ngroups, bits, row0, rows,
                                                                static_cast<__nv_bfloat16*>(w_hi),
                                                                static_cast<__nv_bfloat16*>(w_lo), ldw, vec);
      break;
    case GLMCTL_F32:
      dequant_kernel<float><<<blocks, 256, 0, stream>>>(qw, scale, stype, k, ngroups, bits, row0, rows,
                                                        static_cast<float*>(w_hi), static_cast<float*>(w_lo), ldw, vec);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

#define GLMCTL_STR2(x) #x
#define GLMCTL_STR(x) GLMCTL_STR2(x)
// build.py passes the cubin list as -DGLMCTL_CUBIN_ARCHS=80_86_89_90 (nvcc splits -D at commas).
#if defined(GLMCTL_CUBIN_ARCHS)
#define GLMCTL_ARCHS GLMCTL_STR(GLMCTL_CUBIN_ARCHS)
#elif defined(__CUDA_ARCH_LIST__)
#define GLMCTL_ARCHS GLMCTL_STR(__CUDA_ARCH_LIST__)
#else
#define GLMCTL_ARCHS "unknown"
#endif

extern "C" const char* glmctl_cuda_build_info(void) {
  return "archs=" GLMCTL_ARCHS " cudart=" GLMCTL_STR(CUDART_VERSION);
}
