// Building blocks of the CUDA fused kernels: every kernel walks a [rows, C]
// matrix (unit column stride, row stride ld) with the same thread layout.
//
// The columns, in packs of V adjacent values loaded as one vector, are split
// into tiles of at most kThreads packs (one tile per blockIdx.y). A block of
// kThreads threads gives each thread one pack column of its tile and one of
// `row_lanes = kThreads / tile` row lanes, so a warp reads whole rows: the
// accesses are coalesced for any C, and no thread ever divides an index.
//
// Column reductions are deterministic without atomics: block b reduces the
// fixed row chunk b into a per-column partial (a tree over its row lanes, in a
// fixed order), and a second kernel combines the partials of each column in
// chunk order. The chunking depends only on the shape, dtype and alignment.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <initializer_list>
#include <type_traits>

#include "../bn_math.h"
#include "../fused_kernels.h"
#include "device_runtime.cuh"
#include "fused_kernels_cuda.h"

namespace gunn_ext {
namespace cuda {

constexpr int kThreads = 256;
// Rows each thread loads before it uses any of them (memory-level parallelism).
constexpr int kUnroll = 4;
// Column reductions: each row chunk gives every thread about this many rows,
// and there are at most kMaxChunks chunks (partials to combine per column).
constexpr int kRowsPerThread = 8;
constexpr int64_t kMaxChunks = 1024;
constexpr int64_t kMaxElementwiseBlocks = 8192;

// float accumulation for float, half and bfloat16; double for double.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// The thread layout described above, for V-wide packs.
struct Tiling {
  int64_t rows;
  int cols_v;     // pack columns
  int tile;       // pack columns per block tile
  int row_lanes;  // rows a block touches at once

  __device__ int lane_row() const { return threadIdx.x / tile; }
  __device__ int col_v() const { return blockIdx.y * tile + threadIdx.x % tile; }
  __device__ bool active() const { return lane_row() < row_lanes && col_v() < cols_v; }
};

inline Tiling make_tiling(int64_t rows, int64_t cols, int vec) {
  const int cols_v = static_cast<int>(cols / vec);
  const int tile = std::min(cols_v, kThreads);
  return {rows, cols_v, tile, kThreads / tile};
}

inline int column_tiles(const Tiling& t) { return (t.cols_v + t.tile - 1) / t.tile; }

inline dim3 elementwise_grid(const Tiling& t) {
  const int64_t per_block = int64_t(t.row_lanes) * kUnroll;
  const int64_t blocks = std::min((t.rows + per_block - 1) / per_block, kMaxElementwiseBlocks);
  return dim3(static_cast<unsigned>(std::max<int64_t>(blocks, 1)), column_tiles(t));
}

// Rows per reduction chunk: a function of the shape only, never of the GPU.
inline int64_t chunk_rows(const Tiling& t) {
  const int64_t by_cap = (t.rows + kMaxChunks - 1) / kMaxChunks;
  return std::max<int64_t>(int64_t(t.row_lanes) * kRowsPerThread, by_cap);
}

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* base, int64_t ld, int64_t row, int col_v) {
  return load_aligned<Pack<T, V>>(base + row * ld + int64_t(col_v) * V);
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* base, int64_t ld, int64_t row, int col_v,
                                           const Pack<T, V>& p) {
  store_aligned(base + row * ld + int64_t(col_v) * V, p);
}

// Device view of a Norm: per-channel parameters in the accumulation type.
template <typename acc_t>
struct NormParams {
  const acc_t *mean, *var, *weight, *bias;
  acc_t eps;

  __device__ BNChannel<acc_t> channel(int64_t j) const {
    return {mean[j], bn_invstd<acc_t>(var[j], eps), weight[j], bias[j]};
  }
};

// A Norm's run of `cols` channels in one of its tensors: 1-D, contiguous,
// acc_t, on the device.
template <typename acc_t>
acc_t* run_of(const Norm& run, const at::Tensor& t, int64_t cols, const char* what,
              const char* name) {
  const auto dtype = c10::CppTypeToScalarType<acc_t>::value;
  TORCH_CHECK(t.defined() && t.dim() == 1 && t.stride(0) == 1, "gunn_ext: ", what, ": ", name,
              " must be a contiguous 1-D tensor, got ", t.defined() ? t.sizes() : at::IntArrayRef{});
  TORCH_CHECK(run.length == cols && run.offset >= 0 && run.offset + cols <= t.size(0),
              "gunn_ext: ", what, ": ", name, " must have a run of ", cols,
              " entries, got entries [", run.offset, ", ", run.offset + run.length, ") of ",
              t.size(0));
  TORCH_CHECK(t.scalar_type() == dtype && t.device().type() == kDevice, "gunn_ext: ", what, ": ",
              name, " must be a ", kDevice, " ", dtype, " tensor, got ", t.scalar_type(), " on ",
              t.device());
  return run.data<acc_t>(t);
}

template <typename acc_t>
NormParams<acc_t> norm_params(const Norm& norm, int64_t cols, const char* what) {
  return {run_of<acc_t>(norm, norm.mean, cols, what, "the BN mean"),
          run_of<acc_t>(norm, norm.var, cols, what, "the BN variance"),
          run_of<acc_t>(norm, norm.weight, cols, what, "the BN weight"),
          run_of<acc_t>(norm, norm.bias, cols, what, "the BN bias"), static_cast<acc_t>(norm.eps)};
}

// A [rows, cols] operand: unit column stride, on the GPU, of the given dtype.
inline void check_matrix(const at::Tensor& t, const char* what, const char* name, int64_t rows,
                         int64_t cols, at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols,
              "gunn_ext: ", what, ": ", name, " must have shape [", rows, ", ", cols, "], got ",
              t.sizes());
  TORCH_CHECK(t.stride(1) == 1 || cols == 1, "gunn_ext: ", what, ": ", name,
              " must have unit column stride, got strides ", t.strides());
  TORCH_CHECK(t.scalar_type() == dtype, "gunn_ext: ", what, ": ", name, " must be ", dtype,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.device().type() == kDevice, "gunn_ext: ", what, ": ", name, " must be on ",
              kDevice, ", got ", t.device());
}

inline bool fits_vector(const at::Tensor& t, int vec) {
  const auto bytes = static_cast<uintptr_t>(vec) * t.element_size();
  return t.size(1) % vec == 0 && (t.size(0) <= 1 || t.stride(0) % vec == 0) &&
         reinterpret_cast<uintptr_t>(t.const_data_ptr()) % bytes == 0;
}

// The widest pack (16 bytes, then 2 values, then 1) every operand allows.
template <typename scalar_t>
int vector_width(std::initializer_list<const at::Tensor*> operands) {
  constexpr int widest = 16 / sizeof(scalar_t);
  for (int vec : {widest, 2}) {
    if (vec > widest) continue;
    bool ok = true;
    for (const at::Tensor* t : operands) ok = ok && (!t->defined() || fits_vector(*t, vec));
    if (ok) return vec;
  }
  return 1;
}

// Calls body(std::integral_constant<int, V>{}) for the runtime width `vec`.
template <typename scalar_t, typename Body>
void with_vector_width(int vec, Body&& body) {
  constexpr int widest = 16 / sizeof(scalar_t);
  if (vec == widest) {
    body(std::integral_constant<int, widest>{});
  } else if (vec == 2) {
    if constexpr (widest > 2) body(std::integral_constant<int, 2>{});
  } else {
    body(std::integral_constant<int, 1>{});
  }
}

__host__ __device__ inline int next_pow2(int v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Tree over the block's row lanes, in a fixed order. Each thread passes its
// V states; row lane 0 then writes its columns' totals for this chunk to
// partials[column][chunk] ([cols][chunks] layout, column = col * V + v).
// All threads of the block must call it.
template <int V, typename State, typename Combine>
__device__ void reduce_chunk(const Tiling& t, const State (&mine)[V], State* smem,
                             int lanes_pow2, Combine combine, State* partials, int col,
                             int64_t chunks) {
  const int tid = threadIdx.x;
#pragma unroll
  for (int v = 0; v < V; ++v) smem[tid * V + v] = mine[v];
  __syncthreads();
  const int lane = t.lane_row();
  for (int stride = lanes_pow2 / 2; stride > 0; stride /= 2) {
    if (t.active() && lane < stride && lane + stride < t.row_lanes) {
#pragma unroll
      for (int v = 0; v < V; ++v)
        smem[tid * V + v] = combine(smem[tid * V + v], smem[(tid + stride * t.tile) * V + v]);
    }
    __syncthreads();
  }
  if (t.active() && lane == 0) {
#pragma unroll
    for (int v = 0; v < V; ++v)
      partials[(int64_t(col) * V + v) * chunks + blockIdx.x] = smem[tid * V + v];
  }
}

// Combines the [cols][chunks] partials of one column per block, in chunk
// order per thread, then in a fixed tree across threads; calls
// finish(column, total) on thread 0.
template <typename State, typename Combine, typename Finish>
__global__ void combine_partials_kernel(const State* partials, int64_t chunks, State identity,
                                        Combine combine, Finish finish) {
  GUNN_SHARED_ARRAY(State, smem, kThreads);
  const int64_t col = blockIdx.x;
  State s = identity;
  for (int64_t k = threadIdx.x; k < chunks; k += kThreads) s = combine(s, partials[col * chunks + k]);
  smem[threadIdx.x] = s;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) smem[threadIdx.x] = combine(smem[threadIdx.x], smem[threadIdx.x + stride]);
    __syncthreads();
  }
  if (threadIdx.x == 0) finish(col, smem[0]);
}

// Count, mean and sum of squared deviations of a run of values.
template <typename acc_t>
struct Welford {
  acc_t mean, m2;
  int64_t n;
};

// Chan et al.'s pairwise update: exact for any split of the values.
template <typename acc_t>
struct WelfordCombine {
  __device__ Welford<acc_t> operator()(const Welford<acc_t>& a, const Welford<acc_t>& b) const {
    if (b.n == 0) return a;
    if (a.n == 0) return b;
    const int64_t n = a.n + b.n;
    const acc_t fraction_b = static_cast<acc_t>(b.n) / static_cast<acc_t>(n);
    const acc_t delta = b.mean - a.mean;
    return {a.mean + delta * fraction_b, a.m2 + b.m2 + delta * delta * static_cast<acc_t>(a.n) * fraction_b,
            n};
  }
};

// A pixel (a row of the [rows, C] matrix) and its column x and row y in its image.
struct Pixel {
  int64_t p, x, y;
};

// A channels_last image's pixels as the rows of its [rows, C] matrix. A
// pixel's coordinates take two 64-bit divisions, which cost more than a
// narrow unit's arithmetic: they are found once per pixel (at) or stepped
// (next), not once per 3x3 tap.
struct Image {
  int64_t batch, height, width;

  __device__ int64_t pixels() const { return batch * height * width; }
  __device__ Pixel at(int64_t p) const { return {p, p % width, (p / width) % height}; }
  // The pixel after `a` in row order.
  __device__ Pixel next(Pixel a) const {
    ++a.p;
    if (++a.x == width) {
      a.x = 0;
      if (++a.y == height) a.y = 0;
    }
    return a;
  }
  // The pixel at offset (dy, dx) from `a`, or -1 outside the image.
  __device__ int64_t shifted(const Pixel& a, int64_t dy, int64_t dx) const {
    const int64_t x = a.x + dx, y = a.y + dy;
    if (x < 0 || x >= width || y < 0 || y >= height) return -1;
    return a.p + dy * width + dx;
  }
};

inline Image image_of(const ImageShape& s) { return {s.batch, s.height, s.width}; }

// Operands loaded together before any is used (one memory latency per batch,
// not per operand): the rows of a pixel range, or a row's block columns.
constexpr int kRowBatch = 8;

// sum over the pixels p in [begin, end), in order, of dy[p, co] x[p + d_t, ci]
// (no term where p + d_t is outside the image): a 3x3's weight gradient at
// tap t over a range of pixels.
template <typename acc_t, typename scalar_t>
__device__ acc_t tap_product(const Image& s, int64_t begin, int64_t end, int t, const scalar_t* dy,
                             int64_t ld_dy, int co, const scalar_t* x, int64_t ld_x, int ci) {
  acc_t acc = 0;
  Pixel here = s.at(begin);
  while (here.p < end) {
    // Past the range or outside the image: no term (acc + 0 * 0 == acc).
    acc_t a[kRowBatch], b[kRowBatch];
#pragma unroll
    for (int i = 0; i < kRowBatch; ++i) {
      a[i] = b[i] = 0;
      if (here.p >= end) continue;
      const int64_t q = s.shifted(here, t / 3 - 1, t % 3 - 1);
      if (q >= 0) {
        a[i] = static_cast<acc_t>(dy[here.p * ld_dy + co]);
        b[i] = static_cast<acc_t>(x[q * ld_x + ci]);
      }
      here = s.next(here);
    }
#pragma unroll
    for (int i = 0; i < kRowBatch; ++i) acc += a[i] * b[i];
  }
  return acc;
}

inline at::Tensor partials_workspace(const at::Tensor& like, int64_t count, size_t state_bytes) {
  return at::empty({static_cast<int64_t>(count * state_bytes)}, like.options().dtype(at::kByte));
}

}  // namespace cuda
}  // namespace gunn_ext
