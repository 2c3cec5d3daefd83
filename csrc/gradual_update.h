// The device-generic orchestration of the gradual update (gradual_update.cpp),
// for the device registrations that wrap it (csrc/cuda/graph_replay.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>
#include <vector>

namespace gunn_ext {

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using BackwardResult = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
                                  std::vector<at::Tensor>>;

ForwardResult gradual_update(const at::Tensor& x, at::TensorList conv_weights,
                             at::TensorList bn_weights, at::TensorList bn_biases,
                             at::TensorList running_means, at::TensorList running_vars,
                             at::IntArrayRef segments, int64_t units, bool shortcut,
                             bool sequential, bool training, at::ArrayRef<double> eps);

BackwardResult gradual_update_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                       const at::Tensor& y, at::TensorList conv_weights,
                                       at::TensorList bn_weights, at::TensorList bn_biases,
                                       const at::Tensor& mean, const at::Tensor& var,
                                       at::IntArrayRef segments, int64_t units, bool shortcut,
                                       bool sequential, bool training, at::ArrayRef<double> eps);

}  // namespace gunn_ext
