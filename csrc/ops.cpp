// Every schema of torch.ops.tokenbounds.*, in one place, defined on every build (CPU-only or
// CUDA). The kernels register their implementations next to their code:
//   CPU:  csrc/cpu/*.cpp                (TORCH_LIBRARY_IMPL(tokenbounds, CPU, ...))
//   CUDA: csrc/cuda_bindings/*.cpp      (TORCH_LIBRARY_IMPL(tokenbounds, CUDA, ...); CUDA builds only)
// and the fake (meta) kernels used by torch.compile are registered from Python whenever the
// extension loads (pyext/ops/_fakes.py). Inputs are validated in pyext/ops/; the kernels only
// guard memory safety.
#include <torch/library.h>

TORCH_LIBRARY(tokenbounds, m) {
  // Fused softmax + prediction smoothing + log-loss (pyext/ops/losses.py). log_keep[a] =
  // log(1 - alpha_a), log_floor[a] = log(alpha_a / V) (float64, on the data's device), computed
  // once per call by tokenbounds._C.smoothing_constants (tokenbounds/smoothed_loss.h).
  m.def(
      "smoothed_nll(Tensor logits, Tensor targets, Tensor log_keep, Tensor log_floor, "
      "int vocab_size, int ignore_index) -> (Tensor nll_bits, Tensor logp, Tensor rank)");
  m.def(
      "linear_smoothed_nll(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, "
      "Tensor log_keep, Tensor log_floor, int vocab_size, int ignore_index, int max_bytes) -> "
      "(Tensor nll_bits, Tensor logp, Tensor rank)");
  // Fast Walsh-Hadamard transform along rows (pyext/ops/hadamard.py).
  m.def("hadamard_transform(Tensor x, Tensor hk, float scale) -> Tensor");
  // Proxy Hessian X^T X and Rademacher probe products (pyext/ops/gram.py).
  m.def("gram_accumulate_(Tensor(a!) acc, Tensor x) -> ()");
  m.def("rademacher_matmul(Tensor x, int seed, int offset, int k) -> Tensor");
  m.def("rademacher_probes(int d, int k, int seed, int offset, ScalarType dtype) -> Tensor");
}
