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
// The scores are kept transposed, a row per key and a column per query, so that the
// softmax over keys runs down the columns: W queries per vector, plain vector max, exp and
// sums across rows, no reduction inside a vector. (Kept the other way round, every row
// paid two horizontal reductions, a division and a log for a row of 1-4 vectors: the
// forward pass ran 1.2x slower, the backward 1.1x.)
//
// attention_forward(qkv, n_head) -> (y, lse)
//   qkv  (B, T, 3C) float32, [q | k | v] along the last dimension, heads of D = C / n_head
//   y    (B, T, C)  softmax(q k^T / sqrt(D), causal) v, heads concatenated
//   lse  (B, H, T)  each query's log-sum-exp of its scores, kept for the backward pass
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

// C[r, (0, NV W)) = sum_{k0 <= k < k1} A[r, k] B[k, (0, NV W)] times alpha, or times
// row_scale[r] where given, for r < R: R x NV accumulators in registers, one broadcast of A
// and NV loads of B per k. With TA, A is stored transposed (A[k, r]).
template <int R, int NV, bool TA>
inline void tile(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                 int64_t k0, int64_t k1, float alpha, const float* row_scale) {
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
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const Vec scale = vset(row_scale ? row_scale[r] : alpha);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) vstore(C + r * ldc + v * W, vmul(acc[r][v], scale));
  }
}

template <int R, bool TA>
inline void tile_row(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                     int64_t k0, int64_t k1, int64_t n0, int64_t n1, float alpha,
                     const float* row_scale) {
  int64_t n = n0;
  for (; n + 2 * W <= n1; n += 2 * W)
    tile<R, 2, TA>(A, lda, B + n, ldb, C + n, ldc, k0, k1, alpha, row_scale);
  if (n < n1) tile<R, 1, TA>(A, lda, B + n, ldb, C + n, ldc, k0, k1, alpha, row_scale);
}

// C = A B for rows [0, M) in tiles of 4, times alpha or row_scale[row]. The tile at row r
// sums over k in [klo(r), khi(r, rows)) and writes columns [nlo(r), nhi) (nlo a multiple
// of W). Row-major, every column count and leading dimension a multiple of W.
template <bool TA = false, class KLo, class KHi, class NLo>
void gemm(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
          int64_t M, KLo klo, KHi khi, NLo nlo, int64_t nhi, float alpha,
          const float* row_scale = nullptr) {
  for (int64_t r = 0; r < M; r += 4) {
    const int64_t rows = std::min<int64_t>(4, M - r);
    const float* a = TA ? A + r : A + r * lda;
    float* c = C + r * ldc;
    const float* rs = row_scale ? row_scale + r : nullptr;
    const int64_t k0 = klo(r), k1 = khi(r, rows), n0 = nlo(r);
    switch (rows) {
      case 4: tile_row<4, TA>(a, lda, B, ldb, c, ldc, k0, k1, n0, nhi, alpha, rs); break;
      case 3: tile_row<3, TA>(a, lda, B, ldb, c, ldc, k0, k1, n0, nhi, alpha, rs); break;
      case 2: tile_row<2, TA>(a, lda, B, ldb, c, ldc, k0, k1, n0, nhi, alpha, rs); break;
      default: tile_row<1, TA>(a, lda, B, ldb, c, ldc, k0, k1, n0, nhi, alpha, rs); break;
    }
  }
}

// The bounds the products below use: from 0, from the tile's own row, up to T, up to
// (and including) the tile's last row, and the first column of the vector holding row r.
const auto zero = [](int64_t) { return int64_t(0); };
const auto same = [](int64_t r) { return r; };
inline auto upto(int64_t n) { return [n](int64_t, int64_t) { return n; }; }
inline auto through(int64_t T) {
  return [T](int64_t r, int64_t rows) { return std::min(r + rows, T); };
}
const auto diagonal = [](int64_t r) { return r / W * W; };

// x^T of one head (D x Tp, zero past T), x read with row stride `stride`: the B operand of
// k q^T and v dy^T.
inline void transpose(const float* x0, int64_t stride, int64_t T, int64_t D, int64_t Tp, float* xt) {
  // W x W blocks transposed in registers (ATen's shuffle network, which inductor's kernels
  // use too). Gathers down the columns, before, were 10-16% of a call in perf profiles.
  int64_t t0 = 0;
  for (; t0 + W <= T; t0 += W)
    for (int64_t d = 0; d < D; d += W)
      at::vec::transpose_mxn<float, W, W>(x0 + t0 * stride + d, stride, xt + d * Tp + t0, Tp);
  for (int64_t d = 0; d < D; ++d) {
    for (int64_t t = t0; t < T; ++t) xt[d * Tp + t] = x0[t * stride + d];
    for (int64_t t = T; t < Tp; ++t) xt[d * Tp + t] = 0.f;
  }
}

// The scores of one head transposed, a row per key and a column per query:
// st[j, i] = scale k_j . q_i for i >= j, computed from the vector holding column j to the
// end of the row, -inf for the masked i < j of that vector. Keeping keys along the rows
// makes the softmax over keys a column operation: plain vector max, exp and sum across the
// rows, W queries at a time, with no reduction inside a vector.
void scores(const float* k0, int64_t stride, const float* qt, int64_t T, int64_t D, int64_t Tp,
            float scale, float* st) {
  gemm(k0, stride, qt, Tp, st, Tp, T, zero, upto(D), diagonal, Tp, scale);
  const V lane = V::arange(0.f, 1.f);
  for (int64_t j = 0; j < T; ++j) {
    float* v = st + j * Tp + diagonal(j);
    V::blendv(V(kNegInf), V::loadu(v), lane >= V(float(j % W))).store(v);
  }
}

// The keys that queries [c, c + W) see: rows [0, keys_seen) of their columns of st.
inline int64_t keys_seen(int64_t c, int64_t T) { return std::min(c + W, T); }

// The whole of one head's softmax, forward: st becomes exp(st - max), inv_l 1 / the sum,
// lse max + log(sum) (T values).
void softmax(float* st, int64_t T, int64_t Tp, float* inv_l, float* lse) {
  for (int64_t c = 0; c < Tp; c += W) {
    const int64_t rows = keys_seen(c, T);
    V m(kNegInf);
    for (int64_t j = 0; j < rows; ++j) m = at::vec::maximum(m, V::loadu(st + j * Tp + c));
    V l(0.f);
    for (int64_t j = 0; j < rows; ++j) {
      const V e = (V::loadu(st + j * Tp + c) - m).exp_u20();
      e.store(st + j * Tp + c);
      l = l + e;
    }
    l.reciprocal().store(inv_l + c);
    (m + l.log()).store(lse + c);  // lse is Tp long: the lanes past T are dropped later
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
    std::vector<float> qt(D * Tp), st(Tp * Tp), inv_l(Tp), lse_row(Tp);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const float* q0 = base + b * T * C3 + h * D;
      transpose(q0, C3, T, D, Tp, qt.data());
      scores(q0 + C, C3, qt.data(), T, D, Tp, scale, st.data());
      softmax(st.data(), T, Tp, inv_l.data(), lse_row.data());
      std::copy(lse_row.begin(), lse_row.begin() + T, lp + bh * T);
      // y_i = sum_{j <= i} p[j, i] v_j / l_i: st read transposed, the tile of queries from
      // r reaching keys up to r + 3 (inside the vectors computed above; 0 past i).
      gemm<true>(st.data(), Tp, q0 + 2 * C, C3, yp + b * T * C + h * D, C, T, zero, through(T),
                 zero, D, 1.f, inv_l.data());
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
    // Past T: lse 0 and rowsum 0, so the padding columns stay finite.
    std::vector<float> qt(D * Tp), dyt(D * Tp), p(Tp * Tp), ds(Tp * Tp), lse_row(Tp, 0.f),
        rowsum(Tp, 0.f);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const float* q0 = base + b * T * C3 + h * D;
      const float* g0 = dyp + b * T * C + h * D;
      const float* y0 = ypp + b * T * C + h * D;
      float* dq0 = gp + b * T * C3 + h * D;
      transpose(q0, C3, T, D, Tp, qt.data());
      transpose(g0, C, T, D, Tp, dyt.data());
      std::copy(lp + bh * T, lp + bh * T + T, lse_row.begin());
      for (int64_t i = 0; i < T; ++i) {  // rowsum(dY * Y), one value per query
        V acc(0.f);
        for (int64_t d = 0; d < D; d += W)
          acc = at::vec::fmadd(V::loadu(g0 + i * C + d), V::loadu(y0 + i * C + d), acc);
        rowsum[i] = at::vec::vec_reduce_all<float>([](V& x, V& y) { return x + y; }, acc);
      }
      // P^T recomputed from lse; dP^T = V dY^T on the same causal tiles; then
      // dS^T = P^T (dP^T - rowsum), column by column.
      scores(q0 + C, C3, qt.data(), T, D, Tp, scale, p.data());
      gemm(q0 + 2 * C, C3, dyt.data(), Tp, ds.data(), Tp, T, zero, upto(D), diagonal, Tp, 1.f);
      for (int64_t c = 0; c < Tp; c += W) {
        const V m = V::loadu(lse_row.data() + c), dsum = V::loadu(rowsum.data() + c);
        for (int64_t j = 0, rows = keys_seen(c, T); j < rows; ++j) {
          float* pj = p.data() + j * Tp + c;
          float* dj = ds.data() + j * Tp + c;
          const V e = (V::loadu(pj) - m).exp_u20();
          e.store(pj);
          (e * (V::loadu(dj) - dsum)).store(dj);
        }
      }
      // dQ = scale dS K: query i sums over keys j <= i (dS^T read transposed).
      gemm<true>(ds.data(), Tp, q0 + C, C3, dq0, C3, T, zero, through(T), zero, D, scale);
      // dK = scale dS^T Q, dV = P^T dY: key j sums over queries i >= j.
      gemm(ds.data(), Tp, q0, C3, dq0 + C, C3, T, same, upto(T), zero, D, scale);
      gemm(p.data(), Tp, g0, C, dq0 + 2 * C, C3, T, same, upto(T), zero, D, 1.f);
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
