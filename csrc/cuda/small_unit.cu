// A small update unit run whole on the GPU (fused_kernels.h: unit_forward,
// unit_backward): the math of csrc/cpu/small_unit_cpu.cpp in a fixed number
// of launches per unit, whatever its size, with no library call and no
// allocation. One bottleneck, W2 the 3x3 and W3 the last 1x1 ([n, mid]):
//
//   forward (4 launches in training, 3 or 4 in eval)
//     first       pre1 += the block's own columns (BlockTerms), and the
//                 statistics of pre1's columns                (either or both)
//     conv        act1 = relu(bn1(pre1[:, skip:])), pre2 = conv3x3(act1)
//     head        act2 = relu(bn2(pre2)), pre3 = act2 W3^T
//     residual    target += bn3(pre3) + shortcut_bn(pre1[:, :n])
//   backward from g = dL/dU, after conv and head on the same unit (5 launches)
//     out_sums    g = dL/dU + the block's later terms, bn3's and the
//                 shortcut BN's sums over g
//     out_grad    d3 = bn3'(g), d_act2 = d3 W3, bn2's sums
//     conv_grad   d2 = bn2'(d_act2), d_act1 = conv3x3^T(d2), bn1's sums
//     weight_sums dW2 = sum_p d2 act1 (per tap), dW3 = d3^T act2, per row chunk
//     input_grad  d1 = [shortcut_bn'(g), bn1'(d_act1)], dW2 and dW3
//
// One thread runs one row (pixel) at a time over all of the unit's channels,
// so BN, ReLU, the 1x1 and the 3x3 (which re-applies the previous BN + ReLU to
// its neighbours rather than reading them back) fuse into the passes above.
// Every column reduction is deterministic without atomics: block b reduces
// the fixed row chunk b (a function of the shape only) into a partial, and
// every block of the next launch combines the partials (all of its threads,
// in an order fixed by the shape: combine_chunks) before it uses the totals;
// block 0 also stores them (the batch statistics and the BN parameter
// gradients). input_grad's blocks split the combining of dW2's and dW3's
// partials between them.
#include "column_kernels.cuh"
#include "fused_kernels_cuda.h"

namespace gunn_ext {
namespace cuda {
namespace {

constexpr int kUnitThreads = 128;
// Each row chunk gives every thread about this many rows (one thread per row
// up to 65536 rows: a unit's arithmetic per row is serial in its thread, so
// the rows are spread as widely as the chunks allow); at most kUnitMaxChunks
// chunks (partials each consumer block combines, a share per thread).
constexpr int kUnitRowsPerThread = 1;
constexpr int64_t kUnitMaxChunks = 512;
// The widest unit: mid (and so n) at most the direct 3x3's channels.
constexpr int kMaxMid = static_cast<int>(kConvMaxChannels);
constexpr int kMaxFirst = 2 * kMaxMid;  // the shortcut's n and bn1's mid

// The fixed row chunks of a unit's reductions, one per block.
struct Chunks {
  int64_t rows, size, count;

  __device__ int64_t begin(int64_t k) const { return k * size; }
  __device__ int64_t end(int64_t k) const { return min(rows, (k + 1) * size); }
};

Chunks unit_chunks(int64_t rows) {
  const int64_t per_block = int64_t(kUnitThreads) * kUnitRowsPerThread;
  const int64_t count = std::clamp<int64_t>((rows + per_block - 1) / per_block, 1, kUnitMaxChunks);
  const int64_t size = (rows + count - 1) / count;
  return {rows, size, (rows + size - 1) / size};
}

// The workspace's partials, [chunk][entry] per kind, in acc_t values from
// the start; entries per chunk: moments 2 per column (mean, m2), sums 2 per
// column (sum dy', sum dy' xhat), and the weight gradients.
struct WorkLayout {
  int64_t first, second, third, out_sums, shortcut_sums, bn2_sums, bn1_sums, weights, total;

  static WorkLayout of(int64_t n, int64_t mid, int64_t skip, int64_t chunks) {
    WorkLayout w;
    int64_t at = 0;
    auto take = [&](int64_t per_chunk) {
      const int64_t start = at;
      at += per_chunk * chunks;
      return start;
    };
    w.first = take(2 * (skip + mid));
    w.second = take(2 * mid);
    w.third = take(2 * n);
    w.out_sums = take(2 * n);
    w.shortcut_sums = take(2 * n);
    w.bn2_sums = take(2 * mid);
    w.bn1_sums = take(2 * mid);
    w.weights = take(9 * mid * mid + n * mid);
    w.total = at;
    return w;
  }
};

// A BN run on the device: its parameters, or (grads) its sum(dy') in bias
// and sum(dy' xhat) in weight.
template <typename acc_t>
struct NormRun {
  acc_t *mean, *var, *weight, *bias;
  acc_t eps;

  __device__ BNChannel<acc_t> channel(int j, acc_t m, acc_t v) const {
    return {m, bn_invstd<acc_t>(v, eps), weight[j], bias[j]};
  }
  __device__ BNChannel<acc_t> channel(int j) const { return channel(j, mean[j], var[j]); }
};

template <typename acc_t>
NormRun<acc_t> norm_run(const Norm& norm, int64_t cols, bool parameters) {
  const char* what = "unit kernels";
  NormRun<acc_t> r{nullptr, nullptr, nullptr, nullptr, static_cast<acc_t>(norm.eps)};
  if (parameters) {
    r.mean = run_of<acc_t>(norm, norm.mean, cols, what, "a BN mean");
    r.var = run_of<acc_t>(norm, norm.var, cols, what, "a BN variance");
  }
  r.weight = run_of<acc_t>(norm, norm.weight, cols, what, parameters ? "a BN weight" : "a BN weight gradient");
  r.bias = run_of<acc_t>(norm, norm.bias, cols, what, parameters ? "a BN bias" : "a BN bias gradient");
  return r;
}

// Everything the unit kernels read and write: one argument, passed by value.
template <typename scalar_t>
struct UnitArgs {
  using acc_t = acc_type<scalar_t>;
  Image image;
  Chunks chunks;
  int n, mid, skip;
  bool training;
  scalar_t* pre1;
  int64_t ld1;
  // The block terms (BlockTerms): own columns, then later terms.
  const scalar_t *updated, *original, *block_w;
  int64_t ld_updated, ld_original, ld_block_w;
  int columns, seen;
  const scalar_t *later_d1, *later_w;
  int64_t ld_later_d1, ld_later_w;
  int later;
  // g, what the backward kernels after out_sums read: dL/dU, or the scratch's
  // [rows, n] where there are later terms.
  const scalar_t* g;
  int64_t ldg;
  const scalar_t *w2, *w3;
  scalar_t *act1, *pre2, *act2, *pre3;  // the tape: [rows, mid] x 3, [rows, n]
  scalar_t *d_act2, *d2, *d_act1, *d3, *g_sum;  // the scratch: alike, and [rows, n]
  NormRun<acc_t> first, shortcut, bn1, bn2, bn3;
  NormRun<acc_t> grad_shortcut, grad_bn1, grad_bn2, grad_bn3;
  acc_t* work;
  WorkLayout layout;

  __device__ int64_t row_begin() const { return chunks.begin(blockIdx.x) + threadIdx.x; }
  __device__ int64_t row_end() const { return chunks.end(blockIdx.x); }
  __device__ acc_t mean_of(acc_t sum) const { return sum / static_cast<acc_t>(chunks.rows); }
};

template <typename acc_t>
struct Sums {
  acc_t dy, dy_xhat;
};

template <typename acc_t>
struct AddSums {
  __device__ Sums<acc_t> operator()(const Sums<acc_t>& a, const Sums<acc_t>& b) const {
    return {a.dy + b.dy, a.dy_xhat + b.dy_xhat};
  }
};

// The block's total of every thread's v, in a fixed tree order, on every
// thread. All threads of the block must call it.
template <typename State, typename Combine>
__device__ State block_total(State v, State* smem, Combine combine) {
  const int tid = threadIdx.x;
  smem[tid] = v;
  __syncthreads();
  for (int stride = kUnitThreads / 2; stride > 0; stride /= 2) {
    if (tid < stride) smem[tid] = combine(smem[tid], smem[tid + stride]);
    __syncthreads();
  }
  const State total = smem[0];
  __syncthreads();
  return total;
}

// A thread's moments of up to C columns over its rows (one count for all).
template <typename acc_t, int C>
struct RowMoments {
  acc_t mean[C], m2[C];
  int64_t n;

  __device__ void clear(int cols) {
    n = 0;
#pragma unroll
    for (int c = 0; c < C; ++c) mean[c] = m2[c] = 0;
  }
  __device__ void add(const acc_t* v, int cols) {
    ++n;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      if (c >= cols) break;
      const acc_t delta = v[c] - mean[c];
      mean[c] += delta / static_cast<acc_t>(n);
      m2[c] += delta * (v[c] - mean[c]);
    }
  }
  // The block's moments of each column to partials[chunk][2 c + (0: mean, 1: m2)].
  __device__ void store(int cols, Welford<acc_t>* smem, acc_t* partials) const {
#pragma unroll
    for (int c = 0; c < C; ++c) {
      if (c >= cols) break;
      const Welford<acc_t> t = block_total(Welford<acc_t>{mean[c], m2[c], n}, smem, WelfordCombine<acc_t>{});
      if (threadIdx.x == 0) {
        partials[blockIdx.x * 2 * cols + 2 * c] = t.mean;
        partials[blockIdx.x * 2 * cols + 2 * c + 1] = t.m2;
      }
    }
  }
};

// A thread's sums of up to C columns over its rows.
template <typename acc_t, int C>
struct RowSums {
  Sums<acc_t> s[C];

  __device__ void clear(int cols) {
#pragma unroll
    for (int c = 0; c < C; ++c) s[c] = {0, 0};
  }
  __device__ void add(int c, acc_t dy, acc_t xhat) {
    s[c].dy += dy;
    s[c].dy_xhat += dy * xhat;
  }
  // The block's sums of each column to partials[chunk][2 c + (0: dy, 1: dy xhat)].
  __device__ void store(int cols, Sums<acc_t>* smem, acc_t* partials) const {
#pragma unroll
    for (int c = 0; c < C; ++c) {
      if (c >= cols) break;
      const Sums<acc_t> t = block_total(s[c], smem, AddSums<acc_t>{});
      if (threadIdx.x == 0) {
        partials[blockIdx.x * 2 * cols + 2 * c] = t.dy;
        partials[blockIdx.x * 2 * cols + 2 * c + 1] = t.dy_xhat;
      }
    }
  }
};

// Chunk partials are combined by the whole block: each of `cols` entries
// gets kUnitThreads / lanes threads (lanes: the power of two >= cols), which
// combine every lanes-th chunk in order and then meet in a fixed tree, so the
// order depends only on the shape. A thread's chunks are in L2: loaded
// kChunkBatch at a time before any is used, their latencies overlap instead
// of adding up.
constexpr int kChunkBatch = 8;

// The total of load(e, k) over chunks k = 0 .. count - 1 of each entry
// e < cols <= kUnitThreads, returned on thread e (identity elsewhere). smem
// holds kUnitThreads states. All threads of the block must call it. A thread
// reads back only its own slot after the last barrier, so consecutive calls
// may use the same smem without another barrier.
template <typename State, typename Load, typename Combine>
__device__ State combine_chunks(int cols, int64_t count, State identity, Load load, Combine combine,
                                State* smem) {
  const int tid = threadIdx.x, lanes = next_pow2(cols), e = tid % lanes;
  const int group = kUnitThreads / lanes;
  State s = identity;
  if (e < cols) {
    for (int64_t k0 = tid / lanes; k0 < count; k0 += int64_t(kChunkBatch) * group) {
      State v[kChunkBatch];
#pragma unroll
      for (int j = 0; j < kChunkBatch; ++j) {
        const int64_t k = k0 + int64_t(j) * group;
        if (k < count) v[j] = load(e, k);
      }
#pragma unroll
      for (int j = 0; j < kChunkBatch; ++j) {
        if (k0 + int64_t(j) * group < count) s = combine(s, v[j]);
      }
    }
  }
  smem[tid] = s;
  __syncthreads();
  for (int stride = kUnitThreads / 2; stride >= lanes; stride /= 2) {
    if (tid < stride) smem[tid] = combine(smem[tid], smem[tid + stride]);
    __syncthreads();
  }
  return tid < cols ? smem[tid] : identity;
}

// Mean and biased variance of `cols` columns from the chunks' moment
// partials, into mean[] and var[] (shared); block 0 also stores them in out.
// All threads of the block must call it; the caller synchronises before
// reading them.
template <typename acc_t>
__device__ void combine_moments(const acc_t* partials, int cols, const Chunks& chunks, acc_t* mean,
                                acc_t* var, const NormRun<acc_t>& out, Welford<acc_t>* smem) {
  const Welford<acc_t> s = combine_chunks(
      cols, chunks.count, Welford<acc_t>{0, 0, 0},
      [&](int c, int64_t k) {
        const acc_t* p = partials + k * 2 * cols + 2 * c;
        return Welford<acc_t>{p[0], p[1], chunks.end(k) - chunks.begin(k)};
      },
      WelfordCombine<acc_t>{}, smem);
  const int c = threadIdx.x;
  if (c >= cols) return;
  mean[c] = s.mean;
  var[c] = s.m2 / static_cast<acc_t>(s.n);
  if (blockIdx.x == 0) {
    out.mean[c] = mean[c];
    out.var[c] = var[c];
  }
}

// The same for sum partials, into sums[] (shared); block 0 stores them as
// the norm's parameter gradients.
template <typename acc_t>
__device__ void combine_sums(const acc_t* partials, int cols, int64_t chunks, Sums<acc_t>* sums,
                             const NormRun<acc_t>& grads, Sums<acc_t>* smem) {
  const Sums<acc_t> s = combine_chunks(
      cols, chunks, Sums<acc_t>{0, 0},
      [&](int c, int64_t k) {
        const acc_t* p = partials + k * 2 * cols + 2 * c;
        return Sums<acc_t>{p[0], p[1]};
      },
      AddSums<acc_t>{}, smem);
  const int c = threadIdx.x;
  if (c >= cols) return;
  sums[c] = s;
  if (blockIdx.x == 0) {
    grads.bias[c] = s.dy;
    grads.weight[c] = s.dy_xhat;
  }
}

template <typename scalar_t>
__device__ __forceinline__ acc_type<scalar_t> rounded(acc_type<scalar_t> v) {
  return static_cast<acc_type<scalar_t>>(static_cast<scalar_t>(v));
}

// pre1 += the block's own columns S[:, :columns] W^T, per row in column
// order (a batch of kRowBatch columns loaded before any is used), with the
// sums and the statistics of pre1's cols <= 2 kMid columns in registers.
template <typename scalar_t, int kMid>
__global__ void __launch_bounds__(kUnitThreads)
    unit_first_kernel(UnitArgs<scalar_t> u, bool compute_stats) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kFirst = 2 * kMid;
  GUNN_SHARED_ARRAY(acc_t, w, kFirst * kMaxBlockColumns);  // [f][c]
  GUNN_SHARED_ARRAY(Welford<acc_t>, smem, kUnitThreads);
  const int cols = u.skip + u.mid, columns = u.columns;
  for (int k = threadIdx.x; k < cols * columns; k += kUnitThreads) {
    w[k] = static_cast<acc_t>(u.block_w[(k / columns) * u.ld_block_w + k % columns]);
  }
  __syncthreads();
  RowMoments<acc_t, kFirst> m;
  m.clear(cols);
  for (int64_t r = u.row_begin(); r < u.row_end(); r += kUnitThreads) {
    acc_t v[kFirst];
#pragma unroll
    for (int f = 0; f < kFirst; ++f) v[f] = 0;
    for (int c0 = 0; c0 < columns; c0 += kRowBatch) {
      acc_t s[kRowBatch];
#pragma unroll
      for (int j = 0; j < kRowBatch; ++j) {
        const int c = c0 + j;
        s[j] = c >= columns ? acc_t(0)
                            : static_cast<acc_t>(c < u.seen ? u.updated[r * u.ld_updated + c]
                                                            : u.original[r * u.ld_original + c]);
      }
#pragma unroll
      for (int j = 0; j < kRowBatch; ++j) {
        if (c0 + j >= columns) break;
#pragma unroll
        for (int f = 0; f < kFirst; ++f) {
          if (f >= cols) break;
          v[f] += s[j] * w[f * columns + c0 + j];
        }
      }
    }
#pragma unroll
    for (int f = 0; f < kFirst; ++f) {
      if (f >= cols) break;
      const acc_t pre = static_cast<acc_t>(u.pre1[r * u.ld1 + f]);
      if (columns == 0) {
        v[f] = pre;
        continue;
      }
      v[f] = rounded<scalar_t>(pre + v[f]);
      u.pre1[r * u.ld1 + f] = static_cast<scalar_t>(v[f]);
    }
    if (compute_stats) m.add(v, cols);
  }
  if (compute_stats) m.store(cols, smem, u.work + u.layout.first);
}

// W2 ([co][ci][t]) as 9 padded kMid x kMid taps, taps[(t kMid + a) kMid + b],
// zero past mid: (a, b) = (ci, co) for the 3x3, (co, ci) for its input
// gradient. All threads of the block must call it; the caller synchronises
// before reading them.
template <int kMid, bool kByOutput, typename scalar_t, typename acc_t>
__device__ void load_padded_taps(acc_t* taps, const scalar_t* w2, int mid) {
  for (int k = threadIdx.x; k < 9 * kMid * kMid; k += kUnitThreads) taps[k] = 0;
  __syncthreads();
  for (int k = threadIdx.x; k < 9 * mid * mid; k += kUnitThreads) {
    const int t = k % 9, ci = (k / 9) % mid, co = k / (9 * mid);
    const int a = kByOutput ? co : ci, b = kByOutput ? ci : co;
    taps[(t * kMid + a) * kMid + b] = static_cast<acc_t>(w2[k]);
  }
}

template <typename scalar_t, int kMid>
__global__ void __launch_bounds__(kUnitThreads)
    unit_conv_kernel(UnitArgs<scalar_t> u, bool compute_stats) {
  using acc_t = acc_type<scalar_t>;
  GUNN_SHARED_ARRAY(acc_t, taps, 9 * kMid * kMid);  // [t][ci][co], zero for co >= mid
  GUNN_SHARED_ARRAY(acc_t, mean, kMaxFirst);
  GUNN_SHARED_ARRAY(acc_t, var, kMaxFirst);
  GUNN_SHARED_ARRAY(BNChannel<acc_t>, bn1, kMaxMid);
  GUNN_SHARED_ARRAY(Welford<acc_t>, smem, kUnitThreads);
  const int mid = u.mid, cols = u.skip + mid, tid = threadIdx.x;
  load_padded_taps<kMid, false>(taps, u.w2, mid);
  if (compute_stats) {
    combine_moments(u.work + u.layout.first, cols, u.chunks, mean, var, u.first, smem);
  } else if (tid < cols) {
    mean[tid] = u.first.mean[tid];
    var[tid] = u.first.var[tid];
  }
  __syncthreads();
  if (tid < mid) bn1[tid] = u.bn1.channel(tid, mean[u.skip + tid], var[u.skip + tid]);
  __syncthreads();
  RowMoments<acc_t, kMid> m;
  m.clear(mid);
  for (int64_t p = u.row_begin(); p < u.row_end(); p += kUnitThreads) {
    acc_t acc[kMid];
#pragma unroll
    for (int co = 0; co < kMid; ++co) acc[co] = 0;
    const Pixel here = u.image.at(p);
#pragma unroll 1
    for (int t = 0; t < 9; ++t) {
      const int64_t q = u.image.shifted(here, t / 3 - 1, t % 3 - 1);
      if (q < 0) continue;
      const scalar_t* in = u.pre1 + q * u.ld1 + u.skip;
      const acc_t* tap = taps + t * kMid * kMid;
#pragma unroll
      for (int ci = 0; ci < kMid; ++ci) {
        if (ci >= mid) break;
        const acc_t a = rounded<scalar_t>(relu(bn1[ci].apply(static_cast<acc_t>(in[ci]))));
        if (t == 4) u.act1[p * mid + ci] = static_cast<scalar_t>(a);
#pragma unroll
        for (int co = 0; co < kMid; ++co) acc[co] += a * tap[ci * kMid + co];
      }
    }
#pragma unroll
    for (int co = 0; co < kMid; ++co) {
      if (co >= mid) break;
      acc[co] = rounded<scalar_t>(acc[co]);
      u.pre2[p * mid + co] = static_cast<scalar_t>(acc[co]);
    }
    if (compute_stats) m.add(acc, mid);
  }
  if (compute_stats) m.store(mid, smem, u.work + u.layout.second);
}

template <typename scalar_t, int kMid>
__global__ void __launch_bounds__(kUnitThreads)
    unit_head_kernel(UnitArgs<scalar_t> u, bool compute_stats) {
  using acc_t = acc_type<scalar_t>;
  GUNN_SHARED_ARRAY(acc_t, w3, kMaxMid * kMaxMid);  // [o][k]
  GUNN_SHARED_ARRAY(acc_t, mean, kMaxMid);
  GUNN_SHARED_ARRAY(acc_t, var, kMaxMid);
  GUNN_SHARED_ARRAY(BNChannel<acc_t>, bn2, kMaxMid);
  GUNN_SHARED_ARRAY(Welford<acc_t>, smem, kUnitThreads);
  const int n = u.n, mid = u.mid, tid = threadIdx.x;
  for (int k = tid; k < n * mid; k += kUnitThreads) w3[k] = static_cast<acc_t>(u.w3[k]);
  if (compute_stats) {
    combine_moments(u.work + u.layout.second, mid, u.chunks, mean, var, u.bn2, smem);
  } else if (tid < mid) {
    mean[tid] = u.bn2.mean[tid];
    var[tid] = u.bn2.var[tid];
  }
  __syncthreads();
  if (tid < mid) bn2[tid] = u.bn2.channel(tid, mean[tid], var[tid]);
  __syncthreads();
  RowMoments<acc_t, kMid> m;
  m.clear(n);
  for (int64_t p = u.row_begin(); p < u.row_end(); p += kUnitThreads) {
    acc_t a[kMid], out[kMid];
#pragma unroll
    for (int k = 0; k < kMid; ++k) {
      if (k >= mid) break;
      a[k] = rounded<scalar_t>(relu(bn2[k].apply(static_cast<acc_t>(u.pre2[p * mid + k]))));
      u.act2[p * mid + k] = static_cast<scalar_t>(a[k]);
    }
#pragma unroll
    for (int o = 0; o < kMid; ++o) {
      if (o >= n) break;
      acc_t sum = 0;
#pragma unroll
      for (int k = 0; k < kMid; ++k) {
        if (k >= mid) break;
        sum += a[k] * w3[o * mid + k];
      }
      out[o] = rounded<scalar_t>(sum);
      u.pre3[p * n + o] = static_cast<scalar_t>(out[o]);
    }
    if (compute_stats) m.add(out, n);
  }
  if (compute_stats) m.store(n, smem, u.work + u.layout.third);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kUnitThreads)
    unit_residual_kernel(UnitArgs<scalar_t> u, bool compute_stats, scalar_t* target, int64_t ldt) {
  using acc_t = acc_type<scalar_t>;
  GUNN_SHARED_ARRAY(acc_t, mean, kMaxMid);
  GUNN_SHARED_ARRAY(acc_t, var, kMaxMid);
  GUNN_SHARED_ARRAY(BNChannel<acc_t>, bn3, kMaxMid);
  GUNN_SHARED_ARRAY(BNChannel<acc_t>, shortcut, kMaxMid);
  GUNN_SHARED_ARRAY(Welford<acc_t>, smem, kUnitThreads);
  const int n = u.n, tid = threadIdx.x;
  if (compute_stats) {
    combine_moments(u.work + u.layout.third, n, u.chunks, mean, var, u.bn3, smem);
  } else if (tid < n) {
    mean[tid] = u.bn3.mean[tid];
    var[tid] = u.bn3.var[tid];
  }
  __syncthreads();
  if (tid < n) {
    bn3[tid] = u.bn3.channel(tid, mean[tid], var[tid]);
    if (u.skip) shortcut[tid] = u.shortcut.channel(tid);
  }
  __syncthreads();
  if (target == nullptr) return;
  for (int64_t p = u.row_begin(); p < u.row_end(); p += kUnitThreads) {
    for (int o = 0; o < n; ++o) {
      acc_t v = static_cast<acc_t>(target[p * ldt + o]) +
                bn3[o].apply(static_cast<acc_t>(u.pre3[p * n + o]));
      if (u.skip) v += shortcut[o].apply(static_cast<acc_t>(u.pre1[p * u.ld1 + o]));
      target[p * ldt + o] = static_cast<scalar_t>(v);
    }
  }
}

template <typename scalar_t, int kMid>
__global__ void __launch_bounds__(kUnitThreads)
    unit_out_sums_kernel(UnitArgs<scalar_t> u, const scalar_t* grad, int64_t ld_grad) {
  using acc_t = acc_type<scalar_t>;
  GUNN_SHARED_ARRAY(BNChannel<acc_t>, bn3, kMaxMid);
  GUNN_SHARED_ARRAY(BNChannel<acc_t>, shortcut, kMaxMid);
  GUNN_SHARED_ARRAY(Sums<acc_t>, smem, kUnitThreads);
  const int n = u.n, tid = threadIdx.x;
  if (tid < n) {
    bn3[tid] = u.bn3.channel(tid);
    if (u.skip) shortcut[tid] = u.shortcut.channel(tid);
  }
  __syncthreads();
  RowSums<acc_t, kMid> s3, sc;
  s3.clear(n);
  sc.clear(n);
  for (int64_t p = u.row_begin(); p < u.row_end(); p += kUnitThreads) {
#pragma unroll
    for (int o = 0; o < kMid; ++o) {
      if (o >= n) break;
      acc_t dy = static_cast<acc_t>(grad[p * ld_grad + o]);
      if (u.later > 0) {
        acc_t sum = 0;
        for (int f = 0; f < u.later; ++f) {
          sum += static_cast<acc_t>(u.later_d1[p * u.ld_later_d1 + f]) *
                 static_cast<acc_t>(u.later_w[f * u.ld_later_w + o]);
        }
        dy = rounded<scalar_t>(dy + sum);
        u.g_sum[p * n + o] = static_cast<scalar_t>(dy);
      }
      s3.add(o, dy, bn3[o].xhat(static_cast<acc_t>(u.pre3[p * n + o])));
      if (u.skip) sc.add(o, dy, shortcut[o].xhat(static_cast<acc_t>(u.pre1[p * u.ld1 + o])));
    }
  }
  s3.store(n, smem, u.work + u.layout.out_sums);
  if (u.skip) sc.store(n, smem, u.work + u.layout.shortcut_sums);
}

template <typename scalar_t, int kMid>
__global__ void __launch_bounds__(kUnitThreads)
    unit_out_grad_kernel(UnitArgs<scalar_t> u) {
  using acc_t = acc_type<scalar_t>;
  GUNN_SHARED_ARRAY(acc_t, w3, kMaxMid * kMaxMid);  // [o][k]
  GUNN_SHARED_ARRAY(Sums<acc_t>, sums3, kMaxMid);
  GUNN_SHARED_ARRAY(Sums<acc_t>, shortcut_sums, kMaxMid);
  GUNN_SHARED_ARRAY(BNChannel<acc_t>, bn3, kMaxMid);
  GUNN_SHARED_ARRAY(BNChannel<acc_t>, bn2, kMaxMid);
  GUNN_SHARED_ARRAY(Sums<acc_t>, smem, kUnitThreads);
  const int n = u.n, mid = u.mid, tid = threadIdx.x;
  for (int k = tid; k < n * mid; k += kUnitThreads) w3[k] = static_cast<acc_t>(u.w3[k]);
  combine_sums(u.work + u.layout.out_sums, n, u.chunks.count, sums3, u.grad_bn3, smem);
  if (u.skip) combine_sums(u.work + u.layout.shortcut_sums, n, u.chunks.count, shortcut_sums,
                             u.grad_shortcut, smem);
  if (tid < n) bn3[tid] = u.bn3.channel(tid);
  if (tid < mid) bn2[tid] = u.bn2.channel(tid);
  __syncthreads();
  RowSums<acc_t, kMid> s2;
  s2.clear(mid);
  for (int64_t p = u.row_begin(); p < u.row_end(); p += kUnitThreads) {
    acc_t d3[kMid];
#pragma unroll
    for (int o = 0; o < kMid; ++o) {
      if (o >= n) break;
      d3[o] = rounded<scalar_t>(bn_input_grad(
          bn3[o], static_cast<acc_t>(u.g[p * u.ldg + o]), static_cast<acc_t>(u.pre3[p * n + o]),
          u.training, u.mean_of(sums3[o].dy), u.mean_of(sums3[o].dy_xhat)));
      u.d3[p * n + o] = static_cast<scalar_t>(d3[o]);
    }
#pragma unroll
    for (int k = 0; k < kMid; ++k) {
      if (k >= mid) break;
      acc_t sum = 0;
#pragma unroll
      for (int o = 0; o < kMid; ++o) {
        if (o >= n) break;
        sum += d3[o] * w3[o * mid + k];
      }
      const acc_t da = rounded<scalar_t>(sum);
      u.d_act2[p * mid + k] = static_cast<scalar_t>(da);
      const acc_t x = static_cast<acc_t>(u.pre2[p * mid + k]);
      s2.add(k, relu_backward(da, bn2[k].apply(x), true), bn2[k].xhat(x));
    }
  }
  s2.store(mid, smem, u.work + u.layout.bn2_sums);
}

template <typename scalar_t, int kMid>
__global__ void __launch_bounds__(kUnitThreads) unit_conv_grad_kernel(UnitArgs<scalar_t> u) {
  using acc_t = acc_type<scalar_t>;
  GUNN_SHARED_ARRAY(acc_t, taps, 9 * kMid * kMid);  // [t][co][ci], zero for ci >= mid
  GUNN_SHARED_ARRAY(Sums<acc_t>, sums2, kMaxMid);
  GUNN_SHARED_ARRAY(BNChannel<acc_t>, bn2, kMaxMid);
  GUNN_SHARED_ARRAY(BNChannel<acc_t>, bn1, kMaxMid);
  GUNN_SHARED_ARRAY(Sums<acc_t>, smem, kUnitThreads);
  const int mid = u.mid, tid = threadIdx.x;
  load_padded_taps<kMid, true>(taps, u.w2, mid);
  combine_sums(u.work + u.layout.bn2_sums, mid, u.chunks.count, sums2, u.grad_bn2, smem);
  if (tid < mid) {
    bn2[tid] = u.bn2.channel(tid);
    bn1[tid] = u.bn1.channel(tid);
  }
  __syncthreads();
  RowSums<acc_t, kMid> s1;
  s1.clear(mid);
  for (int64_t p = u.row_begin(); p < u.row_end(); p += kUnitThreads) {
    acc_t acc[kMid];
#pragma unroll
    for (int ci = 0; ci < kMid; ++ci) acc[ci] = 0;
    const Pixel here = u.image.at(p);
#pragma unroll 1
    for (int t = 0; t < 9; ++t) {
      const int64_t q = u.image.shifted(here, 1 - t / 3, 1 - t % 3);
      if (q < 0) continue;
      const acc_t* tap = taps + t * kMid * kMid;
#pragma unroll
      for (int co = 0; co < kMid; ++co) {
        if (co >= mid) break;
        const acc_t x = static_cast<acc_t>(u.pre2[q * mid + co]);
        const acc_t dy = relu_backward(static_cast<acc_t>(u.d_act2[q * mid + co]), bn2[co].apply(x), true);
        const acc_t d = rounded<scalar_t>(bn_input_grad(bn2[co], dy, x, u.training,
                                                        u.mean_of(sums2[co].dy),
                                                        u.mean_of(sums2[co].dy_xhat)));
        if (t == 4) u.d2[p * mid + co] = static_cast<scalar_t>(d);
#pragma unroll
        for (int ci = 0; ci < kMid; ++ci) acc[ci] += d * tap[co * kMid + ci];
      }
    }
#pragma unroll
    for (int ci = 0; ci < kMid; ++ci) {
      if (ci >= mid) break;
      const acc_t da = rounded<scalar_t>(acc[ci]);
      u.d_act1[p * mid + ci] = static_cast<scalar_t>(da);
      const acc_t x = static_cast<acc_t>(u.pre1[p * u.ld1 + u.skip + ci]);
      s1.add(ci, relu_backward(da, bn1[ci].apply(x), true), bn1[ci].xhat(x));
    }
  }
  s1.store(mid, smem, u.work + u.layout.bn1_sums);
}

// Entry k of the weight gradients: dW2 (w2's layout, [co][ci][t]), then dW3 ([o][k]).
template <typename scalar_t>
__global__ void __launch_bounds__(kUnitThreads) unit_weight_sums_kernel(UnitArgs<scalar_t> u) {
  using acc_t = acc_type<scalar_t>;
  const int mid = u.mid, convs = 9 * mid * mid, total = convs + u.n * mid;
  const int k = blockIdx.y * kUnitThreads + threadIdx.x;
  if (k >= total) return;
  const int64_t begin = u.chunks.begin(blockIdx.x), end = u.chunks.end(blockIdx.x);
  acc_t acc = 0;
  if (k < convs) {
    const int t = k % 9, ci = (k / 9) % mid, co = k / (9 * mid);
    acc = tap_product<acc_t>(u.image, begin, end, t, u.d2, mid, co, u.act1, mid, ci);
  } else {
    // The chunk's rows in order, kRowBatch pairs of operands loaded together
    // (past the chunk: no term, acc + 0 * 0 == acc).
    const int o = (k - convs) / mid, j = (k - convs) % mid;
    for (int64_t p0 = begin; p0 < end; p0 += kRowBatch) {
      acc_t a[kRowBatch], b[kRowBatch];
#pragma unroll
      for (int i = 0; i < kRowBatch; ++i) {
        const bool in = p0 + i < end;
        a[i] = in ? static_cast<acc_t>(u.d3[(p0 + i) * u.n + o]) : acc_t(0);
        b[i] = in ? static_cast<acc_t>(u.act2[(p0 + i) * mid + j]) : acc_t(0);
      }
#pragma unroll
      for (int i = 0; i < kRowBatch; ++i) acc += a[i] * b[i];
    }
  }
  u.work[u.layout.weights + int64_t(blockIdx.x) * total + k] = acc;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kUnitThreads)
    unit_input_grad_kernel(UnitArgs<scalar_t> u, scalar_t* d1, int64_t ldd, scalar_t* grad_w2,
                           scalar_t* grad_w3) {
  using acc_t = acc_type<scalar_t>;
  GUNN_SHARED_ARRAY(Sums<acc_t>, sums1, kMaxMid);
  GUNN_SHARED_ARRAY(Sums<acc_t>, sums_sc, kMaxMid);
  GUNN_SHARED_ARRAY(BNChannel<acc_t>, bn1, kMaxMid);
  GUNN_SHARED_ARRAY(BNChannel<acc_t>, shortcut, kMaxMid);
  GUNN_SHARED_ARRAY(Sums<acc_t>, smem, kUnitThreads);
  GUNN_SHARED_ARRAY(acc_t, weight_smem, kUnitThreads);
  const int n = u.n, mid = u.mid, tid = threadIdx.x;
  combine_sums(u.work + u.layout.bn1_sums, mid, u.chunks.count, sums1, u.grad_bn1, smem);
  if (tid < mid) bn1[tid] = u.bn1.channel(tid);
  if (u.skip && tid < n) {
    shortcut[tid] = u.shortcut.channel(tid);
    sums_sc[tid] = {u.grad_shortcut.bias[tid], u.grad_shortcut.weight[tid]};
  }
  __syncthreads();
  // This block's share of the weight gradients, each combined over the chunks.
  const int convs = 9 * mid * mid, total = convs + n * mid;
  const int share = (total + gridDim.x - 1) / gridDim.x;
  const int first = min(total, int(blockIdx.x) * share), last = min(total, first + share);
  for (int e0 = first; e0 < last; e0 += kUnitThreads) {
    const int cols = min(kUnitThreads, last - e0);
    const acc_t sum = combine_chunks(
        cols, u.chunks.count, acc_t(0),
        [&](int e, int64_t c) { return u.work[u.layout.weights + c * total + e0 + e]; },
        [](acc_t a, acc_t b) { return a + b; }, weight_smem);
    const int k = e0 + tid;
    if (tid >= cols) continue;
    if (k < convs) grad_w2[k] = static_cast<scalar_t>(sum);
    else grad_w3[k - convs] = static_cast<scalar_t>(sum);
  }
  for (int64_t p = u.row_begin(); p < u.row_end(); p += kUnitThreads) {
    for (int ci = 0; ci < mid; ++ci) {
      const acc_t x = static_cast<acc_t>(u.pre1[p * u.ld1 + u.skip + ci]);
      const acc_t dy = relu_backward(static_cast<acc_t>(u.d_act1[p * mid + ci]), bn1[ci].apply(x), true);
      d1[p * ldd + u.skip + ci] = static_cast<scalar_t>(bn_input_grad(
          bn1[ci], dy, x, u.training, u.mean_of(sums1[ci].dy), u.mean_of(sums1[ci].dy_xhat)));
    }
    if (!u.skip) continue;
    for (int o = 0; o < n; ++o) {
      const acc_t x = static_cast<acc_t>(u.pre1[p * u.ld1 + o]);
      d1[p * ldd + o] = static_cast<scalar_t>(
          bn_input_grad(shortcut[o], static_cast<acc_t>(u.g[p * u.ldg + o]), x, u.training,
                        u.mean_of(sums_sc[o].dy), u.mean_of(sums_sc[o].dy_xhat)));
    }
  }
}

// body(std::integral_constant<int, W>{}) for the unit width W (2, 4, 8 or 16)
// that holds mid: the kernels templated on it (conv, head, out_sums, out_grad,
// conv_grad) run their per-row loops over W columns, so a row's accumulators
// live in registers, not in local memory.
template <typename Body>
void with_unit_width(int mid, Body&& body) {
  static_assert(kMaxMid == 16, "the unit widths below cover mid <= 16");
  if (mid <= 2) body(std::integral_constant<int, 2>{});
  else if (mid <= 4) body(std::integral_constant<int, 4>{});
  else if (mid <= 8) body(std::integral_constant<int, 8>{});
  else body(std::integral_constant<int, 16>{});
}

template <typename scalar_t>
UnitArgs<scalar_t> unit_args(const SmallUnit& u) {
  using acc_t = acc_type<scalar_t>;
  TORCH_CHECK(u.mid >= 1 && u.mid <= kMaxMid && u.n >= 1 && u.n <= u.mid,
              "gunn_ext: the whole-unit kernels take 1 <= n <= mid <= ", kMaxMid,
              " channels, got n = ", u.n, " and mid = ", u.mid);
  const int64_t rows = u.shape.rows(), skip = u.shortcut ? u.n : 0, mid = u.mid;
  const Chunks chunks = unit_chunks(rows);
  auto* tape = static_cast<scalar_t*>(u.tape);
  auto* scratch = static_cast<scalar_t*>(u.scratch);
  UnitArgs<scalar_t> a{};
  a.image = image_of(u.shape);
  a.chunks = chunks;
  a.n = static_cast<int>(u.n);
  a.mid = static_cast<int>(mid);
  a.skip = static_cast<int>(skip);
  a.training = u.training;
  a.pre1 = static_cast<scalar_t*>(u.pre1.data);
  a.ld1 = u.pre1.ld;
  const BlockTerms& b = u.block;
  TORCH_CHECK(b.columns >= 0 && b.columns <= kMaxBlockColumns && b.seen >= 0 && b.seen <= b.columns,
              "gunn_ext: the whole-unit kernels take at most ", kMaxBlockColumns,
              " block columns, got ", b.columns, " (", b.seen, " seen)");
  a.updated = static_cast<const scalar_t*>(b.updated.data);
  a.original = static_cast<const scalar_t*>(b.original.data);
  a.block_w = static_cast<const scalar_t*>(b.weight);
  a.ld_updated = b.updated.ld;
  a.ld_original = b.original.ld;
  a.ld_block_w = b.weight_ld;
  a.columns = static_cast<int>(b.columns);
  a.seen = static_cast<int>(b.seen);
  a.later_d1 = static_cast<const scalar_t*>(b.later_d1.data);
  a.ld_later_d1 = b.later_d1.ld;
  a.later_w = static_cast<const scalar_t*>(b.later_weight);
  a.ld_later_w = b.later_ld;
  a.later = static_cast<int>(b.later);
  a.w2 = static_cast<const scalar_t*>(u.conv2);
  a.w3 = static_cast<const scalar_t*>(u.conv3);
  a.act1 = tape;
  a.pre2 = tape + rows * mid;
  a.act2 = tape + 2 * rows * mid;
  a.pre3 = tape + 3 * rows * mid;
  a.d_act2 = scratch;
  a.d2 = scratch + rows * mid;
  a.d_act1 = scratch + 2 * rows * mid;
  a.d3 = scratch + 3 * rows * mid;
  a.g_sum = scratch + 3 * rows * mid + rows * u.n;
  a.first = norm_run<acc_t>(u.norms.first, skip + mid, true);
  if (skip) a.shortcut = norm_run<acc_t>(u.norms.shortcut, u.n, true);
  a.bn1 = norm_run<acc_t>(u.norms.bn1, mid, true);
  a.bn2 = norm_run<acc_t>(u.norms.bn2, mid, true);
  a.bn3 = norm_run<acc_t>(u.norms.bn3, u.n, true);
  a.work = static_cast<acc_t*>(u.workspace);
  a.layout = WorkLayout::of(u.n, mid, skip, chunks.count);
  return a;
}

}  // namespace
}  // namespace cuda

using namespace cuda;

int64_t unit_workspace_bytes_cuda(const ImageShape& s, int64_t n, int64_t mid,
                                  at::ScalarType dtype) {
  const int64_t acc_bytes = dtype == at::kDouble ? 8 : 4;
  return WorkLayout::of(n, mid, n, unit_chunks(s.rows()).count).total * acc_bytes;
}

void unit_forward_cuda(const SmallUnit& unit, bool compute_stats, UnitMatrix target) {
  const DeviceScope scope(unit.device);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, unit.dtype, "unit_forward_cuda", [&] {
    const UnitArgs<scalar_t> a = unit_args<scalar_t>(unit);
    const dim3 grid(static_cast<unsigned>(a.chunks.count));
    with_unit_width(a.mid, [&](auto width) {
      constexpr int W = decltype(width)::value;
      if (compute_stats || a.columns > 0) {
        launch(unit_first_kernel<scalar_t, W>, grid, kUnitThreads, 0, scope.stream(), a, compute_stats);
      }
      launch(unit_conv_kernel<scalar_t, W>, grid, kUnitThreads, 0, scope.stream(), a, compute_stats);
      launch(unit_head_kernel<scalar_t, W>, grid, kUnitThreads, 0, scope.stream(), a, compute_stats);
      if (compute_stats || target.data != nullptr) {
        launch(unit_residual_kernel<scalar_t>, grid, kUnitThreads, 0, scope.stream(), a,
               compute_stats, static_cast<scalar_t*>(target.data), target.ld);
      }
    });
  });
}

void unit_backward_cuda(const SmallUnit& unit, UnitMatrix grad_unit, UnitMatrix d1,
                        void* grad_conv2, void* grad_conv3, const UnitNorms& grads) {
  const DeviceScope scope(unit.device);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, unit.dtype, "unit_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    UnitArgs<scalar_t> a = unit_args<scalar_t>(unit);
    if (a.skip) a.grad_shortcut = norm_run<acc_t>(grads.shortcut, a.n, false);
    a.grad_bn1 = norm_run<acc_t>(grads.bn1, a.mid, false);
    a.grad_bn2 = norm_run<acc_t>(grads.bn2, a.mid, false);
    a.grad_bn3 = norm_run<acc_t>(grads.bn3, a.n, false);
    const auto* grad = static_cast<const scalar_t*>(grad_unit.data);
    a.g = a.later > 0 ? a.g_sum : grad;
    a.ldg = a.later > 0 ? a.n : grad_unit.ld;
    const dim3 grid(static_cast<unsigned>(a.chunks.count));
    const int weights = 9 * a.mid * a.mid + a.n * a.mid;
    const dim3 weight_grid(grid.x, (weights + kUnitThreads - 1) / kUnitThreads);
    with_unit_width(a.mid, [&](auto width) {
      constexpr int W = decltype(width)::value;
      launch(unit_out_sums_kernel<scalar_t, W>, grid, kUnitThreads, 0, scope.stream(), a, grad,
             grad_unit.ld);
      launch(unit_out_grad_kernel<scalar_t, W>, grid, kUnitThreads, 0, scope.stream(), a);
      launch(unit_conv_grad_kernel<scalar_t, W>, grid, kUnitThreads, 0, scope.stream(), a);
      launch(unit_weight_sums_kernel<scalar_t>, weight_grid, kUnitThreads, 0, scope.stream(), a);
      launch(unit_input_grad_kernel<scalar_t>, grid, kUnitThreads, 0, scope.stream(), a,
             static_cast<scalar_t*>(d1.data), d1.ld, static_cast<scalar_t*>(grad_conv2),
             static_cast<scalar_t*>(grad_conv3));
    });
  });
}

}  // namespace gunn_ext
