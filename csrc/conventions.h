// Two rules every implementation of the layer op follows, in one place;
// gunn_ext/conventions.py states them for Python.
//  * Output memory format: the output and the input gradient are channels_last
//    when x is channels_last (and not also contiguous, as a tensor with one
//    channel or a 1x1 image is), else contiguous.
//  * Statistics dtype: float64 for float64 inputs, float32 for every other dtype.
#pragma once

#include <ATen/core/Tensor.h>

namespace gunn_ext {

inline bool output_is_channels_last(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
}

inline at::MemoryFormat output_memory_format(const at::Tensor& x) {
  return output_is_channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

inline at::ScalarType stats_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace gunn_ext
