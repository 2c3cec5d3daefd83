// Direct 3x3 convolutions of narrow channels_last activations on the GPU
// (fused_kernels.h: conv3x3, conv3x3_backward), the arithmetic of
// csrc/cpu/conv3x3_cpu.cpp: with p a pixel, t = (ky, kx) a tap and
// d_t = (ky - 1, kx - 1), zero outside the image,
//   out[p, co] = sum_t sum_ci x[p + d_t, ci] w[co, ci, t]
//   dx[p, ci]  = sum_t sum_co dy[p - d_t, co] w[co, ci, t]
//   dw[co, ci, t] = sum_p dy[p, co] x[p + d_t, ci]
// One thread computes all channels of an output pixel, from the weights
// staged in shared memory. The weight gradient is reduced deterministically:
// block b sums the fixed pixel chunk b into a partial per weight, and a second
// kernel adds the partials in chunk order.
#include "column_kernels.cuh"
#include "fused_kernels_cuda.h"

namespace gunn_ext {
namespace cuda {
namespace {

constexpr int kConvThreads = 128;
constexpr int64_t kMaxConvBlocks = 8192;
constexpr int64_t kMaxWeightChunks = 256;
constexpr int64_t kMinChunkPixels = 256;


// out[p, b] = sum_t sum_a in[p + sign d_t, a] taps[t][a][b] for every pixel p:
// the forward (a = ci, b = co, sign 1) and the input gradient (a = co,
// b = ci, sign -1). w is [cout, cin, 3, 3], contiguous.
template <typename scalar_t>
__global__ void __launch_bounds__(kConvThreads)
    correlate_kernel(const scalar_t* in, int64_t ld_in, const scalar_t* w, int cin, int cout,
                     bool transposed, Image s, scalar_t* out, int64_t ld_out) {
  using acc_t = acc_type<scalar_t>;
  const int a_n = transposed ? cout : cin, b_n = transposed ? cin : cout;
  acc_t* taps = dynamic_shared_memory<acc_t>();  // [9][a_n][b_n]
  for (int k = threadIdx.x; k < 9 * cin * cout; k += blockDim.x) {
    const int t = k % 9, ci = (k / 9) % cin, co = k / (9 * cin);
    const int a = transposed ? co : ci, b = transposed ? ci : co;
    taps[(t * a_n + a) * b_n + b] = static_cast<acc_t>(w[k]);
  }
  __syncthreads();
  const int64_t sign = transposed ? -1 : 1;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < s.pixels(); p += step) {
    acc_t acc[kConvMaxChannels];
    for (int b = 0; b < b_n; ++b) acc[b] = 0;
    const Pixel here = s.at(p);
    for (int t = 0; t < 9; ++t) {
      const int64_t q = s.shifted(here, sign * (t / 3 - 1), sign * (t % 3 - 1));
      if (q < 0) continue;
      const scalar_t* v = in + q * ld_in;
      const acc_t* tap = taps + t * a_n * b_n;
      for (int a = 0; a < a_n; ++a) {
        const acc_t va = static_cast<acc_t>(v[a]);
        for (int b = 0; b < b_n; ++b) acc[b] += va * tap[a * b_n + b];
      }
    }
    scalar_t* o = out + p * ld_out;
    for (int b = 0; b < b_n; ++b) o[b] = static_cast<scalar_t>(acc[b]);
  }
}

// partials[chunk][k] = sum over the chunk's pixels p of dy[p, co] x[p + d_t, ci],
// k = (co * cin + ci) * 9 + t (w's layout); blockIdx.x is the chunk.
template <typename scalar_t>
__global__ void __launch_bounds__(kConvThreads)
    weight_partials_kernel(const scalar_t* dy, int64_t ld_dy, const scalar_t* x, int64_t ld_x,
                           int cin, int cout, Image s, int64_t chunk,
                           acc_type<scalar_t>* partials) {
  using acc_t = acc_type<scalar_t>;
  const int weights = 9 * cin * cout;
  const int k = blockIdx.y * blockDim.x + threadIdx.x;
  if (k >= weights) return;
  const int t = k % 9, ci = (k / 9) % cin, co = k / (9 * cin);
  const int64_t begin = int64_t(blockIdx.x) * chunk;
  const int64_t end = begin + chunk < s.pixels() ? begin + chunk : s.pixels();
  partials[int64_t(blockIdx.x) * weights + k] =
      tap_product<acc_t>(s, begin, end, t, dy, ld_dy, co, x, ld_x, ci);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kConvThreads)
    combine_weight_partials_kernel(const acc_type<scalar_t>* partials, int64_t chunks,
                                   int weights, scalar_t* dw) {
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= weights) return;
  acc_type<scalar_t> sum = 0;
  for (int64_t c = 0; c < chunks; ++c) sum += partials[c * weights + k];
  dw[k] = static_cast<scalar_t>(sum);
}

int blocks_for(int64_t items, int threads, int64_t cap) {
  return static_cast<int>(std::max<int64_t>(1, std::min((items + threads - 1) / threads, cap)));
}

template <typename scalar_t>
void correlate(const at::Tensor& in, const at::Tensor& w, bool transposed, const ImageShape& s,
               const at::Tensor& out, cudaStream_t stream) {
  const int cout = static_cast<int>(w.size(0)), cin = static_cast<int>(w.size(1));
  TORCH_CHECK(cout <= kConvMaxChannels && cin <= kConvMaxChannels,
              "gunn_ext: direct 3x3 convolution takes at most ", kConvMaxChannels,
              " channels, got weight ", w.sizes());
  const int64_t pixels = s.rows();
  const size_t shared = size_t(9) * cin * cout * sizeof(acc_type<scalar_t>);
  launch(correlate_kernel<scalar_t>, dim3(blocks_for(pixels, kConvThreads, kMaxConvBlocks)),
         dim3(kConvThreads), shared, stream, in.const_data_ptr<scalar_t>(), in.stride(0),
         w.const_data_ptr<scalar_t>(), cin, cout, transposed, image_of(s),
         out.data_ptr<scalar_t>(), out.stride(0));
}

template <typename scalar_t>
void weight_grad(const at::Tensor& dy, const at::Tensor& x, const ImageShape& s,
                 const at::Tensor& dw, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const int cout = static_cast<int>(dw.size(0)), cin = static_cast<int>(dw.size(1));
  const int weights = 9 * cin * cout;
  const int64_t pixels = s.rows();
  // A function of the shape only, so the sums are the same on every GPU.
  const int64_t chunk =
      std::max(kMinChunkPixels, (pixels + kMaxWeightChunks - 1) / kMaxWeightChunks);
  const int64_t chunks = (pixels + chunk - 1) / chunk;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  at::Tensor partials = at::empty({chunks, weights}, dy.options().dtype(acc_dtype));
  const unsigned weight_tiles = (weights + kConvThreads - 1) / kConvThreads;
  launch(weight_partials_kernel<scalar_t>, dim3(chunks, weight_tiles), dim3(kConvThreads), 0,
         stream, dy.const_data_ptr<scalar_t>(), dy.stride(0), x.const_data_ptr<scalar_t>(),
         x.stride(0), cin, cout, image_of(s), chunk, partials.data_ptr<acc_t>());
  launch(combine_weight_partials_kernel<scalar_t>, dim3(weight_tiles), dim3(kConvThreads), 0,
         stream, partials.const_data_ptr<acc_t>(), chunks, weights, dw.data_ptr<scalar_t>());
}

}  // namespace
}  // namespace cuda

void conv3x3_cuda(const at::Tensor& x, const at::Tensor& w, const ImageShape& s,
                  const at::Tensor& out) {
  const cuda::DeviceScope scope(x);
  const at::Tensor dense = w.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv3x3_cuda", [&] {
    cuda::correlate<scalar_t>(x, dense, false, s, out, scope.stream());
  });
}

void conv3x3_backward_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                           const ImageShape& s, const at::Tensor& dx, const at::Tensor& dw) {
  const cuda::DeviceScope scope(x);
  const at::Tensor dense = w.contiguous();
  TORCH_CHECK(dw.is_contiguous(), "gunn_ext: conv3x3_backward: dw must be contiguous");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv3x3_backward_cuda", [&] {
    cuda::correlate<scalar_t>(dy, dense, true, s, dx, scope.stream());
    cuda::weight_grad<scalar_t>(dy, x, s, dw, scope.stream());
  });
}

}  // namespace gunn_ext
