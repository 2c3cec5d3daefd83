// The gradual update of a whole layer, forward and backward (Algorithm 1),
// for any device that has fused kernels: GEMMs go through ATen (BLAS on the
// CPU, cuBLAS on the GPU), and so do 3x3 convolutions (oneDNN, cuDNN) but the
// small ones (FusedKernels::direct_conv_max_macs); those, and the BatchNorm,
// ReLU and residual work, run the device's fused_kernels.h.
// Narrow segments run their first GEMMs in blocks (delayed updates, below),
// and, where the device has whole-unit kernels, the rest of their unit in one
// call each way (FusedKernels::unit_forward, unit_backward).
//
// Layout: the layer's state is a [rows, N] matrix, rows = B*H*W, channels
// contiguous (channels_last). Segment c_i is a column block of it, updated in
// place; intermediates of a unit are [rows, K*n] matrices.
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/alignment.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "conventions.h"
#include "fused_kernels.h"
#include "gradual_update.h"
#include "parameter_layout.h"

namespace gunn_ext {
namespace {

using at::Tensor;

struct Shape {
  int64_t batch, channels, height, width;
  int64_t rows() const { return batch * height * width; }
};

// [B, C, H, W] in any layout -> [rows, C] row-major (a view when channels_last).
Tensor as_rows(const Tensor& t) {
  return t.permute({0, 2, 3, 1}).contiguous().view({-1, t.size(1)});
}

// [rows, C] row-major -> [B, C, H, W] channels_last view.
Tensor as_image(const Tensor& rows, const Shape& s) {
  return rows.view({s.batch, s.height, s.width, rows.size(1)}).permute({0, 3, 1, 2});
}

// The result in the output memory format (conventions.h).
Tensor in_layout_of(const Tensor& rows, const Shape& s, const Tensor& like) {
  Tensor image = as_image(rows, s);
  return output_is_channels_last(like) ? image : image.contiguous();
}

void check_input(const Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 4, "gunn_ext: x must be 4-D (batch, channels, height, width), got ",
                    x.dim(), "-D");
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "gunn_ext: x must be floating point, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.numel() > 0, "gunn_ext: x must not be empty, got shape ", x.sizes());
}

// Per-channel BN parameters of all norms in the statistics dtype; a norm, or
// a run of channels spanning several (for their statistics), is a Norm over
// them.
struct Norms {
  Norm all;

  Norm at(const Slot& channels) const { return all.slice(channels.offset, channels.numel()); }
};

Norms pack_norms(const ParameterLayout& layout, const Tensor& bn_weight, const Tensor& bn_bias,
                 double eps, Tensor mean, Tensor var) {
  const auto dtype = mean.scalar_type();
  return {Norm{mean.contiguous(), var.contiguous(), bn_weight.to(dtype).contiguous(),
               bn_bias.to(dtype).contiguous(), 0, layout.norm_channels(), eps}};
}

// The op's own direct kernel for narrow channels, where the device has one;
// the library's convolution otherwise.
bool direct_conv(const FusedKernels& k, int64_t cout, int64_t cin, const Shape& s) {
  return k.conv3x3 != nullptr && std::max(cin, cout) <= k.direct_conv_max_channels &&
         9 * cin * cout * s.rows() <= k.direct_conv_max_macs;
}

ImageShape image_shape(const Shape& s) { return {s.batch, s.height, s.width}; }

// Whether the device's whole-unit kernels can run this layer's units (those
// of one bottleneck; Unit::whole decides per unit).
bool has_whole_units(const FusedKernels& k, const ParameterLayout& layout) {
  return k.unit_forward != nullptr && layout.bottlenecks == 1;
}

// Whether the device's whole-unit kernels run unit i: one bottleneck whose
// 3x3 runs the direct kernel.
bool runs_whole(const FusedKernels& k, const ParameterLayout& layout, const Shape& shape,
                int64_t i) {
  const int64_t mid = layout.mid(i);
  return has_whole_units(k, layout) && direct_conv(k, mid, mid, shape);
}

// m, or a copy of it where its data is not aligned as a new tensor's: the
// backward's x, whose products must round as the forward's products of a new
// tensor (the state) do, and a library may round by its operands' alignment.
Tensor aligned_as_new(const Tensor& m) {
  return reinterpret_cast<uintptr_t>(m.data_ptr()) % c10::gAlignment == 0 ? m : m.clone();
}

// The address of m[row, col] of a 2-D tensor.
char* element(const Tensor& m, int64_t row, int64_t col) {
  return static_cast<char*>(m.data_ptr()) + (row * m.stride(0) + col * m.stride(1)) * m.element_size();
}

// Columns from `from` on of a [rows, C] matrix, for the whole-unit kernels.
UnitMatrix columns_of(const Tensor& m, int64_t from) { return {element(m, 0, from), m.stride(0)}; }

// A slot's values in a contiguous flat tensor.
void* slot_data(const Tensor& flat, const Slot& slot) {
  return static_cast<char*>(flat.data_ptr()) + slot.offset * flat.element_size();
}

// The 3x3 convolution (padding 1) of a [rows, Cin] activation: [rows, Cout].
Tensor conv3x3(const Tensor& a, const Tensor& w, const Shape& s, const FusedKernels& k) {
  if (direct_conv(k, w.size(0), w.size(1), s)) {
    Tensor out = at::empty({s.rows(), w.size(0)}, a.options());
    k.conv3x3(a, w, image_shape(s), out);
    return out;
  }
  Tensor out = at::conv2d(as_image(a, s), w, {}, 1, 1);
  return as_rows(out.contiguous(at::MemoryFormat::ChannelsLast));
}

// Its input gradient dL/da ([rows, Cin]), and dL/dw written into dw, from dy = dL/dout.
Tensor conv3x3_backward(const Tensor& dy, const Tensor& a, const Tensor& w, const Shape& s,
                        const FusedKernels& k, const Tensor& dw) {
  if (direct_conv(k, w.size(0), w.size(1), s)) {
    Tensor da = at::empty({s.rows(), w.size(1)}, a.options());
    k.conv3x3_backward(dy, a, w, image_shape(s), da, dw);
    return da;
  }
  auto [da, d_w, unused] = at::convolution_backward(
      as_image(dy, s), as_image(a, s), w, std::nullopt, {1, 1}, {1, 1}, {1, 1}, false, {0, 0}, 1,
      {true, true, false});
  dw.copy_(d_w);
  return as_rows(da);
}

// The whole-unit kernels' buffers of a call: each unit's tape and scratch
// (unit_buffer_size values of dtype each), then the device's workspace.
struct UnitBuffers {
  Tensor bytes;
  at::ScalarType dtype;
  int64_t workspace_offset;
};

// Activations of one bottleneck, kept for its backward.
struct BottleneckTape {
  Tensor input;  // [rows, Cin] (undefined for the first bottleneck: the state)
  Tensor pre1;   // conv1 output, [rows, (n +) K n]: shortcut columns first
  Tensor act1, pre2, act2, pre3;
};

// The computation of one update unit, shared by forward and backward.
class Unit {
 public:
  Unit(const ParameterLayout& layout, bool training, const Tensor& conv_weight, const Norms& norms,
       const Shape& shape, const FusedKernels& kernels, int64_t index)
      : layout_(layout), training_(training), convs_(conv_weight), norms_(norms), shape_(shape),
        k_(kernels), i_(index), n_(layout.segments[index]), start_(layout.starts[index]) {}

  bool whole() const { return runs_whole(k_, layout_, shape_, i_); }

  // The unit for those kernels, its first GEMM's output at pre1, its buffers
  // in `buffers` (unit_buffers).
  SmallUnit small(UnitMatrix pre1, const UnitBuffers& buffers) const {
    const ImageShape image = image_shape(shape_);
    const int64_t mid = layout_.mid(i_);
    char* tape = static_cast<char*>(buffers.bytes.data_ptr());
    return {buffers.dtype, buffers.bytes.device(), image, n_, mid, layout_.shortcut, training_,
            pre1, slot_data(convs_, layout_.conv2(i_, 0)), slot_data(convs_, layout_.conv3(i_, 0)),
            unit_norms(norms_), tape,
            tape + unit_buffer_size(image, n_, mid) * at::elementSize(buffers.dtype),
            tape + buffers.workspace_offset};
  }

  // The unit's BN runs in `all` (the parameters, or their gradients).
  UnitNorms unit_norms(const Norms& all) const {
    UnitNorms u{all.at(layout_.first_norms(i_, 0)), Norm(), all.at(layout_.bn1(i_, 0)),
                all.at(layout_.bn2(i_, 0)), all.at(layout_.bn3(i_, 0))};
    if (layout_.shortcut) u.shortcut = all.at(layout_.shortcut_bn(i_));
    return u;
  }

  // The merged first GEMM's weight: [shortcut; conv1] of bottleneck m, one slice of conv_weight.
  Tensor first_weight(int64_t m) const { return layout_.first_gemm(i_, m).of(convs_); }
  int64_t skip(int64_t m) const { return layout_.has_shortcut(m) ? n_ : 0; }

  // Runs bottleneck m from pre1 (the first GEMM's output) on; fills the tape.
  void bottleneck_tail(int64_t m, BottleneckTape& t, bool compute_stats) const {
    const int64_t mid = layout_.mid(i_);
    if (compute_stats) {
      k_.column_stats(t.pre1, norms_.at(layout_.first_norms(i_, m)));
    }
    Tensor pre1 = t.pre1.narrow(1, skip(m), mid);
    t.act1 = at::empty({shape_.rows(), mid}, pre1.options());
    k_.bn_relu(pre1, norms_.at(layout_.bn1(i_, m)), t.act1);
    t.pre2 = conv3x3(t.act1, layout_.conv2(i_, m).of(convs_), shape_, k_);
    if (compute_stats) stats(t.pre2, layout_.bn2(i_, m));
    t.act2 = at::empty_like(t.pre2);
    k_.bn_relu(t.pre2, norms_.at(layout_.bn2(i_, m)), t.act2);
    t.pre3 = at::mm(t.act2, layout_.conv3(i_, m).matrix_of(convs_).t());
    if (compute_stats) stats(t.pre3, layout_.bn3(i_, m));
  }

  // out (+)= bn3(pre3) + (shortcut BN of pre1 | extra).
  void combine(int64_t m, const BottleneckTape& t, Tensor& out, bool accumulate,
               const Tensor& extra) const {
    const Norm bn3 = norms_.at(layout_.bn3(i_, m));
    if (layout_.has_shortcut(m)) {
      const Norm sc = norms_.at(layout_.shortcut_bn(i_));
      k_.bn_add(out, accumulate, t.pre3, bn3, t.pre1.narrow(1, 0, n_), &sc);
    } else {
      k_.bn_add(out, accumulate, t.pre3, bn3, extra, nullptr);
    }
  }

  // Runs the unit from `pre1`, the first GEMM's output ([rows, F] with F =
  // first_weight(0).size(0)); adds U(state) into `target` ([rows, n] column
  // block of the state) unless it is undefined (the backward's recomputation,
  // which needs only the tape). Returns the tape.
  std::vector<BottleneckTape> forward(const Tensor& pre1, Tensor target, bool compute_stats) const {
    std::vector<BottleneckTape> tape(layout_.bottlenecks);
    Tensor h;
    for (int64_t m = 0; m < layout_.bottlenecks; ++m) {
      BottleneckTape& t = tape[m];
      if (m > 0) {
        t.input = h;
        t.pre1 = at::mm(h, first_weight(m).t());
      } else {
        t.pre1 = pre1;
      }
      bottleneck_tail(m, t, compute_stats);
      const bool last = m + 1 == layout_.bottlenecks;
      if (last) {
        if (target.defined()) combine(m, t, target, true, h);
      } else if (m == 0) {
        h = at::empty({shape_.rows(), n_}, t.pre1.options());
        combine(m, t, h, false, Tensor());
      } else {
        Tensor next = h.clone();  // h is this bottleneck's saved input
        combine(m, t, next, true, Tensor());
        h = next;
      }
    }
    return tape;
  }

  // dL/dpre of a BN (+ ReLU) given dL/dout; writes the parameter gradients.
  void norm_backward(const Tensor& dout, const Tensor& pre, const Slot& slot, bool has_relu,
                     const Norms& grads, const Tensor& dpre) const {
    const Norm g = grads.at(slot), norm = norms_.at(slot);
    k_.bn_backward_reduce(dout, pre, norm, has_relu, g);
    k_.bn_backward_apply(dout, pre, norm, has_relu, training_, g, dpre);
  }

  // Backpropagates dL/dU through the unit, down to d1, the gradient of the
  // first GEMM's output, written into `d1_first` ([rows, F]); the caller
  // turns d1 into the gradients of the state and of the first weight. The
  // other weight gradients go to their slots of `grad_convs` (flat like
  // conv_weight), the BN ones to `grads`. Each activation of the tape and
  // each intermediate gradient is released after its last use, so that a
  // unit's backward holds about three [rows, K n] matrices at a time.
  void backward(std::vector<BottleneckTape> tape, Tensor grad_unit, const Tensor& d1_first,
                const Tensor& grad_convs, const Norms& grads) const {
    for (int64_t m = layout_.bottlenecks - 1; m >= 0; --m) {
      BottleneckTape& t = tape[m];
      const int64_t mid = layout_.mid(i_), skip_m = skip(m);
      const Slot conv2 = layout_.conv2(i_, m), conv3 = layout_.conv3(i_, m);
      Tensor d3 = at::empty_like(t.pre3);
      norm_backward(grad_unit, t.pre3, layout_.bn3(i_, m), false, grads, d3);
      t.pre3.reset();
      Tensor grad_w3 = conv3.matrix_of(grad_convs);
      at::mm_out(grad_w3, d3.t(), t.act2);
      t.act2.reset();
      Tensor d_act2 = at::mm(d3, conv3.matrix_of(convs_));
      d3.reset();
      Tensor d2 = at::empty_like(t.pre2);
      norm_backward(d_act2, t.pre2, layout_.bn2(i_, m), true, grads, d2);
      t.pre2.reset();
      d_act2.reset();
      const Tensor d_act1 =
          conv3x3_backward(d2, t.act1, conv2.of(convs_), shape_, k_, conv2.of(grad_convs));
      t.act1.reset();
      d2.reset();
      Tensor d1 = m == 0 ? d1_first : at::empty({shape_.rows(), skip_m + mid}, t.pre1.options());
      norm_backward(d_act1, t.pre1.narrow(1, skip_m, mid), layout_.bn1(i_, m), true, grads,
                    d1.narrow(1, skip_m, mid));
      if (skip_m) {
        norm_backward(grad_unit, t.pre1.narrow(1, 0, n_), layout_.shortcut_bn(i_), false, grads,
                      d1.narrow(1, 0, n_));
      }
      if (m > 0) {
        Tensor dw = layout_.first_gemm(i_, m).of(grad_convs);  // [shortcut; conv1] as one matrix
        at::mm_out(dw, d1.t(), t.input);
        grad_unit = at::addmm(grad_unit, d1, first_weight(m));  // h_m = h_{m-1} + B_m(h_{m-1})
      }
    }
  }

 private:
  void stats(const Tensor& pre, const Slot& norm) const {
    k_.column_stats(pre, norms_.at(norm));
  }

  const ParameterLayout& layout_;
  bool training_;
  const Tensor& convs_;
  const Norms& norms_;
  const Shape& shape_;
  const FusedKernels& k_;
  int64_t i_, n_, start_;
};

// Inside the op: its GEMMs and convolutions run in the op's dtypes (no
// autocast), and its many slices are plain views (no autograd view tracking:
// nothing in here is differentiated).
struct OpGuard {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
};

Shape shape_of(const Tensor& x) { return {x.size(0), x.size(1), x.size(2), x.size(3)}; }

// Delayed updates: consecutive narrow segments run their first GEMMs as one.
//
// While the segments of a block (columns [begin, end)) update, the state
// outside the block does not change, so the first GEMM of segment j splits
// into one product over the outside columns, shared by the block (one pass
// over the state per block, not per segment), and one over the block's own
// columns as segment j sees them:
//   pre1_j = S[:, out] W_j[:, out]^T + S_j[:, begin:end] W_j[:, begin:end]^T
// The backward delays Eq. 6's g += d1_j W_j to the block's end: segment j
// reads g[:, c_j] plus the terms of the block's later segments,
//   g_j = g[:, c_j] + sum_{k > j in block} d1_k W_k[:, c_j],
// and dW_j = d1_j^T S_j is one GEMM per block plus, for the block's columns
// that segment j saw updated, d1_j^T (y - x)[:, begin:start_j].
// The arithmetic is the same; only the shape of the GEMMs changes. Where
// the device pushes updates (FusedKernels::push_updates: the CPU, in float
// and double), the shared product covers the block's own columns too, as
// the block finds them, and each segment's update then reaches the later
// segments' outputs as a push,
//   pre1_j += sum_{k < j in block} (y - x)[:, c_k] W_j[:, c_k]^T,
// one pass over the rows per segment, without a library call or a copy:
// the same sum as S_j W_j^T, rounded differently.
// Elsewhere, where the in-block products are small (FusedKernels::
// block_terms_max_macs: always on CUDA, where a launch costs more than they
// do; on the CPU below a library call's fixed cost), the whole-unit kernels
// add the terms of pre1_j (when every unit of the block runs whole) and of
// g_j themselves: no GEMM and no copy per segment.
//
// The backward recomputes each pre1_j with the forward's own GEMMs (or
// kernels, or pushes in the same order), on the same operands, so that it
// is bitwise the forward's: a ReLU mask recomputed from a rounding-level
// difference would flip where BN + ReLU is near 0 and change the gradient
// there by O(1).
struct Block {
  int64_t first, last;           // segments [first, last)
  int64_t begin, end;            // their columns
  std::vector<int64_t> offsets;  // each segment's rows in `weight`; back() = F
  std::vector<int64_t> starts;   // each segment's first column; back() = end
  Tensor weight;                 // [F, N]: the segments' first-GEMM weights, stacked
  // Where the segments are of one size, their first-GEMM weights' slots lie
  // this far apart in the flat convolution tensor (0 otherwise).
  int64_t slot_stride = 0;

  bool single() const { return last - first == 1; }
  int64_t count() const { return last - first; }
  int64_t width() const { return end - begin; }
  BlockSegments segments() const { return {starts, offsets}; }
  // W[:, begin:end]^T, [width, F] contiguous: the pushes' weights.
  Tensor own_weight() const { return weight.narrow(1, begin, width()).t().contiguous(); }
  // Segment j's columns of a [rows, F] block matrix (or rows of an [F, N] one).
  Tensor of(const Tensor& t, int64_t j, int64_t dim = 1) const {
    const int64_t k = j - first;
    return t.narrow(dim, offsets[k], offsets[k + 1] - offsets[k]);
  }
  // The columns (rows) of segments after j: from later_start(j) on, later_rows(j) of them.
  Tensor after(const Tensor& t, int64_t j, int64_t dim = 1) const {
    return t.narrow(dim, later_start(j), later_rows(j));
  }
  int64_t later_start(int64_t j) const { return offsets[j + 1 - first]; }
  int64_t later_rows(int64_t j) const { return offsets.back() - later_start(j); }
  // Segment j's columns of a [rows, F] block matrix, for the whole-unit kernels (no view).
  UnitMatrix columns(const Tensor& t, int64_t j) const { return columns_of(t, offsets[j - first]); }
};

std::vector<Block> blocks_of(const ParameterLayout& layout, const Tensor& conv_weight) {
  std::vector<Block> blocks;
  const int64_t count = static_cast<int64_t>(layout.segments.size());
  blocks.reserve(count);  // a call's allocations do not grow with the segments
  for (int64_t i = 0; i < count;) {
    Block b{i, i, layout.starts[i], layout.starts[i], {0}, {layout.starts[i]}, Tensor()};
    b.offsets.reserve(kMaxBlockColumns + 1);
    b.starts.reserve(kMaxBlockColumns + 1);
    do {
      b.end += layout.segments[b.last];
      b.offsets.push_back(b.offsets.back() + layout.first_gemm(b.last, 0).shape[0]);
      b.starts.push_back(b.end);
      ++b.last;
    } while (b.last < count && b.width() + layout.segments[b.last] <= kMaxBlockColumns);
    if (!b.single()) {
      const int64_t stride = layout.first_gemm(b.first + 1, 0).offset - layout.first_gemm(b.first, 0).offset;
      bool equal = true;
      for (int64_t j = b.first + 1; j < b.last; ++j) {
        equal = equal && layout.segments[j] == layout.segments[b.first] &&
                layout.first_gemm(j, 0).offset - layout.first_gemm(j - 1, 0).offset == stride;
      }
      if (equal) b.slot_stride = stride;
    }
    if (b.single()) {
      b.weight = layout.first_gemm(b.first, 0).of(conv_weight);
    } else if (b.slot_stride > 0) {  // the slots, stacked: one gather, no view per segment
      const int64_t rows = b.offsets[1], cols = layout.channels;
      b.weight = conv_weight
                     .as_strided({b.count(), rows, cols}, {b.slot_stride, cols, 1},
                                 conv_weight.storage_offset() + layout.first_gemm(b.first, 0).offset)
                     .reshape({b.offsets.back(), cols});
    } else {
      std::vector<Tensor> weights;
      for (int64_t j = b.first; j < b.last; ++j) weights.push_back(layout.first_gemm(j, 0).of(conv_weight));
      b.weight = at::cat(weights);
    }
    blocks.push_back(std::move(b));
    i = blocks.back().last;
  }
  return blocks;
}

// a[:, cols] w[:, cols]^T for the columns [from, to) of a [rows, N] matrix,
// added into out when `accumulate`.
void product(Tensor& out, bool accumulate, const Tensor& a, const Tensor& w, int64_t from,
             int64_t to) {
  const Tensor lhs = a.narrow(1, from, to - from), rhs = w.narrow(1, from, to - from).t();
  if (accumulate) out.addmm_(lhs, rhs);
  else out = at::mm(lhs, rhs);
}

// The block's first-GEMM outputs over the columns that stay fixed while it
// runs, [rows, F]: `before` on the columns before the block (updated), `after`
// from its end on (original). With `covers_block`, and for a single segment,
// `after` from the block's start on: the block's columns as the block finds
// them, to which the pushes add the in-block updates (FusedKernels::
// push_updates); else the blocks' own columns follow per segment
// (`block_columns`). Forward and backward call this with equal operands.
Tensor fixed_product(const Block& b, const Tensor& before, const Tensor& after, int64_t channels,
                     bool covers_block) {
  const int64_t from = b.single() || covers_block ? b.begin : b.end;
  Tensor pre;
  if (b.begin > 0) product(pre, false, before, b.weight, 0, b.begin);
  if (from < channels) product(pre, b.begin > 0, after, b.weight, from, channels);
  if (!pre.defined()) pre = at::zeros({before.size(0), b.offsets.back()}, before.options());
  return pre;
}

// pre1_i += S_i[:, begin:end] W_i[:, begin:end]^T, with `columns` the block's
// columns of the state as segment i finds them ([rows, width], contiguous).
void block_columns(const Block& b, int64_t i, const Tensor& columns, const Tensor& pre1) {
  if (!b.single()) pre1.addmm_(columns, b.of(b.weight, i, 0).narrow(1, b.begin, b.width()).t());
}

// Whether the block's in-block terms of the first GEMMs are pushed
// (FusedKernels::push_updates), where the device has pushes: in float and
// double. A push accumulates into the first GEMM's outputs in their dtype;
// in half precision the library's GEMM, which accumulates in float, stays.
bool pushes(const Block& b, const FusedKernels& k, const Tensor& x) {
  const auto dtype = x.scalar_type();
  return !b.single() && k.push_updates != nullptr &&
         (dtype == at::kFloat || dtype == at::kDouble);
}

// Whether the whole-unit kernels add an in-block term of `columns` inputs and
// `outputs` outputs per row themselves.
bool small_terms(const FusedKernels& k, const Shape& shape, int64_t columns, int64_t outputs) {
  return shape.rows() * columns * outputs <= k.block_terms_max_macs;
}

// Whether the whole-unit kernels add the block's own columns themselves
// (BlockTerms), with no copy of them: where every unit of the block runs
// whole and its term is small.
bool own_columns_in_kernels(const Block& b, const FusedKernels& k, const ParameterLayout& layout,
                            const Shape& shape) {
  if (b.single()) return false;
  for (int64_t i = b.first; i < b.last; ++i) {
    const int64_t outputs = b.of(b.weight, i, 0).size(0);
    if (!runs_whole(k, layout, shape, i) || !small_terms(k, shape, b.width(), outputs)) return false;
  }
  return true;
}

// Segment i's own-column terms: the block's columns of `updated` before the
// segment, of `original` from it on (the state itself in the forward).
void add_own_columns(BlockTerms& t, const Block& b, int64_t i, const ParameterLayout& layout,
                     const Tensor& updated, const Tensor& original) {
  t.updated = columns_of(updated, b.begin);
  t.original = columns_of(original, b.begin);
  t.columns = b.width();
  t.seen = layout.starts[i] - b.begin;
  t.weight = element(b.weight, b.offsets[i - b.first], b.begin);
  t.weight_ld = b.weight.stride(0);
}

// Segment i's later terms: the first-GEMM gradients of the block's later
// segments (columns of d1) and their weights on the segment's channels.
void add_later_terms(BlockTerms& t, const Block& b, int64_t i, const ParameterLayout& layout,
                     const Tensor& d1) {
  t.later_d1 = columns_of(d1, b.later_start(i));
  t.later = b.later_rows(i);
  t.later_weight = element(b.weight, b.later_start(i), layout.starts[i]);
  t.later_ld = b.weight.stride(0);
}

// dL/dU of segment i with the block's later terms added by the library:
// g[:, c_i] + d1[:, later] W[later, c_i], a new [rows, n] matrix.
Tensor later_terms(const Block& b, int64_t i, const ParameterLayout& layout, const Tensor& g,
                   const Tensor& d1) {
  const int64_t start = layout.starts[i], n = layout.segments[i];
  return at::addmm(g.narrow(1, start, n), b.after(d1, i), b.after(b.weight, i, 0).narrow(1, start, n));
}

// dW_i[:, begin:start_i] += d1_i^T (y - x)[:, begin:start_i] for every
// segment i of the block: the block's columns that segment i saw updated
// (delta = (y - x)[:, begin:end]). For many segments of one size this is
// one product for the block, d1^T delta, masked to the columns of earlier
// segments: five library calls in place of one per segment after the first.
void add_seen_columns(const Block& b, const ParameterLayout& layout, const Tensor& d1,
                      const Tensor& delta, const Tensor& dw) {
  constexpr int64_t kMaskedProductCalls = 5;
  if (b.slot_stride > 0 && b.count() - 1 > kMaskedProductCalls) {
    const int64_t count = b.count(), rows = b.offsets[1], n = layout.segments[b.first];
    Tensor seen = at::mm(d1.t(), delta);  // [count * rows, count * n]
    const Tensor earlier = at::ones({count, count}, seen.options()).tril_(-1);
    seen.view({count, rows, count, n}).mul_(earlier.view({count, 1, count, 1}));
    dw.narrow(1, b.begin, b.width()).add_(seen);
    return;
  }
  for (int64_t i = b.first + 1; i < b.last; ++i) {
    const int64_t seen = layout.starts[i] - b.begin;
    Tensor dw_seen = b.of(dw, i, 0).narrow(1, b.begin, seen);
    dw_seen.addmm_(b.of(d1, i).t(), delta.narrow(1, 0, seen));
  }
}

// The block's stacked first-GEMM weight gradients dw to their slots of
// grad_convs: one strided copy for segments of one size.
void store_first_gemm_grads(const Block& b, const ParameterLayout& layout, const Tensor& dw,
                            const Tensor& grad_convs) {
  if (b.slot_stride > 0) {
    const int64_t count = b.count(), rows = b.offsets[1], channels = dw.size(1);
    grad_convs
        .as_strided({count, rows, channels}, {b.slot_stride, channels, 1},
                    layout.first_gemm(b.first, 0).offset)
        .copy_(dw.view({count, rows, channels}));
    return;
  }
  for (int64_t i = b.first; i < b.last; ++i) layout.first_gemm(i, 0).of(grad_convs).copy_(b.of(dw, i, 0));
}

// One allocation per call for the whole-unit kernels' tape, scratch and
// workspace, large enough for any unit that runs whole (empty where none does).
UnitBuffers unit_buffers(const ParameterLayout& layout, const Shape& shape, const FusedKernels& k,
                         const Tensor& x) {
  const ImageShape image = image_shape(shape);
  int64_t values = 0, workspace = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(layout.segments.size()); ++i) {
    if (runs_whole(k, layout, shape, i)) {
      const int64_t n = layout.segments[i], mid = layout.mid(i);
      values = std::max(values, unit_buffer_size(image, n, mid));
      if (k.unit_workspace_bytes != nullptr) {
        workspace = std::max(workspace, k.unit_workspace_bytes(image, n, mid, x.scalar_type()));
      }
    }
  }
  constexpr int64_t kAlign = 16;
  const int64_t offset = (2 * values * x.element_size() + kAlign - 1) / kAlign * kAlign;
  return {at::empty({offset + workspace}, x.options().dtype(at::kByte)), x.scalar_type(), offset};
}

}  // namespace

ForwardResult gradual_update(const Tensor& x, const Tensor& conv_weight, const Tensor& bn_weight,
                             const Tensor& bn_bias, const std::optional<Tensor>& running_mean,
                             const std::optional<Tensor>& running_var, at::IntArrayRef segments,
                             int64_t expansion, int64_t bottlenecks, bool shortcut, bool sequential,
                             bool training, double eps) {
  const OpGuard guard;
  check_input(x);
  const ParameterLayout layout(x.size(1), segments, expansion, bottlenecks, shortcut);
  layout.check_arguments(x, conv_weight, bn_weight, bn_bias, running_mean, running_var, training);
  const Shape shape = shape_of(x);
  const auto stats_options = x.options().dtype(stats_dtype(x.scalar_type()));
  Tensor mean, var;
  if (training) {
    mean = at::empty({layout.norm_channels()}, stats_options);
    var = at::empty({layout.norm_channels()}, stats_options);
  } else {  // copies: the outputs never alias the running statistics
    mean = running_mean->to(stats_options, false, true);
    var = running_var->to(stats_options, false, true);
  }
  const Norms norms = pack_norms(layout, bn_weight, bn_bias, eps, mean, var);
  const FusedKernels& kernels = fused_kernels(x.device().type());

  const Tensor convs = conv_weight.contiguous();
  const UnitBuffers buffers = unit_buffers(layout, shape, kernels, x);
  const Tensor input = as_rows(x);
  Tensor state = input.clone();  // also the output buffer, updated in place
  const int64_t channels = layout.channels;
  for (const Block& b : blocks_of(layout, convs)) {
    const bool push = sequential && pushes(b, kernels, x);
    Tensor pre = sequential ? fixed_product(b, state, state, channels, push)
                            : at::mm(input, b.weight.t());
    const Tensor own_weight = push ? b.own_weight() : Tensor();
    // Whether segments add their block's own columns themselves.
    const bool own_columns = sequential && !b.single() && !push;
    const bool in_kernels = own_columns && own_columns_in_kernels(b, kernels, layout, shape);
    // The block's columns of the state as the next segment finds them.
    Tensor columns = own_columns && !in_kernels ? state.narrow(1, b.begin, b.width()).clone() : Tensor();
    for (int64_t i = b.first; i < b.last; ++i) {
      const int64_t start = layout.starts[i], n = layout.segments[i];
      if (columns.defined()) block_columns(b, i, columns, b.of(pre, i));
      const Unit unit(layout, training, convs, norms, shape, kernels, i);
      if (unit.whole()) {  // raw pointers: no tensor, view or library call per segment
        SmallUnit small = unit.small(b.columns(pre, i), buffers);
        if (in_kernels) add_own_columns(small.block, b, i, layout, state, state);
        kernels.unit_forward(small, training, columns_of(state, start));
      } else {
        unit.forward(b.of(pre, i), state.narrow(1, start, n), training);
      }
      if (columns.defined() && i + 1 < b.last) {
        columns.narrow(1, start - b.begin, n).copy_(state.narrow(1, start, n));
      }
      if (push && i + 1 < b.last) {
        kernels.push_updates(pre, state, input, own_weight, b.segments(), i - b.first, i + 1 - b.first);
      }
    }
  }
  return {in_layout_of(state, shape, x), norms.all.mean, norms.all.var};
}

BackwardResult gradual_update_backward(const Tensor& grad_y, const Tensor& x, const Tensor& y,
                                       const Tensor& conv_weight, const Tensor& bn_weight,
                                       const Tensor& bn_bias, const Tensor& mean, const Tensor& var,
                                       at::IntArrayRef segments, int64_t expansion,
                                       int64_t bottlenecks, bool shortcut, bool sequential,
                                       bool training, double eps) {
  const OpGuard guard;
  check_input(x);
  const ParameterLayout layout(x.size(1), segments, expansion, bottlenecks, shortcut);
  layout.check_backward_arguments(grad_y, x, y, conv_weight, bn_weight, bn_bias, mean, var);
  const Shape shape = shape_of(x);
  const Norms norms = pack_norms(layout, bn_weight, bn_bias, eps, mean, var);
  const FusedKernels& kernels = fused_kernels(x.device().type());
  Norm all_grads = norms.all;  // d weight and d bias, in place of weight and bias
  all_grads.mean = all_grads.var = Tensor();
  all_grads.weight = at::empty_like(norms.all.weight);
  all_grads.bias = at::empty_like(norms.all.bias);
  const Norms grads{all_grads};
  // Every slot is written: one gradient per convolution.
  const Tensor grad_convs = at::empty({layout.conv_numel()}, conv_weight.options());

  const Tensor original = aligned_as_new(as_rows(x));
  const Tensor updated = sequential ? as_rows(y) : Tensor();
  // One gradient buffer, accumulated in place (Eq. 6). GUNN reads each
  // segment's gradient from it after the later segments have added theirs;
  // SUNN's units all read dL/dy, so it keeps that apart.
  const Tensor incoming = as_rows(grad_y);
  const bool owned = !incoming.is_alias_of(grad_y);
  Tensor grad = (owned && sequential) ? incoming : incoming.clone();
  const Tensor read_from = sequential ? grad : incoming;
  const int64_t channels = layout.channels, rows = shape.rows();
  const Tensor convs = conv_weight.contiguous();
  const UnitBuffers buffers = unit_buffers(layout, shape, kernels, x);
  const auto blocks = blocks_of(layout, convs);
  for (auto b = blocks.rbegin(); b != blocks.rend(); ++b) {
    // The state before segment i is y on the columns before c_i, x from c_i on:
    // the forward's first GEMMs, repeated on equal operands.
    const bool push = sequential && pushes(*b, kernels, x);
    Tensor pre = sequential ? fixed_product(*b, updated, original, channels, push)
                            : at::mm(original, b->weight.t());
    if (push) {
      kernels.push_updates(pre, updated, original, b->own_weight(), b->segments(), 0,
                           b->count() - 1);
    }
    // Whether segments saw earlier ones of their block update (delta), and
    // whether they add their block's own columns themselves (the forward's).
    const bool in_block = sequential && !b->single();
    const bool own_columns = in_block && !push;
    const bool in_kernels = own_columns && own_columns_in_kernels(*b, kernels, layout, shape);
    Tensor columns, delta;
    if (in_block) {
      delta = updated.narrow(1, b->begin, b->width()) - original.narrow(1, b->begin, b->width());
    }
    if (own_columns && !in_kernels) columns = updated.narrow(1, b->begin, b->width()).clone();
    const Tensor d1 = at::empty({rows, b->offsets.back()}, x.options());
    for (int64_t i = b->last - 1; i >= b->first; --i) {
      const int64_t start = layout.starts[i], n = layout.segments[i];
      if (columns.defined()) {
        columns.narrow(1, start - b->begin, n).copy_(original.narrow(1, start, n));
        block_columns(*b, i, columns, b->of(pre, i));
      }
      const Unit unit(layout, training, convs, norms, shape, kernels, i);
      const bool later = sequential && i + 1 < b->last;  // the block's later segments, not yet in grad
      const bool whole = unit.whole();
      const bool later_in_kernels = later && whole && small_terms(kernels, shape, b->later_rows(i), n);
      // dL/dU: grad's columns, or a new matrix with the later terms added by the library.
      const bool library_terms = later && !later_in_kernels;
      if (whole) {  // raw pointers: no tensor, view or library call per segment
        Tensor grad_unit;  // only where the library adds the later terms
        if (library_terms) grad_unit = later_terms(*b, i, layout, read_from, d1);
        SmallUnit small = unit.small(b->columns(pre, i), buffers);
        if (in_kernels) add_own_columns(small.block, *b, i, layout, updated, original);
        if (later_in_kernels) add_later_terms(small.block, *b, i, layout, d1);
        kernels.unit_forward(small, false, UnitMatrix{});
        const UnitMatrix g = library_terms ? columns_of(grad_unit, 0) : columns_of(read_from, start);
        kernels.unit_backward(small, g, b->columns(d1, i), slot_data(grad_convs, layout.conv2(i, 0)),
                              slot_data(grad_convs, layout.conv3(i, 0)), unit.unit_norms(grads));
        continue;
      }
      const Tensor grad_unit =
          library_terms ? later_terms(*b, i, layout, read_from, d1) : read_from.narrow(1, start, n);
      unit.backward(unit.forward(b->of(pre, i), Tensor(), false), grad_unit, b->of(d1, i), grad_convs,
                    grads);
    }
    // The block's first-GEMM gradients: dW = d1^T (state), then g += d1 W (Eq. 6).
    Tensor dw = b->single() ? layout.first_gemm(b->first, 0).of(grad_convs)
                            : at::empty(b->weight.sizes(), b->weight.options());
    const int64_t from = sequential ? b->begin : 0;
    if (from > 0) {
      Tensor head = dw.narrow(1, 0, from);
      at::mm_out(head, d1.t(), updated.narrow(1, 0, from));
    }
    Tensor tail = dw.narrow(1, from, channels - from);
    at::mm_out(tail, d1.t(), original.narrow(1, from, channels - from));
    if (delta.defined()) add_seen_columns(*b, layout, d1, delta, dw);
    if (!b->single()) store_first_gemm_grads(*b, layout, dw, grad_convs);
    grad.addmm_(d1, b->weight);
  }
  return {in_layout_of(grad, shape, x), grad_convs, grads.all.weight.to(bn_weight.scalar_type()),
          grads.all.bias.to(bn_bias.scalar_type())};
}

// The device registrations: csrc/cpu/gradual_update_cpu.cpp and
// csrc/cuda/gradual_update_cuda.cpp.

}  // namespace gunn_ext
