// CPU kernels of fused_kernels.h that live outside fused_kernels_cpu.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>

#include "../fused_kernels.h"

namespace gunn_ext {

// Work (values moved or multiply-adds) per parallel task: a smaller task
// costs more to hand to a thread than to run.
constexpr int64_t kTaskWork = int64_t(1) << 16;

// Items per parallel task, for items of `work_per_item` each.
inline int64_t task_grain(int64_t work_per_item) {
  return std::max<int64_t>(1, kTaskWork / std::max<int64_t>(1, work_per_item));
}

void conv3x3_cpu(const at::Tensor& x, const at::Tensor& w, const ImageShape& s,
                 const at::Tensor& out);
void conv3x3_backward_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                          const ImageShape& s, const at::Tensor& dx, const at::Tensor& dw);

}  // namespace gunn_ext
