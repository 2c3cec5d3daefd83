// csrc/cuda/fused_kernels_cuda.cpp, compiled as C++ for the CUDA emulator: it
// registers the emulated kernels as this build's CPU kernels.
#include "../cuda/fused_kernels_cuda.cpp"
