// The device-generic orchestration of the gradual update (gradual_update.cpp),
// for the device registrations that wrap it (csrc/cpu/gradual_update_cpu.cpp,
// csrc/cuda/gradual_update_cuda.cpp). The flat tensors are laid out as
// parameter_layout.h describes.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace gunn_ext {

// (y, mean, var)
using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
// (grad_x, grad_conv_weight, grad_bn_weight, grad_bn_bias)
using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

ForwardResult gradual_update(const at::Tensor& x, const at::Tensor& conv_weight,
                             const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                             const std::optional<at::Tensor>& running_mean,
                             const std::optional<at::Tensor>& running_var, at::IntArrayRef segments,
                             int64_t expansion, int64_t bottlenecks, bool shortcut, bool sequential,
                             bool training, double eps);

BackwardResult gradual_update_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                       const at::Tensor& y, const at::Tensor& conv_weight,
                                       const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                                       const at::Tensor& mean, const at::Tensor& var,
                                       at::IntArrayRef segments, int64_t expansion,
                                       int64_t bottlenecks, bool shortcut, bool sequential,
                                       bool training, double eps);

}  // namespace gunn_ext
