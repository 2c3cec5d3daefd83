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
// Every sum runs in a fixed order (dW3 over fixed chunks of rows, in double),
// so results do not depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "fused_kernels_cpu.h"

namespace gunn_ext {
namespace {

int64_t rows_of(const ImageShape& s) { return s.batch * s.height * s.width; }

Mat mat(const UnitMatrix& m, int64_t rows, int64_t cols, at::ScalarType dtype) {
  return {m.data, rows, cols, m.ld, dtype};
}

// A buffer's matrices, back to back: three [rows, mid], then one [rows, n].
struct Buffers {
  Mat a, b, c, d;
  Buffers(void* data, const SmallUnit& u) {
    const int64_t rows = rows_of(u.shape), size = at::elementSize(u.dtype);
    char* p = static_cast<char*>(data);
    a = {p, rows, u.mid, u.mid, u.dtype};
    b = {p + rows * u.mid * size, rows, u.mid, u.mid, u.dtype};
    c = {p + 2 * rows * u.mid * size, rows, u.mid, u.mid, u.dtype};
    d = {p + 3 * rows * u.mid * size, rows, u.n, u.n, u.dtype};
  }
};

// out = a w^T (transpose_w) or a w, w a contiguous [O, K] (or [K, O]) matrix:
// out[r, o] = sum_k a[r, k] w[o, k]  or  sum_k a[r, k] w[k, o]. A few outputs
// per row are dot products; more run along the outputs, which vectorises.
void matmul(const Mat& a, const void* w, bool transpose_w, const Mat& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "unit_matmul", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t K = a.cols, O = out.cols;
    const scalar_t* pw = static_cast<const scalar_t*>(w);
    const bool dots = O < 4;
    std::vector<acc_t> packed(K * O);  // [o][k] for dot products, else [k][o]
    for (int64_t k = 0; k < K; ++k)
      for (int64_t o = 0; o < O; ++o) {
        const acc_t v = acc_t(transpose_w ? pw[o * K + k] : pw[k * O + o]);
        packed[dots ? o * K + k : k * O + o] = v;
      }
    const scalar_t* pa = a.ptr<scalar_t>();
    scalar_t* po = out.ptr<scalar_t>();
    at::parallel_for(0, a.rows, task_grain(K * O), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(O);
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* ar = pa + r * a.ld;
        scalar_t* o_r = po + r * out.ld;
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

// dw = a^T b ([a.cols, b.cols], contiguous): sums over fixed chunks of rows
// in double, combined in chunk order.
void matmul_tn(const Mat& a, const Mat& b, void* dw) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "unit_matmul_tn", [&] {
    const int64_t rows = a.rows, A = a.cols, B = b.cols, size = A * B;
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(64, rows / task_grain(size)));
    const int64_t per_chunk = (rows + chunks - 1) / chunks;
    const scalar_t* pa = a.ptr<scalar_t>();
    const scalar_t* pb = b.ptr<scalar_t>();
    std::vector<double> partial(chunks * size, 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> bv(B);
      for (int64_t k = begin; k < end; ++k) {
        double* acc = partial.data() + k * size;
        for (int64_t r = k * per_chunk; r < std::min(rows, (k + 1) * per_chunk); ++r) {
          const scalar_t* br = pb + r * b.ld;
          for (int64_t j = 0; j < B; ++j) bv[j] = double(br[j]);
          const scalar_t* ar = pa + r * a.ld;
          for (int64_t i = 0; i < A; ++i) {
            const double v = double(ar[i]);
            double* row = acc + i * B;
            for (int64_t j = 0; j < B; ++j) row[j] += v * bv[j];
          }
        }
      }
    });
    scalar_t* out = static_cast<scalar_t*>(dw);
    for (int64_t j = 0; j < size; ++j) {
      double total = 0.0;
      for (int64_t k = 0; k < chunks; ++k) total += partial[k * size + j];
      out[j] = scalar_t(total);
    }
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
  const int64_t rows = rows_of(u.shape), skip = u.shortcut ? u.n : 0;
  const Mat pre1 = mat(u.pre1, rows, skip + u.mid, u.dtype);
  const Buffers tape(u.tape, u);  // act1, pre2, act2, pre3
  if (compute_stats) column_stats(pre1, u.norms.first);
  bn_relu(pre1.columns(skip, u.mid), u.norms.bn1, tape.a);
  conv3x3(tape.a, u.conv2, u.shape, tape.b);
  if (compute_stats) column_stats(tape.b, u.norms.bn2);
  bn_relu(tape.b, u.norms.bn2, tape.c);
  matmul(tape.c, u.conv3, true, tape.d);
  if (compute_stats) column_stats(tape.d, u.norms.bn3);
  if (target.data == nullptr) return;
  const Mat out = mat(target, rows, u.n, u.dtype);
  if (u.shortcut) bn_add(out, true, tape.d, u.norms.bn3, pre1.columns(0, u.n), &u.norms.shortcut);
  else bn_add(out, true, tape.d, u.norms.bn3, Mat{}, nullptr);
}

void unit_backward_cpu(const SmallUnit& u, UnitMatrix grad_unit, UnitMatrix d1, void* grad_conv2,
                       void* grad_conv3, const UnitNorms& grads) {
  const int64_t rows = rows_of(u.shape), skip = u.shortcut ? u.n : 0;
  const Mat pre1 = mat(u.pre1, rows, skip + u.mid, u.dtype);
  const Mat g = mat(grad_unit, rows, u.n, u.dtype), dpre1 = mat(d1, rows, skip + u.mid, u.dtype);
  const Buffers tape(u.tape, u);        // act1, pre2, act2, pre3
  const Buffers grad(u.scratch, u);     // d_act2, d2, d_act1, d3
  norm_backward(g, tape.d, u.norms.bn3, false, u.training, grads.bn3, grad.d);
  matmul_tn(grad.d, tape.c, grad_conv3);
  matmul(grad.d, u.conv3, false, grad.a);
  norm_backward(grad.a, tape.b, u.norms.bn2, true, u.training, grads.bn2, grad.b);
  conv3x3_backward(grad.b, tape.a, u.conv2, u.shape, grad.c, grad_conv2);
  norm_backward(grad.c, pre1.columns(skip, u.mid), u.norms.bn1, true, u.training, grads.bn1,
                dpre1.columns(skip, u.mid));
  if (u.shortcut) {
    norm_backward(g, pre1.columns(0, u.n), u.norms.shortcut, false, u.training, grads.shortcut,
                  dpre1.columns(0, u.n));
  }
}

}  // namespace gunn_ext
