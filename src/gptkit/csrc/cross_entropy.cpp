// Cross-entropy over the unembedding's logits for training on a CPU, forward and backward.
//
// With a GPT-2 vocabulary a step's logits are (B T) x 50,257 values, and eagerly
// `F.cross_entropy(logits.float(), y)` goes over them five times and more: under bf16
// autocast a fp32 copy, the log-softmax written out and read back, its backward, the
// gradient's cast back to bf16 (for a 4-layer width-128 model at batch 8 x 128 on the dev
// machine: 335 ms of a 540 ms training step). Here one task per row: the row widened to
// fp32 in a buffer that stays in L2 where it is bf16, its maximum, then the sum of
// exponentials; the backward writes (softmax - onehot) x upstream in the logits' dtype in
// one more pass. Rows are independent, so the results do not depend on the thread count.
//
// cross_entropy_forward(logits, targets) -> (loss, lse)
//   logits  (N, V) float32 or bfloat16, targets (N,) int64 in [0, V)
//   loss    (N,) float32: lse - logits[r, targets[r]]
//   lse     (N,) float32: log(sum(exp(logits[r]))), kept for the backward pass
// cross_entropy_backward(grad, logits, targets, lse) -> dlogits (N, V), the logits' dtype
//   dlogits[r, j] = (exp(logits[r, j] - lse[r]) - [j == targets[r]]) * grad[r]

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "simd.h"

namespace {

using V = at::vec::Vectorized<float>;
constexpr int64_t W = V::size();
using namespace gptkit_simd;
static_assert(kWidth == W, "Vectorized<float> and simd.h's Vec differ in width");

void check_inputs(const at::Tensor& logits, const at::Tensor& targets, const char* op) {
  TORCH_CHECK(logits.dim() == 2 && logits.device().is_cpu() &&
                  (logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16),
              op, ": logits must be a float32 or bfloat16 CPU tensor (N, V), got ",
              logits.sizes(), " ", logits.scalar_type());
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 &&
                  targets.size(0) == logits.size(0),
              op, ": targets must be int64 (N,) for logits of ", logits.size(0), " rows");
}

// Row r of the logits as fp32: in place for float32, widened into `buf` for bfloat16.
const float* row_fp32(const at::Tensor& logits, int64_t r, std::vector<float>& buf) {
  const int64_t n = logits.size(1);
  if (logits.scalar_type() == at::kFloat) return logits.data_ptr<float>() + r * n;
  const auto* src = reinterpret_cast<const uint16_t*>(logits.data_ptr<at::BFloat16>()) + r * n;
  buf.resize(n);
  int64_t c = 0;
  for (; c + W <= n; c += W) vstore(buf.data() + c, vload(src + c));
  for (; c < n; ++c) buf[c] = static_cast<float>(at::BFloat16(src[c], at::BFloat16::from_bits()));
  return buf.data();
}

float row_max(const float* x, int64_t n) {
  V m(-std::numeric_limits<float>::infinity());
  int64_t c = 0;
  for (; c + W <= n; c += W) m = at::vec::maximum(m, V::loadu(x + c));
  float top = vmaxall(m);
  for (; c < n; ++c) top = std::max(top, x[c]);
  return top;
}

float row_sum_exp(const float* x, int64_t n, float shift) {
  V s(0.f);
  const V shift_v(shift);
  int64_t c = 0;
  for (; c + W <= n; c += W) s = s + (V::loadu(x + c) - shift_v).exp_u20();
  float total = vsum(s);
  for (; c < n; ++c) total += std::exp(x[c] - shift);
  return total;
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward(const at::Tensor& logits_in,
                                                         const at::Tensor& targets_in) {
  check_inputs(logits_in, targets_in, "cross_entropy_forward");
  const at::Tensor logits = logits_in.contiguous(), targets = targets_in.contiguous();
  const int64_t rows = logits.size(0), n = logits.size(1);
  const int64_t* tp = targets.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(tp[r] >= 0 && tp[r] < n, "cross_entropy_forward: target ", tp[r],
                " is out of range for ", n, " classes");
  at::Tensor loss = at::empty({rows}, logits.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({rows}, loss.options());
  float* lp = loss.data_ptr<float>();
  float* sp = lse.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    for (int64_t r = begin; r < end; ++r) {
      const float* x = row_fp32(logits, r, buf);
      const float top = row_max(x, n);
      sp[r] = top + std::log(row_sum_exp(x, n, top));
      lp[r] = sp[r] - x[tp[r]];
    }
  });
  return {loss, lse};
}

at::Tensor cross_entropy_backward(const at::Tensor& grad_in, const at::Tensor& logits_in,
                                  const at::Tensor& targets_in, const at::Tensor& lse_in) {
  check_inputs(logits_in, targets_in, "cross_entropy_backward");
  const int64_t rows = logits_in.size(0), n = logits_in.size(1);
  TORCH_CHECK(grad_in.numel() == rows && lse_in.numel() == rows &&
                  grad_in.scalar_type() == at::kFloat && lse_in.scalar_type() == at::kFloat,
              "cross_entropy_backward: grad and lse must be float32 (N,)");
  const at::Tensor logits = logits_in.contiguous(), targets = targets_in.contiguous();
  const at::Tensor grad = grad_in.contiguous(), lse = lse_in.contiguous();
  const bool bf16 = logits.scalar_type() == at::kBFloat16;
  at::Tensor out = at::empty({rows, n}, logits.options());
  const int64_t* tp = targets.data_ptr<int64_t>();
  const float* gp = grad.data_ptr<float>();
  const float* sp = lse.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf, dx(bf16 ? n : 0);
    for (int64_t r = begin; r < end; ++r) {
      const float* x = row_fp32(logits, r, buf);
      float* d = bf16 ? dx.data() : out.data_ptr<float>() + r * n;
      const V shift(sp[r]), scale(gp[r]);
      int64_t c = 0;
      for (; c + W <= n; c += W) ((V::loadu(x + c) - shift).exp_u20() * scale).store(d + c);
      for (; c < n; ++c) d[c] = std::exp(x[c] - sp[r]) * gp[r];
      d[tp[r]] -= gp[r];
      if (bf16) at::vec::convert(d, out.data_ptr<at::BFloat16>() + r * n, n);  // to nearest
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(GPTKIT_NS, m) {
  m.def("cross_entropy_forward(Tensor logits, Tensor targets) -> (Tensor, Tensor)");
  m.def("cross_entropy_backward(Tensor grad, Tensor logits, Tensor targets, Tensor lse) -> Tensor");
}

TORCH_LIBRARY_IMPL(GPTKIT_NS, CPU, m) {
  m.impl("cross_entropy_forward", &cross_entropy_forward);
  m.impl("cross_entropy_backward", &cross_entropy_backward);
}
