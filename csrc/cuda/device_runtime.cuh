// What the fused kernels use of the CUDA runtime, in one place: the device
// guard and stream of a call, dynamic shared memory, kernel launches, and
// vector loads and stores (which the emulator checks for alignment).
// Built with GUNN_EXT_EMULATE_CUDA, the same kernel sources compile as plain
// C++ against a CPU emulator of these few pieces (csrc/emulation), which the
// CPU tests run.
#pragma once

#ifdef GUNN_EXT_EMULATE_CUDA
#include "../emulation/cuda_emulator.h"
#else

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <utility>

namespace gunn_ext {
namespace cuda {

// For the duration of a call: t's device made current, and its current stream.
class DeviceScope {
 public:
  explicit DeviceScope(c10::Device device)
      : guard_(device), stream_(c10::cuda::getCurrentCUDAStream(device.index())) {}
  explicit DeviceScope(const at::Tensor& t) : DeviceScope(t.device()) {}
  cudaStream_t stream() const { return stream_; }

 private:
  c10::cuda::CUDAGuard guard_;
  cudaStream_t stream_;
};

// A T at address, and a store of one; the address must be aligned to T (a
// GPU faults otherwise, and the emulator fails the launch).
template <typename T>
__device__ __forceinline__ T load_aligned(const void* address) {
  return *static_cast<const T*>(address);
}

template <typename T>
__device__ __forceinline__ void store_aligned(void* address, const T& value) {
  *static_cast<T*>(address) = value;
}

// `__shared__ T name[N]`: a shared array of the block (the emulator fills it
// with NaN bytes before every block, as a GPU leaves it undefined).
#define GUNN_SHARED_ARRAY(T, name, N) __shared__ T name[N]

// The block's dynamic shared memory (the launch's shared_bytes), as T[].
template <typename T>
__device__ __forceinline__ T* dynamic_shared_memory() {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  return reinterpret_cast<T*>(shared_bytes);
}

// kernel<<<grid, block, shared_bytes, stream>>>(args...), checked.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
            cudaStream_t stream, Args&&... args) {
  kernel<<<grid, block, shared_bytes, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace gunn_ext

#endif
