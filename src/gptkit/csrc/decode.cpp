// The decode step on a CPU: matrix-vector products, and a whole transformer block fused.
//
// Decoding a token at batch 1 reads every weight once and does two FLOPs per weight, so its
// speed is the rate at which the weights stream in from memory. ATen's fp32 path (MKL) runs
// at that rate; its bf16 and int8 paths do not on CPUs without native bf16 instructions:
// they convert too slowly and leave bandwidth unused. Here each weight is loaded and widened
// in registers, R rows at a time, while the next R rows are prefetched: bf16 to fp32 (a
// 16-bit shift) with fp32 accumulation; int8 to int16, multiplied with x rounded to 16-bit
// fixed point (2^-16 of the row's largest value) and summed exactly in integers.
//
// gemv(x, w, scale, bias): y = x W^T (* scale) (+ bias).
//   x      (M, K) float32: a decode step's few rows, or a prompt's many (sgemm, below)
//   w      (N, K) float32, bfloat16 or int8, row-major (nn.Linear's layout), or bf16 or
//          int8 in the blocked layout (below): (ceil(N / 4), K / 32, 4, 32)
//   scale  (N,)   float32 or None: per-output-row factor (int8 weights; required blocked)
//   bias   (N,)   float32 or None
//   ->     (M, N) float32
//
// decode_step(...): a whole decode step for one new token per row, in one call: token and
// position embedding, every transformer block, the final norm and the unembedding. Eager
// PyTorch spent 5-8 ms per gpt2 token on the ~15 small ops around each block's four
// products (dispatch, allocation, thread wake-ups per op): a fifth of an fp32 token and
// two fifths of an int8 one; and each small op left costs ~50 us once a token's weights
// have streamed through the caches. Here the layer norms, the KV-cache writes, attention
// over the cached keys, the activation and the residual adds are plain loops between the
// products. model.py's `GPT._native_step` passes the arguments; the eager modules are its
// reference.
//
// Built by gptkit/kernels.py for the CPU's vector ISA (AVX-512 or AVX2+FMA) under the op
// namespace GPTKIT_NS; products and attention heads are split across ATen's OpenMP threads.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>  // Vectorized<float>: exp and tanh (Sleef, inside libtorch)
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <optional>
#include <type_traits>
#include <vector>
#include <immintrin.h>

#include "simd.h"

namespace {

using namespace gptkit_simd;  // Vec, IVec and their helpers (simd.h)

inline float to_float(float v) { return v; }
inline float to_float(uint16_t bf16) {
  uint32_t bits = uint32_t(bf16) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float to_float(int8_t q) { return float(q); }

constexpr int64_t kRows = 4;  // weight rows per block: one x load feeds kRows FMAs

// Rows of x multiplied together (kTogether at a time): each weight vector loaded (and
// widened) once feeds the FMAs of every row, where one row at a time loaded and widened it
// again per row, so that 8 rows cost ~4x one row's time (gpt2's head, int8 and bf16).
constexpr int64_t kTogether = kWidth == 16 ? 4 : 2;  // AVX2 has 16 registers, AVX-512 32

// out[m * R + r] = dot(x[m], w[r]) for the MR rows x[m] and the R rows starting at w (row
// stride K). The rows of the next block (w + R K, which the same thread reads next) are
// prefetched one cache line per line consumed: the hardware prefetcher alone left a third
// of the bandwidth unused.
template <int64_t R, int64_t MR, typename W>
void dot_rows(const float* const* x, const W* w, int64_t K, bool prefetch_next, float* out) {
  Vec acc[MR][R];
  for (int64_t m = 0; m < MR; ++m)
    for (int64_t r = 0; r < R; ++r) acc[m][r] = vzero();
  constexpr int64_t kLine = 64 / sizeof(W);  // weights per cache line
  int64_t k = 0;
  for (; k + kWidth <= K; k += kWidth) {
    if (prefetch_next && k % kLine == 0) {
      for (int64_t r = 0; r < R; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(w + (R + r) * K + k), _MM_HINT_T0);
    }
    Vec wv[R];
    for (int64_t r = 0; r < R; ++r) wv[r] = vload(w + r * K + k);
    for (int64_t m = 0; m < MR; ++m) {
      const Vec xv = vload(x[m] + k);
      for (int64_t r = 0; r < R; ++r) acc[m][r] = vfma(xv, wv[r], acc[m][r]);
    }
  }
  for (int64_t m = 0; m < MR; ++m) {
    for (int64_t r = 0; r < R; ++r) {
      float s = vsum(acc[m][r]);
      for (int64_t j = k; j < K; ++j) s += x[m][j] * to_float(w[r * K + j]);  // K's tail
      out[m * R + r] = s;
    }
  }
}

// int8 weights take x in 16-bit fixed point. The fp32 loop spends a sign-extend, a convert
// and an FMA per 16 weights, which left int8 compute-bound at ~15 GB/s on the dev machine's
// Xeon; a multiply-add of int16 pairs costs one (VNNI) or two uops per 32 weights. Each row
// of x becomes q = round(x / s) with s = max|x| / 32767, every entry within s / 2 of x
// (2^-16 of the row's largest: far below int8's rounding of the weights), and dot(q, w) is
// summed exactly in integers; the caller multiplies by s.
constexpr float kInt16Max = 32767.0f;
// Per int32 lane at most kChunk / kPairs pair sums of 2 * 32767 * 128: under 2^31.
constexpr int64_t kChunk = 4096;

// q = round(x / s) for one row of K values; returns s, or NaN when x holds an inf or a NaN
// (the products then come out NaN, as the fp32 loop's would).
float quantize_row(const float* x, int64_t K, int16_t* q) {
  Vec top = vzero(), poison = vzero();  // poison: sum of x * 0, NaN iff some x is not finite
  int64_t k = 0;
  for (; k + kWidth <= K; k += kWidth) {
    const Vec v = vload(x + k);
    top = vmax(top, vabs(v));
    poison = vfma(v, vzero(), poison);
  }
  float m = vmaxall(top), bad = vsum(poison);
  for (int64_t j = k; j < K; ++j) {
    m = std::max(m, std::fabs(x[j]));
    bad += x[j] * 0.0f;
  }
  if (std::isnan(bad)) return NAN;
  const float s = m / kInt16Max, inv = m > 0.0f ? 1.0f / s : 0.0f;
  const Vec vinv = vset(inv);
  for (k = 0; k + kWidth <= K; k += kWidth) vstore_int16(vmul(vload(x + k), vinv), q + k);
  for (int64_t j = k; j < K; ++j) q[j] = int16_t(std::nearbyint(x[j] * inv));
  return s;
}

// out[r] = dot(q, w[r]) for R int8 rows, as dot_rows: exact integer sums, as floats. One
// row of x (MR = 1) only: row-major int8 is the rare layout (widths not a multiple of 32).
template <int64_t R, int64_t MR>
void dot_rows(const int16_t* const* x, const int8_t* w, int64_t K, bool prefetch_next,
              float* out) {
  static_assert(MR == 1, "row-major int8 takes one row of x at a time");
  const int16_t* q = x[0];
  int64_t total[R] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int64_t k1 = std::min(K, k0 + kChunk);
    IVec acc[R];
    for (int64_t r = 0; r < R; ++r) acc[r] = izero();
    int64_t k = k0;
    for (; k + kPairs <= k1; k += kPairs) {
      if (prefetch_next && k % 64 == 0) {
        for (int64_t r = 0; r < R; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(w + (R + r) * K + k), _MM_HINT_T0);
      }
      const IVec qv = iload(q + k);
      for (int64_t r = 0; r < R; ++r) acc[r] = imadd(qv, iload(w + r * K + k), acc[r]);
    }
    for (int64_t r = 0; r < R; ++r) {
      total[r] += isum(acc[r]);
      for (int64_t j = k; j < k1; ++j) total[r] += int32_t(q[j]) * w[r * K + j];  // K's tail
    }
  }
  for (int64_t r = 0; r < R; ++r) out[r] = float(total[r]);
}

// The blocked layout. The loops above read kRows rows side by side: kRows streams of K
// weights each (768 for gpt2) that jump ahead together, which the hardware prefetchers
// follow poorly (the software prefetches of the next rows notwithstanding, int8 products
// streamed 82-93% of the read bandwidth where fp32's long rows reach ~100%). Blocked, each
// group of kRows rows is stored as K / kBlockCols chunks of [kRows rows x kBlockCols
// columns], so a group is one sequential stream, prefetched kAhead bytes ahead: a token's
// int8 products 1.17x faster, bf16's 1.07-1.11x (RESULTS.md, session 10). A blocked
// matrix is a 4-D int8 or bf16 tensor (groups, K / kBlockCols, kRows, kBlockCols); the
// last group is padded with zero rows and the true row count is the length of its scales
// (which bf16 carries too, as ones, for that).
constexpr int64_t kBlockCols = 32;
constexpr int64_t kAhead = 4096;

template <typename W>
void prefetch_chunk_ahead(const W* chunk) {
  const char* ahead = reinterpret_cast<const char*>(chunk) + kAhead;
  for (int64_t b = 0; b < int64_t(kRows * kBlockCols * sizeof(W)); b += 64)
    _mm_prefetch(ahead + b, _MM_HINT_T0);
}

// out[m * kRows + r] = dot(x[m], row r) for MR rows of x and the kRows rows of one blocked
// group of bf16 weights.
template <int64_t MR>
void dot_group(const float* const* x, const uint16_t* group, int64_t K, float* out) {
  Vec acc[MR][kRows];
  for (int64_t m = 0; m < MR; ++m)
    for (int64_t r = 0; r < kRows; ++r) acc[m][r] = vzero();
  for (int64_t k = 0; k < K; k += kBlockCols) {  // K is a multiple of kBlockCols
    const uint16_t* chunk = group + k * kRows;
    prefetch_chunk_ahead(chunk);
    for (int64_t h = 0; h < kBlockCols; h += kWidth) {
      Vec wv[kRows];
      for (int64_t r = 0; r < kRows; ++r) wv[r] = vload(chunk + r * kBlockCols + h);
      for (int64_t m = 0; m < MR; ++m) {
        const Vec xv = vload(x[m] + k + h);
        for (int64_t r = 0; r < kRows; ++r) acc[m][r] = vfma(xv, wv[r], acc[m][r]);
      }
    }
  }
  for (int64_t m = 0; m < MR; ++m)
    for (int64_t r = 0; r < kRows; ++r) out[m * kRows + r] = vsum(acc[m][r]);
}

// The same for int8 weights and x in fixed point: exact integer sums.
template <int64_t MR>
void dot_group(const int16_t* const* q, const int8_t* group, int64_t K, float* out) {
  int64_t total[MR][kRows] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {  // kChunk is a multiple of kBlockCols
    const int64_t k1 = std::min(K, k0 + kChunk);
    IVec acc[MR][kRows];
    for (int64_t m = 0; m < MR; ++m)
      for (int64_t r = 0; r < kRows; ++r) acc[m][r] = izero();
    for (int64_t k = k0; k < k1; k += kBlockCols) {
      const int8_t* chunk = group + k * kRows;
      prefetch_chunk_ahead(chunk);
      for (int64_t h = 0; h < kBlockCols; h += kPairs) {
        IVec wv[kRows];
        for (int64_t r = 0; r < kRows; ++r) wv[r] = iload(chunk + r * kBlockCols + h);
        for (int64_t m = 0; m < MR; ++m) {
          const IVec qv = iload(q[m] + k + h);
          for (int64_t r = 0; r < kRows; ++r) acc[m][r] = imadd(qv, wv[r], acc[m][r]);
        }
      }
    }
    for (int64_t m = 0; m < MR; ++m)
      for (int64_t r = 0; r < kRows; ++r) total[m][r] += isum(acc[m][r]);
  }
  for (int64_t m = 0; m < MR; ++m)
    for (int64_t r = 0; r < kRows; ++r) out[m * kRows + r] = float(total[m][r]);
}

// f(std::integral_constant<int64_t, n>) for 1 <= n <= kTogether: a count of rows of x as
// the template argument the dot products are compiled for.
template <typename F>
void with_rows(int64_t n, F&& f) {
  if constexpr (kTogether == 4) {
    if (n == 4) return f(std::integral_constant<int64_t, 4>{});
    if (n == 3) return f(std::integral_constant<int64_t, 3>{});
  }
  if (n == 2) return f(std::integral_constant<int64_t, 2>{});
  f(std::integral_constant<int64_t, 1>{});
}

template <typename W, bool kBlocked = false>
void gemv_impl(const float* x, const W* w, const float* scale, const float* bias, float* y,
               int64_t M, int64_t N, int64_t K) {
  constexpr bool kInt8 = std::is_same_v<W, int8_t>;
  static_assert(!kBlocked || !std::is_same_v<W, float>, "fp32 weights are never blocked");
  std::vector<int16_t> xq(kInt8 ? M * K : 0);  // int8 only: x in fixed point, its factors
  std::vector<float> xs(kInt8 ? M : 0);
  if constexpr (kInt8) {
    for (int64_t m = 0; m < M; ++m) xs[m] = quantize_row(x + m * K, K, &xq[m * K]);
  }
  auto row = [&](int64_t m) {  // row m of x as the dot products take it
    if constexpr (kInt8) {
      return xq.data() + m * K;
    } else {
      return x + m * K;
    }
  };
  // Rows of x taken together: kTogether, but one for row-major int8 (see its dot_rows).
  constexpr int64_t kMR = kInt8 && !kBlocked ? 1 : kTogether;
  const int64_t blocks = (N + kRows - 1) / kRows;
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    float out[kMR * kRows];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * kRows, rows = std::min(kRows, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += kMR) {
        const int64_t mr = std::min(kMR, M - m0);
        decltype(row(0)) xs_of[kMR];
        for (int64_t m = 0; m < mr; ++m) xs_of[m] = row(m0 + m);
        with_rows(mr, [&](auto together) {
          constexpr int64_t MR = decltype(together)::value;
          if constexpr (MR <= kMR) {
            if constexpr (kBlocked) {  // later rows of x find the group in L1
              dot_group<MR>(xs_of, w + n0 * K, K, out);
            } else if (rows == kRows) {
              // Later rows of x find this block in L1; only the first pass prefetches.
              const bool prefetch = m0 == 0 && b + 1 < end && n0 + 2 * kRows <= N;
              dot_rows<kRows, MR>(xs_of, w + n0 * K, K, prefetch, out);
            } else {  // the last rows of w, one at a time: out[m * kRows + r]
              for (int64_t r = 0; r < rows; ++r) {
                float one[MR];
                dot_rows<1, MR>(xs_of, w + (n0 + r) * K, K, false, one);
                for (int64_t m = 0; m < MR; ++m) out[m * kRows + r] = one[m];
              }
            }
          }
        });
        for (int64_t m = 0; m < mr; ++m) {
          for (int64_t r = 0; r < rows; ++r) {
            float v = out[m * kRows + r];
            if constexpr (kInt8) v *= xs[m0 + m];
            if (scale) v *= scale[n0 + r];
            if (bias) v += bias[n0 + r];
            y[(m0 + m) * N + n0 + r] = v;
          }
        }
      }
    }
  });
}

// Many rows of x (a prompt, a batch) make the product compute-bound, and the loops above,
// which widen every weight again for each row of x, fall behind MKL's fp32 sgemm: a
// 512-token gpt2 prompt took 2.2x fp32's time with int8 weights, 2.9x with bf16. Past
// kGemmRows rows the weights are instead widened to fp32 (times their scales), kSlabRows
// rows at a time, and multiplied by sgemm: x in fp32 then, not int8's 16-bit fixed point.
constexpr int64_t kPassRows = 8;    // rows of x per pass of the loops above
constexpr int64_t kGemmRows = 48;   // more rows than this: slabs and sgemm
constexpr int64_t kSlabRows = 512;  // weight rows widened at a time (1.5 MB for K = 768)

// out (n1 - n0, K) = rows [n0, n1) of w (row-major or blocked), as fp32, times their scales.
template <typename W, bool kBlocked>
void widen_rows(const W* w, const float* scale, int64_t n0, int64_t n1, int64_t K, float* out) {
  at::parallel_for(n0, n1, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float s = scale ? scale[n] : 1.0f;
      const Vec vs = vset(s);
      float* o = out + (n - n0) * K;
      if constexpr (kBlocked) {  // column c + j of row n: chunk c / 32 of its group
        const W* row = w + (n / kRows) * kRows * K + (n % kRows) * kBlockCols;
        for (int64_t c = 0; c < K; c += kBlockCols)
          for (int64_t j = 0; j < kBlockCols; j += kWidth)
            vstore(o + c + j, vmul(vload(row + c * kRows + j), vs));
      } else {
        const W* row = w + n * K;
        int64_t k = 0;
        for (; k + kWidth <= K; k += kWidth) vstore(o + k, vmul(vload(row + k), vs));
        for (; k < K; ++k) o[k] = to_float(row[k]) * s;
      }
    }
  });
}

// y (M, N) = x (M, K) W^T * scale + bias through sgemm, one slab of widened rows at a time.
template <typename W, bool kBlocked>
void gemm_slabs(const float* x, const W* w, const float* scale, const float* bias, float* y,
                int64_t M, int64_t N, int64_t K) {
  std::vector<float> slab(std::min(N, kSlabRows) * K);
  const at::Tensor xt = at::from_blob(const_cast<float*>(x), {M, K}, at::kFloat);
  for (int64_t n0 = 0; n0 < N; n0 += kSlabRows) {
    const int64_t n = std::min(kSlabRows, N - n0);
    widen_rows<W, kBlocked>(w, scale, n0, n0 + n, K, slab.data());
    const at::Tensor part = at::mm(xt, at::from_blob(slab.data(), {n, K}, at::kFloat).t());
    const float* pp = part.data_ptr<float>();  // (M, n)
    at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m)
        for (int64_t j = 0; j < n; ++j)
          y[m * N + n0 + j] = pp[m * n + j] + (bias ? bias[n0 + j] : 0.0f);
    });
  }
}

// y (M, N) = x (M, K) W^T + bias for fp32 weights (M, N) through sgemm, which reads them once
// where the loops above, kPassRows rows of x per pass, read them once per pass.
inline void gemm_fp32(const float* x, const at::Tensor& w, const at::Tensor& bias, float* y,
                      int64_t M, int64_t N, int64_t K) {
  const at::Tensor xt = at::from_blob(const_cast<float*>(x), {M, K}, at::kFloat);
  at::Tensor out = at::from_blob(y, {M, N}, at::kFloat);
  if (bias.defined()) {
    at::addmm_out(out, bias, xt, w.t());
  } else {
    at::mm_out(out, xt, w.t());
  }
}

// A linear layer's weight (row-major, or bf16 / int8 blocked), per-row scales and bias, checked
// against its input width K.
struct Linear {
  at::Tensor w, scale, bias;  // w contiguous; scale and bias undefined or (N,)
  int64_t N = 0;
  bool blocked = false;

  Linear(const at::Tensor& weight, const std::optional<at::Tensor>& s,
         const std::optional<at::Tensor>& b, int64_t K, const char* name) {
    TORCH_CHECK(weight.device().is_cpu(), name, ": the weight must be a CPU tensor");
    blocked = weight.dim() == 4;
    if (blocked) {
      TORCH_CHECK((weight.scalar_type() == at::kChar || weight.scalar_type() == at::kBFloat16) &&
                      weight.size(1) * kBlockCols == K && weight.size(2) == kRows &&
                      weight.size(3) == kBlockCols && s,
                  name, ": a blocked weight must be int8 or bf16 (groups, ", K / kBlockCols, ", ",
                  kRows, ", ", kBlockCols, ") with scales, got ", weight.sizes());
      N = s->numel();
      TORCH_CHECK(N > (weight.size(0) - 1) * kRows && N <= weight.size(0) * kRows, name, ": ",
                  N, " scales for ", weight.size(0), " groups of ", kRows, " rows");
    } else {
      TORCH_CHECK(weight.dim() == 2 && weight.size(1) == K, name, ": the weight must be a (N, ",
                  K, ") matrix, got ", weight.sizes());
      N = weight.size(0);
    }
    w = weight.contiguous();
    if (s) {
      TORCH_CHECK(s->numel() == N && s->scalar_type() == at::kFloat, name, ": bad scale");
      scale = s->contiguous();
    }
    if (b) {
      TORCH_CHECK(b->numel() == N && b->scalar_type() == at::kFloat, name, ": bad bias");
      bias = b->contiguous();
    }
  }

  int64_t out_features() const { return N; }
  int64_t in_features() const { return blocked ? w.size(1) * kBlockCols : w.size(1); }

  // y (M, N) = x (M, K) W^T * scale + bias
  void operator()(const float* x, int64_t M, float* y) const {
    const int64_t K = in_features();
    const float* sp = scale.defined() ? scale.data_ptr<float>() : nullptr;
    const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
    auto run = [&](const auto* wp, auto blocked_tag) {
      using W = std::remove_cv_t<std::remove_pointer_t<decltype(wp)>>;
      constexpr bool kBlocked = decltype(blocked_tag)::value;
      if constexpr (std::is_same_v<W, float>) {
        if (M > kPassRows) return gemm_fp32(x, w, bias, y, M, N, K);
      } else {
        if (M > kGemmRows) return gemm_slabs<W, kBlocked>(x, wp, sp, bp, y, M, N, K);
      }
      for (int64_t m0 = 0; m0 < M; m0 += kPassRows) {  // x's rows stay in L1 for a block
        const int64_t rows = std::min(kPassRows, M - m0);
        gemv_impl<W, kBlocked>(x + m0 * K, wp, sp, bp, y + m0 * N, rows, N, K);
      }
    };
    const void* data = w.data_ptr();
    switch (w.scalar_type()) {
      case at::kFloat:
        return run(static_cast<const float*>(data), std::false_type{});
      case at::kBFloat16:
        if (blocked) return run(static_cast<const uint16_t*>(data), std::true_type{});
        return run(static_cast<const uint16_t*>(data), std::false_type{});
      case at::kChar:
        if (blocked) return run(static_cast<const int8_t*>(data), std::true_type{});
        return run(static_cast<const int8_t*>(data), std::false_type{});
      default:
        TORCH_CHECK(false, "w must be float32, bfloat16 or int8, got ", w.scalar_type());
    }
  }
};

at::Tensor gemv(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scale,
                const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "gemv: CPU tensors only");
  TORCH_CHECK(x.dim() == 2, "gemv: x must be (M, K)");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "gemv: x must be float32");
  const Linear linear(w, scale, bias, x.size(1), "gemv");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({xc.size(0), linear.out_features()}, xc.options());
  linear(xc.data_ptr<float>(), xc.size(0), y.data_ptr<float>());
  return y;
}

// ---- where a decode step's time goes ---------------------------------------------------

// decode_step adds the seconds it spends in each phase to process-wide totals, which
// `decode_profile` reads: the matrix-vector products, whose time scales with the bytes of
// weights, against the work that does not (attention over the cached keys and values,
// norms, activations, embeddings). Two clock reads per phase, ~100 per step: microseconds
// against a step of milliseconds.
enum Phase : int64_t { kProducts = 0, kAttention = 1, kOther = 2, kPhases = 3 };

class Laps {
 public:
  // The time since the previous lap (or since construction) goes to `phase`.
  void lap(Phase phase) {
    const Clock::time_point now = Clock::now();
    seconds_[phase] += std::chrono::duration<double>(now - last_).count();
    last_ = now;
  }

  // Adds this step's laps to the process-wide totals.
  void commit() const {
    Totals& t = totals();
    std::lock_guard<std::mutex> lock(t.mutex);
    t.steps += 1;
    for (int64_t p = 0; p < kPhases; ++p) t.seconds[p] += seconds_[p];
  }

  struct Totals {
    std::mutex mutex;
    int64_t steps = 0;
    double seconds[kPhases] = {};
  };
  static Totals& totals() {
    static Totals t;
    return t;
  }

 private:
  using Clock = std::chrono::steady_clock;
  Clock::time_point last_ = Clock::now();
  double seconds_[kPhases] = {};
};

// [steps, products, attention, other]: decode steps and seconds per phase since the last
// reset, summed over every thread that called decode_step; `reset` zeroes them after.
std::vector<double> decode_profile(bool reset) {
  Laps::Totals& t = Laps::totals();
  std::lock_guard<std::mutex> lock(t.mutex);
  std::vector<double> out = {double(t.steps), t.seconds[kProducts], t.seconds[kAttention],
                             t.seconds[kOther]};
  if (reset) {
    t.steps = 0;
    std::fill(t.seconds, t.seconds + kPhases, 0.0);
  }
  return out;
}

// ---- the fused block -------------------------------------------------------------------

// dot(a, b) for fp32 a and fp32 or bf16 b (a KV cache's keys).
template <typename T>
float dot(const float* a, const T* b, int64_t n) {
  Vec acc = vzero();
  int64_t i = 0;
  for (; i + kWidth <= n; i += kWidth) acc = vfma(vload(a + i), vload(b + i), acc);
  float s = vsum(acc);
  for (; i < n; ++i) s += a[i] * to_float(b[i]);
  return s;
}

// A KV cache holds fp32 or bf16 (as its raw 16 bits); new keys and values are stored
// rounded to the nearest bf16, ties to even, as torch's conversion rounds them.
inline void store_kv(const float* src, int64_t n, float* dst) {
  std::memcpy(dst, src, sizeof(float) * n);
}
inline void store_kv(const float* src, int64_t n, uint16_t* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::BFloat16(src[i]).x;
}

using FVec = at::vec::Vectorized<float>;  // ATen's vector type, for its exp and tanh

float lane_sum(FVec v) {
  float lanes[FVec::size()];
  v.store(lanes);
  float total = 0.0f;
  for (float lane : lanes) total += lane;
  return total;
}

// y = LN(x) * gain + bias per row of C, vectorized (x and y may alias). Two passes for the
// statistics: the mean, then the squares of the deviations from it.
void layer_norm(const float* x, const float* gain, const float* bias, double eps, int64_t M,
                int64_t C, float* y) {
  constexpr int64_t W = FVec::size();
  for (int64_t m = 0; m < M; ++m, x += C, y += C) {
    FVec sums(0.0f);
    int64_t c = 0;
    for (; c + W <= C; c += W) sums = sums + FVec::loadu(x + c);
    float total = lane_sum(sums);
    for (; c < C; ++c) total += x[c];
    const float mean = total / float(C);
    const FVec vmean(mean);
    FVec squares(0.0f);
    for (c = 0; c + W <= C; c += W) {
      const FVec d = FVec::loadu(x + c) - vmean;
      squares = squares + d * d;
    }
    float var = lane_sum(squares);
    for (; c < C; ++c) var += (x[c] - mean) * (x[c] - mean);
    const float rstd = float(1.0 / std::sqrt(double(var) / double(C) + eps));
    const FVec vrstd(rstd);
    for (c = 0; c + W <= C; c += W) {
      FVec v = (FVec::loadu(x + c) - vmean) * vrstd * FVec::loadu(gain + c);
      if (bias) v = v + FVec::loadu(bias + c);
      v.store(y + c);
    }
    for (; c < C; ++c) {
      const float v = (x[c] - mean) * rstd * gain[c];
      y[c] = bias ? v + bias[c] : v;
    }
  }
}

enum Activation : int64_t { kGeluTanh = 0, kRelu = 1, kLeakyRelu = 2 };

// GPT-2's GELU, 0.5 v (1 + tanh(sqrt(2/pi) (v + 0.044715 v^3))), as ATen's own kernel
// computes it (a scalar std::tanh per value cost ~0.15 ms per gpt2 block).
float gelu_tanh(float v) {
  constexpr float kBeta = 0.7978845608028654f, kKappa = 0.044715f;
  return 0.5f * v * (1.0f + std::tanh(kBeta * (v + kKappa * v * v * v)));
}

FVec gelu_tanh(FVec v) {
  const FVec beta(0.7978845608028654f), kappa(0.044715f), half(0.5f), one(1.0f);
  return half * v * (one + (beta * (v + kappa * v * v * v)).tanh());
}

void activate(float* h, int64_t n, int64_t activation, float slope) {
  if (activation != kGeluTanh) {
    for (int64_t i = 0; i < n; ++i)
      h[i] = h[i] >= 0.0f ? h[i] : (activation == kRelu ? 0.0f : slope * h[i]);
    return;
  }
  int64_t i = 0;
  for (; i + FVec::size() <= n; i += FVec::size()) gelu_tanh(FVec::loadu(h + i)).store(h + i);
  for (; i < n; ++i) h[i] = gelu_tanh(h[i]);
}

// w[i] = exp(w[i] - top) for i in [0, n); returns their sum.
float exp_shifted(float* w, int64_t n, float top) {
  const FVec shift(top);
  FVec sums(0.0f);
  int64_t i = 0;
  for (; i + FVec::size() <= n; i += FVec::size()) {
    const FVec e = (FVec::loadu(w + i) - shift).exp();
    e.store(w + i);
    sums = sums + e;
  }
  float total = lane_sum(sums);
  for (; i < n; ++i) total += (w[i] = std::exp(w[i] - top));
  return total;
}

// The data of an optional float32 vector of n values, checked; null when absent.
const float* data_or_null(const std::optional<at::Tensor>& t, int64_t n, const char* name) {
  if (!t) return nullptr;
  TORCH_CHECK(t->numel() == n && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                  t->device().is_cpu(),
              "decode_step: ", name, " must be contiguous float32 of ", n, " values");
  return t->data_ptr<float>();
}

// The tensors of one block, from 16 consecutive entries of decode_step's `weights`:
// ln_1 (weight, bias), ln_2 (weight, bias), then (weight, scale, bias) of qkv, the
// attention output projection (weight None: no projection), fc and proj.
struct Block {
  const float *g1, *b1, *g2, *b2;  // layer-norm gains and biases (biases may be null)
  Linear qkv, fc, proj;
  std::optional<Linear> out;
  int64_t band;  // > 0: a query sees only its last `band` keys

  static constexpr int64_t kTensors = 16;

  Block(const c10::List<std::optional<at::Tensor>>& w, int64_t first, int64_t C, int64_t band)
      : g1(vector_of(w, first, C, "ln_1 weight", true)),
        b1(vector_of(w, first + 1, C, "ln_1 bias", false)),
        g2(vector_of(w, first + 2, C, "ln_2 weight", true)),
        b2(vector_of(w, first + 3, C, "ln_2 bias", false)),
        qkv(linear_of(w, first + 4, C, 3 * C, "qkv")),
        fc(linear_of(w, first + 10, C, -1, "fc")),
        proj(linear_of(w, first + 13, fc.out_features(), C, "proj")),
        band(band) {
    if (w.get(first + 7)) out.emplace(linear_of(w, first + 7, C, C, "out"));
  }

  static const float* vector_of(const c10::List<std::optional<at::Tensor>>& w, int64_t i,
                                int64_t n, const char* name, bool required) {
    const std::optional<at::Tensor> t = w.get(i);
    TORCH_CHECK(t || !required, "decode_step: ", name, " is missing");
    return data_or_null(t, n, name);
  }

  static Linear linear_of(const c10::List<std::optional<at::Tensor>>& w, int64_t i, int64_t K,
                          int64_t N, const char* name) {
    const std::optional<at::Tensor> weight = w.get(i);
    TORCH_CHECK(weight.has_value(), "decode_step: the ", name, " weight is missing");
    Linear linear(*weight, w.get(i + 1), w.get(i + 2), K, name);
    TORCH_CHECK(N < 0 || linear.out_features() == N, "decode_step: ", name, " must have ", N,
                " rows, got ", linear.out_features());
    return linear;
  }
};

// Scratch rows for one decode step: (M, C) normed input, (M, 3C) q|k|v, (M, C) attention
// output and its projection, (M, F) feed-forward.
struct Scratch {
  std::vector<float> h, qkv, att, a, f;
  Scratch(int64_t M, int64_t C, int64_t F)
      : h(M * C), qkv(M * 3 * C), att(M * C), a(M * C), f(M * F) {}
};

// One layer's keys and values in a KV cache: (rows, H, S, D) each, fp32 or bf16. Position
// s is held at slot s, or at s % S in a ring buffer (a banded layer's last S positions).
template <typename T>
struct LayerCache {
  T *k, *v;
  int64_t S;
  bool ring;

  int64_t slot(int64_t s) const { return ring ? s % S : s; }
  // The first value of (row m, head hd) at position s, in k or v.
  int64_t at(int64_t m, int64_t hd, int64_t H, int64_t D, int64_t s) const {
    return ((m * H + hd) * S + slot(s)) * D;
  }
};

// Heads attend, each to its own row's keys: att[m, head] = softmax(q k^T / sqrt(D)) v over
// the positions [max(0, p[m] - band + 1), p[m]] of cache row m.
template <typename T>
void attend(const float* qkv, const LayerCache<T>& cache, const int64_t* p, int64_t band,
            int64_t M, int64_t H, int64_t D, float* att) {
  const int64_t C = H * D;
  const float inv_sqrt_d = 1.0f / std::sqrt(float(D));
  at::parallel_for(0, M * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> w;  // w[s - first]: the weight of position s
    for (int64_t i = begin; i < end; ++i) {
      const int64_t m = i / H, hd = i % H;
      const int64_t first = band > 0 ? std::max<int64_t>(0, p[m] - band + 1) : 0;
      const int64_t n = p[m] + 1 - first;
      w.resize(n);
      const float* q = qkv + m * 3 * C + hd * D;
      float top = -INFINITY;
      for (int64_t j = 0; j < n; ++j) {
        w[j] = dot(q, cache.k + cache.at(m, hd, H, D, first + j), D) * inv_sqrt_d;
        top = std::max(top, w[j]);
      }
      const float total = exp_shifted(w.data(), n, top);
      float* o = att + m * C + hd * D;
      std::fill(o, o + D, 0.0f);
      for (int64_t j = 0; j < n; ++j) {
        const float wj = w[j] / total;
        const T* vs = cache.v + cache.at(m, hd, H, D, first + j);
        for (int64_t d = 0; d < D; ++d) o[d] += wj * to_float(vs[d]);
      }
    }
  });
}

// One block on the residual rows r (M, C), in place, as model.py's Block.forward:
//   pre-LN:  r += attn(LN1(r));  r += mlp(LN2(r))
//   post-LN: r = LN1(r + attn(r));  r = LN2(r + mlp(r))
// The new keys and values go to position p[m] of cache row m first.
template <typename T>
void block_step(const Block& blk, float* r, const LayerCache<T>& cache, const int64_t* p,
                int64_t M, int64_t H, bool post_norm, int64_t activation, float slope,
                double eps, Scratch& buf, Laps& laps) {
  const int64_t C = blk.qkv.in_features(), D = C / H, F = blk.fc.out_features();
  const float* in = r;
  if (!post_norm) {
    layer_norm(r, blk.g1, blk.b1, eps, M, C, buf.h.data());
    in = buf.h.data();
  }
  laps.lap(kOther);
  blk.qkv(in, M, buf.qkv.data());  // (M, 3C): q | k | v, head-major within each
  laps.lap(kProducts);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t hd = 0; hd < H; ++hd) {
      const int64_t at = cache.at(m, hd, H, D, p[m]);
      store_kv(&buf.qkv[m * 3 * C + C + hd * D], D, cache.k + at);
      store_kv(&buf.qkv[m * 3 * C + 2 * C + hd * D], D, cache.v + at);
    }
  }
  attend(buf.qkv.data(), cache, p, blk.band, M, H, D, buf.att.data());
  laps.lap(kAttention);  // with the cache writes
  const float* attended = buf.att.data();
  if (blk.out) {
    (*blk.out)(buf.att.data(), M, buf.a.data());
    laps.lap(kProducts);
    attended = buf.a.data();
  }
  for (int64_t i = 0; i < M * C; ++i) r[i] += attended[i];
  in = r;
  if (post_norm) {
    layer_norm(r, blk.g1, blk.b1, eps, M, C, r);
  } else {
    layer_norm(r, blk.g2, blk.b2, eps, M, C, buf.h.data());
    in = buf.h.data();
  }
  laps.lap(kOther);
  blk.fc(in, M, buf.f.data());
  laps.lap(kProducts);
  activate(buf.f.data(), M * F, activation, slope);
  laps.lap(kOther);
  blk.proj(buf.f.data(), M, buf.a.data());
  laps.lap(kProducts);
  for (int64_t i = 0; i < M * C; ++i) r[i] += buf.a[i];
  if (post_norm) layer_norm(r, blk.g2, blk.b2, eps, M, C, r);
}

// Row `id` of an embedding table (rows, C) of fp32, bf16 or int8 weights, or of bf16 / int8
// ones blocked like a Linear's (a tied head's), times the row's scale and `factor`, into
// out (C).
void embedding_row(const at::Tensor& table, const float* scale, int64_t id, int64_t C,
                   float factor, float* out) {
  const float s = (scale ? scale[id] : 1.0f);
  if (table.dim() == 4) {  // blocked: chunk c of the row sits in its group's chunk c
    auto gather = [&](const auto* data) {
      const auto* row = data + (id / kRows) * kRows * C + (id % kRows) * kBlockCols;
      for (int64_t c = 0; c < C; ++c)
        out[c] = to_float(row[(c / kBlockCols) * kRows * kBlockCols + c % kBlockCols]) * s;
    };
    if (table.scalar_type() == at::kChar) {
      gather(table.data_ptr<int8_t>());
    } else {
      gather(reinterpret_cast<const uint16_t*>(table.data_ptr()));
    }
  } else {
    switch (table.scalar_type()) {
      case at::kFloat: {
        const float* row = table.data_ptr<float>() + id * C;
        for (int64_t c = 0; c < C; ++c) out[c] = row[c] * s;
        break;
      }
      case at::kBFloat16: {
        const auto* row = reinterpret_cast<const uint16_t*>(table.data_ptr()) + id * C;
        for (int64_t c = 0; c < C; ++c) out[c] = to_float(row[c]) * s;
        break;
      }
      case at::kChar: {
        const int8_t* row = table.data_ptr<int8_t>() + id * C;
        for (int64_t c = 0; c < C; ++c) out[c] = to_float(row[c]) * s;
        break;
      }
      default:
        TORCH_CHECK(false, "decode_step: the embedding must be float32, bfloat16 or int8");
    }
  }
  if (factor != 1.0f)
    for (int64_t c = 0; c < C; ++c) out[c] *= factor;
}

// One decode step, token ids to next-token logits, for one new token per row: model.py's
// GPT.forward for idx (M, 1) with a KV cache, in one call.
//   idx               (M,) int64 token ids
//   wte, wte_scale    the token embedding (V, C), fp32 / bf16 / int8 (or bf16 / int8
//                     blocked as a tied head's weight), and its row scales (int8, blocked)
//   embed_scale       factor on the token embedding (sqrt(C) or 1)
//   positions         (P, C) float32: learned position vectors or the sinusoidal table
//   k_cache, v_cache  (L_dense, rows >= M, H, S, D) float32 or bfloat16
//   ring_k, ring_v    (L_ring, rows >= M, H, W, D), the same dtype: ring buffers of banded
//                     layers (position s at slot s % W; L_ring may be 0)
//   slots             one per layer: slots[l] >= 0 keeps layer l's keys in k_cache[slots[l]],
//                     slots[l] < 0 in ring_k[-1 - slots[l]] (then 0 < bands[l] <= W)
//   pos               (M,) int64: the position of row m's new token
//   bands             one per layer: > 0 limits a query to its last `band` keys
//   weights           Block::kTensors per layer
//   lnf_w, lnf_b      the final layer norm (None: no final norm)
//   head, head_scale  the unembedding (V, C) and int8's row scales
// Returns the logits (M, V).
at::Tensor decode_step(const at::Tensor& idx, const at::Tensor& wte,
                       const std::optional<at::Tensor>& wte_scale, double embed_scale,
                       const at::Tensor& positions, at::Tensor& k_cache, at::Tensor& v_cache,
                       at::Tensor& ring_k, at::Tensor& ring_v, at::IntArrayRef slots,
                       const at::Tensor& pos, at::IntArrayRef bands, int64_t n_head,
                       bool post_norm, int64_t activation, double slope, double eps,
                       const c10::List<std::optional<at::Tensor>>& weights,
                       const std::optional<at::Tensor>& lnf_w,
                       const std::optional<at::Tensor>& lnf_b, const at::Tensor& head,
                       const std::optional<at::Tensor>& head_scale) {
  Laps laps;
  TORCH_CHECK(idx.device().is_cpu() && idx.dim() == 1 && idx.scalar_type() == at::kLong,
              "decode_step: idx must hold one int64 token id per row");
  const bool wte_blocked = wte.dim() == 4;
  TORCH_CHECK(wte.device().is_cpu() && wte.is_contiguous() &&
                  (wte.dim() == 2 || (wte_blocked &&
                                      (wte.scalar_type() == at::kChar ||
                                       wte.scalar_type() == at::kBFloat16) &&
                                      wte.size(2) == kRows && wte.size(3) == kBlockCols &&
                                      wte_scale && wte_scale->numel() > (wte.size(0) - 1) * kRows &&
                                      wte_scale->numel() <= wte.size(0) * kRows)),
              "decode_step: the embedding must be a contiguous CPU (V, C) matrix or a blocked "
              "one with its scales");
  const int64_t M = idx.size(0), H = n_head;
  const int64_t V = wte_blocked ? wte_scale->numel() : wte.size(0);
  const int64_t C = wte_blocked ? wte.size(1) * kBlockCols : wte.size(1);
  const int64_t L = int64_t(bands.size());
  TORCH_CHECK(H > 0 && C % H == 0, "decode_step: ", H, " heads do not divide ", C);
  TORCH_CHECK(int64_t(weights.size()) == L * Block::kTensors, "decode_step: ", L,
              " layers need ", L * Block::kTensors, " weights, got ", weights.size());
  const int64_t D = C / H;
  for (const at::Tensor* cache : {&k_cache, &v_cache, &ring_k, &ring_v}) {
    TORCH_CHECK(cache->device().is_cpu() &&
                    (cache->scalar_type() == at::kFloat ||
                     cache->scalar_type() == at::kBFloat16) &&
                    cache->scalar_type() == k_cache.scalar_type() && cache->is_contiguous() &&
                    cache->dim() == 5 && cache->size(1) >= M && cache->size(2) == H &&
                    cache->size(4) == D,
                "decode_step: the KV cache must be contiguous float32 or bfloat16 (layers, "
                ">= ", M, ", ", H, ", S, ", D, "), all of one dtype, got ", cache->sizes());
  }
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && ring_k.sizes() == ring_v.sizes(),
              "decode_step: keys and values differ");
  const int64_t S = k_cache.size(3), W = ring_k.size(3);
  TORCH_CHECK(int64_t(slots.size()) == L, "decode_step: one cache slot per layer");
  bool dense = false;  // whether some layer keeps every position (then they must fit S)
  for (int64_t l = 0; l < L; ++l) {
    const int64_t i = slots[l] >= 0 ? slots[l] : -1 - slots[l];
    const at::Tensor& keys = slots[l] >= 0 ? k_cache : ring_k;
    TORCH_CHECK(i < keys.size(0), "decode_step: layer ", l, "'s cache slot is out of range");
    TORCH_CHECK(slots[l] >= 0 || (0 < bands[l] && bands[l] <= W), "decode_step: layer ", l,
                "'s band must fit its ring buffer of ", W);
    dense = dense || slots[l] >= 0;
  }
  TORCH_CHECK(pos.numel() == M && pos.scalar_type() == at::kLong && pos.device().is_cpu(),
              "decode_step: pos must hold one int64 position per row");
  TORCH_CHECK(positions.scalar_type() == at::kFloat && positions.is_contiguous() &&
                  positions.dim() == 2 && positions.size(1) == C,
              "decode_step: positions must be a contiguous float32 (P, ", C, ") table");
  const at::Tensor ids = idx.contiguous(), at_pos = pos.contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t* p = at_pos.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m) {
    TORCH_CHECK(0 <= id[m] && id[m] < V, "decode_step: token id ", id[m], " outside [0, ", V,
                ")");
    TORCH_CHECK(0 <= p[m] && (p[m] < S || !dense) && p[m] < positions.size(0),
                "decode_step: position ", p[m], " outside the cache or the position table");
  }
  TORCH_CHECK(activation >= kGeluTanh && activation <= kLeakyRelu, "decode_step: activation");
  const float* wte_s = data_or_null(wte_scale, V, "the embedding's scale");
  const float* g = data_or_null(lnf_w, C, "the final norm's weight");
  const float* b = data_or_null(lnf_b, C, "the final norm's bias");
  const Linear unembed(head, head_scale, std::nullopt, C, "decode_step head");

  std::vector<Block> blocks;
  blocks.reserve(L);
  for (int64_t l = 0; l < L; ++l) blocks.emplace_back(weights, l * Block::kTensors, C, bands[l]);
  const int64_t F = blocks.empty() ? 0 : blocks[0].fc.out_features();
  Scratch buf(M, C, F);

  // 1. token embedding (scaled) plus position vector: the residual stream x (M, C)
  std::vector<float> x(M * C);
  const float* table = positions.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    embedding_row(wte, wte_s, id[m], C, float(embed_scale), &x[m * C]);
    for (int64_t c = 0; c < C; ++c) x[m * C + c] += table[p[m] * C + c];
  }
  // 2. the blocks
  auto run_blocks = [&](auto type) {  // the caches hold decltype(type): fp32 or bf16
    using T = decltype(type);
    auto data = [](at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); };
    for (int64_t l = 0; l < L; ++l) {
      TORCH_CHECK(blocks[l].fc.out_features() == F, "decode_step: layers of different widths");
      const bool ring = slots[l] < 0;
      at::Tensor &k = ring ? ring_k : k_cache, &v = ring ? ring_v : v_cache;
      const int64_t first = (ring ? -1 - slots[l] : slots[l]) * k.stride(0);
      const LayerCache<T> cache{data(k) + first, data(v) + first, ring ? W : S, ring};
      block_step(blocks[l], x.data(), cache, p, M, H, post_norm, activation, float(slope), eps,
                 buf, laps);
    }
  };
  if (k_cache.scalar_type() == at::kBFloat16) {
    run_blocks(uint16_t{});
  } else {
    run_blocks(float{});
  }
  // 3. final norm (pre-LN models), then the unembedding
  if (g) layer_norm(x.data(), g, b, eps, M, C, x.data());
  at::Tensor logits = at::empty({M, unembed.out_features()}, idx.options().dtype(at::kFloat));
  laps.lap(kOther);
  unembed(x.data(), M, logits.data_ptr<float>());
  laps.lap(kProducts);
  laps.commit();
  return logits;
}

}  // namespace

TORCH_LIBRARY(GPTKIT_NS, m) {
  m.def("gemv(Tensor x, Tensor w, Tensor? scale, Tensor? bias) -> Tensor");
  m.def(
      "decode_step(Tensor idx, Tensor wte, Tensor? wte_scale, float embed_scale, "
      "Tensor positions, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) ring_k, "
      "Tensor(d!) ring_v, int[] slots, Tensor pos, int[] bands, "
      "int n_head, bool post_norm, int activation, float slope, float eps, "
      "Tensor?[] weights, Tensor? lnf_w, Tensor? lnf_b, Tensor head, Tensor? head_scale) "
      "-> Tensor");
  m.def("decode_profile(bool reset) -> float[]");
}

TORCH_LIBRARY_IMPL(GPTKIT_NS, CPU, m) {
  m.impl("gemv", &gemv);
  m.impl("decode_step", &decode_step);
}

TORCH_LIBRARY_IMPL(GPTKIT_NS, CatchAll, m) { m.impl("decode_profile", &decode_profile); }
