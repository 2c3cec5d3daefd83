// CUDA implementations of fused_kernels.h (fused_forward.cu, fused_backward.cu, conv3x3.cu,
// small_unit.cu).
#pragma once

#include <ATen/core/Tensor.h>

#include "../fused_kernels.h"

namespace gunn_ext {
namespace cuda {

// The device of the kernels' tensors: the GPU, or the CPU in the emulator build.
#ifdef GUNN_EXT_EMULATE_CUDA
constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;
#else
constexpr c10::DeviceType kDevice = c10::DeviceType::CUDA;
#endif

// Channels of the widest 3x3 the direct kernel takes (conv3x3.cu): one
// thread keeps an output pixel's channels in registers.
constexpr int64_t kConvMaxChannels = 16;

}  // namespace cuda

void column_stats_cuda(const at::Tensor& x, const Norm& stats);
void bn_relu_cuda(const at::Tensor& x, const Norm& norm, const at::Tensor& out);
void bn_add_cuda(const at::Tensor& out, bool accumulate, const at::Tensor& x1, const Norm& norm1,
                 const at::Tensor& x2, const Norm* norm2);
void bn_backward_reduce_cuda(const at::Tensor& dy, const at::Tensor& x, const Norm& norm,
                             bool has_relu, const Norm& grads);
void bn_backward_apply_cuda(const at::Tensor& dy, const at::Tensor& x, const Norm& norm,
                            bool has_relu, bool training, const Norm& grads,
                            const at::Tensor& dx);
void conv3x3_cuda(const at::Tensor& x, const at::Tensor& w, const ImageShape& s,
                  const at::Tensor& out);
void unit_forward_cuda(const SmallUnit& unit, bool compute_stats, UnitMatrix target);
void unit_backward_cuda(const SmallUnit& unit, UnitMatrix grad_unit, UnitMatrix d1,
                        void* grad_conv2, void* grad_conv3, const UnitNorms& grads);
int64_t unit_workspace_bytes_cuda(const ImageShape& s, int64_t n, int64_t mid,
                                  at::ScalarType dtype);
void conv3x3_backward_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                           const ImageShape& s, const at::Tensor& dx, const at::Tensor& dw);

}  // namespace gunn_ext
