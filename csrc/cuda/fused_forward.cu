// Forward fused kernels: column statistics, bn + relu, bn + residual add.
#include "column_kernels.cuh"

namespace gunn_ext {
namespace cuda {
namespace {

template <typename acc_t>
struct WriteMoments {
  acc_t *mean, *var;
  __device__ void operator()(int64_t col, const Welford<acc_t>& s) const {
    mean[col] = s.mean;
    var[col] = s.m2 / static_cast<acc_t>(s.n);
  }
};

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    column_moments_kernel(const scalar_t* x, int64_t ld, Tiling t, int64_t chunk, int lanes_pow2,
                          Welford<acc_type<scalar_t>>* partials, int64_t chunks) {
  using acc_t = acc_type<scalar_t>;
  auto* smem = dynamic_shared_memory<Welford<acc_t>>();
  Welford<acc_t> s[V];
#pragma unroll
  for (int v = 0; v < V; ++v) s[v] = {0, 0, 0};
  const int col = t.col_v();
  if (t.active()) {
    const int64_t r0 = blockIdx.x * chunk, r1 = min(t.rows, r0 + chunk);
    const int64_t step = t.row_lanes;
    for (int64_t r = r0 + t.lane_row(); r < r1; r += step * kUnroll) {
      Pack<scalar_t, V> in[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (r + u * step < r1) in[u] = load_pack<scalar_t, V>(x, ld, r + u * step, col);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (r + u * step >= r1) break;
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const acc_t value = static_cast<acc_t>(in[u].v[v]);
          s[v].n += 1;
          const acc_t delta = value - s[v].mean;
          s[v].mean += delta / static_cast<acc_t>(s[v].n);
          s[v].m2 += delta * (value - s[v].mean);
        }
      }
    }
  }
  reduce_chunk<V>(t, s, smem, lanes_pow2, WelfordCombine<acc_t>{}, partials, col, chunks);
}

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    bn_relu_kernel(const scalar_t* x, int64_t ldx, scalar_t* out, int64_t ldo,
                   NormParams<acc_type<scalar_t>> norm, Tiling t) {
  using acc_t = acc_type<scalar_t>;
  if (!t.active()) return;
  const int col = t.col_v();
  BNChannel<acc_t> ch[V];
#pragma unroll
  for (int v = 0; v < V; ++v) ch[v] = norm.channel(int64_t(col) * V + v);
  const int64_t step = int64_t(gridDim.x) * t.row_lanes;
  for (int64_t r = int64_t(blockIdx.x) * t.row_lanes + t.lane_row(); r < t.rows; r += step * kUnroll) {
    Pack<scalar_t, V> in[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (r + u * step < t.rows) in[u] = load_pack<scalar_t, V>(x, ldx, r + u * step, col);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (r + u * step >= t.rows) break;
      Pack<scalar_t, V> o;
#pragma unroll
      for (int v = 0; v < V; ++v)
        o.v[v] = static_cast<scalar_t>(relu(ch[v].apply(static_cast<acc_t>(in[u].v[v]))));
      store_pack<scalar_t, V>(out, ldo, r + u * step, col, o);
    }
  }
}

// out = (accumulate ? out : 0) + bn1(x1) [+ bn2(x2) | + x2]
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    bn_add_kernel(scalar_t* out, int64_t ldo, bool accumulate, const scalar_t* x1, int64_t ld1,
                  NormParams<acc_type<scalar_t>> norm1, const scalar_t* x2, int64_t ld2,
                  bool has_norm2, NormParams<acc_type<scalar_t>> norm2, Tiling t) {
  using acc_t = acc_type<scalar_t>;
  if (!t.active()) return;
  const int col = t.col_v();
  BNChannel<acc_t> ch1[V], ch2[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    ch1[v] = norm1.channel(int64_t(col) * V + v);
    ch2[v] = has_norm2 ? norm2.channel(int64_t(col) * V + v) : BNChannel<acc_t>{0, 1, 1, 0};
  }
  const int64_t step = int64_t(gridDim.x) * t.row_lanes;
  for (int64_t r = int64_t(blockIdx.x) * t.row_lanes + t.lane_row(); r < t.rows; r += step * kUnroll) {
    Pack<scalar_t, V> a[kUnroll], b[kUnroll], c[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t row = r + u * step;
      if (row >= t.rows) break;
      a[u] = load_pack<scalar_t, V>(x1, ld1, row, col);
      if (x2 != nullptr) b[u] = load_pack<scalar_t, V>(x2, ld2, row, col);
      if (accumulate) c[u] = load_pack<scalar_t, V>(out, ldo, row, col);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t row = r + u * step;
      if (row >= t.rows) break;
      Pack<scalar_t, V> o;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        acc_t value = accumulate ? static_cast<acc_t>(c[u].v[v]) : acc_t(0);
        value += ch1[v].apply(static_cast<acc_t>(a[u].v[v]));
        if (x2 != nullptr) value += ch2[v].apply(static_cast<acc_t>(b[u].v[v]));
        o.v[v] = static_cast<scalar_t>(value);
      }
      store_pack<scalar_t, V>(out, ldo, row, col, o);
    }
  }
}

}  // namespace
}  // namespace cuda

using namespace cuda;

void column_stats_cuda(const at::Tensor& x, const Norm& stats) {
  const int64_t rows = x.size(0), cols = x.size(1);
  check_matrix(x, "column_stats", "x", rows, cols, x.scalar_type());
  TORCH_CHECK(rows > 0, "gunn_ext: column_stats: x must have at least one row, got ", x.sizes());
  if (cols == 0) return;
  const DeviceScope scope(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "column_stats_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    acc_t* mean_out = run_of<acc_t>(stats, stats.mean, cols, "column_stats", "mean");
    acc_t* var_out = run_of<acc_t>(stats, stats.var, cols, "column_stats", "var");
    const int vec = vector_width<scalar_t>({&x});
    with_vector_width<scalar_t>(vec, [&](auto width) {
      constexpr int V = decltype(width)::value;
      const Tiling t = make_tiling(rows, cols, V);
      const int64_t chunk = chunk_rows(t), chunks = (rows + chunk - 1) / chunk;
      at::Tensor workspace = partials_workspace(x, cols * chunks, sizeof(Welford<acc_t>));
      auto* partials = reinterpret_cast<Welford<acc_t>*>(workspace.data_ptr());
      const dim3 grid(static_cast<unsigned>(chunks), column_tiles(t));
      launch(column_moments_kernel<scalar_t, V>, grid, kThreads,
             kThreads * V * sizeof(Welford<acc_t>), scope.stream(), x.const_data_ptr<scalar_t>(),
             x.stride(0), t, chunk, next_pow2(t.row_lanes), partials, chunks);
      launch(combine_partials_kernel<Welford<acc_t>, WelfordCombine<acc_t>, WriteMoments<acc_t>>,
             static_cast<unsigned>(cols), kThreads, 0, scope.stream(), partials, chunks,
             Welford<acc_t>{0, 0, 0}, WelfordCombine<acc_t>{}, WriteMoments<acc_t>{mean_out, var_out});
    });
  });
}

void bn_relu_cuda(const at::Tensor& x, const Norm& norm, const at::Tensor& out) {
  const int64_t rows = x.size(0), cols = x.size(1);
  check_matrix(x, "bn_relu", "x", rows, cols, x.scalar_type());
  check_matrix(out, "bn_relu", "out", rows, cols, x.scalar_type());
  if (rows == 0 || cols == 0) return;
  const DeviceScope scope(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_cuda", [&] {
    const auto params = norm_params<acc_type<scalar_t>>(norm, cols, "bn_relu");
    with_vector_width<scalar_t>(vector_width<scalar_t>({&x, &out}), [&](auto width) {
      constexpr int V = decltype(width)::value;
      const Tiling t = make_tiling(rows, cols, V);
      launch(bn_relu_kernel<scalar_t, V>, elementwise_grid(t), kThreads, 0, scope.stream(),
             x.const_data_ptr<scalar_t>(), x.stride(0), out.data_ptr<scalar_t>(), out.stride(0),
             params, t);
    });
  });
}

void bn_add_cuda(const at::Tensor& out, bool accumulate, const at::Tensor& x1, const Norm& norm1,
                 const at::Tensor& x2, const Norm* norm2) {
  const int64_t rows = out.size(0), cols = out.size(1);
  check_matrix(out, "bn_add", "out", rows, cols, out.scalar_type());
  check_matrix(x1, "bn_add", "x1", rows, cols, out.scalar_type());
  if (x2.defined()) check_matrix(x2, "bn_add", "x2", rows, cols, out.scalar_type());
  TORCH_CHECK(x2.defined() || norm2 == nullptr, "gunn_ext: bn_add: norm2 given without x2");
  if (rows == 0 || cols == 0) return;
  const DeviceScope scope(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "bn_add_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto params1 = norm_params<acc_t>(norm1, cols, "bn_add");
    const auto params2 = norm2 ? norm_params<acc_t>(*norm2, cols, "bn_add") : params1;
    with_vector_width<scalar_t>(vector_width<scalar_t>({&out, &x1, &x2}), [&](auto width) {
      constexpr int V = decltype(width)::value;
      const Tiling t = make_tiling(rows, cols, V);
      launch(bn_add_kernel<scalar_t, V>, elementwise_grid(t), kThreads, 0, scope.stream(),
             out.data_ptr<scalar_t>(), out.stride(0), accumulate, x1.const_data_ptr<scalar_t>(),
             x1.stride(0), params1, x2.defined() ? x2.const_data_ptr<scalar_t>() : nullptr,
             x2.defined() ? x2.stride(0) : 0, norm2 != nullptr, params2, t);
    });
  });
}

}  // namespace gunn_ext
