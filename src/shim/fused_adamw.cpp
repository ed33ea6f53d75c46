// A C entry point to ATen's fused AdamW, which tch does not bind: one multi-tensor kernel on CUDA,
// one vectorised pass over memory on the CPU (docs/design.md §6). Tensors arrive as tch's handles
// (pointers to at::Tensor); an error comes back as a message, never as an exception across the
// language boundary.
#include <ATen/core/Tensor.h>
#include <ATen/ops/_fused_adamw.h>

#include <cstring>
#include <exception>
#include <vector>

namespace {
std::vector<at::Tensor> tensors(void* const* handles, int n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (int i = 0; i < n; ++i) out.push_back(*static_cast<at::Tensor*>(handles[i]));
  return out;
}
}  // namespace

// One AdamW update of n tensors: params, grads, first and second moments and step counts (f32
// scalars on the params' device, already counting this step). Returns 0, or 1 with `error` set.
extern "C" int multipos_fused_adamw(void* const* params, void* const* grads, void* const* exp_avgs,
                                    void* const* exp_avg_sqs, void* const* steps, int n, double lr,
                                    double beta1, double beta2, double weight_decay, double eps,
                                    char* error, size_t error_len) {
  try {
    at::_fused_adamw_(tensors(params, n), tensors(grads, n), tensors(exp_avgs, n),
                      tensors(exp_avg_sqs, n), {}, tensors(steps, n), lr, beta1, beta2,
                      weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false);
    return 0;
  } catch (const std::exception& e) {
    if (error_len > 0) {
      std::strncpy(error, e.what(), error_len - 1);
      error[error_len - 1] = '\0';
    }
    return 1;
  }
}
