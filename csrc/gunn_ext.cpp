// Op schemas of the gunn_ext namespace and the module that loads them.
#include <Python.h>
#include <torch/library.h>

#include <array>

#include "fused_kernels.h"

extern "C" {
// `import gunn_ext._C` loads this library, whose static initialisers
// register the ops with the dispatcher; there are no Python bindings.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
}

namespace gunn_ext {

namespace {
std::array<const FusedKernels*, static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)>&
kernel_table() {
  static std::array<const FusedKernels*,
                    static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)>
      table{};
  return table;
}
}  // namespace

void register_fused_kernels(c10::DeviceType device, const FusedKernels& kernels) {
  kernel_table()[static_cast<size_t>(device)] = new FusedKernels(kernels);
}

const FusedKernels& fused_kernels(c10::DeviceType device) {
  const FusedKernels* k = kernel_table()[static_cast<size_t>(device)];
  TORCH_CHECK(k != nullptr, "gunn_ext: no fused kernels were compiled for device type ",
              c10::DeviceTypeName(device), "; rebuild with that backend available");
  return *k;
}

// Whether this build's CPU kernels run their parallel_for tasks on threads:
// at::parallel_for spreads them over torch's OpenMP threads only in code
// compiled with OpenMP (setup.py: openmp_flags), and otherwise runs them all
// on the calling thread.
bool cpu_kernels_parallel() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

// The tensors are flat, laid out as parameter_layout.h (and the docstring of
// gunn_ext/parameter_layout.py) describes.
TORCH_LIBRARY(gunn_ext, m) {
  m.def(
      "gradual_update(Tensor x, Tensor conv_weight, Tensor bn_weight, Tensor bn_bias, "
      "Tensor? running_mean, Tensor? running_var, int[] segments, int expansion, int bottlenecks, "
      "bool shortcut, bool sequential, bool training, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "gradual_update_backward(Tensor grad_y, Tensor x, Tensor y, Tensor conv_weight, "
      "Tensor bn_weight, Tensor bn_bias, Tensor mean, Tensor var, int[] segments, int expansion, "
      "int bottlenecks, bool shortcut, bool sequential, bool training, float eps) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("cpu_kernels_parallel() -> bool", &cpu_kernels_parallel);
}

}  // namespace gunn_ext
