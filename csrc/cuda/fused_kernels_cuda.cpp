// Registers the CUDA fused kernels for the device-generic orchestration (for
// the CPU in the emulator build).
#include "fused_kernels_cuda.h"

namespace gunn_ext {
namespace {

const FusedKernelsRegistration registration(
    cuda::kDevice,
    FusedKernels{column_stats_cuda, bn_relu_cuda, bn_add_cuda, bn_backward_reduce_cuda,
                 bn_backward_apply_cuda, conv3x3_cuda, conv3x3_backward_cuda});

}  // namespace
}  // namespace gunn_ext
