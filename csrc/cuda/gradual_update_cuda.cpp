// The CUDA entry point of the gradual update: the device-generic orchestration
// (csrc/gradual_update.cpp) running the CUDA fused kernels, registered as the
// eager ops `_gradual_update_cuda` and `_gradual_update_backward_cuda`.
//
// Their schemas are those of `gradual_update` and `gradual_update_backward`,
// defined from them in gunn_ext/native_cuda.py, whose CUDA kernels for the
// public ops call these eager ones through the CUDA graph replay engine
// (gunn_ext/graph_replay.py).
#include <torch/library.h>

#include "../gradual_update.h"

namespace gunn_ext {

TORCH_LIBRARY_IMPL(gunn_ext, CUDA, m) {
  m.impl("_gradual_update_cuda", &gradual_update);
  m.impl("_gradual_update_backward_cuda", &gradual_update_backward);
}

}  // namespace gunn_ext
