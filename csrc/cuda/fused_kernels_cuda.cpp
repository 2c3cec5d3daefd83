// Registers the CUDA fused kernels for the device-generic orchestration (for
// the CPU in the emulator build).
#include <limits>

#include "fused_kernels_cuda.h"

namespace gunn_ext {
namespace {

// Every 3x3 of at most kConvMaxChannels channels runs the direct kernel, and
// every unit of one bottleneck with such a 3x3 runs whole, with its block
// terms: no library call per small segment.
const FusedKernelsRegistration registration(
    cuda::kDevice,
    FusedKernels{column_stats_cuda, bn_relu_cuda, bn_add_cuda, bn_backward_reduce_cuda,
                 bn_backward_apply_cuda, conv3x3_cuda, conv3x3_backward_cuda,
                 cuda::kConvMaxChannels, std::numeric_limits<int64_t>::max(), unit_forward_cuda,
                 unit_backward_cuda, std::numeric_limits<int64_t>::max(),
                 unit_workspace_bytes_cuda});

}  // namespace
}  // namespace gunn_ext
