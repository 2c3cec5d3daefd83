// The fused elementwise and reduction kernels around the GEMMs and the 3x3
// convolution of an update unit. Every matrix is 2-D [rows, channels] with
// unit column stride and any row stride: rows = batch * height * width, so
// a channels_last activation and a column block of the layer's state are
// both such matrices.
#pragma once

#include <ATen/core/Tensor.h>

namespace gunn_ext {

// BN parameters of a run of channels, [offset, offset + length) of a layer's
// flat per-channel tensors (1-D, contiguous, in the statistics dtype: float32,
// or float64 for float64 inputs), and the norm's eps (meaningful when the run
// lies within one norm). Kernels reach the run through pointers, so a run
// costs no tensor view. As an output (column_stats, bn_backward_reduce) only
// the tensors written need be defined.
struct Norm {
  at::Tensor mean, var, weight, bias;  // the whole flat tensors
  int64_t offset = 0, length = 0;
  double eps = 0.0;

  Norm slice(int64_t start, int64_t count) const {
    Norm run = *this;
    run.offset += start;
    run.length = count;
    return run;
  }
  // The run's first entry of one of the four tensors.
  template <typename T>
  T* data(const at::Tensor& t) const {
    return t.data_ptr<T>() + offset;
  }
};

// The spatial shape of the [rows, C] matrices: rows = batch * height * width.
struct ImageShape {
  int64_t batch, height, width;

  int64_t rows() const { return batch * height * width; }
};

// A [rows, cols] operand of the whole-unit kernels: unit column stride, rows
// `ld` apart; rows and cols are known from the unit.
struct UnitMatrix {
  void* data = nullptr;
  int64_t ld = 0;
};

// The BN runs of an update unit of one bottleneck: `first` spans the first
// GEMM's columns (shortcut BN, then bn1), for their statistics.
struct UnitNorms {
  Norm first, shortcut, bn1, bn2, bn3;
};

// Columns of a block of delayed updates (gradual_update.cpp) at most.
constexpr int64_t kMaxBlockColumns = 32;

// The terms of a unit's first GEMM and of its incoming gradient that come
// from the other segments of its block of delayed updates, where the
// whole-unit kernels add them (FusedKernels::block_terms_max_macs; columns
// or later > 0):
//   pre1 += S W^T, S = [updated[:, :seen], original[:, seen:columns]]
//   g     = dL/dU + later_d1 later_weight
// S is the block's columns as the unit finds them (seen of them updated
// already), W ([F, columns], rows weight_ld apart) their part of the unit's
// first GEMM weight; later_d1 ([rows, later]) is the first GEMM's gradient of
// the block's later units and later_weight ([later, n], rows later_ld apart)
// their weights on this unit's channels.
struct BlockTerms {
  UnitMatrix updated, original;
  int64_t columns = 0, seen = 0;
  const void* weight = nullptr;
  int64_t weight_ld = 0;
  UnitMatrix later_d1;
  int64_t later = 0;
  const void* later_weight = nullptr;
  int64_t later_ld = 0;
};

// An update unit of one bottleneck, from its first GEMM's output on, as a
// device's whole-unit kernels take it (FusedKernels::unit_forward and
// unit_backward): the math of Unit in gradual_update.cpp, without a library
// call or an allocation. Matrices are in `dtype`; weights are contiguous.
struct SmallUnit {
  at::ScalarType dtype;
  c10::Device device;
  ImageShape shape;
  int64_t n, mid;  // the segment's channels and the bottleneck's, K n
  bool shortcut, training;
  UnitMatrix pre1;    // [rows, (n +) mid]: the first GEMM's output, shortcut columns first
  const void* conv2;  // [mid, mid, 3, 3]
  const void* conv3;  // [n, mid]
  UnitNorms norms;
  void* tape;       // unit_buffer_size values: the forward's activations
  void* scratch;    // unit_buffer_size values: the backward's gradients
  void* workspace;  // the device's unit_workspace_bytes, for its reductions
  BlockTerms block;
};

// The segments of a block of delayed updates (gradual_update.cpp): segment k
// has the state's columns [starts[k], starts[k + 1]) and the rows
// [offsets[k], offsets[k + 1]) of the block's stacked first-GEMM weight (the
// columns of its outputs).
struct BlockSegments {
  at::IntArrayRef starts, offsets;
};

// Values in each of a SmallUnit's buffers: three [rows, mid] and two [rows, n].
inline int64_t unit_buffer_size(const ImageShape& s, int64_t n, int64_t mid) {
  return s.rows() * (3 * mid + 2 * n);
}

struct FusedKernels {
  // stats.mean and stats.var = mean and biased variance of every column of x.
  void (*column_stats)(const at::Tensor& x, const Norm& stats);
  // out = relu(bn(x)).
  void (*bn_relu)(const at::Tensor& x, const Norm& norm, const at::Tensor& out);
  // out = (accumulate ? out : 0) + bn1(x1) [+ bn2(x2)], bn2 absent = identity.
  void (*bn_add)(const at::Tensor& out, bool accumulate, const at::Tensor& x1, const Norm& norm1,
                 const at::Tensor& x2, const Norm* norm2);
  // The norm's parameter gradients: grads.bias = sum(dy') and grads.weight =
  // sum(dy' * xhat), dy' = dy masked by the ReLU after bn(x) when has_relu.
  void (*bn_backward_reduce)(const at::Tensor& dy, const at::Tensor& x, const Norm& norm,
                             bool has_relu, const Norm& grads);
  // dx from dy' and those sums (see bn_math.h).
  void (*bn_backward_apply)(const at::Tensor& dy, const at::Tensor& x, const Norm& norm,
                            bool has_relu, bool training, const Norm& grads, const at::Tensor& dx);
  // Direct 3x3 convolution, stride 1, zero padding 1, of [rows, Cin] into
  // [rows, Cout] (contiguous), Cin and Cout <= direct_conv_max_channels; w
  // is [Cout, Cin, 3, 3]. nullptr where a device has none (the library runs).
  void (*conv3x3)(const at::Tensor& x, const at::Tensor& w, const ImageShape& s,
                  const at::Tensor& out) = nullptr;
  // Its input gradient dx ([rows, Cin], contiguous) and weight gradient dw
  // ([Cout, Cin, 3, 3], contiguous) from dy ([rows, Cout]).
  void (*conv3x3_backward)(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                           const ImageShape& s, const at::Tensor& dx, const at::Tensor& dw) = nullptr;
  // A 3x3 runs the direct kernel when Cin and Cout are at most
  // direct_conv_max_channels and its multiply-adds, 9 Cin Cout rows, at most
  // direct_conv_max_macs: where a library call's fixed cost outweighs the
  // arithmetic.
  int64_t direct_conv_max_channels = 0;
  int64_t direct_conv_max_macs = 0;
  // A unit of one bottleneck whose 3x3 runs the direct kernel runs whole in
  // these, where a device has them (nullptr: the op's steps run one by one).
  // unit_forward first adds the unit's block terms into pre1, then fills the
  // tape, writes the unit's BN statistics when compute_stats, and adds U
  // into target ([rows, n]) unless target.data is null. unit_backward, after
  // unit_forward on the same unit, takes g (dL/dU, [rows, n], plus the later
  // block terms) to d1, the gradient of pre1 ([rows, (n +) mid]), and writes
  // the gradients of conv2 and conv3 (contiguous) and of the BN parameters.
  void (*unit_forward)(const SmallUnit& unit, bool compute_stats, UnitMatrix target) = nullptr;
  void (*unit_backward)(const SmallUnit& unit, UnitMatrix grad_unit, UnitMatrix d1,
                        void* grad_conv2, void* grad_conv3, const UnitNorms& grads) = nullptr;
  // The whole-unit kernels add a unit's BlockTerms themselves where each
  // term's multiply-adds (rows x its columns x its outputs) are at most this
  // many (else the op adds them with library GEMMs, and SmallUnit::block
  // leaves them out): where a library call's fixed cost outweighs them.
  int64_t block_terms_max_macs = 0;
  // Bytes of SmallUnit::workspace the whole-unit kernels need for a unit of
  // n channels (nullptr: none).
  int64_t (*unit_workspace_bytes)(const ImageShape& s, int64_t n, int64_t mid,
                                  at::ScalarType dtype) = nullptr;
  // The first GEMMs' in-block terms of the delayed updates as pushes, where
  // a device has them (the op uses them in float and double: gradual_update.cpp,
  // pushes): for the block's segments k in [from, to), in order, each row of
  //   pre[:, offsets[k + 1]:] += (updated - original)[:, c_k] W[offsets[k + 1]:, c_k]^T
  // with pre [rows, F] contiguous, W^T given as `own_weight`, the block's
  // columns of the stacked first-GEMM weight transposed ([width, F],
  // contiguous), updated and original [rows, N] (unit column stride) and c_k
  // segment k's columns. Every element of pre gets its terms in the same
  // order and rounding whether one call pushes many segments or many calls
  // push one each.
  void (*push_updates)(const at::Tensor& pre, const at::Tensor& updated,
                       const at::Tensor& original, const at::Tensor& own_weight,
                       const BlockSegments& block, int64_t from, int64_t to) = nullptr;
};

const FusedKernels& fused_kernels(c10::DeviceType device);
void register_fused_kernels(c10::DeviceType device, const FusedKernels& kernels);

struct FusedKernelsRegistration {
  FusedKernelsRegistration(c10::DeviceType device, const FusedKernels& kernels) {
    register_fused_kernels(device, kernels);
  }
};

}  // namespace gunn_ext
