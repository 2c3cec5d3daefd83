// BatchNorm, ReLU and residual arithmetic shared by the CPU and CUDA kernels.
//
//   invstd = 1 / sqrt(var + eps)
//   xhat   = (x - mean) * invstd
//   bn(x)  = weight * xhat + bias
//
// Backward, with dy the gradient of bn(x) (masked by the ReLU where one
// follows) and n the number of values per channel:
//   dbias   = sum(dy)
//   dweight = sum(dy * xhat)
//   dx      = weight * invstd * (dy - dbias / n - xhat * dweight / n)   (training)
//   dx      = weight * invstd * dy                                      (eval)
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define GUNN_HD __host__ __device__ __forceinline__
#else
#define GUNN_HD inline
#endif

namespace gunn_ext {

template <typename acc_t>
GUNN_HD acc_t bn_invstd(acc_t var, acc_t eps) {
#if defined(__CUDA_ARCH__)
  return static_cast<acc_t>(1) / sqrt(var + eps);
#else
  return static_cast<acc_t>(1) / std::sqrt(var + eps);
#endif
}

// One channel of a BN with the statistics it normalises with.
template <typename acc_t>
struct BNChannel {
  acc_t mean, invstd, weight, bias;

  GUNN_HD acc_t xhat(acc_t x) const { return (x - mean) * invstd; }
  GUNN_HD acc_t apply(acc_t x) const { return xhat(x) * weight + bias; }
  // bn(x) = x * scale() + shift()
  GUNN_HD acc_t scale() const { return weight * invstd; }
  GUNN_HD acc_t shift() const { return bias - mean * weight * invstd; }
};

// max(v, 0) that keeps a NaN, as torch.relu does: a diverged value must show.
template <typename acc_t>
GUNN_HD acc_t relu(acc_t v) {
  return (v > static_cast<acc_t>(0) || v != v) ? v : static_cast<acc_t>(0);
}

// Gradient through an optional ReLU that followed bn(x) = out: zero where
// out <= 0 only, so a NaN out passes dy, as torch.relu's backward does.
template <typename acc_t>
GUNN_HD acc_t relu_backward(acc_t dy, acc_t out, bool has_relu) {
  return (has_relu && out <= static_cast<acc_t>(0)) ? static_cast<acc_t>(0) : dy;
}

template <typename acc_t>
GUNN_HD acc_t bn_input_grad(const BNChannel<acc_t>& c, acc_t dy, acc_t x, bool training,
                            acc_t mean_dy, acc_t mean_dy_xhat) {
  if (!training) return c.weight * c.invstd * dy;
  return c.weight * c.invstd * (dy - mean_dy - c.xhat(x) * mean_dy_xhat);
}

}  // namespace gunn_ext
