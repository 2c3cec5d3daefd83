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

#include <numeric>
#include <optional>
#include <unordered_set>
#include <vector>

#include "fused_kernels.h"
#include "gradual_update.h"

namespace gunn_ext {
namespace {

using at::Tensor;

struct Shape {
  int64_t batch, channels, height, width;
  int64_t rows() const { return batch * height * width; }
};

// The layer's structure, decoded from the op's arguments.
struct Layout {
  std::vector<int64_t> segments, starts;
  int64_t units;
  bool shortcut, sequential, training;

  int64_t per_unit() const { return (shortcut ? 1 : 0) + 3 * units; }
  // Index of bottleneck m's first conv / norm within the flat lists for unit i.
  int64_t first(int64_t i, int64_t m) const { return i * per_unit() + (shortcut ? 1 : 0) + 3 * m; }
  int64_t shortcut_index(int64_t i) const { return i * per_unit(); }
};

// [B, C, H, W] in any layout -> [rows, C] row-major (a view when channels_last).
Tensor as_rows(const Tensor& t) {
  return t.permute({0, 2, 3, 1}).contiguous().view({-1, t.size(1)});
}

// [rows, C] row-major -> [B, C, H, W] channels_last view.
Tensor as_image(const Tensor& rows, const Shape& s) {
  return rows.view({s.batch, s.height, s.width, rows.size(1)}).permute({0, 3, 1, 2});
}

bool wants_channels_last(const Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
}

// The result in the layout promised by the fake kernel (see ops.py).
Tensor in_layout_of(const Tensor& rows, const Shape& s, const Tensor& like) {
  Tensor image = as_image(rows, s);
  return wants_channels_last(like) ? image : image.contiguous();
}

Tensor stats_options_tensor(const Tensor& x, int64_t n) {
  const auto dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::empty({n}, x.options().dtype(dtype));
}

Tensor conv_matrix(const Tensor& w) { return w.view({w.size(0), -1}); }

void check_arguments(const Tensor& x, at::TensorList conv_weights, at::TensorList bn_weights,
                     at::TensorList bn_biases, const Layout& layout, at::ArrayRef<double> eps) {
  TORCH_CHECK(x.dim() == 4, "gunn_ext: x must be 4-D (batch, channels, height, width), got ",
              x.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "gunn_ext: x must be floating point, got ",
              x.scalar_type());
  TORCH_CHECK(x.numel() > 0, "gunn_ext: x must not be empty, got shape ", x.sizes());
  TORCH_CHECK(layout.units >= 1, "gunn_ext: units must be >= 1, got ", layout.units);
  const int64_t channels = x.size(1);
  int64_t total = 0;
  for (int64_t n : layout.segments) {
    TORCH_CHECK(n >= 1, "gunn_ext: segments must be >= 1, got ", at::IntArrayRef(layout.segments));
    total += n;
  }
  TORCH_CHECK(total == channels, "gunn_ext: segments ", at::IntArrayRef(layout.segments), " sum to ", total,
              " but x has ", channels, " channels");
  const int64_t expected = static_cast<int64_t>(layout.segments.size()) * layout.per_unit();
  TORCH_CHECK(static_cast<int64_t>(conv_weights.size()) == expected,
              "gunn_ext: conv_weights must hold ", expected, " tensors, got ", conv_weights.size());
  TORCH_CHECK(bn_weights.size() == conv_weights.size() && bn_biases.size() == conv_weights.size() &&
                  eps.size() == conv_weights.size(),
              "gunn_ext: bn_weights, bn_biases and eps must hold ", expected, " entries each");
  const auto stat_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (size_t k = 0; k < conv_weights.size(); ++k) {
    const Tensor& w = conv_weights[k];
    TORCH_CHECK(w.device() == x.device(), "gunn_ext: conv_weights[", k, "] is on ", w.device(),
                " but x is on ", x.device());
    TORCH_CHECK(w.scalar_type() == x.scalar_type(), "gunn_ext: conv_weights[", k, "] has dtype ",
                w.scalar_type(), " but x has ", x.scalar_type());
    TORCH_CHECK(w.dim() == 4, "gunn_ext: conv_weights[", k, "] must be 4-D, got ", w.sizes());
    for (const Tensor& p : {bn_weights[k], bn_biases[k]}) {
      TORCH_CHECK(p.device() == x.device(), "gunn_ext: BN parameter ", k, " is on ", p.device(),
                  " but x is on ", x.device());
      TORCH_CHECK(p.scalar_type() == x.scalar_type() || p.scalar_type() == stat_dtype,
                  "gunn_ext: BN parameter ", k, " has dtype ", p.scalar_type(), "; expected ",
                  x.scalar_type(), " or ", stat_dtype);
      TORCH_CHECK(p.dim() == 1 && p.size(0) == w.size(0), "gunn_ext: BN parameter ", k,
                  " must have shape [", w.size(0), "], got ", p.sizes());
    }
  }
  for (size_t i = 0; i < layout.segments.size(); ++i) {
    const int64_t n = layout.segments[i];
    if (layout.shortcut) {
      const Tensor& w = conv_weights[layout.shortcut_index(i)];
      TORCH_CHECK(w.sizes() == at::IntArrayRef({n, channels, 1, 1}), "gunn_ext: shortcut weight of unit ", i,
                  " must have shape [", n, ", ", channels, ", 1, 1], got ", w.sizes());
    }
    for (int64_t m = 0; m < layout.units; ++m) {
      const int64_t k = layout.first(i, m);
      const int64_t in = m == 0 ? channels : n, mid = conv_weights[k].size(0);
      TORCH_CHECK(conv_weights[k].sizes() == at::IntArrayRef({mid, in, 1, 1}), "gunn_ext: conv1 of unit ", i,
                  " bottleneck ", m, " must have shape [K*", n, ", ", in, ", 1, 1], got ",
                  conv_weights[k].sizes());
      TORCH_CHECK(conv_weights[k + 1].sizes() == at::IntArrayRef({mid, mid, 3, 3}), "gunn_ext: conv2 of unit ", i,
                  " bottleneck ", m, " must have shape [", mid, ", ", mid, ", 3, 3], got ",
                  conv_weights[k + 1].sizes());
      TORCH_CHECK(conv_weights[k + 2].sizes() == at::IntArrayRef({n, mid, 1, 1}), "gunn_ext: conv3 of unit ", i,
                  " bottleneck ", m, " must have shape [", n, ", ", mid, ", 1, 1], got ",
                  conv_weights[k + 2].sizes());
    }
  }
}

// Per-channel BN parameters of all norms, packed in list order, with a view
// per norm made once (views cost a dispatcher call each).
struct Norms {
  Norm all;
  std::vector<int64_t> offsets;  // offsets[k] = first channel of norm k
  std::vector<Norm> each;

  const Norm& at(int64_t k) const { return each[k]; }
  // Norms k .. k + count - 1 as one run of channels (for their statistics).
  Norm run(int64_t k, int64_t count) const {
    return count == 1 ? each[k] : all.slice(offsets[k], offsets[k + count] - offsets[k]);
  }
};

std::vector<Norm> split_norms(const Norm& all, at::IntArrayRef sizes, at::ArrayRef<double> eps) {
  const auto split = [&](const Tensor& t) {
    return t.defined() ? t.split_with_sizes(sizes) : std::vector<Tensor>(sizes.size());
  };
  const auto mean = split(all.mean), var = split(all.var), weight = split(all.weight),
             bias = split(all.bias);
  std::vector<Norm> each(sizes.size());
  for (size_t k = 0; k < sizes.size(); ++k)
    each[k] = {mean[k], var[k], weight[k], bias[k], eps.empty() ? 0.0 : eps[k]};
  return each;
}

Norms pack_norms(at::TensorList bn_weights, at::TensorList bn_biases, at::ArrayRef<double> eps,
                 Tensor mean, Tensor var) {
  Norms n;
  n.offsets.assign(1, 0);
  std::vector<int64_t> sizes;
  for (const Tensor& w : bn_weights) {
    sizes.push_back(w.size(0));
    n.offsets.push_back(n.offsets.back() + w.size(0));
  }
  const auto dtype = mean.scalar_type();
  n.all = {std::move(mean), std::move(var), at::cat(bn_weights).to(dtype),
           at::cat(bn_biases).to(dtype)};
  n.each = split_norms(n.all, sizes, eps);
  return n;
}

// The op's own direct kernel for narrow channels, where the device has one;
// the library's convolution otherwise.
bool direct_conv(const FusedKernels& k, const Tensor& w) {
  return k.conv3x3 != nullptr && w.size(0) <= kDirectConvMaxChannels &&
         w.size(1) <= kDirectConvMaxChannels;
}

ImageShape image_shape(const Shape& s) { return {s.batch, s.height, s.width}; }

// The 3x3 convolution (padding 1) of a [rows, Cin] activation: [rows, Cout].
Tensor conv3x3(const Tensor& a, const Tensor& w, const Shape& s, const FusedKernels& k) {
  if (direct_conv(k, w)) {
    Tensor out = at::empty({s.rows(), w.size(0)}, a.options());
    k.conv3x3(a, w, image_shape(s), out);
    return out;
  }
  Tensor out = at::conv2d(as_image(a, s), w, {}, 1, 1);
  return as_rows(out.contiguous(at::MemoryFormat::ChannelsLast));
}

// Its gradients: dL/da ([rows, Cin]) and dL/dw, from dy = dL/dout ([rows, Cout]).
std::pair<Tensor, Tensor> conv3x3_backward(const Tensor& dy, const Tensor& a, const Tensor& w,
                                           const Shape& s, const FusedKernels& k) {
  if (direct_conv(k, w)) {
    Tensor da = at::empty({s.rows(), w.size(1)}, a.options());
    Tensor dw = at::empty(w.sizes(), w.options());
    k.conv3x3_backward(dy, a, w, image_shape(s), da, dw);
    return {da, dw};
  }
  auto [da, dw, unused] = at::convolution_backward(
      as_image(dy, s), as_image(a, s), w, std::nullopt, {1, 1}, {1, 1}, {1, 1}, false, {0, 0}, 1,
      {true, true, false});
  return {as_rows(da), dw};
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
  Unit(const Layout& layout, at::TensorList convs, const Norms& norms, const Shape& shape,
       const FusedKernels& kernels, int64_t index)
      : layout_(layout), convs_(convs), norms_(norms), shape_(shape), k_(kernels), i_(index),
        n_(layout.segments[index]), start_(layout.starts[index]) {}

  // The merged first GEMM's weight: [shortcut; conv1] of bottleneck m.
  Tensor first_weight(int64_t m) const {
    Tensor w1 = conv_matrix(convs_[layout_.first(i_, m)]);
    if (m == 0 && layout_.shortcut)
      return at::cat({conv_matrix(convs_[layout_.shortcut_index(i_)]), w1});
    return w1;
  }
  int64_t first_norm(int64_t m) const {
    return (m == 0 && layout_.shortcut) ? layout_.shortcut_index(i_) : layout_.first(i_, m);
  }
  bool has_shortcut(int64_t m) const { return m == 0 && layout_.shortcut; }

  // Runs bottleneck m from pre1 (the first GEMM's output) on; fills the tape.
  void bottleneck_tail(int64_t m, BottleneckTape& t, bool compute_stats) const {
    const int64_t k = layout_.first(i_, m), skip = has_shortcut(m) ? n_ : 0;
    const int64_t mid = convs_[k].size(0);
    if (compute_stats) stats(t.pre1, first_norm(m), has_shortcut(m) ? 2 : 1);
    Tensor pre1 = t.pre1.narrow(1, skip, mid);
    t.act1 = at::empty({shape_.rows(), mid}, pre1.options());
    k_.bn_relu(pre1, norms_.at(k), t.act1);
    t.pre2 = conv3x3(t.act1, convs_[k + 1], shape_, k_);
    if (compute_stats) stats(t.pre2, k + 1, 1);
    t.act2 = at::empty_like(t.pre2);
    k_.bn_relu(t.pre2, norms_.at(k + 1), t.act2);
    t.pre3 = at::mm(t.act2, conv_matrix(convs_[k + 2]).t());
    if (compute_stats) stats(t.pre3, k + 2, 1);
  }

  // out (+)= bn3(pre3) + (shortcut BN of pre1 | extra).
  void combine(int64_t m, const BottleneckTape& t, Tensor& out, bool accumulate,
               const Tensor& extra) const {
    const int64_t k = layout_.first(i_, m);
    if (has_shortcut(m)) {
      const Norm& sc = norms_.at(layout_.shortcut_index(i_));
      k_.bn_add(out, accumulate, t.pre3, norms_.at(k + 2), t.pre1.narrow(1, 0, n_), &sc);
    } else {
      k_.bn_add(out, accumulate, t.pre3, norms_.at(k + 2), extra, nullptr);
    }
  }

  // Runs the unit on `source` ([rows, N]); adds U(source) into `target`
  // ([rows, n] column block of the state). Returns the tape.
  std::vector<BottleneckTape> forward(const Tensor& source, Tensor target, bool compute_stats,
                                      const std::optional<std::pair<Tensor, Tensor>>& split = {}) const {
    std::vector<BottleneckTape> tape(layout_.units);
    Tensor h;
    for (int64_t m = 0; m < layout_.units; ++m) {
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
      const bool last = m + 1 == layout_.units;
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
  void norm_backward(const Tensor& dout, const Tensor& pre, int64_t k, bool has_relu,
                     const std::vector<Norm>& grads, const Tensor& dpre) const {
    const Tensor& gw = grads[k].weight;
    const Tensor& gb = grads[k].bias;
    const Norm& norm = norms_.at(k);
    k_.bn_backward_reduce(dout, pre, norm, has_relu, gb, gw);
    k_.bn_backward_apply(dout, pre, norm, has_relu, layout_.training, gb, gw, dpre);
  }

  // Backpropagates dL/dU through the unit. Adds dL/dstate into `grad_state`
  // ([rows, N]); conv weight gradients go to grad_convs, BN ones to grads.
  void backward(const std::vector<BottleneckTape>& tape, Tensor grad_unit, Tensor& grad_state,
                const std::pair<Tensor, Tensor>& state, std::vector<Tensor>& grad_convs,
                const std::vector<Norm>& grads) const {
    for (int64_t m = layout_.units - 1; m >= 0; --m) {
      const BottleneckTape& t = tape[m];
      const int64_t k = layout_.first(i_, m), mid = convs_[k].size(0);
      const int64_t skip = has_shortcut(m) ? n_ : 0;
      Tensor d3 = at::empty_like(t.pre3);
      norm_backward(grad_unit, t.pre3, k + 2, false, grads, d3);
      grad_convs[k + 2] = at::mm(d3.t(), t.act2).view_as(convs_[k + 2]);
      Tensor d_act2 = at::mm(d3, conv_matrix(convs_[k + 2]));
      Tensor d2 = at::empty_like(t.pre2);
      norm_backward(d_act2, t.pre2, k + 1, true, grads, d2);
      auto [d_act1, d_w2] = conv3x3_backward(d2, t.act1, convs_[k + 1], shape_, k_);
      grad_convs[k + 1] = d_w2;
      Tensor d1 = at::empty({shape_.rows(), skip + mid}, t.pre1.options());
      norm_backward(d_act1, t.pre1.narrow(1, skip, mid), k, true, grads,
                    d1.narrow(1, skip, mid));
      if (skip) {
        norm_backward(grad_unit, t.pre1.narrow(1, 0, n_), layout_.shortcut_index(i_), false,
                      grads, d1.narrow(1, 0, n_));
      }
      const Tensor w = first_weight(m);
      Tensor dw;
      if (m > 0) {
        dw = at::mm(d1.t(), t.input);
        grad_unit = at::addmm(grad_unit, d1, w);  // h_m = h_{m-1} + B_m(h_{m-1})
      } else {
        // dW^T = state^T d1, the state split as in forward.
        const auto& [updated, original] = state;
        Tensor dwt = at::empty({w.size(1), w.size(0)}, d1.options());
        const int64_t from = updated.defined() ? start_ : 0;
        if (from > 0) {
          Tensor head = dwt.narrow(0, 0, from);
          at::mm_out(head, updated.narrow(1, 0, from).t(), d1);
        }
        Tensor tail = dwt.narrow(0, from, w.size(1) - from);
        at::mm_out(tail, original.narrow(1, from, w.size(1) - from).t(), d1);
        dw = dwt.t();
        grad_state.addmm_(d1, w);  // Eq. 6: the identity path is already in grad_state
      }
      grad_convs[k] = dw.narrow(0, skip, mid).contiguous().view_as(convs_[k]);
      if (skip) {
        const int64_t s = layout_.shortcut_index(i_);
        grad_convs[s] = dw.narrow(0, 0, n_).contiguous().view_as(convs_[s]);
      }
    }
  }

 private:
  void stats(const Tensor& pre, int64_t k, int64_t count) const {
    const Norm n = norms_.run(k, count);
    k_.column_stats(pre, n.mean, n.var);
  }

  const Layout& layout_;
  at::TensorList convs_;
  const Norms& norms_;
  const Shape& shape_;
  const FusedKernels& k_;
  int64_t i_, n_, start_;
};

Layout make_layout(at::IntArrayRef segments, int64_t units, bool shortcut, bool sequential,
                   bool training) {
  Layout l{segments.vec(), {}, units, shortcut, sequential, training};
  int64_t start = 0;
  for (int64_t n : l.segments) {
    l.starts.push_back(start);
    start += n;
  }
  return l;
}

Shape shape_of(const Tensor& x) { return {x.size(0), x.size(1), x.size(2), x.size(3)}; }

}  // namespace

ForwardResult gradual_update(
    const Tensor& x, at::TensorList conv_weights, at::TensorList bn_weights,
    at::TensorList bn_biases, at::TensorList running_means, at::TensorList running_vars,
    at::IntArrayRef segments, int64_t units, bool shortcut, bool sequential, bool training,
    at::ArrayRef<double> eps) {
  // The op fixes its own dtypes: its GEMMs and convolutions must not autocast.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Layout layout = make_layout(segments, units, shortcut, sequential, training);
  check_arguments(x, conv_weights, bn_weights, bn_biases, layout, eps);
  const Shape shape = shape_of(x);
  TORCH_CHECK(!training || shape.rows() > 1,
              "gunn_ext: expected more than 1 value per channel when training, got input of shape ",
              x.sizes());
  const int64_t total = std::accumulate(bn_weights.begin(), bn_weights.end(), int64_t(0),
                                        [](int64_t s, const Tensor& w) { return s + w.size(0); });
  Tensor mean, var;
  if (training) {
    mean = stats_options_tensor(x, total);
    var = stats_options_tensor(x, total);
  } else {
    TORCH_CHECK(running_means.size() == bn_weights.size() && running_vars.size() == bn_weights.size(),
                "gunn_ext: eval mode needs running_means and running_vars for all ", bn_weights.size(),
                " norms, got ", running_means.size(), " and ", running_vars.size());
    mean = at::cat(running_means).to(stats_options_tensor(x, 0).options());
    var = at::cat(running_vars).to(mean.options());
  }
  const Norms norms = pack_norms(bn_weights, bn_biases, eps, mean, var);
  const FusedKernels& kernels = fused_kernels(x.device().type());

  Tensor input = as_rows(x);
  Tensor state = input.clone();  // also the output buffer, updated in place
  for (size_t i = 0; i < layout.segments.size(); ++i) {
    const Unit unit(layout, conv_weights, norms, shape, kernels, i);
    unit.forward(sequential ? state : input,
                 state.narrow(1, layout.starts[i], layout.segments[i]), training);
  }
  return {in_layout_of(state, shape, x), norms.all.mean, norms.all.var};
}

BackwardResult gradual_update_backward(const Tensor& grad_y, const Tensor& x, const Tensor& y,
                        at::TensorList conv_weights, at::TensorList bn_weights,
                        at::TensorList bn_biases, const Tensor& mean, const Tensor& var,
                        at::IntArrayRef segments, int64_t units, bool shortcut, bool sequential,
                        bool training, at::ArrayRef<double> eps) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Layout layout = make_layout(segments, units, shortcut, sequential, training);
  check_arguments(x, conv_weights, bn_weights, bn_biases, layout, eps);
  TORCH_CHECK(grad_y.sizes() == x.sizes() && y.sizes() == x.sizes(),
              "gunn_ext: grad_y and y must have the shape of x ", x.sizes(), ", got ",
              grad_y.sizes(), " and ", y.sizes());
  const Shape shape = shape_of(x);
  const Norms norms = pack_norms(bn_weights, bn_biases, eps, mean, var);
  const FusedKernels& kernels = fused_kernels(x.device().type());
  const Norm grad_all{Tensor(), Tensor(), at::empty_like(norms.all.weight),
                      at::empty_like(norms.all.bias)};
  std::vector<int64_t> sizes;
  for (const Tensor& w : bn_weights) sizes.push_back(w.size(0));
  const std::vector<Norm> grads = split_norms(grad_all, sizes, {});
  std::vector<Tensor> grad_convs(conv_weights.size());

  const Tensor original = as_rows(x);
  const Tensor updated = sequential ? as_rows(y) : Tensor();
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), "gunn_ext: grad_y has dtype ",
              grad_y.scalar_type(), " but x has ", x.scalar_type());
  // One gradient buffer, accumulated in place (Eq. 6). GUNN reads each
  // segment's gradient from it after the later segments have added theirs;
  // SUNN's units all read dL/dy, so it keeps that apart.
  const Tensor incoming = as_rows(grad_y);
  const bool owned = !incoming.is_alias_of(grad_y);
  Tensor grad = (owned && sequential) ? incoming : incoming.clone();
  const Tensor read_from = sequential ? grad : incoming;
  const std::pair<Tensor, Tensor> state{updated, original};
  for (int64_t i = static_cast<int64_t>(layout.segments.size()) - 1; i >= 0; --i) {
    const Unit unit(layout, conv_weights, norms, shape, kernels, i);
    Tensor scratch = at::empty({shape.rows(), layout.segments[i]}, x.options());
    auto tape = sequential ? unit.forward(Tensor(), scratch, false, state)
                           : unit.forward(original, scratch, false);
    unit.backward(tape, read_from.narrow(1, layout.starts[i], layout.segments[i]), grad, state,
                  grad_convs, grads);
  }
  std::vector<Tensor> grad_w, grad_b;
  for (size_t k = 0; k < bn_weights.size(); ++k) {
    grad_w.push_back(grads[k].weight.to(bn_weights[k].scalar_type()));
    grad_b.push_back(grads[k].bias.to(bn_biases[k].scalar_type()));
  }
  return {in_layout_of(grad, shape, x), grad_convs, grad_w, grad_b};
}

namespace {

// `values` as outputs of an op: each in its own storage and laid out as the
// tensor it is the gradient of, which is what the fake kernel promises. The
// orchestration's gradients can be views of one packed buffer, or come in
// oneDNN's layout; only those are copied.
std::vector<Tensor> as_outputs(std::vector<Tensor> values, at::TensorList like,
                               std::unordered_set<const void*>& storages) {
  for (size_t k = 0; k < values.size(); ++k) {
    const bool shared = !storages.insert(values[k].storage().data()).second;
    if (shared || values[k].strides() != like[k].strides()) {
      values[k] = at::empty_like(like[k]).copy_(values[k]);
      storages.insert(values[k].storage().data());
    }
  }
  return values;
}

// The CPU registration of the backward; the CUDA one copies its results into
// such outputs too (csrc/cuda/graph_replay.cpp).
BackwardResult gradual_update_backward_cpu(
    const Tensor& grad_y, const Tensor& x, const Tensor& y, at::TensorList conv_weights,
    at::TensorList bn_weights, at::TensorList bn_biases, const Tensor& mean, const Tensor& var,
    at::IntArrayRef segments, int64_t units, bool shortcut, bool sequential, bool training,
    at::ArrayRef<double> eps) {
  auto [grad_x, grad_convs, grad_w, grad_b] =
      gradual_update_backward(grad_y, x, y, conv_weights, bn_weights, bn_biases, mean, var,
                              segments, units, shortcut, sequential, training, eps);
  std::unordered_set<const void*> storages{grad_x.storage().data()};
  return {grad_x, as_outputs(std::move(grad_convs), conv_weights, storages),
          as_outputs(std::move(grad_w), bn_weights, storages),
          as_outputs(std::move(grad_b), bn_biases, storages)};
}

}  // namespace

TORCH_LIBRARY_IMPL(gunn_ext, CPU, m) {
  m.impl("gradual_update", &gradual_update);
  m.impl("gradual_update_backward", &gradual_update_backward_cpu);
}

// The CUDA registration (csrc/cuda/graph_replay.cpp) replays this same
// orchestration as CUDA graphs and calls it through the dispatcher.

}  // namespace gunn_ext
