// CPU implementations of fused_kernels.h. Reductions run over a fixed number
// of row chunks, combined in chunk order, so results do not depend on the
// number of threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <vector>

#include "../bn_math.h"
#include "../fused_kernels.h"

namespace gunn_ext {
namespace {

constexpr int64_t kRowGrain = 256;

template <typename stat_t>
std::vector<BNChannel<double>> channels_of(const Norm& norm) {
  const int64_t c = norm.mean.numel();
  const stat_t* mean = norm.mean.data_ptr<stat_t>();
  const stat_t* var = norm.var.data_ptr<stat_t>();
  const stat_t* weight = norm.weight.data_ptr<stat_t>();
  const stat_t* bias = norm.bias.data_ptr<stat_t>();
  std::vector<BNChannel<double>> out(c);
  for (int64_t j = 0; j < c; ++j) {
    // The statistics' own precision decides invstd, as on the GPU.
    const stat_t invstd = bn_invstd<stat_t>(var[j], static_cast<stat_t>(norm.eps));
    out[j] = {double(mean[j]), double(invstd), double(weight[j]), double(bias[j])};
  }
  return out;
}

// Sums f(row, col) over rows for every column, in double, deterministically.
template <typename F>
std::vector<double> column_sums(int64_t rows, int64_t cols, int n_out, F f) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(64, rows / kRowGrain));
  const int64_t per_chunk = (rows + chunks - 1) / chunks;
  std::vector<double> partial(chunks * n_out * cols, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      double* acc = partial.data() + k * n_out * cols;
      const int64_t r1 = std::min(rows, (k + 1) * per_chunk);
      for (int64_t r = k * per_chunk; r < r1; ++r) f(r, acc);
    }
  });
  std::vector<double> total(n_out * cols, 0.0);
  for (int64_t k = 0; k < chunks; ++k)
    for (int64_t j = 0; j < n_out * cols; ++j) total[j] += partial[k * n_out * cols + j];
  return total;
}

void column_stats_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var) {
  const int64_t rows = x.size(0), cols = x.size(1), ld = x.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "column_stats", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    auto sums = column_sums(rows, cols, 1, [&](int64_t r, double* acc) {
      for (int64_t j = 0; j < cols; ++j) acc[j] += double(px[r * ld + j]);
    });
    for (auto& s : sums) s /= double(rows);
    auto sq = column_sums(rows, cols, 1, [&](int64_t r, double* acc) {
      for (int64_t j = 0; j < cols; ++j) {
        const double d = double(px[r * ld + j]) - sums[j];
        acc[j] += d * d;
      }
    });
    AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "column_stats_out", [&] {
      for (int64_t j = 0; j < cols; ++j) {
        mean.data_ptr<scalar_t>()[j] = scalar_t(sums[j]);
        var.data_ptr<scalar_t>()[j] = scalar_t(sq[j] / double(rows));
      }
    });
  });
}

std::vector<BNChannel<double>> norm_channels(const Norm& norm) {
  return norm.mean.scalar_type() == at::kDouble ? channels_of<double>(norm) : channels_of<float>(norm);
}

void bn_relu_cpu(const at::Tensor& x, const Norm& norm, const at::Tensor& out) {
  const int64_t rows = x.size(0), cols = x.size(1), ldx = x.stride(0), ldo = out.stride(0);
  const auto ch = norm_channels(norm);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        for (int64_t j = 0; j < cols; ++j)
          po[r * ldo + j] = scalar_t(relu(ch[j].apply(double(px[r * ldx + j]))));
    });
  });
}

void bn_add_cpu(const at::Tensor& out, bool accumulate, const at::Tensor& x1, const Norm& norm1,
                const at::Tensor& x2, const Norm* norm2) {
  const int64_t rows = out.size(0), cols = out.size(1);
  const int64_t ldo = out.stride(0), ld1 = x1.stride(0), ld2 = x2.defined() ? x2.stride(0) : 0;
  const auto ch1 = norm_channels(norm1);
  const auto ch2 = norm2 ? norm_channels(*norm2) : std::vector<BNChannel<double>>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "bn_add", [&] {
    scalar_t* po = out.data_ptr<scalar_t>();
    const scalar_t* p1 = x1.const_data_ptr<scalar_t>();
    const scalar_t* p2 = x2.defined() ? x2.const_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        for (int64_t j = 0; j < cols; ++j) {
          double v = accumulate ? double(po[r * ldo + j]) : 0.0;
          v += ch1[j].apply(double(p1[r * ld1 + j]));
          if (p2) {
            const double t = double(p2[r * ld2 + j]);
            v += norm2 ? ch2[j].apply(t) : t;
          }
          po[r * ldo + j] = scalar_t(v);
        }
    });
  });
}

void bn_backward_reduce_cpu(const at::Tensor& dy, const at::Tensor& x, const Norm& norm,
                            bool has_relu, const at::Tensor& sum_dy, const at::Tensor& sum_dy_xhat) {
  const int64_t rows = x.size(0), cols = x.size(1), ldx = x.stride(0), ldd = dy.stride(0);
  const auto ch = norm_channels(norm);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_backward_reduce", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pd = dy.const_data_ptr<scalar_t>();
    auto sums = column_sums(rows, cols, 2, [&](int64_t r, double* acc) {
      for (int64_t j = 0; j < cols; ++j) {
        const double xv = double(px[r * ldx + j]);
        const double g = relu_backward(double(pd[r * ldd + j]), ch[j].apply(xv), has_relu);
        acc[j] += g;
        acc[cols + j] += g * ch[j].xhat(xv);
      }
    });
    AT_DISPATCH_FLOATING_TYPES(sum_dy.scalar_type(), "bn_backward_reduce_out", [&] {
      for (int64_t j = 0; j < cols; ++j) {
        sum_dy.data_ptr<scalar_t>()[j] = scalar_t(sums[j]);
        sum_dy_xhat.data_ptr<scalar_t>()[j] = scalar_t(sums[cols + j]);
      }
    });
  });
}

void bn_backward_apply_cpu(const at::Tensor& dy, const at::Tensor& x, const Norm& norm,
                           bool has_relu, bool training, const at::Tensor& sum_dy,
                           const at::Tensor& sum_dy_xhat, const at::Tensor& dx) {
  const int64_t rows = x.size(0), cols = x.size(1);
  const int64_t ldx = x.stride(0), ldd = dy.stride(0), ldo = dx.stride(0);
  const auto ch = norm_channels(norm);
  const auto s_dy = sum_dy.to(at::kDouble), s_dyx = sum_dy_xhat.to(at::kDouble);
  std::vector<double> mean_dy(cols), mean_dy_xhat(cols);
  for (int64_t j = 0; j < cols; ++j) {
    mean_dy[j] = s_dy.data_ptr<double>()[j] / double(rows);
    mean_dy_xhat[j] = s_dyx.data_ptr<double>()[j] / double(rows);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_backward_apply", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pd = dy.const_data_ptr<scalar_t>();
    scalar_t* po = dx.data_ptr<scalar_t>();
    at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        for (int64_t j = 0; j < cols; ++j) {
          const double xv = double(px[r * ldx + j]);
          const double g = relu_backward(double(pd[r * ldd + j]), ch[j].apply(xv), has_relu);
          po[r * ldo + j] = scalar_t(bn_input_grad(ch[j], g, xv, training, mean_dy[j], mean_dy_xhat[j]));
        }
    });
  });
}

const FusedKernelsRegistration registration(
    c10::DeviceType::CPU,
    FusedKernels{column_stats_cpu, bn_relu_cpu, bn_add_cpu, bn_backward_reduce_cpu,
                 bn_backward_apply_cpu});

}  // namespace
}  // namespace gunn_ext
