// The feed-forward's activation with its bias, for training on a CPU: y = act(h + b), where
// h is the first product without its bias. act is GPT-2's tanh GELU, or the spec's leaky
// ReLU (ReLU at slope 0).
//
// Under torch.compile the feed-forward's first product ran as `addmm` (ATen first copies the
// bias into every row of the output, 0.3 ms for the Shakespeare model's 768 x 512) and then
// an inductor kernel for the GELU (x * sigmoid(2u): 0.46 ms forward, 0.37 ms backward per
// layer on the dev machine's Xeon). For the leaky ReLU, inductor saved the sign of each
// input as a bool tensor for the backward pass, and its vectorised store of that mask took
// 4.4 ms per layer for the same 768 x 512 (a where() alone: 0.2 ms). Here the product runs
// without its bias (`mm`), one pass adds the bias and applies the activation, and the
// backward pass computes the derivative and the bias gradient (the column sums) in one pass.
//
// bias_gelu_forward(h, b) -> y
//   h  (..., N) float32, the product x W^T without its bias; b (N,) float32
//   y  = u sigmoid(2 sqrt(2/pi) (u + 0.044715 u^3)), u = h + b: GPT-2's tanh GELU
//        (0.5 (1 + tanh(z)) = sigmoid(2z))
// bias_gelu_backward(dy, h, b) -> (dh, db)
//   dh = dy gelu'(h + b); db = the sum of dh over every row (fixed blocks of rows, summed
//   in order: the same result for any number of threads).
// bias_leaky_relu_forward(h, b, slope) -> y
//   y = u where u > 0, else slope u (u = h + b; slope >= 0)
// bias_leaky_relu_backward(dy, y, slope) -> (dh, db)
//   dh = dy where y > 0, else slope dy: the forward's output says which side u was on (for
//   slope >= 0), and the second product's weight gradient keeps y anyway, so nothing more is
//   saved. At u = 0 the slope, as ATen's leaky_relu_backward; db as above.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>
#include <immintrin.h>

#include "simd.h"  // GPTKIT_NS

namespace {

using V = at::vec::Vectorized<float>;
constexpr int64_t W = V::size();
constexpr float kTwoZ = 1.5957691216057308f;  // 2 sqrt(2 / pi)
constexpr float kCube = 0.044715f;
constexpr int64_t kRowBlock = 64;  // rows per partial bias-gradient sum

// 1 / d for d >= 1: the reciprocal estimate and one Newton step (relative error ~1e-7).
// A vector division cost more than everything else in the pass together (about 20 cycles
// per vector on the dev machine's Xeon; the estimate is 2).
inline V reciprocal(V d) {
#if defined(CPU_CAPABILITY_AVX512)
  const V r(_mm512_rcp14_ps(d));
#else
  const V r(_mm256_rcp_ps(d));
#endif
  return r * (V(2.f) - d * r);
}

// sigmoid(2z) for u, and d(2z)/du: the two factors of the GELU and of its derivative.
// exp's argument stops at 80 (exp(80) = 5.5e34, far from inf): 1 / (1 + inf) would be
// 0 * inf = NaN in the Newton step. sigmoid(-80) = 1.8e-35 against 0: no difference in u s.
inline V exp_minus_2z(V u) {
  const V z2 = u * (V(kTwoZ) + V(kTwoZ * kCube) * u * u);
  return at::vec::minimum(z2.neg(), V(80.f)).exp_u20();
}
inline V sigmoid_2z(V u) { return reciprocal(V(1.f) + exp_minus_2z(u)); }
inline float sigmoid_2z(float u) {
  return 1.f / (1.f + std::exp(std::min(-u * (kTwoZ + kTwoZ * kCube * u * u), 80.f)));
}
template <class T>
inline T dz2_du(T u) {
  return T(kTwoZ) + T(3.f * kTwoZ * kCube) * u * u;
}

void check(const at::Tensor& h, const at::Tensor& b, const char* op) {
  TORCH_CHECK(h.scalar_type() == at::kFloat && h.device().is_cpu() && h.dim() >= 1, op,
              ": h must be a float32 CPU tensor, got ", h.scalar_type());
  TORCH_CHECK(b.scalar_type() == at::kFloat && b.dim() == 1 && b.size(0) == h.size(-1), op,
              ": b must be float32 (", h.size(-1), "), got ", b.sizes());
}

// y = act(h + b) row by row: vec(u) for whole vectors, one(u) for the tail.
template <class Vec, class One>
at::Tensor forward_rows(const at::Tensor& h_in, const at::Tensor& b_in, const char* op, Vec vec,
                        One one) {
  check(h_in, b_in, op);
  const at::Tensor h = h_in.contiguous(), b = b_in.contiguous();
  const int64_t N = h.size(-1), M = N ? h.numel() / N : 0;
  at::Tensor y = at::empty_like(h);
  const float* hp = h.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, M, 16, [=](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float* __restrict hr = hp + m * N;
      float* __restrict yr = yp + m * N;
      int64_t n = 0;
      for (; n + W <= N; n += W) vec(V::loadu(hr + n) + V::loadu(bp + n)).store(yr + n);
      for (; n < N; ++n) yr[n] = one(hr[n] + bp[n]);
    }
  });
  return y;
}

// dh = dy f'(row of x, column n), and db = the column sums of dh, in fixed blocks of rows
// added in order (the same bits for any thread count). x is what the derivative reads: h
// for the GELU, y for the leaky ReLU. vec(dy, x row, n) for whole vectors, one(...) for the
// tail.
template <class Vec, class One>
std::tuple<at::Tensor, at::Tensor> backward_rows(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                 const char* op, Vec vec, One one) {
  TORCH_CHECK(dy_in.sizes() == x_in.sizes() && dy_in.scalar_type() == at::kFloat &&
                  x_in.scalar_type() == at::kFloat && x_in.device().is_cpu() && x_in.dim() >= 1,
              op, ": dy and the saved activation must be float32 CPU tensors of one shape, got ",
              dy_in.sizes(), " and ", x_in.sizes());
  const at::Tensor dy = dy_in.contiguous(), x = x_in.contiguous();
  const int64_t N = x.size(-1), M = N ? x.numel() / N : 0;
  const int64_t blocks = (M + kRowBlock - 1) / kRowBlock;
  at::Tensor dh = at::empty_like(x);
  std::vector<float> partial(blocks * N, 0.f);  // each block's column sums of dh
  const float* gp = dy.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  float* dp = dh.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      float* sum = partial.data() + blk * N;
      for (int64_t m = blk * kRowBlock; m < std::min(M, (blk + 1) * kRowBlock); ++m) {
        const float* gr = gp + m * N;
        const float* xr = xp + m * N;
        float* dr = dp + m * N;
        int64_t n = 0;
        for (; n + W <= N; n += W) {
          const V d = vec(V::loadu(gr + n), xr, n);
          d.store(dr + n);
          (V::loadu(sum + n) + d).store(sum + n);
        }
        for (; n < N; ++n) {
          const float d = one(gr[n], xr, n);
          dr[n] = d;
          sum[n] += d;
        }
      }
    }
  });
  at::Tensor db = at::zeros({N}, x.options());
  float* dbp = db.data_ptr<float>();
  for (int64_t blk = 0; blk < blocks; ++blk)
    for (int64_t n = 0; n < N; ++n) dbp[n] += partial[blk * N + n];
  return {dh, db};
}

at::Tensor bias_gelu_forward(const at::Tensor& h, const at::Tensor& b) {
  return forward_rows(
      h, b, "bias_gelu_forward", [](V u) { return u * sigmoid_2z(u); },
      [](float u) { return u * sigmoid_2z(u); });
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_backward(const at::Tensor& dy,
                                                      const at::Tensor& h_in,
                                                      const at::Tensor& b_in) {
  check(h_in, b_in, "bias_gelu_backward");
  const at::Tensor b = b_in.contiguous();
  const float* bp = b.data_ptr<float>();
  return backward_rows(
      dy, h_in, "bias_gelu_backward",
      [bp](V g, const float* hr, int64_t n) {
        const V u = V::loadu(hr + n) + V::loadu(bp + n);
        const V e = exp_minus_2z(u), s = reciprocal(V(1.f) + e);
        // d/du [u s(u)] = s + u s (1 - s) d(2z)/du, with 1 - s = e s: exactly 0 where e
        // is (s's own rounding, times u d(2z)/du ~ 1e6 at u = 200, would not be). s e is
        // taken first: for u below about -9, s s underflows (s ~ 1e-35), and every
        // underflowing product costs a microcode assist, which made this pass 3.4x
        // slower on activations that were mostly negative.
        return g * (s + u * s * (s * e) * dz2_du(u));
      },
      [bp](float g, const float* hr, int64_t n) {
        const float u = hr[n] + bp[n];
        const float e = std::exp(std::min(-u * (kTwoZ + kTwoZ * kCube * u * u), 80.f));
        const float s = 1.f / (1.f + e);
        return g * (s + u * s * (s * e) * dz2_du(u));
      });
}

void check_slope(double slope, const char* op) {
  TORCH_CHECK(slope >= 0.0, op, ": the slope must be >= 0 (the backward pass reads the sign "
              "of the output), got ", slope);
}

at::Tensor bias_leaky_relu_forward(const at::Tensor& h, const at::Tensor& b, double slope_in) {
  check_slope(slope_in, "bias_leaky_relu_forward");
  const float slope = static_cast<float>(slope_in);
  return forward_rows(
      h, b, "bias_leaky_relu_forward",
      [slope](V u) { return V::blendv(u * V(slope), u, u > V(0.f)); },
      [slope](float u) { return u > 0.f ? u : u * slope; });
}

std::tuple<at::Tensor, at::Tensor> bias_leaky_relu_backward(const at::Tensor& dy,
                                                            const at::Tensor& y,
                                                            double slope_in) {
  check_slope(slope_in, "bias_leaky_relu_backward");
  const float slope = static_cast<float>(slope_in);
  return backward_rows(
      dy, y, "bias_leaky_relu_backward",
      [slope](V g, const float* yr, int64_t n) {
        return V::blendv(g * V(slope), g, V::loadu(yr + n) > V(0.f));
      },
      [slope](float g, const float* yr, int64_t n) { return yr[n] > 0.f ? g : g * slope; });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(GPTKIT_NS, m) {
  m.def("bias_gelu_forward(Tensor h, Tensor b) -> Tensor");
  m.def("bias_gelu_backward(Tensor dy, Tensor h, Tensor b) -> (Tensor, Tensor)");
  m.def("bias_leaky_relu_forward(Tensor h, Tensor b, float slope) -> Tensor");
  m.def("bias_leaky_relu_backward(Tensor dy, Tensor y, float slope) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(GPTKIT_NS, CPU, m) {
  m.impl("bias_gelu_forward", &bias_gelu_forward);
  m.impl("bias_gelu_backward", &bias_gelu_backward);
  m.impl("bias_leaky_relu_forward", &bias_leaky_relu_forward);
  m.impl("bias_leaky_relu_backward", &bias_leaky_relu_backward);
}
