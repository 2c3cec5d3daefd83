// CPU kernels of fused_kernels.h that live outside fused_kernels_cpu.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/SmallVector.h>

#include <algorithm>

#include <ATen/Parallel.h>

#include <type_traits>

#include "../bn_math.h"
#include "../fused_kernels.h"

namespace gunn_ext {

// Work (values moved or multiply-adds) per parallel task: a smaller task
// costs more to hand to a thread than to run. Starting and joining a
// parallel loop costs about 1 us on the 2-core development machine (its
// workers spin between loops), about the time of 2k values; a pass over a
// few channels of 2048 rows is then worth splitting.
constexpr int64_t kTaskWork = int64_t(1) << 11;

// The kernels' host scratch (per-channel coefficients, packed weights,
// per-task sums): up to 1 KiB inline, so that the few values a narrow
// segment needs take no heap allocation; larger ones go to the heap.
template <typename T>
using Scratch = c10::SmallVector<T, std::max<size_t>(1, 1024 / sizeof(T))>;

// Items per parallel task, for items of `work_per_item` each.
inline int64_t task_grain(int64_t work_per_item) {
  return std::max<int64_t>(1, kTaskWork / std::max<int64_t>(1, work_per_item));
}

// sum_k a[k] b[k] in a fixed order, in eight lanes (which vectorise).
template <typename T>
T dot(const T* a, const T* b, int64_t count) {
  T lanes[8] = {};
  int64_t k = 0;
  for (; k + 8 <= count; k += 8) {
    for (int j = 0; j < 8; ++j) lanes[j] += a[k + j] * b[k + j];
  }
  T sum = 0;
  for (; k < count; ++k) sum += a[k] * b[k];
  for (int j = 0; j < 8; ++j) sum += lanes[j];
  return sum;
}

// The fixed number of row chunks a sum over `rows` rows of `work_per_row`
// each runs in: tasks worth handing to a thread, and at least 32 rows a
// chunk, so that combining the chunks' partial sums costs little next to
// the sums themselves. It depends on the sizes alone, never on the threads.
inline int64_t sum_chunks(int64_t rows, int64_t work_per_row) {
  constexpr int64_t kMinChunkRows = 32;
  return std::clamp<int64_t>(rows / std::max(task_grain(work_per_row), kMinChunkRows), 1, 64);
}

// Sums, for every column j, f(row pointer, acc) over all rows, in double.
template <typename F>
inline Scratch<double> column_sums(int64_t rows, int64_t width, F f) {
  const int64_t chunks = sum_chunks(rows, 2 * width);
  const int64_t per_chunk = (rows + chunks - 1) / chunks;
  Scratch<double> partial(chunks * width, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t r1 = std::min(rows, (k + 1) * per_chunk);
      for (int64_t r = k * per_chunk; r < r1; ++r) f(r, partial.data() + k * width);
    }
  });
  Scratch<double> total(width, 0.0);
  for (int64_t k = 0; k < chunks; ++k)
    for (int64_t j = 0; j < width; ++j) total[j] += partial[k * width + j];
  return total;
}

// f(cols), with cols a compile-time constant for 1 to 4 channels: the
// per-row loops over a few channels then unroll, and reductions keep their
// sums in registers.
template <typename F>
void with_cols(int64_t cols, F f) {
  switch (cols) {
    case 1: return f(std::integral_constant<int64_t, 1>{});
    case 2: return f(std::integral_constant<int64_t, 2>{});
    case 3: return f(std::integral_constant<int64_t, 3>{});
    case 4: return f(std::integral_constant<int64_t, 4>{});
    default: return f(cols);
  }
}

// f(r, C) for every row r, in parallel tasks, with C the number of columns
// as with_cols gives it.
template <typename F>
void each_row(int64_t rows, int64_t cols, F f) {
  with_cols(cols, [&](auto C) {
    at::parallel_for(0, rows, task_grain(2 * cols), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) f(r, C);
    });
  });
}

// bn(x) = x * scale + shift, per channel, in the arithmetic type.
template <typename acc_t>
struct Affine {
  Scratch<acc_t> scale, shift;
  explicit Affine(const Scratch<BNChannel<double>>& ch) : scale(ch.size()), shift(ch.size()) {
    for (size_t j = 0; j < ch.size(); ++j) {
      scale[j] = acc_t(ch[j].scale());
      shift[j] = acc_t(ch[j].shift());
    }
  }
};

// A norm's channels in double.
Scratch<BNChannel<double>> norm_channels(const Norm& norm);

// values[from, from + run.length) into the run of one of a Norm's tensors,
// in its dtype (float or double).
void store_stats(const Norm& run, const at::Tensor& t, const Scratch<double>& values,
                 int64_t from = 0);

// BN backward's input gradient per column, dx = a dy' + b x + c (bn_math.h),
// from the parameter gradients (dbias, dweight) in `grads`.
struct InputGradCoefficients {
  Scratch<double> a, b, c;
};
InputGradCoefficients input_grad_coefficients(const Scratch<BNChannel<double>>& ch,
                                              const Norm& grads, int64_t rows, bool training);

// a dy' + b x + c; in eval (b = c = 0) a dy' alone, so that an infinite x
// gives a finite gradient, as the eval formula of bn_math.h does.
template <typename acc_t>
inline acc_t input_grad(acc_t a, acc_t b, acc_t c, acc_t dy, acc_t x, bool training) {
  return training ? a * dy + b * x + c : a * dy;
}

// A [rows, cols] matrix in memory, unit column stride, rows `ld` apart: the
// CPU kernels' operands, so that callers with raw buffers need no tensors.
struct Mat {
  void* data = nullptr;
  int64_t rows = 0, cols = 0, ld = 0;
  at::ScalarType dtype = at::kFloat;

  template <typename T>
  T* ptr() const {
    return static_cast<T*>(data);
  }
  // Columns [from, from + count).
  Mat columns(int64_t from, int64_t count) const {
    return {static_cast<char*>(data) + from * at::elementSize(dtype), rows, count, ld, dtype};
  }
};

// A 2-D tensor with unit column stride as a Mat (null when undefined).
inline Mat mat_of(const at::Tensor& t) {
  if (!t.defined()) return {};
  return {t.data_ptr(), t.size(0), t.size(1), t.stride(0), t.scalar_type()};
}

// fused_kernels.h's kernels on Mats; conv weights are contiguous
// [Cout, Cin, 3, 3] in the matrices' dtype, Cin = x.cols and Cout = out.cols.
void column_stats(const Mat& x, const Norm& stats);
void bn_relu(const Mat& x, const Norm& norm, const Mat& out);
void bn_add(const Mat& out, bool accumulate, const Mat& x1, const Norm& norm1, const Mat& x2,
            const Norm* norm2);
void bn_backward_reduce(const Mat& dy, const Mat& x, const Norm& norm, bool has_relu,
                        const Norm& grads);
void bn_backward_apply(const Mat& dy, const Mat& x, const Norm& norm, bool has_relu,
                       bool training, const Norm& grads, const Mat& dx);
void conv3x3(const Mat& x, const void* w, const ImageShape& s, const Mat& out);
void conv3x3_backward(const Mat& dy, const Mat& x, const void* w, const ImageShape& s,
                      const Mat& dx, void* dw);

void unit_forward_cpu(const SmallUnit& unit, bool compute_stats, UnitMatrix target);
void unit_backward_cpu(const SmallUnit& unit, UnitMatrix grad_unit, UnitMatrix d1,
                       void* grad_conv2, void* grad_conv3, const UnitNorms& grads);

void push_updates_cpu(const at::Tensor& pre, const at::Tensor& updated, const at::Tensor& original,
                      const at::Tensor& own_weight, const BlockSegments& block, int64_t from,
                      int64_t to);

void conv3x3_cpu(const at::Tensor& x, const at::Tensor& w, const ImageShape& s,
                 const at::Tensor& out);
void conv3x3_backward_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                          const ImageShape& s, const at::Tensor& dx, const at::Tensor& dw);

}  // namespace gunn_ext
