// The gradual update of a whole layer, forward and backward (Algorithm 1),
// for any device that has fused kernels: GEMMs and the 3x3 convolution go
// through ATen (BLAS / oneDNN on the CPU, cuBLAS / cuDNN on the GPU), the
// BatchNorm, ReLU and residual work through fused_kernels.h.
//
// Layout: the layer's state is a [rows, N] matrix, rows = B*H*W, channels
// contiguous (channels_last). Segment c_i is a column block of it, updated in
// place; intermediates of a unit are [rows, K*n] matrices.
#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

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
  TORCH_CHECK(x.dim() == 4, "gunn_ext: x must be 4-D (batch, channels, height, width), got ",
              x.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "gunn_ext: x must be floating point, got ",
              x.scalar_type());
  TORCH_CHECK(x.numel() > 0, "gunn_ext: x must not be empty, got shape ", x.sizes());
}

// Per-channel BN parameters of all norms in the statistics dtype, with a view
// per norm made once (views cost a dispatcher call each).
struct Norms {
  Norm all;
  std::vector<Norm> each;  // by the norm's row in the layout

  const Norm& at(const Slot& norm) const { return each[norm.row]; }
  // A run of channels spanning one or more norms (for their statistics).
  Norm run(const Slot& channels) const {
    const Norm& first = each[channels.row];
    return first.mean.numel() == channels.numel() ? first : all.slice(channels.offset, channels.numel());
  }
};

std::vector<Norm> split_norms(const Norm& all, at::IntArrayRef sizes, double eps) {
  const auto split = [&](const Tensor& t) {
    return t.defined() ? t.split_with_sizes(sizes) : std::vector<Tensor>(sizes.size());
  };
  const auto mean = split(all.mean), var = split(all.var), weight = split(all.weight),
             bias = split(all.bias);
  std::vector<Norm> each(sizes.size());
  for (size_t k = 0; k < sizes.size(); ++k) each[k] = {mean[k], var[k], weight[k], bias[k], eps};
  return each;
}

Norms pack_norms(const ParameterLayout& layout, const Tensor& bn_weight, const Tensor& bn_bias,
                 double eps, Tensor mean, Tensor var) {
  Norms n;
  const auto dtype = mean.scalar_type();
  n.all = {std::move(mean), std::move(var), bn_weight.to(dtype), bn_bias.to(dtype), eps};
  n.each = split_norms(n.all, layout.norm_sizes(), eps);
  return n;
}

Tensor conv3x3(const Tensor& a, const Tensor& w, const Shape& s) {
  Tensor out = at::conv2d(as_image(a, s), w, {}, 1, 1);
  return as_rows(out.contiguous(at::MemoryFormat::ChannelsLast));
}

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

  // The merged first GEMM's weight: [shortcut; conv1] of bottleneck m, one slice of conv_weight.
  Tensor first_weight(int64_t m) const { return layout_.first_gemm(i_, m).of(convs_); }
  int64_t skip(int64_t m) const { return layout_.has_shortcut(m) ? n_ : 0; }

  // Runs bottleneck m from pre1 (the first GEMM's output) on; fills the tape.
  void bottleneck_tail(int64_t m, BottleneckTape& t, bool compute_stats) const {
    const int64_t mid = layout_.mid(i_);
    if (compute_stats) {
      const Norm first = norms_.run(layout_.first_norms(i_, m));
      k_.column_stats(t.pre1, first.mean, first.var);
    }
    Tensor pre1 = t.pre1.narrow(1, skip(m), mid);
    t.act1 = at::empty({shape_.rows(), mid}, pre1.options());
    k_.bn_relu(pre1, norms_.at(layout_.bn1(i_, m)), t.act1);
    t.pre2 = conv3x3(t.act1, layout_.conv2(i_, m).of(convs_), shape_);
    if (compute_stats) stats(t.pre2, layout_.bn2(i_, m));
    t.act2 = at::empty_like(t.pre2);
    k_.bn_relu(t.pre2, norms_.at(layout_.bn2(i_, m)), t.act2);
    t.pre3 = at::mm(t.act2, layout_.conv3(i_, m).matrix_of(convs_).t());
    if (compute_stats) stats(t.pre3, layout_.bn3(i_, m));
  }

  // out (+)= bn3(pre3) + (shortcut BN of pre1 | extra).
  void combine(int64_t m, const BottleneckTape& t, Tensor& out, bool accumulate,
               const Tensor& extra) const {
    const Norm& bn3 = norms_.at(layout_.bn3(i_, m));
    if (layout_.has_shortcut(m)) {
      const Norm& sc = norms_.at(layout_.shortcut_bn(i_));
      k_.bn_add(out, accumulate, t.pre3, bn3, t.pre1.narrow(1, 0, n_), &sc);
    } else {
      k_.bn_add(out, accumulate, t.pre3, bn3, extra, nullptr);
    }
  }

  // Runs the unit on `source` ([rows, N]); adds U(source) into `target`
  // ([rows, n] column block of the state). Returns the tape.
  std::vector<BottleneckTape> forward(const Tensor& source, Tensor target, bool compute_stats,
                                      const std::optional<std::pair<Tensor, Tensor>>& split = {}) const {
    std::vector<BottleneckTape> tape(layout_.bottlenecks);
    Tensor h;
    for (int64_t m = 0; m < layout_.bottlenecks; ++m) {
      BottleneckTape& t = tape[m];
      const Tensor w = first_weight(m);
      if (m > 0) {
        t.input = h;
        t.pre1 = at::mm(h, w.t());
      } else if (split) {
        // The state before update i: y on segments < i, x from segment i on.
        const auto& [updated, original] = *split;
        t.pre1 = at::mm(original.narrow(1, start_, original.size(1) - start_),
                        w.narrow(1, start_, w.size(1) - start_).t());
        if (start_ > 0) t.pre1.addmm_(updated.narrow(1, 0, start_), w.narrow(1, 0, start_).t());
      } else {
        t.pre1 = at::mm(source, w.t());
      }
      bottleneck_tail(m, t, compute_stats);
      const bool last = m + 1 == layout_.bottlenecks;
      if (last) {
        combine(m, t, target, true, h);
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
    const Norm& g = grads.at(slot);
    const Norm& norm = norms_.at(slot);
    k_.bn_backward_reduce(dout, pre, norm, has_relu, g.bias, g.weight);
    k_.bn_backward_apply(dout, pre, norm, has_relu, training_, g.bias, g.weight, dpre);
  }

  // Backpropagates dL/dU through the unit. Adds dL/dstate into `grad_state`
  // ([rows, N]); the weight gradients go to their slots of `grad_convs` (flat
  // like conv_weight), the BN ones to `grads`.
  void backward(const std::vector<BottleneckTape>& tape, Tensor grad_unit, Tensor& grad_state,
                const std::pair<Tensor, Tensor>& state, const Tensor& grad_convs,
                const Norms& grads) const {
    for (int64_t m = layout_.bottlenecks - 1; m >= 0; --m) {
      const BottleneckTape& t = tape[m];
      const int64_t mid = layout_.mid(i_), skip_m = skip(m);
      const Slot conv2 = layout_.conv2(i_, m), conv3 = layout_.conv3(i_, m);
      Tensor d3 = at::empty_like(t.pre3);
      norm_backward(grad_unit, t.pre3, layout_.bn3(i_, m), false, grads, d3);
      Tensor grad_w3 = conv3.matrix_of(grad_convs);
      at::mm_out(grad_w3, d3.t(), t.act2);
      Tensor d_act2 = at::mm(d3, conv3.matrix_of(convs_));
      Tensor d2 = at::empty_like(t.pre2);
      norm_backward(d_act2, t.pre2, layout_.bn2(i_, m), true, grads, d2);
      auto [d_act1, d_w2, unused] = at::convolution_backward(
          as_image(d2, shape_), as_image(t.act1, shape_), conv2.of(convs_), std::nullopt, {1, 1},
          {1, 1}, {1, 1}, false, {0, 0}, 1, {true, true, false});
      conv2.of(grad_convs).copy_(d_w2);
      Tensor d1 = at::empty({shape_.rows(), skip_m + mid}, t.pre1.options());
      norm_backward(as_rows(d_act1), t.pre1.narrow(1, skip_m, mid), layout_.bn1(i_, m), true, grads,
                    d1.narrow(1, skip_m, mid));
      if (skip_m) {
        norm_backward(grad_unit, t.pre1.narrow(1, 0, n_), layout_.shortcut_bn(i_), false, grads,
                      d1.narrow(1, 0, n_));
      }
      const Tensor w = first_weight(m);
      Tensor dw = layout_.first_gemm(i_, m).of(grad_convs);  // [shortcut; conv1] as one matrix
      if (m > 0) {
        at::mm_out(dw, d1.t(), t.input);
        grad_unit = at::addmm(grad_unit, d1, w);  // h_m = h_{m-1} + B_m(h_{m-1})
      } else {
        // dW = d1^T state, the state split by columns as in forward.
        const auto& [updated, original] = state;
        const int64_t from = updated.defined() ? start_ : 0;
        if (from > 0) {
          Tensor head = dw.narrow(1, 0, from);
          at::mm_out(head, d1.t(), updated.narrow(1, 0, from));
        }
        Tensor tail = dw.narrow(1, from, w.size(1) - from);
        at::mm_out(tail, d1.t(), original.narrow(1, from, w.size(1) - from));
        grad_state.addmm_(d1, w);  // Eq. 6: the identity path is already in grad_state
      }
    }
  }

 private:
  void stats(const Tensor& pre, const Slot& norm) const {
    const Norm& n = norms_.at(norm);
    k_.column_stats(pre, n.mean, n.var);
  }

  const ParameterLayout& layout_;
  bool training_;
  const Tensor& convs_;
  const Norms& norms_;
  const Shape& shape_;
  const FusedKernels& k_;
  int64_t i_, n_, start_;
};

Shape shape_of(const Tensor& x) { return {x.size(0), x.size(1), x.size(2), x.size(3)}; }

}  // namespace

ForwardResult gradual_update(const Tensor& x, const Tensor& conv_weight, const Tensor& bn_weight,
                             const Tensor& bn_bias, const std::optional<Tensor>& running_mean,
                             const std::optional<Tensor>& running_var, at::IntArrayRef segments,
                             int64_t expansion, int64_t bottlenecks, bool shortcut, bool sequential,
                             bool training, double eps) {
  // The op fixes its own dtypes: its GEMMs and convolutions must not autocast.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
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

  Tensor input = as_rows(x);
  Tensor state = input.clone();  // also the output buffer, updated in place
  for (size_t i = 0; i < layout.segments.size(); ++i) {
    const Unit unit(layout, training, conv_weight, norms, shape, kernels, i);
    unit.forward(sequential ? state : input,
                 state.narrow(1, layout.starts[i], layout.segments[i]), training);
  }
  return {in_layout_of(state, shape, x), norms.all.mean, norms.all.var};
}

BackwardResult gradual_update_backward(const Tensor& grad_y, const Tensor& x, const Tensor& y,
                                       const Tensor& conv_weight, const Tensor& bn_weight,
                                       const Tensor& bn_bias, const Tensor& mean, const Tensor& var,
                                       at::IntArrayRef segments, int64_t expansion,
                                       int64_t bottlenecks, bool shortcut, bool sequential,
                                       bool training, double eps) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_input(x);
  const ParameterLayout layout(x.size(1), segments, expansion, bottlenecks, shortcut);
  layout.check_parameters(x, conv_weight, bn_weight, bn_bias);
  layout.check_statistic("mean", mean, x);
  layout.check_statistic("var", var, x);
  TORCH_CHECK(grad_y.sizes() == x.sizes() && y.sizes() == x.sizes(),
              "gunn_ext: grad_y and y must have the shape of x ", x.sizes(), ", got ",
              grad_y.sizes(), " and ", y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), "gunn_ext: grad_y has dtype ",
              grad_y.scalar_type(), " but x has ", x.scalar_type());
  const Shape shape = shape_of(x);
  const Norms norms = pack_norms(layout, bn_weight, bn_bias, eps, mean, var);
  const FusedKernels& kernels = fused_kernels(x.device().type());
  Norms grads;
  grads.all = {Tensor(), Tensor(), at::empty_like(norms.all.weight), at::empty_like(norms.all.bias)};
  grads.each = split_norms(grads.all, layout.norm_sizes(), eps);
  // Every slot is written: one gradient per convolution.
  const Tensor grad_convs = at::empty({layout.conv_numel()}, conv_weight.options());

  const Tensor original = as_rows(x);
  const Tensor updated = sequential ? as_rows(y) : Tensor();
  // One gradient buffer, accumulated in place (Eq. 6). GUNN reads each
  // segment's gradient from it after the later segments have added theirs;
  // SUNN's units all read dL/dy, so it keeps that apart.
  const Tensor incoming = as_rows(grad_y);
  const bool owned = !incoming.is_alias_of(grad_y);
  Tensor grad = (owned && sequential) ? incoming : incoming.clone();
  const Tensor read_from = sequential ? grad : incoming;
  const std::pair<Tensor, Tensor> state{updated, original};
  for (int64_t i = static_cast<int64_t>(layout.segments.size()) - 1; i >= 0; --i) {
    const Unit unit(layout, training, conv_weight, norms, shape, kernels, i);
    Tensor scratch = at::empty({shape.rows(), layout.segments[i]}, x.options());
    auto tape = sequential ? unit.forward(Tensor(), scratch, false, state)
                           : unit.forward(original, scratch, false);
    unit.backward(tape, read_from.narrow(1, layout.starts[i], layout.segments[i]), grad, state,
                  grad_convs, grads);
  }
  return {in_layout_of(grad, shape, x), grad_convs, grads.all.weight.to(bn_weight.scalar_type()),
          grads.all.bias.to(bn_bias.scalar_type())};
}

// The device registrations: csrc/cpu/gradual_update_cpu.cpp and
// csrc/cuda/gradual_update_cuda.cpp.

}  // namespace gunn_ext
