// CPU implementations of fused_kernels.h.
//
// Per-channel constants are folded once per call so that the row loops are
// plain multiply-adds over contiguous channels, which the compiler vectorises.
// Reductions accumulate in double over a fixed number of row chunks combined
// in chunk order, so results do not depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <limits>

#include "../bn_math.h"
#include "fused_kernels_cpu.h"

namespace gunn_ext {

template <typename stat_t>
static Scratch<BNChannel<double>> channels_of(const Norm& norm) {
  const int64_t c = norm.length;
  const stat_t* mean = norm.data<stat_t>(norm.mean);
  const stat_t* var = norm.data<stat_t>(norm.var);
  const stat_t* weight = norm.data<stat_t>(norm.weight);
  const stat_t* bias = norm.data<stat_t>(norm.bias);
  Scratch<BNChannel<double>> out(c);
  for (int64_t j = 0; j < c; ++j) {
    // invstd in the statistics' own precision, as on the GPU.
    const stat_t invstd = bn_invstd<stat_t>(var[j], static_cast<stat_t>(norm.eps));
    out[j] = {double(mean[j]), double(invstd), double(weight[j]), double(bias[j])};
  }
  return out;
}

Scratch<BNChannel<double>> norm_channels(const Norm& norm) {
  return norm.mean.scalar_type() == at::kDouble ? channels_of<double>(norm)
                                                : channels_of<float>(norm);
}

void store_stats(const Norm& run, const at::Tensor& t, const Scratch<double>& values,
                 int64_t from) {
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "store_stats", [&] {
    scalar_t* p = run.data<scalar_t>(t);
    for (int64_t j = 0; j < run.length; ++j) p[j] = scalar_t(values[from + j]);
  });
}

// The run of one of a Norm's tensors, read as doubles.
static Scratch<double> as_doubles(const Norm& run, const at::Tensor& t) {
  Scratch<double> out(run.length);
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "as_doubles", [&] {
    const scalar_t* p = run.data<scalar_t>(t);
    for (int64_t j = 0; j < run.length; ++j) out[j] = double(p[j]);
  });
  return out;
}

InputGradCoefficients input_grad_coefficients(const Scratch<BNChannel<double>>& ch,
                                              const Norm& grads, int64_t rows, bool training) {
  const int64_t cols = static_cast<int64_t>(ch.size());
  const auto s_dy = as_doubles(grads, grads.bias), s_dyx = as_doubles(grads, grads.weight);
  InputGradCoefficients k{Scratch<double>(cols), Scratch<double>(cols),
                          Scratch<double>(cols)};
  for (int64_t j = 0; j < cols; ++j) {
    const double mean_dy = training ? s_dy[j] / double(rows) : 0.0;
    const double mean_dy_xhat = training ? s_dyx[j] / double(rows) : 0.0;
    const double kk = ch[j].invstd * mean_dy_xhat;
    k.a[j] = ch[j].scale();
    k.b[j] = -k.a[j] * kk;
    k.c[j] = k.a[j] * (ch[j].mean * kk - mean_dy);
  }
  return k;
}

// One pass of shifted sums: with d = x - x[0], mean = x[0] + E[d] and
// var = E[d^2] - E[d]^2; the shift keeps the double sums well conditioned.
void column_stats(const Mat& x, const Norm& stats) {
  const int64_t rows = x.rows, cols = x.cols, ld = x.ld;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.dtype, "column_stats", [&] {
    const scalar_t* px = x.ptr<scalar_t>();
    Scratch<double> shift(px, px + cols);
    Scratch<double> sums;
    with_cols(cols, [&](auto C) {
      sums = column_sums(rows, 2 * cols, [&](int64_t r, double* acc) {
        const scalar_t* row = px + r * ld;
        for (int64_t j = 0; j < C; ++j) {
          const double d = double(row[j]) - shift[j];
          acc[j] += d;
          acc[C + j] += d * d;
        }
      });
    });
    Scratch<double> mu(cols), sq(cols);
    for (int64_t j = 0; j < cols; ++j) {
      const double m = sums[j] / double(rows);
      mu[j] = shift[j] + m;
      const double var = sums[cols + j] / double(rows) - m * m;
      sq[j] = var < 0.0 ? 0.0 : var;  // rounding can make it negative; a NaN stays
    }
    store_stats(stats, stats.mean, mu);
    store_stats(stats, stats.var, sq);
  });
}

void bn_relu(const Mat& x, const Norm& norm, const Mat& out) {
  const int64_t rows = x.rows, cols = x.cols, ldx = x.ld, ldo = out.ld;
  const auto ch = norm_channels(norm);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.dtype, "bn_relu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Affine<acc_t> bn(ch);
    const acc_t* sc = bn.scale.data();
    const acc_t* sh = bn.shift.data();
    const scalar_t* px = x.ptr<scalar_t>();
    scalar_t* po = out.ptr<scalar_t>();
    each_row(rows, cols, [&](int64_t r, auto C) {
      const scalar_t* xr = px + r * ldx;
      scalar_t* o = po + r * ldo;
      for (int64_t j = 0; j < C; ++j) o[j] = scalar_t(relu(acc_t(xr[j]) * sc[j] + sh[j]));
    });
  });
}

void bn_add(const Mat& out, bool accumulate, const Mat& x1, const Norm& norm1, const Mat& x2,
            const Norm* norm2) {
  const int64_t rows = out.rows, cols = out.cols;
  const int64_t ldo = out.ld, ld1 = x1.ld, ld2 = x2.ld;
  const auto ch1 = norm_channels(norm1);
  // The second term is bn2(x2), or x2 itself (scale 1, shift 0).
  Scratch<BNChannel<double>> ch2(cols, BNChannel<double>{0.0, 1.0, 1.0, 0.0});
  if (norm2) ch2 = norm_channels(*norm2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.dtype, "bn_add", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Affine<acc_t> bn1(ch1), bn2(ch2);
    const acc_t *sc1 = bn1.scale.data(), *sh1 = bn1.shift.data();
    const acc_t *sc2 = bn2.scale.data(), *sh2 = bn2.shift.data();
    scalar_t* po = out.ptr<scalar_t>();
    const scalar_t* p1 = x1.ptr<scalar_t>();
    const scalar_t* p2 = x2.ptr<scalar_t>();
    each_row(rows, cols, [&](int64_t r, auto C) {
      scalar_t* o = po + r * ldo;
      const scalar_t* a = p1 + r * ld1;
      if (p2) {
        const scalar_t* b = p2 + r * ld2;
        for (int64_t j = 0; j < C; ++j)
          o[j] = scalar_t((accumulate ? acc_t(o[j]) : acc_t(0)) + (acc_t(a[j]) * sc1[j] + sh1[j]) +
                          (acc_t(b[j]) * sc2[j] + sh2[j]));
      } else {
        for (int64_t j = 0; j < C; ++j)
          o[j] = scalar_t((accumulate ? acc_t(o[j]) : acc_t(0)) + (acc_t(a[j]) * sc1[j] + sh1[j]));
      }
    });
  });
}

void bn_backward_reduce(const Mat& dy, const Mat& x, const Norm& norm, bool has_relu,
                        const Norm& grads) {
  const int64_t rows = x.rows, cols = x.cols, ldx = x.ld, ldd = dy.ld;
  const auto ch = norm_channels(norm);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.dtype, "bn_backward_reduce", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Affine<acc_t> bn(ch);
    const acc_t *sc = bn.scale.data(), *sh = bn.shift.data();
    const scalar_t* px = x.ptr<scalar_t>();
    const scalar_t* pd = dy.ptr<scalar_t>();
    // sum(dy' * xhat) = invstd * (sum(dy' * x) - mean * sum(dy')), accumulated in double.
    Scratch<double> sums;
    with_cols(cols, [&](auto C) {
      sums = column_sums(rows, 2 * cols, [&](int64_t r, double* acc) {
        const scalar_t* xr = px + r * ldx;
        const scalar_t* dr = pd + r * ldd;
        for (int64_t j = 0; j < C; ++j) {
          const acc_t xv = acc_t(xr[j]);
          const double g = double(relu_backward(acc_t(dr[j]), xv * sc[j] + sh[j], has_relu));
          acc[j] += g;
          acc[C + j] += g * (double(xv) - ch[j].mean);
        }
      });
    });
    for (int64_t j = 0; j < cols; ++j) sums[cols + j] *= ch[j].invstd;
    store_stats(grads, grads.bias, sums);
    store_stats(grads, grads.weight, sums, cols);
  });
}

void bn_backward_apply(const Mat& dy, const Mat& x, const Norm& norm, bool has_relu,
                       bool training, const Norm& grads, const Mat& dx) {
  const int64_t rows = x.rows, cols = x.cols;
  const int64_t ldx = x.ld, ldd = dy.ld, ldo = dx.ld;
  const auto ch = norm_channels(norm);
  const auto [a, b, c] = input_grad_coefficients(ch, grads, rows, training);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.dtype, "bn_backward_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Affine<acc_t> bn(ch);
    const acc_t *sc = bn.scale.data(), *sh = bn.shift.data();
    const Scratch<acc_t> ka(a.begin(), a.end()), kb(b.begin(), b.end()), kc(c.begin(), c.end());
    const scalar_t* px = x.ptr<scalar_t>();
    const scalar_t* pd = dy.ptr<scalar_t>();
    scalar_t* po = dx.ptr<scalar_t>();
    each_row(rows, cols, [&](int64_t r, auto C) {
      const scalar_t* xr = px + r * ldx;
      const scalar_t* dr = pd + r * ldd;
      scalar_t* o = po + r * ldo;
      for (int64_t j = 0; j < C; ++j) {
        const acc_t xv = acc_t(xr[j]);
        const acc_t g = relu_backward(acc_t(dr[j]), xv * sc[j] + sh[j], has_relu);
        o[j] = scalar_t(input_grad(ka[j], kb[j], kc[j], g, xv, training));
      }
    });
  });
}

namespace {

// The fused_kernels.h entry points: the kernels above on tensors.
void column_stats_cpu(const at::Tensor& x, const Norm& stats) { column_stats(mat_of(x), stats); }

void bn_relu_cpu(const at::Tensor& x, const Norm& norm, const at::Tensor& out) {
  bn_relu(mat_of(x), norm, mat_of(out));
}

void bn_add_cpu(const at::Tensor& out, bool accumulate, const at::Tensor& x1, const Norm& norm1,
                const at::Tensor& x2, const Norm* norm2) {
  bn_add(mat_of(out), accumulate, mat_of(x1), norm1, mat_of(x2), norm2);
}

void bn_backward_reduce_cpu(const at::Tensor& dy, const at::Tensor& x, const Norm& norm,
                            bool has_relu, const Norm& grads) {
  bn_backward_reduce(mat_of(dy), mat_of(x), norm, has_relu, grads);
}

void bn_backward_apply_cpu(const at::Tensor& dy, const at::Tensor& x, const Norm& norm,
                           bool has_relu, bool training, const Norm& grads, const at::Tensor& dx) {
  bn_backward_apply(mat_of(dy), mat_of(x), norm, has_relu, training, grads, mat_of(dx));
}

// The direct 3x3 beats oneDNN's fixed cost per call up to about 2^20
// multiply-adds on the 2-core development machine: at 240 channels, 16x16,
// batch 8 (2048 rows), units of 4 and 6 channels per 3x3 (P = 120, 80) run
// 15-30% faster forward+backward with it, one of 8 (P = 60, 1.2M) about
// even, and 12 or 24 faster in oneDNN. It takes any number of channels.
constexpr int64_t kDirectConvMaxMacs = int64_t(1) << 20;

// The whole-unit kernels' loops for the delayed updates' in-block terms beat
// the library GEMM and the copies around it on a few rows (P = N at 240
// channels on a 2x2 image: 10 ms forward+backward, not 15), and lose on many
// (the same on 16x16, batch 8: 2048 rows x 32 columns x 3 outputs per term).
// Where the op pushes the first GEMMs' terms (gradual_update.cpp: pushes),
// this applies to the backward's later terms only.
constexpr int64_t kBlockTermsMaxMacs = int64_t(1) << 15;

const FusedKernelsRegistration registration(
    c10::DeviceType::CPU,
    FusedKernels{column_stats_cpu, bn_relu_cpu, bn_add_cpu, bn_backward_reduce_cpu,
                 bn_backward_apply_cpu, conv3x3_cpu, conv3x3_backward_cpu,
                 std::numeric_limits<int64_t>::max(), kDirectConvMaxMacs, unit_forward_cpu,
                 unit_backward_cpu, kBlockTermsMaxMacs, nullptr, push_updates_cpu});

}  // namespace
}  // namespace gunn_ext
