// Direct 3x3 convolutions of narrow channels_last activations on the CPU
// (fused_kernels.h: conv3x3, conv3x3_backward).
//
// With p a pixel (b, h, w) and t = (ky, kx) a tap, offset d_t = (ky - 1, kx - 1),
// zero outside the image:
//   out[p, co] = sum_t sum_ci x[p + d_t, ci] w[co, ci, t]
//   dx[p, ci]  = sum_t sum_co dy[p - d_t, co] w[co, ci, t]
//   dw[co, ci, t] = sum_p dy[p, co] x[p + d_t, ci]
// Each output pixel sums its taps in a fixed order, and the weight gradient
// sums fixed chunks of image rows combined in chunk order, in double, so the
// results do not depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <array>
#include <vector>

#include "fused_kernels_cpu.h"

namespace gunn_ext {
namespace {

constexpr int64_t kPixelGrain = 256;

// A [rows, C] matrix (unit column stride) seen as an image of pixels.
template <typename T>
struct PixelMatrix {
  T* data;
  int64_t ld, height, width;
  T* at(int64_t b, int64_t h, int64_t w) const { return data + ((b * height + h) * width + w) * ld; }
};

template <typename T>
PixelMatrix<T> pixels(const at::Tensor& m, const ImageShape& s) {
  return {const_cast<T*>(m.const_data_ptr<T>()), m.stride(0), s.height, s.width};
}

// w[co, ci, t] rearranged as taps[t][a][b]: (a, b) = (ci, co) when
// `input_major`, else (co, ci), so the innermost loop runs over contiguous b.
template <typename acc_t, typename scalar_t>
std::vector<acc_t> taps_of(const at::Tensor& w, bool input_major) {
  const int64_t cout = w.size(0), cin = w.size(1);
  const at::Tensor dense = w.contiguous();
  const scalar_t* pw = dense.const_data_ptr<scalar_t>();
  std::vector<acc_t> taps(9 * cin * cout);
  for (int64_t co = 0; co < cout; ++co)
    for (int64_t ci = 0; ci < cin; ++ci)
      for (int64_t t = 0; t < 9; ++t) {
        const int64_t inner = input_major ? ci * cout + co : co * cin + ci;
        taps[t * cin * cout + inner] = acc_t(pw[(co * cin + ci) * 9 + t]);
      }
  return taps;
}

// out[p, :] = sum_t in[p + sign * d_t, :] . taps[t], for every pixel p:
// the forward (sign 1, taps [ci][co]) and the input gradient (sign -1, [co][ci]).
template <typename scalar_t>
void correlate(const at::Tensor& in, const std::vector<at::opmath_type<scalar_t>>& taps,
               int64_t cin, int64_t cout, int sign, const ImageShape& s, const at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto src = pixels<const scalar_t>(in, s);
  const auto dst = pixels<scalar_t>(out, s);
  const int64_t lines = s.batch * s.height;
  const int64_t grain = std::max<int64_t>(1, kPixelGrain / s.width);
  at::parallel_for(0, lines, grain, [&](int64_t begin, int64_t end) {
    std::array<acc_t, kDirectConvMaxChannels> acc;
    for (int64_t line = begin; line < end; ++line) {
      const int64_t b = line / s.height, h = line % s.height;
      for (int64_t x = 0; x < s.width; ++x) {
        std::fill(acc.begin(), acc.begin() + cout, acc_t(0));
        for (int64_t t = 0; t < 9; ++t) {
          const int64_t hh = h + sign * (t / 3 - 1), xx = x + sign * (t % 3 - 1);
          if (hh < 0 || hh >= s.height || xx < 0 || xx >= s.width) continue;
          const scalar_t* v = src.at(b, hh, xx);
          const acc_t* tap = taps.data() + t * cin * cout;
          for (int64_t ci = 0; ci < cin; ++ci) {
            const acc_t a = acc_t(v[ci]);
            const acc_t* row = tap + ci * cout;
            for (int64_t co = 0; co < cout; ++co) acc[co] += a * row[co];
          }
        }
        scalar_t* o = dst.at(b, h, x);
        for (int64_t co = 0; co < cout; ++co) o[co] = scalar_t(acc[co]);
      }
    }
  });
}

template <typename scalar_t>
void weight_grad(const at::Tensor& dy, const at::Tensor& x, const ImageShape& s,
                 const at::Tensor& dw) {
  const int64_t cout = dw.size(0), cin = dw.size(1), size = 9 * cout * cin;
  const auto grad = pixels<const scalar_t>(dy, s);
  const auto src = pixels<const scalar_t>(x, s);
  const int64_t lines = s.batch * s.height;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(64, lines * s.width / kPixelGrain));
  const int64_t per_chunk = (lines + chunks - 1) / chunks;
  // partial[k][t][co][ci]
  std::vector<double> partial(chunks * size, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      double* acc = partial.data() + k * size;
      for (int64_t line = k * per_chunk; line < std::min(lines, (k + 1) * per_chunk); ++line) {
        const int64_t b = line / s.height, h = line % s.height;
        for (int64_t xw = 0; xw < s.width; ++xw) {
          const scalar_t* g = grad.at(b, h, xw);
          for (int64_t t = 0; t < 9; ++t) {
            const int64_t hh = h + t / 3 - 1, xx = xw + t % 3 - 1;
            if (hh < 0 || hh >= s.height || xx < 0 || xx >= s.width) continue;
            const scalar_t* v = src.at(b, hh, xx);
            for (int64_t co = 0; co < cout; ++co) {
              const double gc = double(g[co]);
              double* row = acc + (t * cout + co) * cin;
              for (int64_t ci = 0; ci < cin; ++ci) row[ci] += gc * double(v[ci]);
            }
          }
        }
      }
    }
  });
  std::vector<double> total(size, 0.0);
  for (int64_t k = 0; k < chunks; ++k)
    for (int64_t j = 0; j < size; ++j) total[j] += partial[k * size + j];
  scalar_t* out = dw.data_ptr<scalar_t>();  // [co, ci, 3, 3], contiguous
  for (int64_t t = 0; t < 9; ++t)
    for (int64_t co = 0; co < cout; ++co)
      for (int64_t ci = 0; ci < cin; ++ci)
        out[(co * cin + ci) * 9 + t] = scalar_t(total[(t * cout + co) * cin + ci]);
}

}  // namespace

void conv3x3_cpu(const at::Tensor& x, const at::Tensor& w, const ImageShape& s,
                 const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv3x3", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    correlate<scalar_t>(x, taps_of<acc_t, scalar_t>(w, true), w.size(1), w.size(0), 1, s, out);
  });
}

void conv3x3_backward_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                          const ImageShape& s, const at::Tensor& dx, const at::Tensor& dw) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv3x3_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    correlate<scalar_t>(dy, taps_of<acc_t, scalar_t>(w, false), w.size(0), w.size(1), -1, s, dx);
    weight_grad<scalar_t>(dy, x, s, dw);
  });
}

}  // namespace gunn_ext
