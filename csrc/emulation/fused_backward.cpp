// csrc/cuda/fused_backward.cu, compiled as C++ for the CUDA emulator.
#include "../cuda/fused_backward.cu"
