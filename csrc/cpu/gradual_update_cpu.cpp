// The CPU kernels of the gradual_update ops: the device-generic orchestration
// (gradual_update.cpp) with the fused CPU kernels (fused_kernels_cpu.cpp).
#include <torch/library.h>

#include "../gradual_update.h"

namespace gunn_ext {

TORCH_LIBRARY_IMPL(gunn_ext, CPU, m) {
  m.impl("gradual_update", &gradual_update);
  m.impl("gradual_update_backward", &gradual_update_backward);
}

}  // namespace gunn_ext
