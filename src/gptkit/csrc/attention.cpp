// Causal self-attention for training on a CPU, forward and backward, one call each.
//
// A small model's heads are tiny (T = 64 positions of D = 32 in the Shakespeare benchmark),
// and ATen's flash-attention kernel spends most of its time on per-block bookkeeping and on
// the copies that turn the fused q|k|v projection into (B, H, T, D) tensors and back. Here
// each (batch, head) pair is one task that reads q, k and v in place from the projection's
// output (B, T, 3C), keeps its T x T scores in a per-thread buffer, and writes the heads'
// outputs straight into (B, T, C): no transposes, no copies. Products go through a
// register-tiled kernel (4 rows x 2 vectors) over the causal tiles only.
//
// attention_forward(qkv, n_head) -> (y, lse)
//   qkv  (B, T, 3C) float32, [q | k | v] along the last dimension, heads of D = C / n_head
//   y    (B, T, C)  softmax(q k^T / sqrt(D), causal) v, heads concatenated
//   lse  (B, H, T)  each score row's log-sum-exp, kept for the backward pass
// attention_backward(dy, qkv, y, lse, n_head) -> dqkv (B, T, 3C)
//   recomputes the probabilities from lse (P = exp(S - lse)), then
//   dS = P (dY V^T - rowsum(dY * Y)), dQ = dS K / sqrt(D), dK = dS^T Q / sqrt(D), dV = P^T dY.
//
// D must be a multiple of the vector width (16 floats under AVX-512, 8 under AVX2);
// gptkit/kernels.py checks it, with everything else that routes a call here, and otherwise
// uses scaled_dot_product_attention. model.py's explicit attention is the tests' reference.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>
#include <immintrin.h>

#include "simd.h"

namespace {
using V = at::vec::Vectorized<float>;
constexpr int64_t W = V::size();
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
inline int64_t round_up(int64_t n) { return (n + W - 1) / W * W; }

using namespace gptkit_simd;  // the product kernel's plain vector registers (simd.h)
static_assert(kWidth == W, "Vectorized<float> and simd.h's Vec differ in width");

// C[r, (0, NV W)) = alpha sum_{k0 <= k < k1} A[r, k] B[k, (0, NV W)] for r < R: R x NV
// accumulators in registers, one broadcast of A and NV loads of B per k. With TA, A is
// stored transposed (A[k, r]).
template <int R, int NV, bool TA>
inline void tile(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                 int64_t k0, int64_t k1, float alpha) {
  Vec acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = vzero();
  for (int64_t k = k0; k < k1; ++k) {
    Vec b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = vload(B + k * ldb + v * W);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const Vec a = vset(TA ? A[k * lda + r] : A[r * lda + k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = vfma(a, b[v], acc[r][v]);
    }
  }
  const Vec scale = vset(alpha);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) vstore(C + r * ldc + v * W, vmul(acc[r][v], scale));
}

template <int R, bool TA>
inline void tile_row(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                     int64_t k0, int64_t k1, int64_t N, float alpha) {
  int64_t n = 0;
  for (; n + 2 * W <= N; n += 2 * W) tile<R, 2, TA>(A, lda, B + n, ldb, C + n, ldc, k0, k1, alpha);
  if (n < N) tile<R, 1, TA>(A, lda, B + n, ldb, C + n, ldc, k0, k1, alpha);
}

// C = alpha A B for rows [0, M) in tiles of 4; tile at row r uses k in [klo(r), khi(r)) and
// writes columns [0, ncols(r)) (multiples of W). Row-major, all N/ld padded to W.
template <bool TA = false, class KLo, class KHi, class NCols>
void gemm(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
          int64_t M, KLo klo, KHi khi, NCols ncols, float alpha) {
  for (int64_t r = 0; r < M; r += 4) {
    const int64_t rows = std::min<int64_t>(4, M - r);
    const float* a = TA ? A + r : A + r * lda;
    float* c = C + r * ldc;
    const int64_t k0 = klo(r), k1 = khi(r, rows), n = ncols(r, rows);
    switch (rows) {
      case 4: tile_row<4, TA>(a, lda, B, ldb, c, ldc, k0, k1, n, alpha); break;
      case 3: tile_row<3, TA>(a, lda, B, ldb, c, ldc, k0, k1, n, alpha); break;
      case 2: tile_row<2, TA>(a, lda, B, ldb, c, ldc, k0, k1, n, alpha); break;
      default: tile_row<1, TA>(a, lda, B, ldb, c, ldc, k0, k1, n, alpha); break;
    }
  }
}

// Tiles that start at k = 0.
const auto zero = [](int64_t) { return int64_t(0); };

// k^T of one head (D x Tp, zero past T): the B operand of q k^T and of dY v^T.
inline void transpose(const float* k0, int64_t stride, int64_t T, int64_t D, int64_t Tp, float* kt) {
  // Gathers down the columns, W positions per instruction: the scalar loop it replaced was
  // the hottest code of the forward pass in a perf profile.
  using VI = at::vec::Vectorized<int32_t>;
  int32_t offsets[W];
  for (int64_t t = 0; t < W; ++t) offsets[t] = int32_t(t * stride);
  const VI index = VI::loadu(offsets);
  int64_t t0 = 0;
  for (; t0 + W <= T; t0 += W)
    for (int64_t d = 0; d < D; ++d)
      at::vec::gather<sizeof(float)>(k0 + t0 * stride + d, index).store(kt + d * Tp + t0);
  for (int64_t d = 0; d < D; ++d)
    for (int64_t t = t0; t < T; ++t) kt[d * Tp + t] = k0[t * stride + d];
}

// s = scale q k^T on the causal tiles of one head; row i becomes p = exp(s - m), -inf -> 0
// past i. Forward (lse == nullptr): m is the row max, rows are normalised, lse_out written.
// Backward: m = the saved lse, which normalises them.
void probs(const float* q0, int64_t stride, const float* kt, int64_t T, int64_t D, int64_t Tp,
           float scale, float* s, const float* lse, float* lse_out) {
  gemm(q0, stride, kt, Tp, s, Tp, T, zero, [&](int64_t, int64_t) { return D; },
       [&](int64_t r, int64_t rows) { return round_up(std::min(r + rows, T)); }, scale);
  for (int64_t i = 0; i < T; ++i) {
    float* row = s + i * Tp;
    const int64_t np = round_up(std::min((i / 4 + 1) * 4, T));
    for (int64_t j = i + 1; j < np; ++j) row[j] = kNegInf;
    float m;
    if (lse) {
      m = lse[i];
    } else {
      V vm(kNegInf);
      for (int64_t c = 0; c < np; c += W) vm = at::vec::maximum(vm, V::loadu(row + c));
      m = at::vec::vec_reduce_all<float>([](V& x, V& y) { return at::vec::maximum(x, y); }, vm);
    }
    V acc(0.f);
    const V vm(m);
    for (int64_t c = 0; c < np; c += W) {
      V e = (V::loadu(row + c) - vm).exp_u20();
      e.store(row + c);
      acc = acc + e;
    }
    if (!lse) {
      const float l = at::vec::vec_reduce_all<float>([](V& x, V& y) { return x + y; }, acc);
      const V inv(1.f / l);
      for (int64_t c = 0; c < np; c += W) (V::loadu(row + c) * inv).store(row + c);
      lse_out[i] = m + std::log(l);
    }
  }
}

// The shapes every entry point needs: qkv (B, T, 3C) float32 on the CPU, C = H x D, and D
// a whole number of vectors.
void check_qkv(const at::Tensor& qkv, int64_t H, const char* op) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.scalar_type() == at::kFloat && qkv.device().is_cpu(), op,
              ": qkv must be a float32 CPU tensor (B, T, 3C), got ", qkv.sizes(), " ",
              qkv.scalar_type());
  TORCH_CHECK(H > 0 && qkv.size(2) % (3 * H) == 0 && (qkv.size(2) / (3 * H)) % W == 0, op,
              ": 3C = ", qkv.size(2), " is not 3 x ", H, " heads of a multiple of ", W);
}

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& qkv_in, int64_t H) {
  check_qkv(qkv_in, H, "attention_forward");
  const at::Tensor qkv = qkv_in.contiguous();
  const int64_t B = qkv.size(0), T = qkv.size(1), C3 = qkv.size(2), C = C3 / 3, D = C / H;
  const int64_t Tp = round_up(T);
  auto y = at::empty({B, T, C}, qkv.options());
  auto lse = at::empty({B, H, T}, qkv.options());
  const float* base = qkv.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(float(D));
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kt(D * Tp, 0.f), s(Tp * Tp);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const float* q0 = base + b * T * C3 + h * D;
      transpose(q0 + C, C3, T, D, Tp, kt.data());
      probs(q0, C3, kt.data(), T, D, Tp, scale, s.data(), nullptr, lp + bh * T);
      gemm(s.data(), Tp, q0 + 2 * C, C3, yp + b * T * C + h * D, C, T, zero,
           [&](int64_t r, int64_t rows) { return std::min(r + rows, T); },
           [&](int64_t, int64_t) { return D; }, 1.f);
    }
  });
  return {y, lse};
}

at::Tensor attention_backward(const at::Tensor& dy_in, const at::Tensor& qkv_in, const at::Tensor& y_in,
                    const at::Tensor& lse_in, int64_t H) {
  check_qkv(qkv_in, H, "attention_backward");
  const at::Tensor qkv = qkv_in.contiguous();
  const int64_t B = qkv.size(0), T = qkv.size(1), C3 = qkv.size(2), C = C3 / 3, D = C / H;
  for (const at::Tensor* t : {&dy_in, &y_in})
    TORCH_CHECK(t->sizes() == at::IntArrayRef({B, T, C}) && t->scalar_type() == at::kFloat,
                "attention_backward: dy and y must be float32 (", B, ", ", T, ", ", C, ")");
  TORCH_CHECK(lse_in.sizes() == at::IntArrayRef({B, H, T}) && lse_in.scalar_type() == at::kFloat,
              "attention_backward: lse must be float32 (", B, ", ", H, ", ", T, ")");
  const at::Tensor dy = dy_in.contiguous(), y = y_in.contiguous(), lse = lse_in.contiguous();
  const int64_t Tp = round_up(T);
  auto dqkv = at::empty_like(qkv);
  const float* base = qkv.data_ptr<float>();
  const float* dyp = dy.data_ptr<float>();
  const float* ypp = y.data_ptr<float>();
  const float* lp = lse.data_ptr<float>();
  float* gp = dqkv.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(float(D));
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kt(D * Tp, 0.f), vt(D * Tp, 0.f), p(Tp * Tp), ds(Tp * Tp);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const float* q0 = base + b * T * C3 + h * D;
      const float* g0 = dyp + b * T * C + h * D;
      const float* y0 = ypp + b * T * C + h * D;
      float* dq0 = gp + b * T * C3 + h * D;
      transpose(q0 + C, C3, T, D, Tp, kt.data());
      transpose(q0 + 2 * C, C3, T, D, Tp, vt.data());
      probs(q0, C3, kt.data(), T, D, Tp, scale, p.data(), lp + bh * T, nullptr);
      // dP = dY V^T on the causal tiles, then dS = P (dP - rowsum(dY * Y)): 0 past i.
      gemm(g0, C, vt.data(), Tp, ds.data(), Tp, T, zero, [&](int64_t, int64_t) { return D; },
           [&](int64_t r, int64_t rows) { return round_up(std::min(r + rows, T)); }, 1.f);
      for (int64_t i = 0; i < T; ++i) {
        V acc(0.f);
        for (int64_t d = 0; d < D; d += W)
          acc = at::vec::fmadd(V::loadu(g0 + i * C + d), V::loadu(y0 + i * C + d), acc);
        const V vD(at::vec::vec_reduce_all<float>([](V& x, V& y) { return x + y; }, acc));
        const int64_t np = round_up(std::min((i / 4 + 1) * 4, T));
        float* row = ds.data() + i * Tp;
        const float* pr = p.data() + i * Tp;
        for (int64_t c = 0; c < np; c += W)
          (V::loadu(pr + c) * (V::loadu(row + c) - vD)).store(row + c);
        for (int64_t j = np; j < Tp; ++j) row[j] = 0.f;  // read as dS^T below
        for (int64_t j = np; j < Tp; ++j) p[i * Tp + j] = 0.f;
      }
      // dQ = scale dS K
      gemm(ds.data(), Tp, q0 + C, C3, dq0, C3, T, zero,
           [&](int64_t r, int64_t rows) { return std::min(r + rows, T); },
           [&](int64_t, int64_t) { return D; }, scale);
      // dK = scale dS^T Q, dV = P^T dY: key row j sums over the queries i >= j.
      auto from = [](int64_t r) { return r; };
      auto to = [&](int64_t, int64_t) { return T; };
      auto width = [&](int64_t, int64_t) { return D; };
      gemm<true>(ds.data(), Tp, q0, C3, dq0 + C, C3, T, from, to, width, scale);
      gemm<true>(p.data(), Tp, g0, C, dq0 + 2 * C, C3, T, from, to, width, 1.f);
    }
  });
  return dqkv;
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(GPTKIT_NS, m) {
  m.def("attention_forward(Tensor qkv, int n_head) -> (Tensor, Tensor)");
  m.def("attention_backward(Tensor dy, Tensor qkv, Tensor y, Tensor lse, int n_head) -> Tensor");
}
TORCH_LIBRARY_IMPL(GPTKIT_NS, CPU, m) {
  m.impl("attention_forward", &attention_forward);
  m.impl("attention_backward", &attention_backward);
}
