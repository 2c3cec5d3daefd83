// Where each convolution and BatchNorm of a layer lives in the op's flat
// tensors. The specification is the docstring of gunn_ext/parameter_layout.py;
// this mirror has the same names, the same offsets and the same argument
// checks. Per segment i (n = segments[i], mid = expansion * n), in order:
//   shortcut_conv (n, N, 1, 1)      shortcut_bn (n)      if shortcut
//   per bottleneck m:
//     conv1 (mid, m == 0 ? N : n, 1, 1)   bn1 (mid)
//     conv2 (mid, mid, 3, 3)              bn2 (mid)
//     conv3 (n, mid, 1, 1)                bn3 (n)
// conv_weight concatenates the flattened weights in this order; bn_weight,
// bn_bias, running_mean, running_var and the statistics concatenate the
// norms' channels in this order.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/SmallVector.h>

#include <optional>
#include <vector>

#include "conventions.h"

namespace gunn_ext {

// `shape` stored at offset .. offset + numel() of a flat tensor; `row` is its
// row in the table above. Slots are made per segment and call: the shape is
// held inline, not on the heap.
struct Slot {
  int64_t offset;
  c10::SmallVector<int64_t, 4> shape;
  int64_t row;

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }
  at::Tensor of(const at::Tensor& flat) const { return flat.narrow(0, offset, numel()).view(shape); }
  // The slot as a [shape[0], numel / shape[0]] matrix (a conv weight as a GEMM operand).
  at::Tensor matrix_of(const at::Tensor& flat) const {
    return flat.narrow(0, offset, numel()).view({shape[0], numel() / shape[0]});
  }
};

class ParameterLayout {
 public:
  ParameterLayout(int64_t channels, at::IntArrayRef segments, int64_t expansion, int64_t bottlenecks,
                  bool shortcut)
      : channels(channels), expansion(expansion), bottlenecks(bottlenecks), shortcut(shortcut),
        segments(segments.vec()) {
    TORCH_CHECK_VALUE(channels >= 1, "gunn_ext: channels must be a positive int, got ", channels);
    TORCH_CHECK_VALUE(expansion >= 1, "gunn_ext: expansion must be a positive int, got ", expansion);
    TORCH_CHECK_VALUE(bottlenecks >= 1, "gunn_ext: bottlenecks must be a positive int, got ", bottlenecks);
    TORCH_CHECK_VALUE(!this->segments.empty(), "gunn_ext: segments must be a non-empty sequence of ints >= 1, got ",
                segments);
    int64_t total = 0;
    starts.reserve(this->segments.size());  // a call's allocations do not grow with the segments
    unit_convs_.reserve(this->segments.size() + 1);
    unit_norms_.reserve(this->segments.size() + 1);
    unit_convs_.push_back(0);
    unit_norms_.push_back(0);
    for (int64_t n : this->segments) {
      TORCH_CHECK_VALUE(n >= 1, "gunn_ext: segments must be a non-empty sequence of ints >= 1, got ", segments);
      starts.push_back(total);
      total += n;
      unit_convs_.push_back(unit_convs_.back() + unit_conv_numel(n));
      unit_norms_.push_back(unit_norms_.back() + unit_norm_channels(n));
    }
    TORCH_CHECK_VALUE(total == channels, "gunn_ext: segments ", segments, " sum to ", total, " but x has ",
                channels, " channels");
  }

  const int64_t channels, expansion, bottlenecks;
  const bool shortcut;
  const std::vector<int64_t> segments;
  std::vector<int64_t> starts;

  int64_t mid(int64_t i) const { return expansion * segments[i]; }
  int64_t conv_numel() const { return unit_convs_.back(); }
  int64_t norm_channels() const { return unit_norms_.back(); }
  int64_t norms_per_unit() const { return (shortcut ? 1 : 0) + 3 * bottlenecks; }
  int64_t norm_count() const { return static_cast<int64_t>(segments.size()) * norms_per_unit(); }
  bool has_shortcut(int64_t m) const { return m == 0 && shortcut; }

  Slot shortcut_conv(int64_t i) const {
    return {unit_convs_[i], {segments[i], channels, 1, 1}, row(i, 0)};
  }
  Slot conv1(int64_t i, int64_t m) const {
    return {bottleneck_conv_offset(i, m), {mid(i), m == 0 ? channels : segments[i], 1, 1},
            row(i, (shortcut ? 1 : 0) + 3 * m)};
  }
  Slot conv2(int64_t i, int64_t m) const {
    const Slot first = conv1(i, m);
    return {first.offset + first.numel(), {mid(i), mid(i), 3, 3}, first.row + 1};
  }
  Slot conv3(int64_t i, int64_t m) const {
    const Slot second = conv2(i, m);
    return {second.offset + second.numel(), {segments[i], mid(i), 1, 1}, second.row + 1};
  }
  // [W_shortcut; W_conv1] of bottleneck m as one matrix (W_conv1 alone unless has_shortcut(m)).
  Slot first_gemm(int64_t i, int64_t m) const {
    const Slot c1 = conv1(i, m);
    if (!has_shortcut(m)) return {c1.offset, {c1.shape[0], c1.shape[1]}, c1.row};
    return {unit_convs_[i], {segments[i] + mid(i), channels}, row(i, 0)};
  }

  Slot shortcut_bn(int64_t i) const { return norm(i, 0); }
  Slot bn1(int64_t i, int64_t m) const { return norm(i, (shortcut ? 1 : 0) + 3 * m); }
  Slot bn2(int64_t i, int64_t m) const { return norm(i, (shortcut ? 1 : 0) + 3 * m + 1); }
  Slot bn3(int64_t i, int64_t m) const { return norm(i, (shortcut ? 1 : 0) + 3 * m + 2); }
  // The channels of [shortcut_bn; bn1] (bn1 alone unless has_shortcut(m)).
  Slot first_norms(int64_t i, int64_t m) const {
    const Slot b1 = bn1(i, m);
    if (!has_shortcut(m)) return b1;
    return {b1.offset - segments[i], {segments[i] + mid(i)}, row(i, 0)};
  }

  // Channels of every BatchNorm, in order.
  std::vector<int64_t> norm_sizes() const {
    std::vector<int64_t> sizes;
    sizes.reserve(norm_count());
    for (int64_t n : segments) {
      if (shortcut) sizes.push_back(n);
      for (int64_t m = 0; m < bottlenecks; ++m)
        sizes.insert(sizes.end(), {expansion * n, expansion * n, n});
    }
    return sizes;
  }

  // x and the parameters against this layout; errors name the argument.
  void check_parameters(const at::Tensor& x, const at::Tensor& conv_weight, const at::Tensor& bn_weight,
                        const at::Tensor& bn_bias) const {
    TORCH_CHECK_VALUE(x.dim() == 4, "gunn_ext: x must be 4-D (batch, channels, height, width), got ",
                x.dim(), "-D");
    TORCH_CHECK_VALUE(x.size(1) == channels, "gunn_ext: segments ", at::IntArrayRef(segments), " sum to ",
                channels, " but x has ", x.size(1), " channels");
    const auto stats = stats_dtype(x.scalar_type());
    check_vector("conv_weight", conv_weight, conv_numel(), x, x.scalar_type(), x.scalar_type());
    check_vector("bn_weight", bn_weight, norm_channels(), x, x.scalar_type(), stats);
    check_vector("bn_bias", bn_bias, norm_channels(), x, x.scalar_type(), stats);
  }

  // A per-channel statistic (running_mean, running_var, or the op's mean and var).
  void check_statistic(const char* name, const at::Tensor& t, const at::Tensor& x) const {
    check_vector(name, t, norm_channels(), x, x.scalar_type(), stats_dtype(x.scalar_type()));
  }

  // All the forward op's tensors.
  void check_arguments(const at::Tensor& x, const at::Tensor& conv_weight, const at::Tensor& bn_weight,
                       const at::Tensor& bn_bias, const std::optional<at::Tensor>& running_mean,
                       const std::optional<at::Tensor>& running_var, bool training) const {
    check_parameters(x, conv_weight, bn_weight, bn_bias);
    for (const auto& [name, t] : {std::pair{"running_mean", &running_mean}, {"running_var", &running_var}}) {
      const bool given = t->has_value() && (*t)->defined();
      TORCH_CHECK_VALUE(given || training, "gunn_ext: ", name,
                        " is needed in eval mode (training=False), got None");
      if (given) check_statistic(name, **t, x);  // checked in training too, where it is not read
    }
    TORCH_CHECK_VALUE(!training || x.size(0) * x.size(2) * x.size(3) > 1,
                "gunn_ext: expected more than 1 value per channel when training, got input of shape ",
                x.sizes());
  }

  // All the backward op's tensors.
  void check_backward_arguments(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& y,
                                const at::Tensor& conv_weight, const at::Tensor& bn_weight,
                                const at::Tensor& bn_bias, const at::Tensor& mean, const at::Tensor& var) const {
    check_parameters(x, conv_weight, bn_weight, bn_bias);
    check_statistic("mean", mean, x);
    check_statistic("var", var, x);
    check_like_x("grad_y", grad_y, x);
    check_like_x("y", y, x);
  }

 private:
  int64_t row(int64_t i, int64_t j) const { return i * norms_per_unit() + j; }

  int64_t bottleneck_conv_numel(int64_t n, int64_t inputs) const {
    const int64_t m = expansion * n;
    return m * inputs + m * m * 9 + n * m;
  }
  int64_t unit_conv_numel(int64_t n) const {
    return (shortcut ? n * channels : 0) + bottleneck_conv_numel(n, channels) +
           bottleneck_conv_numel(n, n) * (bottlenecks - 1);
  }
  int64_t unit_norm_channels(int64_t n) const {
    return (shortcut ? n : 0) + (2 * expansion * n + n) * bottlenecks;
  }
  int64_t bottleneck_conv_offset(int64_t i, int64_t m) const {
    const int64_t n = segments[i];
    int64_t offset = unit_convs_[i] + (shortcut ? n * channels : 0);
    if (m > 0) offset += bottleneck_conv_numel(n, channels) + (m - 1) * bottleneck_conv_numel(n, n);
    return offset;
  }
  Slot norm(int64_t i, int64_t j) const {
    const int64_t n = segments[i];
    int64_t offset = unit_norms_[i];
    int64_t k = j;
    if (shortcut) {
      if (k == 0) return {offset, {n}, row(i, j)};
      offset += n;
      --k;
    }
    const int64_t sizes[3] = {mid(i), mid(i), n};
    offset += (k / 3) * (2 * mid(i) + n);
    for (int64_t q = 0; q < k % 3; ++q) offset += sizes[q];
    return {offset, {sizes[k % 3]}, row(i, j)};
  }
  static void check_like_x(const char* name, const at::Tensor& t, const at::Tensor& x) {
    TORCH_CHECK_VALUE(t.sizes() == x.sizes(), "gunn_ext: ", name, " must have the shape of x ", x.sizes(),
                      ", got ", t.sizes());
    TORCH_CHECK_VALUE(t.device() == x.device(), "gunn_ext: ", name, " is on ", t.device(), " but x is on ",
                      x.device());
    TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), "gunn_ext: ", name, " has dtype ", t.scalar_type(),
                     " but x has ", x.scalar_type());
  }
  static void check_vector(const char* name, const at::Tensor& t, int64_t numel, const at::Tensor& x,
                           at::ScalarType dtype, at::ScalarType other_dtype) {
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == numel, "gunn_ext: ", name, " must be 1-D with ", numel,
                " values (see ParameterLayout), got shape ", t.sizes());
    TORCH_CHECK_VALUE(t.device() == x.device(), "gunn_ext: ", name, " is on ", t.device(), " but x is on ",
                x.device());
    TORCH_CHECK_TYPE(t.scalar_type() == dtype || t.scalar_type() == other_dtype, "gunn_ext: ", name,
                " has dtype ", t.scalar_type(), "; expected ", dtype,
                dtype == other_dtype ? "" : " or ", dtype == other_dtype ? "" : c10::toString(other_dtype),
                " for x of dtype ", x.scalar_type());
  }

  std::vector<int64_t> unit_convs_, unit_norms_;
};

}  // namespace gunn_ext
