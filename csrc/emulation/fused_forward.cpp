// csrc/cuda/fused_forward.cu, compiled as C++ for the CUDA emulator.
#include "../cuda/fused_forward.cu"
