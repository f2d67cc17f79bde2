// Embedding lookup for training on a CPU, with a backward pass that adds rows without
// atomics.
//
// Under torch.compile, inductor writes an embedding's backward pass as a scatter of atomic
// adds into the table, one per value (a compare-and-swap loop each on x86): 0.9 ms for the
// Shakespeare model's 768 x 128 gradient into 66 rows on the dev machine's two threads,
// where the same sums as plain vector adds take a few tens of microseconds. The model uses
// these ops for its embeddings when it is compiled for a CPU (model._lookup).
//
// embedding_forward(weight, idx) -> out
//   weight (N, D) float32, idx int64 of any shape with values in [0, N)
//   out    idx.shape + (D,): out[..., :] = weight[idx[...], :]
// embedding_backward(grad, idx, num_rows) -> dweight (num_rows, D)
//   dweight[r] = the sum of grad's rows whose index is r, added in index order (each thread
//   owns a band of columns: the same bits for any thread count).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "simd.h"  // GPTKIT_NS

namespace {

using V = at::vec::Vectorized<float>;
constexpr int64_t W = V::size();

void check_indices(const int64_t* ip, int64_t n, int64_t rows, const char* op) {
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(ip[i] >= 0 && ip[i] < rows, op, ": index ", ip[i], " is out of range for ",
                rows, " rows");
}

at::Tensor embedding_forward(const at::Tensor& weight_in, const at::Tensor& idx_in) {
  TORCH_CHECK(weight_in.dim() == 2 && weight_in.scalar_type() == at::kFloat &&
                  weight_in.device().is_cpu(),
              "embedding_forward: weight must be a float32 CPU tensor (N, D), got ",
              weight_in.sizes(), " ", weight_in.scalar_type());
  TORCH_CHECK(idx_in.scalar_type() == at::kLong, "embedding_forward: idx must be int64");
  const at::Tensor weight = weight_in.contiguous(), idx = idx_in.contiguous();
  const int64_t rows = weight.size(0), D = weight.size(1), n = idx.numel();
  std::vector<int64_t> shape(idx.sizes().begin(), idx.sizes().end());
  shape.push_back(D);
  at::Tensor out = at::empty(shape, weight.options());
  const int64_t* ip = idx.data_ptr<int64_t>();
  check_indices(ip, n, rows, "embedding_forward");
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) std::copy(wp + ip[i] * D, wp + (ip[i] + 1) * D, op + i * D);
  });
  return out;
}

at::Tensor embedding_backward(const at::Tensor& grad_in, const at::Tensor& idx_in, int64_t rows) {
  TORCH_CHECK(idx_in.scalar_type() == at::kLong, "embedding_backward: idx must be int64");
  TORCH_CHECK(grad_in.scalar_type() == at::kFloat && grad_in.device().is_cpu() &&
                  grad_in.dim() == idx_in.dim() + 1,
              "embedding_backward: grad must be float32 of idx's shape + (D,), got ",
              grad_in.sizes());
  const at::Tensor grad = grad_in.contiguous(), idx = idx_in.contiguous();
  const int64_t D = grad.size(-1), n = idx.numel();
  TORCH_CHECK(grad.numel() == n * D, "embedding_backward: grad must be idx's shape + (D,)");
  at::Tensor out = at::zeros({rows, D}, grad.options());
  const int64_t* ip = idx.data_ptr<int64_t>();
  check_indices(ip, n, rows, "embedding_backward");
  const float* gp = grad.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // Bands of columns, whole vectors each (the last one takes the remainder).
  const int64_t bands = std::max<int64_t>(1, D / W);
  at::parallel_for(0, bands, 1, [&](int64_t begin, int64_t end) {
    const int64_t c0 = begin * W, c1 = end == bands ? D : end * W;
    for (int64_t i = 0; i < n; ++i) {
      float* dst = op + ip[i] * D;
      const float* src = gp + i * D;
      int64_t c = c0;
      for (; c + W <= c1; c += W) (V::loadu(dst + c) + V::loadu(src + c)).store(dst + c);
      for (; c < c1; ++c) dst[c] += src[c];
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(GPTKIT_NS, m) {
  m.def("embedding_forward(Tensor weight, Tensor idx) -> Tensor");
  m.def("embedding_backward(Tensor grad, Tensor idx, int num_rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(GPTKIT_NS, CPU, m) {
  m.impl("embedding_forward", &embedding_forward);
  m.impl("embedding_backward", &embedding_backward);
}
