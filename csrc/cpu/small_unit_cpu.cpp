// A small update unit run whole on the CPU (fused_kernels.h: unit_forward,
// unit_backward): the fused kernels on raw buffers, with the last 1x1 and its
// gradients as loops of the op's own. With a few channels per segment, the
// library's fixed cost per GEMM and the tensors around each step cost more
// than the arithmetic.
//
// One bottleneck, a = act, p = pre, W3 the last 1x1 ([n, mid]):
//   act1 = relu(bn1(pre1[:, skip:]))      pre2 = conv3x3(act1)
//   act2 = relu(bn2(pre2))                pre3 = act2 W3^T
//   target += bn3(pre3) + shortcut_bn(pre1[:, :n])
// and backward, from g = dL/dU:
//   d3 = bn3'(g)       dW3 = d3^T act2      d_act2 = d3 W3
//   d2 = bn2'(d_act2)  (d_act1, dW2) = conv3x3'(d2)
//   d1 = [shortcut_bn'(g), bn1'(d_act1)]
// bn2 + ReLU and the last 1x1 are one pass over the rows, and so are the
// backward's steps from g to bn2's input (bn3's input gradient, dW3, d_act2
// and bn2's reduction). The block terms (fused_kernels.h: BlockTerms), where
// the op hands them over, are one pass each. Every sum runs in a fixed
// order (over fixed chunks of rows, in double), so results do not depend on
// the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "fused_kernels_cpu.h"

namespace gunn_ext {
namespace {

Mat mat(const UnitMatrix& m, int64_t rows, int64_t cols, at::ScalarType dtype) {
  return {m.data, rows, cols, m.ld, dtype};
}

// A buffer's matrices, back to back: three [rows, mid], then two [rows, n].
struct Buffers {
  Mat a, b, c, d, e;
  Buffers(void* data, const SmallUnit& u) {
    const int64_t rows = u.shape.rows(), size = at::elementSize(u.dtype);
    char* p = static_cast<char*>(data);
    a = {p, rows, u.mid, u.mid, u.dtype};
    b = {p + rows * u.mid * size, rows, u.mid, u.mid, u.dtype};
    c = {p + 2 * rows * u.mid * size, rows, u.mid, u.mid, u.dtype};
    d = {p + 3 * rows * u.mid * size, rows, u.n, u.n, u.dtype};
    e = {p + (3 * rows * u.mid + rows * u.n) * size, rows, u.n, u.n, u.dtype};
  }
};

// out[r, o] = base[r, o] + sum_k in[k] w[o][k] for every row r, with w an
// [O, K] matrix and in = input(r, buffer) row r's K inputs.
template <typename scalar_t, typename acc_t, typename Input>
void add_row_products(const Mat& base, const Mat& out, const Scratch<acc_t>& w, int64_t K,
                      Input input) {
  const int64_t O = out.cols;
  at::parallel_for(0, out.rows, task_grain(K * O), [&](int64_t begin, int64_t end) {
    Scratch<acc_t> buffer(K);
    for (int64_t r = begin; r < end; ++r) {
      const acc_t* in = input(r, buffer.data());
      const scalar_t* b = base.ptr<scalar_t>() + r * base.ld;
      scalar_t* o_r = out.ptr<scalar_t>() + r * out.ld;
      for (int64_t o = 0; o < O; ++o) o_r[o] = scalar_t(acc_t(b[o]) + dot(in, w.data() + o * K, K));
    }
  });
}

// pre1 += S W^T over the block's own columns (BlockTerms).
void add_own_columns(const SmallUnit& u, const Mat& pre1) {
  const BlockTerms& t = u.block;
  if (t.columns == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.dtype, "unit_own_columns", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t C = t.columns, F = pre1.cols;
    const scalar_t* pw = static_cast<const scalar_t*>(t.weight);
    Scratch<acc_t> w(F * C);
    for (int64_t f = 0; f < F; ++f)
      for (int64_t c = 0; c < C; ++c) w[f * C + c] = acc_t(pw[f * t.weight_ld + c]);
    const Mat updated = mat(t.updated, pre1.rows, C, u.dtype);
    const Mat original = mat(t.original, pre1.rows, C, u.dtype);
    add_row_products<scalar_t>(pre1, pre1, w, C, [&](int64_t r, acc_t* row) {
      const scalar_t* up = updated.ptr<scalar_t>() + r * updated.ld;
      const scalar_t* orig = original.ptr<scalar_t>() + r * original.ld;
      for (int64_t c = 0; c < t.seen; ++c) row[c] = acc_t(up[c]);
      for (int64_t c = t.seen; c < C; ++c) row[c] = acc_t(orig[c]);
      return static_cast<const acc_t*>(row);
    });
  });
}

// out = dL/dU + later_d1 later_weight (BlockTerms).
void add_later_terms(const SmallUnit& u, const Mat& grad_unit, const Mat& out) {
  const BlockTerms& t = u.block;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.dtype, "unit_later_terms", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t L = t.later, n = out.cols;
    const scalar_t* pw = static_cast<const scalar_t*>(t.later_weight);
    Scratch<acc_t> w(n * L);  // [o][f]
    for (int64_t f = 0; f < L; ++f)
      for (int64_t o = 0; o < n; ++o) w[o * L + f] = acc_t(pw[f * t.later_ld + o]);
    const Mat d1 = mat(t.later_d1, out.rows, L, u.dtype);
    add_row_products<scalar_t>(grad_unit, out, w, L, [&](int64_t r, acc_t* row) {
      const scalar_t* d = d1.ptr<scalar_t>() + r * d1.ld;
      for (int64_t f = 0; f < L; ++f) row[f] = acc_t(d[f]);
      return static_cast<const acc_t*>(row);
    });
  });
}

// One pass: act = relu(bn(pre)), out = act w^T with w a contiguous [O, K]
// matrix: out[r, o] = sum_k act[r, k] w[o, k]. A few outputs per row are dot
// products; more run along the outputs, which vectorises.
void bn_relu_matmul(const Mat& pre, const Norm& norm, const Mat& act, const void* w,
                    const Mat& out) {
  const auto ch = norm_channels(norm);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pre.dtype, "unit_bn_relu_matmul", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t K = pre.cols, O = out.cols;
    const Affine<acc_t> bn(ch);
    const scalar_t* pw = static_cast<const scalar_t*>(w);
    const bool dots = O < 4;
    Scratch<acc_t> packed(K * O);  // [o][k] for dot products, else [k][o]
    for (int64_t k = 0; k < K; ++k)
      for (int64_t o = 0; o < O; ++o) packed[dots ? o * K + k : k * O + o] = acc_t(pw[o * K + k]);
    at::parallel_for(0, pre.rows, task_grain(K * O), [&](int64_t begin, int64_t end) {
      Scratch<acc_t> acc(O);
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* pr = pre.ptr<scalar_t>() + r * pre.ld;
        scalar_t* ar = act.ptr<scalar_t>() + r * act.ld;
        for (int64_t k = 0; k < K; ++k) ar[k] = scalar_t(relu(acc_t(pr[k]) * bn.scale[k] + bn.shift[k]));
        scalar_t* o_r = out.ptr<scalar_t>() + r * out.ld;
        if (dots) {
          for (int64_t o = 0; o < O; ++o) {
            const acc_t* wo = packed.data() + o * K;
            acc_t sum = 0;
            for (int64_t k = 0; k < K; ++k) sum += acc_t(ar[k]) * wo[k];
            o_r[o] = scalar_t(sum);
          }
          continue;
        }
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t k = 0; k < K; ++k) {
          const acc_t v = acc_t(ar[k]);
          const acc_t* row = packed.data() + k * O;
          for (int64_t o = 0; o < O; ++o) acc[o] += v * row[o];
        }
        for (int64_t o = 0; o < O; ++o) o_r[o] = scalar_t(acc[o]);
      }
    });
  });
}

// One pass from dL/dU to bn2's input: per row,
//   d3 = bn3'(g)   dW3 += d3^T act2   d_act2 = d3 W3
// and bn2's parameter gradients (its backward reduction over d_act2). bn3's
// parameter gradients must be in grads.bn3 already.
void last_conv_backward(const SmallUnit& u, const Mat& g, const Buffers& tape, const Buffers& grad,
                        void* grad_conv3, const UnitNorms& grads) {
  const int64_t rows = g.rows, n = u.n, mid = u.mid;
  const auto ch3 = norm_channels(u.norms.bn3), ch2 = norm_channels(u.norms.bn2);
  const auto k3 = input_grad_coefficients(ch3, grads.bn3, rows, u.training);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.dtype, "unit_last_conv_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Scratch<acc_t> a3(k3.a.begin(), k3.a.end()), b3(k3.b.begin(), k3.b.end()),
        c3(k3.c.begin(), k3.c.end());
    const scalar_t* pw = static_cast<const scalar_t*>(u.conv3);
    const Scratch<acc_t> w3(pw, pw + n * mid);  // [o][k]
    const Affine<acc_t> bn2(ch2);
    const Mat &pre3 = tape.d, &act2 = tape.c, &pre2 = tape.b, &d3 = grad.d, &d_act2 = grad.a;
    // sums: dW3 [o][k], then bn2's sum(dy') and sum(dy' (x - mean)).
    auto sums = column_sums(rows, n * mid + 2 * mid, [&](int64_t r, double* acc) {
      const scalar_t* gr = g.ptr<scalar_t>() + r * g.ld;
      const scalar_t* p3 = pre3.ptr<scalar_t>() + r * pre3.ld;
      const scalar_t* a2 = act2.ptr<scalar_t>() + r * act2.ld;
      const scalar_t* p2 = pre2.ptr<scalar_t>() + r * pre2.ld;
      scalar_t* d3r = d3.ptr<scalar_t>() + r * d3.ld;
      scalar_t* da = d_act2.ptr<scalar_t>() + r * d_act2.ld;
      for (int64_t o = 0; o < n; ++o) {
        d3r[o] = scalar_t(input_grad(a3[o], b3[o], c3[o], acc_t(gr[o]), acc_t(p3[o]), u.training));
        const double v = double(d3r[o]);
        double* row = acc + o * mid;
        for (int64_t k = 0; k < mid; ++k) row[k] += v * double(a2[k]);
      }
      double* s2 = acc + n * mid;
      for (int64_t k = 0; k < mid; ++k) {
        acc_t sum = 0;
        for (int64_t o = 0; o < n; ++o) sum += acc_t(d3r[o]) * w3[o * mid + k];
        da[k] = scalar_t(sum);
        const acc_t x = acc_t(p2[k]);
        const double dy = double(relu_backward(acc_t(da[k]), x * bn2.scale[k] + bn2.shift[k], true));
        s2[k] += dy;
        s2[mid + k] += dy * (double(x) - ch2[k].mean);
      }
    });
    scalar_t* dw = static_cast<scalar_t*>(grad_conv3);
    for (int64_t j = 0; j < n * mid; ++j) dw[j] = scalar_t(sums[j]);
    for (int64_t k = 0; k < mid; ++k) sums[n * mid + mid + k] *= ch2[k].invstd;
    store_stats(grads.bn2, grads.bn2.bias, sums, n * mid);
    store_stats(grads.bn2, grads.bn2.weight, sums, n * mid + mid);
  });
}

// dx from dy for a BN (+ ReLU), and the norm's parameter gradients.
void norm_backward(const Mat& dy, const Mat& x, const Norm& norm, bool has_relu, bool training,
                   const Norm& grads, const Mat& dx) {
  bn_backward_reduce(dy, x, norm, has_relu, grads);
  bn_backward_apply(dy, x, norm, has_relu, training, grads, dx);
}

}  // namespace

void unit_forward_cpu(const SmallUnit& u, bool compute_stats, UnitMatrix target) {
  const int64_t rows = u.shape.rows(), skip = u.shortcut ? u.n : 0;
  const Mat pre1 = mat(u.pre1, rows, skip + u.mid, u.dtype);
  const Buffers tape(u.tape, u);  // act1, pre2, act2, pre3
  add_own_columns(u, pre1);
  if (compute_stats) column_stats(pre1, u.norms.first);
  bn_relu(pre1.columns(skip, u.mid), u.norms.bn1, tape.a);
  conv3x3(tape.a, u.conv2, u.shape, tape.b);
  if (compute_stats) column_stats(tape.b, u.norms.bn2);
  bn_relu_matmul(tape.b, u.norms.bn2, tape.c, u.conv3, tape.d);
  if (compute_stats) column_stats(tape.d, u.norms.bn3);
  if (target.data == nullptr) return;
  const Mat out = mat(target, rows, u.n, u.dtype);
  if (u.shortcut) bn_add(out, true, tape.d, u.norms.bn3, pre1.columns(0, u.n), &u.norms.shortcut);
  else bn_add(out, true, tape.d, u.norms.bn3, Mat{}, nullptr);
}

void unit_backward_cpu(const SmallUnit& u, UnitMatrix grad_unit, UnitMatrix d1, void* grad_conv2,
                       void* grad_conv3, const UnitNorms& grads) {
  const int64_t rows = u.shape.rows(), skip = u.shortcut ? u.n : 0;
  const Mat pre1 = mat(u.pre1, rows, skip + u.mid, u.dtype);
  const Mat dpre1 = mat(d1, rows, skip + u.mid, u.dtype);
  const Buffers tape(u.tape, u);     // act1, pre2, act2, pre3
  const Buffers grad(u.scratch, u);  // d_act2, d2, d_act1, d3, g
  Mat g = mat(grad_unit, rows, u.n, u.dtype);
  if (u.block.later > 0) {
    add_later_terms(u, g, grad.e);
    g = grad.e;
  }
  bn_backward_reduce(g, tape.d, u.norms.bn3, false, grads.bn3);
  last_conv_backward(u, g, tape, grad, grad_conv3, grads);
  bn_backward_apply(grad.a, tape.b, u.norms.bn2, true, u.training, grads.bn2, grad.b);
  conv3x3_backward(grad.b, tape.a, u.conv2, u.shape, grad.c, grad_conv2);
  norm_backward(grad.c, pre1.columns(skip, u.mid), u.norms.bn1, true, u.training, grads.bn1,
                dpre1.columns(skip, u.mid));
  if (u.shortcut) {
    norm_backward(g, pre1.columns(0, u.n), u.norms.shortcut, false, u.training, grads.shortcut,
                  dpre1.columns(0, u.n));
  }
}

}  // namespace gunn_ext
