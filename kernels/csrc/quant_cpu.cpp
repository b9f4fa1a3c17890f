// CPU weight-only quantized linear: y = x · dequant(qweight, scale)^T + bias.
//
// Canonical format (kernels/reference.py): qweight int8 [n, k] (INT8) or [n, k/2] (INT4: column
// 2j in the high nibble, 2j+1 in the low nibble, two's complement); scale [n] or [n, k/G].
//
// The weight is never dequantized as a whole.  Work is split over blocks of RB output rows
// (at::parallel_for, i.e. torch's OpenMP pool).  For each block the k dimension is walked in
// chunks of KC columns: the RB x KC weight slice is unpacked and scaled into an L1-resident fp32
// buffer (each weight byte is read from memory exactly once), then every row of x is multiplied
// against it with fp32 FMAs.  For INT4 the 16 columns of each 8-byte block are unpacked as
// [8 high nibbles | 8 low nibbles] = columns [0,2,..,14 | 1,3,..,15]; x is permuted the same way
// once per call, so unpacking needs no shuffles (a dot product does not care about the order).
//
// AVX2+FMA code paths are compiled with a function-level target attribute and chosen at run time
// (__builtin_cpu_supports), so the library loads on any x86-64 CPU and falls back to a scalar
// path there.  For large m the kernel dequantizes row panels to fp32 and calls at::mm (MKL/BLAS
// is far better at compute-bound shapes); the result is the same fp32 product.
//
// This file also defines the `glmctl` op library (schemas, CPU kernels) and the Python module
// `glmctl.kernels._cpu`.  The CUDA kernels register into the same namespace from `_cuda`.

// Lean includes (not ATen/ATen.h): this file is compiled by every `pip install -e .`.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <Python.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define GLMCTL_X86 1
#include <immintrin.h>
#else
#define GLMCTL_X86 0
#endif

namespace glmctl {
namespace {

constexpr int RB = 4;          // output rows per block
constexpr int64_t KC = 512;    // columns per chunk (RB * KC * 4 bytes = 8 KiB, stays in L1)
// m at or above which the CPU op dequantizes row panels and calls at::mm instead: measured on a
// Zen 3 core (4096 x 4096 INT4), the fused kernel wins up to m = 64 and loses 1.5x at m = 128.
constexpr int64_t kCpuMatmulMinM = 96;
constexpr int64_t kDirectMaxM = 4;       // m up to which the register-only path is used
constexpr int64_t kPanelBytes = 4 << 20;  // fp32 bytes of one dequantized row panel

std::atomic<bool> g_force_scalar{false};

bool cpu_has_avx2() {
#if GLMCTL_X86 && (defined(__GNUC__) || defined(__clang__))
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

bool use_avx2() { return cpu_has_avx2() && !g_force_scalar.load(std::memory_order_relaxed); }

// AVX-512VL: the same 256-bit instructions, but 32 ymm registers instead of 16 (dense_linear's
// batched tiles hold 24 accumulators). Only the register count changes, not the arithmetic.
std::atomic<bool> g_force_avx2{false};

bool cpu_has_avx512vl() {
#if GLMCTL_X86 && (defined(__GNUC__) || defined(__clang__))
  static const bool ok = cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
  return ok;
#else
  return false;
#endif
}

bool use_avx512vl() { return use_avx2() && cpu_has_avx512vl() && !g_force_avx2.load(std::memory_order_relaxed); }

inline float load_f(const void* p, at::ScalarType t, int64_t i) {
  switch (t) {
    case at::kFloat: return static_cast<const float*>(p)[i];
    case at::kHalf: return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
    case at::kBFloat16: return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
    default: return 0.f;
  }
}

inline void store_f(void* p, at::ScalarType t, int64_t i, float v) {
  switch (t) {
    case at::kFloat: static_cast<float*>(p)[i] = v; break;
    case at::kHalf: static_cast<c10::Half*>(p)[i] = c10::Half(v); break;
    case at::kBFloat16: static_cast<c10::BFloat16*>(p)[i] = c10::BFloat16(v); break;
    default: break;
  }
}

// Position of column c inside the unpacked/permuted buffer (INT4: per 16-column block,
// even columns first, then odd ones).
inline int64_t perm4(int64_t c) {
  const int64_t j = c & 15;
  return (c & ~int64_t(15)) + ((j & 1) ? 8 + (j >> 1) : (j >> 1));
}

struct Problem {
  int64_t m, n, k, Kp;  // Kp: k rounded up to 16
  int bits;
  int64_t ng, G;        // groups per row (1 = per-row scale) and group size (k / ng)
  bool vec_groups;      // every 16 (INT4) / 8 (INT8) column block lies inside one group
  const int8_t* qw;
  int64_t row_bytes;
  const void* scale;
  at::ScalarType stype;
};

// Scales of rows [r0, r0 + rows) as fp32, [rows][ng]; rows past n repeat the last row.
void row_scales(const Problem& p, int64_t r0, int rows, float* out) {
  for (int j = 0; j < rows; ++j) {
    const int64_t r = std::min<int64_t>(r0 + j, p.n - 1);
    for (int64_t g = 0; g < p.ng; ++g) out[j * p.ng + g] = load_f(p.scale, p.stype, r * p.ng + g);
  }
}

inline int nibble_hi(int8_t b) { return ((((int)b >> 4) & 0xF) ^ 8) - 8; }
inline int nibble_lo(int8_t b) { return (((int)b & 0xF) ^ 8) - 8; }

// Generic dequantization of row r, columns [c0, c1) (c0 a multiple of 16, c1 <= Kp) into
// w[0 .. c1-c0) in buffer order; columns >= k become 0.
void dequant_chunk_scalar(const Problem& p, int64_t r, const float* sf, int64_t c0, int64_t c1, float* w) {
  const int8_t* q = p.qw + r * p.row_bytes;
  std::fill(w, w + (c1 - c0), 0.f);
  const int64_t cend = std::min(c1, p.k);
  for (int64_t c = c0; c < cend; ++c) {
    const float s = sf[c / p.G];
    int v;
    int64_t pos;
    if (p.bits == 4) {
      const int8_t b = q[c >> 1];
      v = (c & 1) ? nibble_lo(b) : nibble_hi(b);
      pos = perm4(c);
    } else {
      v = q[c];
      pos = c;
    }
    w[pos - c0] = static_cast<float>(v) * s;
  }
}

void dequant_chunk_fast_scalar(const Problem& p, int64_t r, const float* sf, int64_t c0, int64_t c1, float* w) {
  if (!p.vec_groups) return dequant_chunk_scalar(p, r, sf, c0, c1, w);
  const int8_t* q = p.qw + r * p.row_bytes;
  const int64_t blk = p.bits == 4 ? 16 : 8;
  const int64_t full_end = std::min(c1, (p.k / blk) * blk);
  int64_t c = c0;
  for (; c < full_end; c += blk) {
    const float s = sf[c / p.G];
    float* o = w + (c - c0);
    if (p.bits == 4) {
      const int8_t* b = q + (c >> 1);
      for (int j = 0; j < 8; ++j) {
        o[j] = static_cast<float>(nibble_hi(b[j])) * s;
        o[8 + j] = static_cast<float>(nibble_lo(b[j])) * s;
      }
    } else {
      for (int j = 0; j < 8; ++j) o[j] = static_cast<float>(q[c + j]) * s;
    }
  }
  if (c < c1) dequant_chunk_scalar(p, r, sf, c, c1, w + (c - c0));
}

// res[i*RB + r] += sum_c x[i][c] * w[r][c]
template <int MB>
void micro_scalar(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t len, float* acc) {
  for (int i = 0; i < MB; ++i) {
    for (int r = 0; r < RB; ++r) {
      const float* xi = x + i * ldx;
      const float* wr = w + r * ldw;
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
      for (int64_t c = 0; c < len; c += 4) {
        s0 += xi[c] * wr[c];
        s1 += xi[c + 1] * wr[c + 1];
        s2 += xi[c + 2] * wr[c + 2];
        s3 += xi[c + 3] * wr[c + 3];
      }
      acc[(i * RB + r) * 8] += (s0 + s1) + (s2 + s3);
    }
  }
}

#if GLMCTL_X86
#define GLMCTL_AVX2 __attribute__((target("avx2,fma")))
#define GLMCTL_AVX512VL __attribute__((target("avx2,fma,avx512f,avx512vl")))

GLMCTL_AVX2 void dequant_chunk_avx2(const Problem& p, int64_t r, const float* sf, int64_t c0, int64_t c1, float* w) {
  if (!p.vec_groups) return dequant_chunk_scalar(p, r, sf, c0, c1, w);
  const int8_t* q = p.qw + r * p.row_bytes;
  const int64_t blk = p.bits == 4 ? 16 : 8;
  const int64_t full_end = std::min(c1, (p.k / blk) * blk);
  int64_t c = c0;
  // Walk the groups incrementally (no division per block).
  int64_t g = c0 / p.G;
  int64_t gend = (g + 1) * p.G;
  __m256 s = _mm256_set1_ps(sf[g]);
  if (p.bits == 4) {
    for (; c < full_end; c += 16) {
      if (c >= gend) {  // blocks never skip a group (G >= block size)
        ++g;
        gend += p.G;
        s = _mm256_set1_ps(sf[g]);
      }
      const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + (c >> 1))));
      const __m256i hi = _mm256_srai_epi32(v, 4);
      const __m256i lo = _mm256_srai_epi32(_mm256_slli_epi32(v, 28), 28);
      _mm256_storeu_ps(w + (c - c0), _mm256_mul_ps(_mm256_cvtepi32_ps(hi), s));
      _mm256_storeu_ps(w + (c - c0) + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(lo), s));
    }
  } else {
    for (; c < full_end; c += 8) {
      if (c >= gend) {  // blocks never skip a group (G >= block size)
        ++g;
        gend += p.G;
        s = _mm256_set1_ps(sf[g]);
      }
      const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + c)));
      _mm256_storeu_ps(w + (c - c0), _mm256_mul_ps(_mm256_cvtepi32_ps(v), s));
    }
  }
  if (c < c1) dequant_chunk_scalar(p, r, sf, c, c1, w + (c - c0));
}

GLMCTL_AVX2 inline float hsum256(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 sh = _mm_movehdup_ps(lo);
  lo = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, lo);
  lo = _mm_add_ss(lo, sh);
  return _mm_cvtss_f32(lo);
}

// acc[(i*RW + r)*8 .. +8] (8 partial sums per (x row, weight row)) += x[i] * w[r] over len columns
// (a multiple of 8), one FMA chain per pair. The fused INT4/INT8 path runs it on dequantized
// chunks (RW = RB), dense_linear on the fp32 weight itself (PF: prefetch the next RW rows, which
// follow in memory).
// Inline: a caller compiled for AVX-512VL (dense_wide_avx512) gets it with 32 registers.
template <int MB, int RW = RB, bool PF = false>
GLMCTL_AVX2 inline void micro_avx2(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t len, float* acc) {
  __m256 a[MB][RW];
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < RW; ++r) a[i][r] = _mm256_loadu_ps(acc + (i * RW + r) * 8);
  for (int64_t c = 0; c < len; c += 8) {
    if (PF && (c & 15) == 0)
      for (int r = 0; r < RW; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + (RW + r) * ldw + c), _MM_HINT_T0);
    __m256 wv[RW];
    for (int r = 0; r < RW; ++r) wv[r] = _mm256_loadu_ps(w + r * ldw + c);
    for (int i = 0; i < MB; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * ldx + c);
      for (int r = 0; r < RW; ++r) a[i][r] = _mm256_fmadd_ps(xv, wv[r], a[i][r]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < RW; ++r) _mm256_storeu_ps(acc + (i * RW + r) * 8, a[i][r]);
}

// Direct path for m <= 4 (decode): unpack in registers and FMA straight away, two weight rows at
// a time, no staging buffer (8 independent accumulator chains; for MB <= 2 the two halves of
// each 16-column block get separate accumulators).  Needs one scale per 16 columns.
// For m = 1 the scale is applied once per group instead of once per weight: x . q is summed
// unscaled over the group and then multiplied into the row total (two multiplies per 16
// columns saved; the sums differ from the reference only by fp32 rounding).
template <int MB>
GLMCTL_AVX2 void direct_rows_avx2(const Problem& p, const float* xp, const float* sf, int64_t r0, int rows,
                                  float* res) {
  constexpr bool kHoist = MB == 1;
  const int64_t kfull = p.k & ~int64_t(15);
  const int8_t* q[2];
  for (int j = 0; j < 2; ++j) q[j] = p.qw + std::min<int64_t>(r0 + j, p.n - 1) * p.row_bytes;
  constexpr int H = MB <= 2 ? 2 : 1;  // accumulators per (weight row, x row)
  __m256 acc[2][MB][H];
  __m256 tot[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};  // kHoist: scaled group sums
  for (int j = 0; j < 2; ++j)
    for (int i = 0; i < MB; ++i)
      for (int h = 0; h < H; ++h) acc[j][i][h] = _mm256_setzero_ps();
  int64_t gend = 0;
  __m256 s[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t c = 0; c < kfull; c += 16) {
    if (c >= gend) {
      const int64_t g = c / p.G;
      gend = (g + 1) * p.G;
      for (int j = 0; j < 2; ++j) {
        if (kHoist) {  // close the previous group (s is zero before the first one)
          tot[j] = _mm256_fmadd_ps(_mm256_add_ps(acc[j][0][0], acc[j][0][H - 1]), s[j], tot[j]);
          acc[j][0][0] = acc[j][0][H - 1] = _mm256_setzero_ps();
        }
        s[j] = _mm256_set1_ps(sf[j * p.ng + g]);
      }
    }
    __m256 wa[2], wb[2];
    for (int j = 0; j < 2; ++j) {
      if (p.bits == 4) {
        const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q[j] + (c >> 1))));
        wa[j] = _mm256_cvtepi32_ps(_mm256_srai_epi32(v, 4));
        wb[j] = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 28), 28));
      } else {
        const __m128i v16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q[j] + c));
        wa[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v16));
        wb[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(v16, v16)));
      }
      if (!kHoist) {
        wa[j] = _mm256_mul_ps(wa[j], s[j]);
        wb[j] = _mm256_mul_ps(wb[j], s[j]);
      }
    }
    for (int i = 0; i < MB; ++i) {
      const __m256 xa = _mm256_loadu_ps(xp + i * p.Kp + c);
      const __m256 xb = _mm256_loadu_ps(xp + i * p.Kp + c + 8);
      for (int j = 0; j < 2; ++j) {
        acc[j][i][0] = _mm256_fmadd_ps(xa, wa[j], acc[j][i][0]);
        acc[j][i][H - 1] = _mm256_fmadd_ps(xb, wb[j], acc[j][i][H - 1]);
      }
    }
  }
  for (int j = 0; j < rows; ++j) {
    float tail[16];
    if (kfull < p.k) dequant_chunk_scalar(p, r0 + j, sf + j * p.ng, kfull, p.Kp, tail);
    for (int i = 0; i < MB; ++i) {
      const __m256 sum = H == 2 ? _mm256_add_ps(acc[j][i][0], acc[j][i][H - 1]) : acc[j][i][0];
      float v = hsum256(kHoist ? _mm256_fmadd_ps(sum, s[j], tot[j]) : sum);
      for (int64_t c = kfull; c < p.Kp; ++c) v += tail[c - kfull] * xp[i * p.Kp + c];
      res[i * 2 + j] = v;
    }
  }
}
#endif

// x [m, k] (any float dtype) -> fp32 [m, Kp], INT4 columns permuted like the weight buffer.
void pack_x(const Problem& p, const void* x, at::ScalarType xt, float* xp) {
  at::parallel_for(0, p.m, std::max<int64_t>(1, 16384 / std::max<int64_t>(p.k, 1)), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      float* row = xp + i * p.Kp;
      std::fill(row + (p.k & ~int64_t(15)), row + p.Kp, 0.f);
      const int64_t base = i * p.k;
      if (p.bits == 4) {
        for (int64_t c = 0; c < p.k; ++c) row[perm4(c)] = load_f(x, xt, base + c);
      } else {
        for (int64_t c = 0; c < p.k; ++c) row[c] = load_f(x, xt, base + c);
      }
    }
  });
}

void run_direct(const Problem& p, const float* xp, const float* bias, void* out, at::ScalarType ot) {
#if GLMCTL_X86
  const int64_t npairs = (p.n + 1) / 2;
  const int64_t grain = std::max<int64_t>(1, std::min<int64_t>(32, npairs / (4 * at::get_num_threads() + 1)));
  at::parallel_for(0, npairs, grain, [&](int64_t b0, int64_t b1) {
    float res[8];
    std::vector<float> sf(2 * p.ng);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = 2 * b;
      const int rows = static_cast<int>(std::min<int64_t>(2, p.n - r0));
      row_scales(p, r0, 2, sf.data());
      switch (p.m) {
        case 1: direct_rows_avx2<1>(p, xp, sf.data(), r0, rows, res); break;
        case 2: direct_rows_avx2<2>(p, xp, sf.data(), r0, rows, res); break;
        case 3: direct_rows_avx2<3>(p, xp, sf.data(), r0, rows, res); break;
        default: direct_rows_avx2<4>(p, xp, sf.data(), r0, rows, res); break;
      }
      for (int64_t i = 0; i < p.m; ++i)
        for (int j = 0; j < rows; ++j) {
          float v = res[i * 2 + j];
          if (bias) v += bias[r0 + j];
          store_f(out, ot, i * p.n + r0 + j, v);
        }
    }
  });
#endif
}

void run_fused(const Problem& p, const float* xp, const float* bias, void* out, at::ScalarType ot) {
  const int64_t nblocks = (p.n + RB - 1) / RB;
  const bool avx2 = use_avx2();
#if GLMCTL_X86
  if (avx2 && p.m <= kDirectMaxM && (p.ng == 1 || p.G % 16 == 0)) return run_direct(p, xp, bias, out, ot);
#endif
  // Grain: a few blocks per task, but enough tasks for every thread.
  const int64_t grain = std::max<int64_t>(1, std::min<int64_t>(16, nblocks / (4 * at::get_num_threads() + 1)));
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    std::vector<float> wbuf(RB * KC);
    std::vector<float> acc(p.m * RB * 8);
    std::vector<float> sf(RB * p.ng);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * RB;
      const int rows = static_cast<int>(std::min<int64_t>(RB, p.n - r0));
      row_scales(p, r0, RB, sf.data());
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t c0 = 0; c0 < p.Kp; c0 += KC) {
        const int64_t c1 = std::min(c0 + KC, p.Kp);
        const int64_t len = c1 - c0;
        for (int r = 0; r < RB; ++r) {
          float* wr = wbuf.data() + r * KC;
          if (r >= rows) {
            std::fill(wr, wr + len, 0.f);
            continue;
          }
#if GLMCTL_X86
          if (avx2) {
            dequant_chunk_avx2(p, r0 + r, sf.data() + r * p.ng, c0, c1, wr);
            continue;
          }
#endif
          dequant_chunk_fast_scalar(p, r0 + r, sf.data() + r * p.ng, c0, c1, wr);
        }
        int64_t i = 0;
#if GLMCTL_X86
        if (avx2) {
          for (; i + 2 <= p.m; i += 2)
            micro_avx2<2>(xp + i * p.Kp + c0, p.Kp, wbuf.data(), KC, len, acc.data() + i * RB * 8);
          for (; i < p.m; ++i)
            micro_avx2<1>(xp + i * p.Kp + c0, p.Kp, wbuf.data(), KC, len, acc.data() + i * RB * 8);
        }
#endif
        for (; i < p.m; ++i)
          micro_scalar<1>(xp + i * p.Kp + c0, p.Kp, wbuf.data(), KC, len, acc.data() + i * RB * 8);
      }
      for (int64_t i = 0; i < p.m; ++i) {
        for (int r = 0; r < rows; ++r) {
          const float* a = acc.data() + (i * RB + r) * 8;
          float v = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
          if (bias) v += bias[r0 + r];
          store_f(out, ot, i * p.n + r0 + r, v);
        }
      }
    }
  });
}

// Large m: dequantize panels of rows to fp32 (natural column order) and use at::mm.
void run_panels(const Problem& p, const at::Tensor& x2d, const float* bias, at::Tensor& out) {
  const at::Tensor xf = x2d.to(at::kFloat).contiguous();
  const int64_t rows_per_panel = std::max<int64_t>(RB, std::min<int64_t>(p.n, kPanelBytes / (4 * p.k)));
  at::Tensor panel = at::empty({rows_per_panel, p.k}, xf.options());
  const bool avx2 = use_avx2();
  for (int64_t r0 = 0; r0 < p.n; r0 += rows_per_panel) {
    const int64_t nr = std::min(rows_per_panel, p.n - r0);
    float* pw = panel.data_ptr<float>();
    at::parallel_for(0, nr, 1, [&](int64_t a, int64_t b) {
      std::vector<float> tmp(p.Kp);
      std::vector<float> sf(p.ng);
      for (int64_t r = a; r < b; ++r) {
        row_scales(p, r0 + r, 1, sf.data());
        for (int64_t c0 = 0; c0 < p.Kp; c0 += KC) {
          const int64_t c1 = std::min(c0 + KC, p.Kp);
#if GLMCTL_X86
          if (avx2) dequant_chunk_avx2(p, r0 + r, sf.data(), c0, c1, tmp.data() + c0);
          else
#endif
            dequant_chunk_fast_scalar(p, r0 + r, sf.data(), c0, c1, tmp.data() + c0);
        }
        float* dst = pw + r * p.k;
        if (p.bits == 4) {
          for (int64_t c = 0; c < p.k; ++c) dst[c] = tmp[perm4(c)];
        } else {
          std::memcpy(dst, tmp.data(), sizeof(float) * p.k);
        }
      }
    });
    at::Tensor y = at::mm(xf, panel.narrow(0, 0, nr).t());  // [m, nr] fp32
    if (bias) y.add_(at::from_blob(const_cast<float*>(bias) + r0, {nr}, xf.options()));
    out.narrow(1, r0, nr).copy_(y);
  }
}

struct Checked {
  Problem p;
  at::Tensor x2d, qw, scale, bias_f, out2d;
  std::vector<int64_t> out_shape;
};

Checked check_inputs(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                     const c10::optional<at::Tensor>& bias, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "glmctl::quant_linear: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(x.dim() >= 1, "glmctl::quant_linear: x must have at least one dimension");
  TORCH_CHECK(qweight.dim() == 2, "glmctl::quant_linear: qweight must be 2-D [n, k/2] or [n, k]");
  TORCH_CHECK(qweight.scalar_type() == at::kChar || qweight.scalar_type() == at::kByte,
              "glmctl::quant_linear: qweight must be int8, got ", qweight.scalar_type());
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kHalf || xt == at::kBFloat16,
              "glmctl::quant_linear: x must be float32, float16 or bfloat16, got ", xt);
  const auto st = scale.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "glmctl::quant_linear: scale must be float32, float16 or bfloat16, got ", st);
  const int64_t k = x.size(-1);
  const int64_t n = qweight.size(0);
  const int64_t qcols = qweight.size(1);
  TORCH_CHECK((bits == 4 ? qcols * 2 : qcols) == k, "glmctl::quant_linear: x has ", k,
              " input features but the INT", bits, " weight has ", qcols, " columns");
  TORCH_CHECK(scale.dim() == 1 || scale.dim() == 2, "glmctl::quant_linear: scale must be [n] or [n, k/G]");
  TORCH_CHECK(scale.size(0) == n, "glmctl::quant_linear: scale has ", scale.size(0), " rows, weight has ", n);
  const int64_t ng = scale.dim() == 2 ? scale.size(1) : 1;
  TORCH_CHECK(ng >= 1 && k % ng == 0, "glmctl::quant_linear: ", ng, " scale groups do not divide ", k, " columns");
  Checked c;
  c.x2d = x.reshape({-1, k}).contiguous();
  c.qw = qweight.contiguous();
  c.scale = scale.contiguous();
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == n, "glmctl::quant_linear: bias has ", bias->numel(), " elements, expected ", n);
    c.bias_f = bias->reshape({n}).to(x.device(), at::kFloat).contiguous();
  }
  c.out_shape = x.sizes().vec();
  c.out_shape.back() = n;
  Problem& p = c.p;
  p.m = c.x2d.size(0);
  p.n = n;
  p.k = k;
  p.Kp = (k + 15) / 16 * 16;
  p.bits = static_cast<int>(bits);
  p.ng = ng;
  p.G = ng ? k / ng : k;
  p.vec_groups = ng == 1 || p.G % (bits == 4 ? 16 : 8) == 0;
  p.qw = reinterpret_cast<const int8_t*>(c.qw.data_ptr());
  p.row_bytes = qcols;
  p.scale = c.scale.data_ptr();
  p.stype = st;
  return c;
}

// path: 0 auto, 1 fused kernel, 2 dequantize panels + at::mm.
at::Tensor quant_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                            const c10::optional<at::Tensor>& bias, int64_t bits, int64_t path) {
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu() && scale.device().is_cpu(),
              "glmctl::quant_linear (CPU): all tensors must be on the CPU");
  Checked c = check_inputs(x, qweight, scale, bias, bits);
  const Problem& p = c.p;
  at::Tensor out = at::empty({p.m, p.n}, x.options());
  if (p.m == 0 || p.n == 0) return out.reshape(c.out_shape);
  if (p.k == 0) {
    if (c.bias_f.defined()) out.copy_(c.bias_f.unsqueeze(0).expand({p.m, p.n}));
    else out.zero_();
    return out.reshape(c.out_shape);
  }
  const float* bias_p = c.bias_f.defined() ? c.bias_f.data_ptr<float>() : nullptr;
  const bool panels = path == 2 || (path == 0 && p.m >= kCpuMatmulMinM);
  if (panels) {
    run_panels(p, c.x2d, bias_p, out);
  } else {
    std::vector<float> xp(p.m * p.Kp);
    pack_x(p, c.x2d.data_ptr(), c.x2d.scalar_type(), xp.data());
    run_fused(p, xp.data(), bias_p, out.data_ptr(), out.scalar_type());
  }
  return out.reshape(c.out_shape);
}

// ---- fp32 linear for small m (decode): y = x W^T + b, W fp32 [n, k] --------------------------
// A decode step is a GEMV: every weight byte is read once and used m times, so its speed is the
// memory bandwidth one gets.  MKL's sgemv reaches about half of a plain streaming read on the
// AMD EPYC of the bench machine and does not gain from a second thread, and its sgemm at m = 8
// streams a weight that is not in the cache at ~6 GB/s (bench/RESULTS.md, issue 20).  This kernel
// streams eight weight rows at a time at m = 1 (19-21 GB/s on one core, about a plain read's
// ceiling) and, at m = 2..8, tiles of weight rows x all m rows of x in one pass where AVX-512VL's
// 32 registers allow it (3 x 8 at m = 8), else 4 x 2 tiles (4 weight rows, 2 rows of x). It
// splits the rows evenly over torch's OpenMP threads, one contiguous range per thread. A row's
// result does not depend on m or the tile: every path sums in the same order (tests).
#if GLMCTL_X86
// v + the dot product of the last len (< 8) columns, one code for every tile so that a row's
// result is the same whatever the tile (the compiler may contract or vectorize such a loop
// differently in functions compiled for different targets).
GLMCTL_AVX2 __attribute__((noinline)) float dot_tail(const float* x, const float* w, int64_t len, float v) {
  for (int64_t c = 0; c < len; ++c) v += x[c] * w[c];
  return v;
}

// m = 1 (batch-1 decode): R rows at a time, R weight streams in flight, one FMA chain per row and
// half of each 16-column step.
template <int R>
GLMCTL_AVX2 void dense_rowsR_avx2(const float* x, int64_t k, const float* w, float* res) {
  __m256 a[R];
  for (int j = 0; j < R; ++j) a[j] = _mm256_setzero_ps();
  const int64_t kf = k & ~int64_t(15);
  for (int64_t c = 0; c < kf; c += 16) {
    const __m256 xa = _mm256_loadu_ps(x + c), xb = _mm256_loadu_ps(x + c + 8);
    for (int j = 0; j < R; ++j) {
      a[j] = _mm256_fmadd_ps(xa, _mm256_loadu_ps(w + j * k + c), a[j]);
      a[j] = _mm256_fmadd_ps(xb, _mm256_loadu_ps(w + j * k + c + 8), a[j]);
    }
  }
  const int64_t k8 = k & ~int64_t(7);
  if (k8 > kf) {  // one more 8-column step, as the tiles take it: every m sums in the same order
    const __m256 xa = _mm256_loadu_ps(x + kf);
    for (int j = 0; j < R; ++j) a[j] = _mm256_fmadd_ps(xa, _mm256_loadu_ps(w + j * k + kf), a[j]);
  }
  for (int j = 0; j < R; ++j) {
    res[j] = dot_tail(x + k8, w + j * k + k8, k - k8, hsum256(a[j]));
  }
}

// m = 2..8 (a batch of decode rows): micro_avx2 on a tile of RW weight rows x MB rows of x, then
// the column tail. Inline: it takes the registers of the function it is compiled into.
template <int RW, int MB, bool PF>
GLMCTL_AVX2 __attribute__((always_inline)) inline void dense_tile(const float* x, int64_t k, const float* w, float* res) {
  float acc[MB * RW * 8] = {};
  const int64_t kf = k & ~int64_t(7);
  micro_avx2<MB, RW, PF>(x, k, w, k, kf, acc);
  for (int j = 0; j < RW; ++j)
    for (int i = 0; i < MB; ++i) {
      float v = hsum256(_mm256_loadu_ps(acc + (i * RW + j) * 8));
      res[i * RW + j] = dot_tail(x + i * k + kf, w + j * k + kf, k - kf, v);
    }
}

// With AVX2's 16 registers: 4 x 2 tiles (8 accumulators + 4 weight + 1 x registers, no spills).
// The rows of x go in groups of 2: the first group reads the 4 weight rows from memory (and
// prefetches the next 4), the others from L1/L2. Also the tail rows (RW = 1).
template <int RW, int MB, bool PF = false>
GLMCTL_AVX2 void dense_tile_avx2(const float* x, int64_t k, const float* w, float* res) {
  dense_tile<RW, MB, PF>(x, k, w, res);
}

// With AVX-512VL's 32 registers (the same 256-bit instructions): one pass of RW weight rows serves
// all MB <= 8 rows of x (3 x 8: 24 accumulators + 3 weight + 1 x registers), so each weight byte is
// read once and the FMAs overlap its streaming, where the 4 x 2 tiles read it from memory in the
// first pass and compute the other three from L1. Same arithmetic: identical results.
template <int RW, int MB, bool PF = false>
GLMCTL_AVX512VL void dense_wide_avx512(const float* x, int64_t k, const float* w, float* res) {
  dense_tile<RW, MB, PF>(x, k, w, res);
}

// The wide tile for mb (1..8) rows of x.
template <int RW, bool PF>
void wide_tile(int mb, const float* x, int64_t k, const float* w, float* res) {
  switch (mb) {
    case 1: dense_wide_avx512<RW, 1, PF>(x, k, w, res); break;
    case 2: dense_wide_avx512<RW, 2, PF>(x, k, w, res); break;
    case 3: dense_wide_avx512<RW, 3, PF>(x, k, w, res); break;
    case 4: dense_wide_avx512<RW, 4, PF>(x, k, w, res); break;
    case 5: dense_wide_avx512<RW, 5, PF>(x, k, w, res); break;
    case 6: dense_wide_avx512<RW, 6, PF>(x, k, w, res); break;
    case 7: dense_wide_avx512<RW, 7, PF>(x, k, w, res); break;
    default: dense_wide_avx512<RW, 8, PF>(x, k, w, res); break;
  }
}

// dense_linear with the wide tiles: RW weight rows per tile (RW * mb + RW + 1 <= 32 registers for
// the largest group mb), then the last n % RW rows one at a time. Each tile's weight rows are
// read from memory once, by the first group of (up to) 8 rows of x, and stay in L1 for the
// others: up to m = kDenseWideMaxM (a short prefill) this beats MKL's sgemm on a weight that is
// not in the cache.
template <int RW>
void dense_wide(const float* xp, int64_t m, int64_t k, const float* wp, const float* bp, int64_t n, float* op) {
  const int64_t nblk = n / RW;
  const int64_t grain = std::max<int64_t>(1, nblk / std::max<int64_t>(1, at::get_num_threads()));
  auto tile = [&](const float* w, int64_t r0, int rows) {
    float res[8 * RW];
    for (int64_t i0 = 0; i0 < m; i0 += 8) {
      const int mb = static_cast<int>(std::min<int64_t>(8, m - i0));
      if (rows == RW) i0 ? wide_tile<RW, false>(mb, xp + i0 * k, k, w, res) : wide_tile<RW, true>(mb, xp + i0 * k, k, w, res);
      else wide_tile<1, false>(mb, xp + i0 * k, k, w, res);
      for (int i = 0; i < mb; ++i)
        for (int j = 0; j < rows; ++j) op[(i0 + i) * n + r0 + j] = res[i * rows + j] + (bp ? bp[r0 + j] : 0.f);
    }
  };
  at::parallel_for(0, nblk, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) tile(wp + RW * b * k, RW * b, RW);
  });
  for (int64_t r = RW * nblk; r < n; ++r) tile(wp + r * k, r, 1);
}
#endif

constexpr int64_t kDenseMaxM = 8;       // m above which at::linear (MKL sgemm) is used: AVX2 tiles
constexpr int64_t kDenseWideMaxM = 16;  // the same with the wide (AVX-512VL) tiles

at::Tensor dense_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "glmctl::dense_linear (CPU): tensors must be on the CPU");
  TORCH_CHECK(weight.dim() == 2, "glmctl::dense_linear: weight must be 2-D [n, k]");
  const int64_t k = x.size(-1), n = weight.size(0);
  TORCH_CHECK(weight.size(1) == k, "glmctl::dense_linear: x has ", k, " features, weight ", weight.size(1));
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor x2d = x.reshape({-1, k});
  const int64_t m = x2d.size(0);
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = n;
  if (!use_avx2() || x.scalar_type() != at::kFloat || weight.scalar_type() != at::kFloat ||
      m > (use_avx512vl() ? kDenseWideMaxM : kDenseMaxM) || m == 0 || n < 2 ||
      (has_bias && bias->scalar_type() != at::kFloat)) {  // what F.linear computes
    return at::linear(x2d, weight, has_bias ? *bias : at::Tensor()).reshape(out_shape);
  }
#if GLMCTL_X86
  const at::Tensor xc = x2d.contiguous(), wc = weight.contiguous();
  const at::Tensor bc = has_bias ? bias->contiguous() : at::Tensor();
  at::Tensor out = at::empty({m, n}, x.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  const float* bp = has_bias ? bc.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  constexpr int R = 8;
  if (m == 1 && n >= R) {  // batch-1 decode: blocks of R rows, then the last n % R rows one by one
    const int64_t nquads = n / R;
    const int64_t grain = std::max<int64_t>(1, nquads / std::max<int64_t>(1, at::get_num_threads()));
    at::parallel_for(0, nquads, grain, [&](int64_t b0, int64_t b1) {
      float res[R];
      for (int64_t b = b0; b < b1; ++b) {
        dense_rowsR_avx2<R>(xp, k, wp + R * b * k, res);
        for (int j = 0; j < R; ++j) op[R * b + j] = res[j] + (bp ? bp[R * b + j] : 0.f);
      }
    });
    for (int64_t r = R * nquads; r < n; ++r) {
      float res[1];
      dense_tile_avx2<1, 1>(xp, k, wp + r * k, res);
      op[r] = res[0] + (bp ? bp[r] : 0.f);
    }
    return out.reshape(out_shape);
  }
  if (use_avx512vl()) {  // m = 1 here only with n < 8
    if (m <= 3) dense_wide<6>(xp, m, k, wp, bp, n, op);
    else if (m <= 6) dense_wide<4>(xp, m, k, wp, bp, n, op);
    else dense_wide<3>(xp, m, k, wp, bp, n, op);
    return out.reshape(out_shape);
  }
  constexpr int RW = 4, XB = 2;  // weight rows x rows of x per tile
  const int64_t nblk = n / RW;
  const int64_t grain = std::max<int64_t>(1, nblk / std::max<int64_t>(1, at::get_num_threads()));
  auto tile = [&](const float* w, int64_t r0, int rows_w) {
    float res[RW * XB];
    for (int64_t i0 = 0; i0 < m; i0 += XB) {
      const float* xg = xp + i0 * k;
      const int mb = static_cast<int>(std::min<int64_t>(XB, m - i0));
      if (rows_w == RW) {
        if (mb == 2) i0 ? dense_tile_avx2<RW, 2>(xg, k, w, res) : dense_tile_avx2<RW, 2, true>(xg, k, w, res);
        else i0 ? dense_tile_avx2<RW, 1>(xg, k, w, res) : dense_tile_avx2<RW, 1, true>(xg, k, w, res);
      } else {
        if (mb == 2) dense_tile_avx2<1, 2>(xg, k, w, res);
        else dense_tile_avx2<1, 1>(xg, k, w, res);
      }
      for (int i = 0; i < mb; ++i)
        for (int j = 0; j < rows_w; ++j) op[(i0 + i) * n + r0 + j] = res[i * rows_w + j] + (bp ? bp[r0 + j] : 0.f);
    }
  };
  at::parallel_for(0, nblk, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) tile(wp + RW * b * k, RW * b, RW);
  });
  for (int64_t r = RW * nblk; r < n; ++r) tile(wp + r * k, r, 1);
  return out.reshape(out_shape);
#else
  return at::linear(x2d, weight, has_bias ? *bias : at::Tensor()).reshape(out_shape);
#endif
}

// ---- attention of one new token per row (a decode step) ------------------------------------
// ctx[b, h] = softmax(q[b, h] . K[b, h]^T / sqrt(d) over the keys not blocked) V[b, h], what
// glmctl.model.glm.math_attention computes for s = 1 (in exact arithmetic: it divides q by
// sqrt(d) * c and multiplies c back). Every (row, head) is independent (split over threads), its
// K and V rows are read once each, in order (a cache view [b, n, t, d] with contiguous rows),
// and blocked keys (padding) are skipped: a row's result does not depend on how much padding
// its batch gives it. A row with every key blocked gets the mean of V, as math_attention's
// uniform softmax gives it. F.scaled_dot_product_attention's CPU flash kernel spends ~300 us per
// call at 8 rows x 6 heads x ~100 keys (bench/RESULTS.md), several times the time to read K, V.
#if GLMCTL_X86
// scores[j] = q . K[keys[j]] (rows ldk apart) for j < nk, d a multiple of 8: four keys at a time
// (four independent FMA chains), each summed over d in order, then hsum256.
GLMCTL_AVX2 void scores_avx2(const float* q, const float* K, int64_t ldk, int64_t d, const int64_t* keys,
                             int64_t nk, float* scores) {
  int64_t j = 0;
  for (; j + 4 <= nk; j += 4) {
    const float* r[4] = {K + keys[j] * ldk, K + keys[j + 1] * ldk, K + keys[j + 2] * ldk, K + keys[j + 3] * ldk};
    __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t c = 0; c < d; c += 8) {
      const __m256 qv = _mm256_loadu_ps(q + c);
      for (int u = 0; u < 4; ++u) a[u] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r[u] + c), a[u]);
    }
    for (int u = 0; u < 4; ++u) scores[j + u] = hsum256(a[u]);
  }
  for (; j < nk; ++j) {
    const float* r = K + keys[j] * ldk;
    __m256 a = _mm256_setzero_ps();
    for (int64_t c = 0; c < d; c += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), _mm256_loadu_ps(r + c), a);
    scores[j] = hsum256(a);
  }
}

// o[0:d] = sum_j p[j] V[keys[j]] (d a multiple of 8), each column summed over the keys in order;
// 64 columns at a time in 8 registers.
GLMCTL_AVX2 void weighted_sum_avx2(const float* p, const float* V, int64_t ldv, int64_t d, const int64_t* keys,
                                   int64_t nk, float* o) {
  for (int64_t c0 = 0; c0 < d; c0 += 64) {
    const int w = static_cast<int>(std::min<int64_t>(64, d - c0)) / 8;
    __m256 a[8];
    for (int u = 0; u < 8; ++u) a[u] = _mm256_setzero_ps();
    if (w == 8) {
      for (int64_t j = 0; j < nk; ++j) {
        const float* r = V + keys[j] * ldv + c0;
        const __m256 pv = _mm256_set1_ps(p[j]);
        for (int u = 0; u < 8; ++u) a[u] = _mm256_fmadd_ps(pv, _mm256_loadu_ps(r + 8 * u), a[u]);
      }
    } else {
      for (int64_t j = 0; j < nk; ++j) {
        const float* r = V + keys[j] * ldv + c0;
        const __m256 pv = _mm256_set1_ps(p[j]);
        for (int u = 0; u < w; ++u) a[u] = _mm256_fmadd_ps(pv, _mm256_loadu_ps(r + 8 * u), a[u]);
      }
    }
    for (int u = 0; u < w; ++u) _mm256_storeu_ps(o + c0 + 8 * u, a[u]);
  }
}
#endif

void scores_scalar(const float* q, const float* K, int64_t ldk, int64_t d, const int64_t* keys, int64_t nk,
                   float* scores) {
  for (int64_t j = 0; j < nk; ++j) {
    const float* r = K + keys[j] * ldk;
    float v = 0.f;
    for (int64_t c = 0; c < d; ++c) v += q[c] * r[c];
    scores[j] = v;
  }
}

void weighted_sum_scalar(const float* p, const float* V, int64_t ldv, int64_t d, const int64_t* keys, int64_t nk,
                         float* o) {
  std::fill(o, o + d, 0.f);
  for (int64_t j = 0; j < nk; ++j)
    for (int64_t c = 0; c < d; ++c) o[c] += p[j] * V[keys[j] * ldv + c];
}

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& blocked) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && blocked.device().is_cpu(),
              "glmctl::decode_attention (CPU): tensors must be on the CPU");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "glmctl::decode_attention: q, k, v must be float32");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(2) == 1,
              "glmctl::decode_attention: q [b, n, 1, d], k and v [b, n, t, d]");
  const int64_t B = q.size(0), H = q.size(1), d = q.size(3), T = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == d && v.sizes() == k.sizes(),
              "glmctl::decode_attention: q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes(), " do not match");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "glmctl::decode_attention: k and v rows must be contiguous");
  TORCH_CHECK(blocked.scalar_type() == at::kBool && blocked.numel() == B * T,
              "glmctl::decode_attention: blocked must be bool with b x t elements ([b, 1, 1, t])");
  const at::Tensor qc = q.contiguous(), bl = blocked.contiguous();
  at::Tensor out = at::empty({B, H, 1, d}, q.options());
  const float* qp = qc.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const bool* bp = bl.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const bool avx2 = use_avx2() && d % 8 == 0;
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<int64_t> keys(T);
    std::vector<float> p(T);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H;
      const float* K = kp + b * k.stride(0) + h * k.stride(1);
      const float* V = vp + b * v.stride(0) + h * v.stride(1);
      int64_t nk = 0;
      for (int64_t t = 0; t < T; ++t)
        if (!bp[b * T + t]) keys[nk++] = t;
      const bool none = nk == 0;  // every key blocked: a uniform softmax over all of them
      if (none)
        for (int64_t t = 0; t < T; ++t) keys[nk++] = t;
#if GLMCTL_X86
      if (avx2) scores_avx2(qp + i * d, K, k.stride(2), d, keys.data(), nk, p.data());
      else scores_scalar(qp + i * d, K, k.stride(2), d, keys.data(), nk, p.data());
#else
      scores_scalar(qp + i * d, K, k.stride(2), d, keys.data(), nk, p.data());
#endif
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < nk; ++j) mx = std::max(mx, p[j] *= scale);
      float sum = 0.f;
      for (int64_t j = 0; j < nk; ++j) sum += (p[j] = none ? 1.f : std::exp(p[j] - mx));
      float* o = op + i * d;
#if GLMCTL_X86
      if (avx2) weighted_sum_avx2(p.data(), V, v.stride(2), d, keys.data(), nk, o);
      else weighted_sum_scalar(p.data(), V, v.stride(2), d, keys.data(), nk, o);
#else
      weighted_sum_scalar(p.data(), V, v.stride(2), d, keys.data(), nk, o);
#endif
      const float inv = 1.f / sum;
      for (int64_t c = 0; c < d; ++c) o[c] *= inv;
    }
  });
  return out;
}

std::string cpu_isa() {
  if (use_avx512vl()) return "avx2+fma+avx512vl";
  return use_avx2() ? "avx2+fma" : (cpu_has_avx2() ? "scalar (forced)" : "scalar");
}

bool cpu_force_scalar(bool on) { return g_force_scalar.exchange(on); }

bool cpu_force_avx2(bool on) { return g_force_avx2.exchange(on); }

}  // namespace
}  // namespace glmctl

TORCH_LIBRARY(glmctl, m) {
  m.def("quant_linear(Tensor x, Tensor qweight, Tensor scale, Tensor? bias=None, int bits=4, int path=0) -> Tensor");
  m.def("dense_linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor blocked) -> Tensor");
  m.def("cpu_isa() -> str", &glmctl::cpu_isa);
  m.def("cpu_force_scalar(bool on) -> bool", &glmctl::cpu_force_scalar);
  m.def("cpu_force_avx2(bool on) -> bool", &glmctl::cpu_force_avx2);
}

TORCH_LIBRARY_IMPL(glmctl, CPU, m) {
  m.impl("quant_linear", &glmctl::quant_linear_cpu);
  m.impl("dense_linear", &glmctl::dense_linear_cpu);
  m.impl("decode_attention", &glmctl::decode_attention_cpu);
}

// The shape function (fake / meta kernel, symbolic shapes included) is registered from Python:
// glmctl/kernels/__init__.py, torch.library.register_fake.

// `import glmctl.kernels._cpu` loads this library (and with it the op registrations above).
static struct PyModuleDef glmctl_cpu_module = {PyModuleDef_HEAD_INIT, "_cpu",
                                               "glmctl CPU quantized-linear kernels (torch.ops.glmctl)", -1,
                                               nullptr};

PyMODINIT_FUNC PyInit__cpu(void) { return PyModule_Create(&glmctl_cpu_module); }
