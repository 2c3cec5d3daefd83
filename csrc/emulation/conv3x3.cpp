// csrc/cuda/conv3x3.cu, compiled as C++ for the CUDA emulator.
#include "../cuda/conv3x3.cu"
