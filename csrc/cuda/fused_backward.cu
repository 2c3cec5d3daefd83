// Backward fused kernels of bn (+ relu): the per-channel sums, then dx.
#include "column_kernels.cuh"

namespace gunn_ext {
namespace cuda {
namespace {

// sum(dy') and sum(dy' * xhat) of a run of rows.
template <typename acc_t>
struct GradSums {
  acc_t dy, dy_xhat;
};

template <typename acc_t>
struct AddGradSums {
  __device__ GradSums<acc_t> operator()(const GradSums<acc_t>& a, const GradSums<acc_t>& b) const {
    return {a.dy + b.dy, a.dy_xhat + b.dy_xhat};
  }
};

template <typename acc_t>
struct WriteGradSums {
  acc_t *sum_dy, *sum_dy_xhat;
  __device__ void operator()(int64_t col, const GradSums<acc_t>& s) const {
    sum_dy[col] = s.dy;
    sum_dy_xhat[col] = s.dy_xhat;
  }
};

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    grad_sums_kernel(const scalar_t* dy, int64_t ldd, const scalar_t* x, int64_t ldx,
                     NormParams<acc_type<scalar_t>> norm, bool has_relu, Tiling t, int64_t chunk,
                     int lanes_pow2, GradSums<acc_type<scalar_t>>* partials, int64_t chunks) {
  using acc_t = acc_type<scalar_t>;
  auto* smem = dynamic_shared_memory<GradSums<acc_t>>();
  GradSums<acc_t> s[V];
#pragma unroll
  for (int v = 0; v < V; ++v) s[v] = {0, 0};
  const int col = t.col_v();
  if (t.active()) {
    BNChannel<acc_t> ch[V];
#pragma unroll
    for (int v = 0; v < V; ++v) ch[v] = norm.channel(int64_t(col) * V + v);
    const int64_t r0 = blockIdx.x * chunk, r1 = min(t.rows, r0 + chunk);
    const int64_t step = t.row_lanes;
    for (int64_t r = r0 + t.lane_row(); r < r1; r += step * kUnroll) {
      Pack<scalar_t, V> xs[kUnroll], gs[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (r + u * step >= r1) break;
        xs[u] = load_pack<scalar_t, V>(x, ldx, r + u * step, col);
        gs[u] = load_pack<scalar_t, V>(dy, ldd, r + u * step, col);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (r + u * step >= r1) break;
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const acc_t xv = static_cast<acc_t>(xs[u].v[v]);
          const acc_t g = relu_backward(static_cast<acc_t>(gs[u].v[v]), ch[v].apply(xv), has_relu);
          s[v].dy += g;
          s[v].dy_xhat += g * ch[v].xhat(xv);
        }
      }
    }
  }
  reduce_chunk<V>(t, s, smem, lanes_pow2, AddGradSums<acc_t>{}, partials, col, chunks);
}

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    bn_input_grad_kernel(const scalar_t* dy, int64_t ldd, const scalar_t* x, int64_t ldx,
                         scalar_t* dx, int64_t ldo, NormParams<acc_type<scalar_t>> norm,
                         bool has_relu, bool training, const acc_type<scalar_t>* sum_dy,
                         const acc_type<scalar_t>* sum_dy_xhat, Tiling t) {
  using acc_t = acc_type<scalar_t>;
  if (!t.active()) return;
  const int col = t.col_v();
  BNChannel<acc_t> ch[V];
  acc_t mean_dy[V], mean_dy_xhat[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const int64_t j = int64_t(col) * V + v;
    ch[v] = norm.channel(j);
    mean_dy[v] = sum_dy[j] / static_cast<acc_t>(t.rows);
    mean_dy_xhat[v] = sum_dy_xhat[j] / static_cast<acc_t>(t.rows);
  }
  const int64_t step = int64_t(gridDim.x) * t.row_lanes;
  for (int64_t r = int64_t(blockIdx.x) * t.row_lanes + t.lane_row(); r < t.rows; r += step * kUnroll) {
    Pack<scalar_t, V> xs[kUnroll], gs[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (r + u * step >= t.rows) break;
      xs[u] = load_pack<scalar_t, V>(x, ldx, r + u * step, col);
      gs[u] = load_pack<scalar_t, V>(dy, ldd, r + u * step, col);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (r + u * step >= t.rows) break;
      Pack<scalar_t, V> o;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const acc_t xv = static_cast<acc_t>(xs[u].v[v]);
        const acc_t g = relu_backward(static_cast<acc_t>(gs[u].v[v]), ch[v].apply(xv), has_relu);
        o.v[v] = static_cast<scalar_t>(
            bn_input_grad(ch[v], g, xv, training, mean_dy[v], mean_dy_xhat[v]));
      }
      store_pack<scalar_t, V>(dx, ldo, r + u * step, col, o);
    }
  }
}

}  // namespace
}  // namespace cuda

using namespace cuda;

void bn_backward_reduce_cuda(const at::Tensor& dy, const at::Tensor& x, const Norm& norm,
                             bool has_relu, const Norm& grads) {
  const int64_t rows = x.size(0), cols = x.size(1);
  check_matrix(x, "bn_backward_reduce", "x", rows, cols, x.scalar_type());
  check_matrix(dy, "bn_backward_reduce", "dy", rows, cols, x.scalar_type());
  if (cols == 0) return;
  const DeviceScope scope(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_backward_reduce_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto params = norm_params<acc_t>(norm, cols, "bn_backward_reduce");
    acc_t* out_dy = run_of<acc_t>(grads, grads.bias, cols, "bn_backward_reduce", "sum_dy");
    acc_t* out_dy_xhat = run_of<acc_t>(grads, grads.weight, cols, "bn_backward_reduce", "sum_dy_xhat");
    with_vector_width<scalar_t>(vector_width<scalar_t>({&x, &dy}), [&](auto width) {
      constexpr int V = decltype(width)::value;
      const Tiling t = make_tiling(rows, cols, V);
      const int64_t chunk = chunk_rows(t), chunks = std::max<int64_t>((rows + chunk - 1) / chunk, 1);
      at::Tensor workspace = partials_workspace(x, cols * chunks, sizeof(GradSums<acc_t>));
      auto* partials = reinterpret_cast<GradSums<acc_t>*>(workspace.data_ptr());
      const dim3 grid(static_cast<unsigned>(chunks), column_tiles(t));
      launch(grad_sums_kernel<scalar_t, V>, grid, kThreads,
             kThreads * V * sizeof(GradSums<acc_t>), scope.stream(), dy.const_data_ptr<scalar_t>(),
             dy.stride(0), x.const_data_ptr<scalar_t>(), x.stride(0), params, has_relu, t, chunk,
             next_pow2(t.row_lanes), partials, chunks);
      launch(combine_partials_kernel<GradSums<acc_t>, AddGradSums<acc_t>, WriteGradSums<acc_t>>,
             static_cast<unsigned>(cols), kThreads, 0, scope.stream(), partials, chunks,
             GradSums<acc_t>{0, 0}, AddGradSums<acc_t>{}, WriteGradSums<acc_t>{out_dy, out_dy_xhat});
    });
  });
}

void bn_backward_apply_cuda(const at::Tensor& dy, const at::Tensor& x, const Norm& norm,
                            bool has_relu, bool training, const Norm& grads,
                            const at::Tensor& dx) {
  const int64_t rows = x.size(0), cols = x.size(1);
  check_matrix(x, "bn_backward_apply", "x", rows, cols, x.scalar_type());
  check_matrix(dy, "bn_backward_apply", "dy", rows, cols, x.scalar_type());
  check_matrix(dx, "bn_backward_apply", "dx", rows, cols, x.scalar_type());
  if (rows == 0 || cols == 0) return;
  const DeviceScope scope(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_backward_apply_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto params = norm_params<acc_t>(norm, cols, "bn_backward_apply");
    const acc_t* s_dy = run_of<acc_t>(grads, grads.bias, cols, "bn_backward_apply", "sum_dy");
    const acc_t* s_dy_xhat = run_of<acc_t>(grads, grads.weight, cols, "bn_backward_apply", "sum_dy_xhat");
    with_vector_width<scalar_t>(vector_width<scalar_t>({&x, &dy, &dx}), [&](auto width) {
      constexpr int V = decltype(width)::value;
      const Tiling t = make_tiling(rows, cols, V);
      launch(bn_input_grad_kernel<scalar_t, V>, elementwise_grid(t), kThreads, 0, scope.stream(),
             dy.const_data_ptr<scalar_t>(), dy.stride(0), x.const_data_ptr<scalar_t>(), x.stride(0),
             dx.data_ptr<scalar_t>(), dx.stride(0), params, has_relu, training, s_dy, s_dy_xhat, t);
    });
  });
}

}  // namespace gunn_ext
