// Matrix-vector products for decoding on a CPU: y = x W^T (* scale) (+ bias) for a few rows x.
//
// Decoding a token at batch 1 reads every weight once and does two FLOPs per weight, so its
// speed is the rate at which the weights stream in from memory. ATen's fp32 path (MKL) runs
// at that rate; its bf16 and int8 paths do not on CPUs without native bf16 instructions:
// they convert too slowly and leave bandwidth unused. Here each weight is loaded, widened to
// fp32 in registers (bf16: a 16-bit shift; int8: sign-extend and convert) and accumulated
// in fp32, R rows at a time, while the next R rows are prefetched.
//
//   x      (M, K) float32, M small (a decode step's batch)
//   w      (N, K) float32, bfloat16 or int8, row-major (nn.Linear's layout)
//   scale  (N,)   float32 or None: per-output-row factor (int8 weights)
//   bias   (N,)   float32 or None
//   ->     (M, N) float32
//
// Built by gptkit/kernels.py for the CPU's vector ISA (AVX-512 or AVX2+FMA) under the op
// namespace GPTKIT_NS; rows are split across ATen's OpenMP threads.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <immintrin.h>

#ifndef GPTKIT_NS
#define GPTKIT_NS gptkit_gemv
#endif

namespace {

#if defined(__AVX512F__) && defined(__AVX512BW__)
using Vec = __m512;
constexpr int64_t kWidth = 16;  // floats per vector
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vload(const uint16_t* p) {  // 16 bf16 -> fp32: the bits, shifted up by 16
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline Vec vload(const int8_t* p) {
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
}
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(Vec v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
using Vec = __m256;
constexpr int64_t kWidth = 8;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vload(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline Vec vload(const int8_t* p) {
  __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(Vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}
#else
#error "gemv.cpp needs AVX-512 (F, BW) or AVX2 with FMA"
#endif

inline float to_float(float v) { return v; }
inline float to_float(uint16_t bf16) {
  uint32_t bits = uint32_t(bf16) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float to_float(int8_t q) { return float(q); }

constexpr int64_t kRows = 4;  // weight rows per block: one x load feeds kRows FMAs

// out[r] = dot(x, w[r]) for the R rows starting at w (row stride K). The rows of the next
// block (w + R K, which the same thread reads next) are prefetched one cache line per
// line consumed: the hardware prefetcher alone left a third of the bandwidth unused.
template <int64_t R, typename W>
void dot_rows(const float* x, const W* w, int64_t K, bool prefetch_next, float* out) {
  Vec acc[R];
  for (int64_t r = 0; r < R; ++r) acc[r] = vzero();
  constexpr int64_t kLine = 64 / sizeof(W);  // weights per cache line
  int64_t k = 0;
  for (; k + kWidth <= K; k += kWidth) {
    if (prefetch_next && k % kLine == 0) {
      for (int64_t r = 0; r < R; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(w + (R + r) * K + k), _MM_HINT_T0);
    }
    const Vec xv = vload(x + k);
    for (int64_t r = 0; r < R; ++r) acc[r] = vfma(xv, vload(w + r * K + k), acc[r]);
  }
  for (int64_t r = 0; r < R; ++r) {
    float s = vsum(acc[r]);
    for (int64_t j = k; j < K; ++j) s += x[j] * to_float(w[r * K + j]);  // the tail of K
    out[r] = s;
  }
}

template <typename W>
void gemv_impl(const float* x, const W* w, const float* scale, const float* bias, float* y,
               int64_t M, int64_t N, int64_t K) {
  const int64_t blocks = (N + kRows - 1) / kRows;
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    float out[kRows];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * kRows, rows = std::min(kRows, N - n0);
      for (int64_t m = 0; m < M; ++m) {
        if (rows == kRows) {
          // Later rows of x find this block in L1; only the first pass prefetches.
          const bool prefetch = m == 0 && b + 1 < end && n0 + 2 * kRows <= N;
          dot_rows<kRows>(x + m * K, w + n0 * K, K, prefetch, out);
        } else {
          for (int64_t r = 0; r < rows; ++r)
            dot_rows<1>(x + m * K, w + (n0 + r) * K, K, false, out + r);
        }
        for (int64_t r = 0; r < rows; ++r) {
          float v = out[r];
          if (scale) v *= scale[n0 + r];
          if (bias) v += bias[n0 + r];
          y[m * N + n0 + r] = v;
        }
      }
    }
  });
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scale,
                const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "gemv: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "gemv: x must be (M, K) and w (N, K)");
  TORCH_CHECK(x.size(1) == w.size(1), "gemv: x has ", x.size(1), " columns, w ", w.size(1));
  TORCH_CHECK(x.scalar_type() == at::kFloat, "gemv: x must be float32");
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  at::Tensor s, b;
  if (scale) {
    TORCH_CHECK(scale->numel() == N && scale->scalar_type() == at::kFloat, "gemv: bad scale");
    s = scale->contiguous();
  }
  if (bias) {
    TORCH_CHECK(bias->numel() == N && bias->scalar_type() == at::kFloat, "gemv: bad bias");
    b = bias->contiguous();
  }
  at::Tensor y = at::empty({M, N}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const float* sp = scale ? s.data_ptr<float>() : nullptr;
  const float* bp = bias ? b.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  switch (wc.scalar_type()) {
    case at::kFloat:
      gemv_impl(xp, wc.data_ptr<float>(), sp, bp, yp, M, N, K);
      break;
    case at::kBFloat16:
      gemv_impl(xp, reinterpret_cast<const uint16_t*>(wc.data_ptr()), sp, bp, yp, M, N, K);
      break;
    case at::kChar:
      gemv_impl(xp, wc.data_ptr<int8_t>(), sp, bp, yp, M, N, K);
      break;
    default:
      TORCH_CHECK(false, "gemv: w must be float32, bfloat16 or int8, got ", wc.scalar_type());
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(GPTKIT_NS, m) {
  m.def("gemv(Tensor x, Tensor w, Tensor? scale, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(GPTKIT_NS, CPU, m) { m.impl("gemv", &gemv); }
