// csrc/cuda/small_unit.cu, compiled as C++ for the CUDA emulator.
#include "../cuda/small_unit.cu"
