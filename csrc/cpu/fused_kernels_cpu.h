// CPU kernels of fused_kernels.h that live outside fused_kernels_cpu.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include "../fused_kernels.h"

namespace gunn_ext {

void conv3x3_cpu(const at::Tensor& x, const at::Tensor& w, const ImageShape& s,
                 const at::Tensor& out);
void conv3x3_backward_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                          const ImageShape& s, const at::Tensor& dx, const at::Tensor& dw);

}  // namespace gunn_ext
