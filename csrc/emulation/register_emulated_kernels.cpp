// Registers the emulated CUDA fused kernels as the CPU kernels of this build,
// so the orchestration (csrc/gradual_update.cpp) runs them on CPU tensors.
#include "../cuda/device_runtime.cuh"
#include "../cuda/fused_kernels_cuda.h"

namespace gunn_ext {
namespace {

const FusedKernelsRegistration registration(
    cuda::kDevice,
    FusedKernels{column_stats_cuda, bn_relu_cuda, bn_add_cuda, bn_backward_reduce_cuda,
                 bn_backward_apply_cuda});

}  // namespace
}  // namespace gunn_ext
