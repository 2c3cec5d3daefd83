// Direct 3x3 convolutions of narrow channels_last activations on the CPU
// (fused_kernels.h: conv3x3, conv3x3_backward).
//
// With p a pixel (b, h, w) and t = (ky, kx) a tap, offset d_t = (ky - 1, kx - 1),
// zero outside the image:
//   out[p, co] = sum_ci sum_t x[p + d_t, ci] w[co, ci, t]
//   dx[p, ci]  = sum_co sum_t dy[p - d_t, co] w[co, ci, t]
//   dw[co, ci, t] = sum_p dy[p, co] x[p + d_t, ci]
// The inner loops run along whichever is longer, the channels or the image
// rows. Along channels, the kernels read the channels_last activations as
// they are, pixel by pixel, with the weights packed tap by tap as [a][b]
// matrices. Along rows, where a loop over a few channels is too short to
// vectorise, they first transpose the [rows, C] matrices into one plane per
// channel, zero-padded around each image, so that a tap is one shift over
// the whole batch and the loops run over many image lines at once. Each
// output sums its terms in a fixed order, and the weight gradient sums fixed
// chunks of pixels combined in chunk order, in double, so results do not
// depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <utility>

#include "fused_kernels_cpu.h"

namespace gunn_ext {
namespace {

// A batch of images zero-padded by one pixel, as one plane per channel:
// images of (H + 2) x (W + 2) values, pixel (b, h, w) at position
// (b (H + 2) + h + 1) (W + 2) + w + 1. A tap t is one shift of positions.
struct PaddedImage {
  int64_t height, width;  // padded: H + 2, W + 2
  int64_t lines, plane;   // padded lines of the batch, and values per channel

  explicit PaddedImage(const ImageShape& s)
      : height(s.height + 2), width(s.width + 2), lines(s.batch * height), plane(lines * width) {}
  // Where the neighbour p + d_t of position p lies, relative to p.
  int64_t shift(int64_t t) const { return (t / 3 - 1) * width + (t % 3 - 1); }
  // The positions of padded lines [begin, end), less the batch's first and
  // last width + 1, whose neighbours lie outside the plane: [first, last).
  std::pair<int64_t, int64_t> positions(int64_t begin, int64_t end) const {
    return {std::max(begin * width, width + 1), std::min(end * width, plane - width - 1)};
  }
};

// The columns of a [rows, C] matrix (unit column stride) as C planes of a
// PaddedImage, in the arithmetic type, zeros around each image.
template <typename acc_t, typename scalar_t>
Scratch<acc_t> padded_planes_of(const Mat& m, const ImageShape& s) {
  const PaddedImage padded(s);
  const int64_t W = s.width, cols = m.cols, ld = m.ld;
  const scalar_t* p = m.ptr<scalar_t>();
  Scratch<acc_t> planes(cols * padded.plane, acc_t(0));
  at::parallel_for(0, s.batch * s.height, task_grain(cols * W), [&](int64_t begin, int64_t end) {
    for (int64_t line = begin; line < end; ++line) {
      const int64_t b = line / s.height, h = line % s.height;
      const scalar_t* from = p + line * W * ld;
      acc_t* to = planes.data() + (b * padded.height + h + 1) * padded.width + 1;
      for (int64_t c = 0; c < cols; ++c) {
        for (int64_t w = 0; w < W; ++w) to[c * padded.plane + w] = acc_t(from[w * ld + c]);
      }
    }
  });
  return planes;
}

// out[p, b] = sum_a sum_t in[p + sign d_t, a] w_t[a, b], on zero-padded
// planes (padded_planes_of): the forward (a = ci, b = co, sign 1) and the
// input gradient (a = co, b = ci, sign -1). `tap(a, b, t)` reads w. With the
// zeros in place, a tap is one shift of the whole padded batch, so the inner
// loop runs over every padded line of a task at once (the padding positions
// computed along, and dropped). Parallel over padded lines.
template <typename scalar_t, typename Tap>
void correlate(const Scratch<at::opmath_type<scalar_t>>& in, int64_t a_n, int64_t b_n,
               Tap tap, int sign, const ImageShape& s, const Mat& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const PaddedImage padded(s);
  const int64_t W = s.width, ldo = out.ld;
  scalar_t* po = out.ptr<scalar_t>();
  const int64_t grain = task_grain(9 * a_n * b_n * padded.width);
  at::parallel_for(0, padded.lines, grain, [&](int64_t begin, int64_t end) {
    const auto [q0, q1] = padded.positions(begin, end);
    if (q0 >= q1) return;
    Scratch<acc_t> acc(q1 - q0);
    for (int64_t ob = 0; ob < b_n; ++ob) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t ia = 0; ia < a_n; ++ia) {
        for (int64_t t = 0; t < 9; ++t) {
          const acc_t w = tap(ia, ob, t);
          const acc_t* src = in.data() + ia * padded.plane + q0 + sign * padded.shift(t);
          for (int64_t i = 0; i < q1 - q0; ++i) acc[i] += w * src[i];
        }
      }
      for (int64_t line = begin; line < end; ++line) {
        const int64_t b = line / padded.height, h = line % padded.height - 1;
        if (h < 0 || h >= s.height) continue;
        const acc_t* a = acc.data() + line * padded.width + 1 - q0;
        scalar_t* o = po + ((b * s.height + h) * W) * ldo + ob;
        for (int64_t x = 0; x < W; ++x) o[x * ldo] = scalar_t(a[x]);
      }
    }
  });
}

// dw[co, ci, t] = sum_p dy[p, co] x[p + d_t, ci] on zero-padded planes: over
// every padded position q of the batch, dy[q] x[q + shift_t], where dy is
// zero off the images and x zero around them. Fixed chunks of padded lines,
// each one dot per (co, ci, t), combined in chunk order in double.
template <typename scalar_t>
void weight_grad(const Scratch<at::opmath_type<scalar_t>>& dy,
                 const Scratch<at::opmath_type<scalar_t>>& x, int64_t cout, int64_t cin,
                 const ImageShape& s, void* dw) {
  const PaddedImage padded(s);
  const int64_t size = cout * cin * 9;  // dw's layout: [co][ci][t]
  const int64_t chunks = sum_chunks(padded.lines, size * padded.width);
  const int64_t per_chunk = (padded.lines + chunks - 1) / chunks;
  Scratch<double> partial(chunks * size, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const auto [q0, q1] = padded.positions(k * per_chunk, (k + 1) * per_chunk);
      if (q0 >= q1) continue;
      double* acc = partial.data() + k * size;
      for (int64_t co = 0; co < cout; ++co) {
        const auto* g = dy.data() + co * padded.plane + q0;
        for (int64_t ci = 0; ci < cin; ++ci) {
          for (int64_t t = 0; t < 9; ++t) {
            const auto* v = x.data() + ci * padded.plane + q0 + padded.shift(t);
            acc[(co * cin + ci) * 9 + t] = double(dot(g, v, q1 - q0));
          }
        }
      }
    }
  });
  scalar_t* out = static_cast<scalar_t*>(dw);  // [co, ci, 3, 3], contiguous
  for (int64_t j = 0; j < size; ++j) {
    double total = 0.0;
    for (int64_t k = 0; k < chunks; ++k) total += partial[k * size + j];
    out[j] = scalar_t(total);
  }
}

// Whether the inner loops run along image rows (planes) rather than channels.
bool along_rows(const ImageShape& s, int64_t channels) { return s.width > channels; }

// The pixel (b, h, w) of row p, moved by sign d_t; -1 outside the image.
inline int64_t neighbour(int64_t p, int64_t t, int sign, const ImageShape& s) {
  const int64_t w = p % s.width, h = (p / s.width) % s.height;
  const int64_t hh = h + sign * (t / 3 - 1), ww = w + sign * (t % 3 - 1);
  if (hh < 0 || hh >= s.height || ww < 0 || ww >= s.width) return -1;
  return p + (hh - h) * s.width + (ww - w);
}

// out[p, b] = sum_t sum_a in[p + sign d_t, a] w[t][a][b], pixel by pixel
// along channels; `packed` holds w as 9 [a_n, b_n] matrices.
template <typename scalar_t>
void correlate_pixels(const Mat& in, const Scratch<at::opmath_type<scalar_t>>& packed,
                      int64_t a_n, int64_t b_n, int sign, const ImageShape& s, const Mat& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = s.rows(), ldi = in.ld, ldo = out.ld;
  const scalar_t* pi = in.ptr<scalar_t>();
  scalar_t* po = out.ptr<scalar_t>();
  at::parallel_for(0, rows, task_grain(9 * a_n * b_n), [&](int64_t begin, int64_t end) {
    Scratch<acc_t> acc(b_n);
    for (int64_t p = begin; p < end; ++p) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t t = 0; t < 9; ++t) {
        const int64_t q = neighbour(p, t, sign, s);
        if (q < 0) continue;
        const scalar_t* src = pi + q * ldi;
        const acc_t* wt = packed.data() + t * a_n * b_n;
        for (int64_t a = 0; a < a_n; ++a) {
          const acc_t v = acc_t(src[a]);
          const acc_t* row = wt + a * b_n;
          for (int64_t b = 0; b < b_n; ++b) acc[b] += v * row[b];
        }
      }
      for (int64_t b = 0; b < b_n; ++b) po[p * ldo + b] = scalar_t(acc[b]);
    }
  });
}

// dw[co, ci, t] = sum_p dy[p, co] x[p + d_t, ci], pixel by pixel along
// channels (column_sums, over [t][ci][co]).
template <typename scalar_t>
void weight_grad_pixels(const Mat& dy, const Mat& x, int64_t cout, int64_t cin,
                        const ImageShape& s, void* dw) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* pg = dy.ptr<scalar_t>();
  const scalar_t* px = x.ptr<scalar_t>();
  const auto sums = column_sums(s.rows(), 9 * cin * cout, [&](int64_t p, double* acc) {
    const scalar_t* g = pg + p * dy.ld;
    for (int64_t t = 0; t < 9; ++t) {
      const int64_t q = neighbour(p, t, 1, s);
      if (q < 0) continue;
      for (int64_t ci = 0; ci < cin; ++ci) {
        const acc_t v = acc_t(px[q * x.ld + ci]);
        double* a = acc + (t * cin + ci) * cout;
        for (int64_t co = 0; co < cout; ++co) a[co] += double(v * acc_t(g[co]));
      }
    }
  });
  scalar_t* out = static_cast<scalar_t*>(dw);  // [co, ci, 3, 3], contiguous
  for (int64_t co = 0; co < cout; ++co)
    for (int64_t ci = 0; ci < cin; ++ci)
      for (int64_t t = 0; t < 9; ++t)
        out[(co * cin + ci) * 9 + t] = scalar_t(sums[(t * cin + ci) * cout + co]);
}

// w[co, ci, t] as 9 matrices [t][a][b]: [ci][co] (forward) or, transposed,
// [co][ci] (input gradient).
template <typename acc_t, typename scalar_t>
Scratch<acc_t> packed_taps(const void* w, int64_t cout, int64_t cin, bool transposed) {
  const scalar_t* p = static_cast<const scalar_t*>(w);
  Scratch<acc_t> packed(9 * cin * cout);
  for (int64_t co = 0; co < cout; ++co)
    for (int64_t ci = 0; ci < cin; ++ci)
      for (int64_t t = 0; t < 9; ++t) {
        const int64_t at = transposed ? co * cin + ci : ci * cout + co;
        packed[t * cin * cout + at] = acc_t(p[(co * cin + ci) * 9 + t]);
      }
  return packed;
}

// w[co, ci, t] in the arithmetic type.
template <typename acc_t, typename scalar_t>
Scratch<acc_t> weights_of(const void* w, int64_t cout, int64_t cin) {
  const scalar_t* p = static_cast<const scalar_t*>(w);
  return Scratch<acc_t>(p, p + cout * cin * 9);
}

}  // namespace

void conv3x3(const Mat& x, const void* w, const ImageShape& s, const Mat& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.dtype, "conv3x3", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t cout = out.cols, cin = x.cols;
    if (!along_rows(s, std::max(cin, cout))) {
      correlate_pixels<scalar_t>(x, packed_taps<acc_t, scalar_t>(w, cout, cin, false), cin, cout,
                                 1, s, out);
      return;
    }
    const auto weights = weights_of<acc_t, scalar_t>(w, cout, cin);
    const auto tap = [&](int64_t ci, int64_t co, int64_t t) {
      return weights[(co * cin + ci) * 9 + t];
    };
    correlate<scalar_t>(padded_planes_of<acc_t, scalar_t>(x, s), cin, cout, tap, 1, s, out);
  });
}

void conv3x3_backward(const Mat& dy, const Mat& x, const void* w, const ImageShape& s,
                      const Mat& dx, void* dw) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.dtype, "conv3x3_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t cout = dy.cols, cin = x.cols;
    if (!along_rows(s, std::max(cin, cout))) {
      correlate_pixels<scalar_t>(dy, packed_taps<acc_t, scalar_t>(w, cout, cin, true), cout, cin,
                                 -1, s, dx);
      weight_grad_pixels<scalar_t>(dy, x, cout, cin, s, dw);
      return;
    }
    const auto weights = weights_of<acc_t, scalar_t>(w, cout, cin);
    const auto tap = [&](int64_t co, int64_t ci, int64_t t) {
      return weights[(co * cin + ci) * 9 + t];
    };
    const auto grad = padded_planes_of<acc_t, scalar_t>(dy, s);
    correlate<scalar_t>(grad, cout, cin, tap, -1, s, dx);
    weight_grad<scalar_t>(grad, padded_planes_of<acc_t, scalar_t>(x, s), cout, cin, s, dw);
  });
}

void conv3x3_cpu(const at::Tensor& x, const at::Tensor& w, const ImageShape& s,
                 const at::Tensor& out) {
  conv3x3(mat_of(x), w.contiguous().const_data_ptr(), s, mat_of(out));
}

void conv3x3_backward_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                          const ImageShape& s, const at::Tensor& dx, const at::Tensor& dw) {
  TORCH_CHECK(dw.is_contiguous(), "gunn_ext: conv3x3_backward: dw must be contiguous");
  conv3x3_backward(mat_of(dy), mat_of(x), w.contiguous().const_data_ptr(), s, mat_of(dx),
                   dw.data_ptr());
}

}  // namespace gunn_ext
