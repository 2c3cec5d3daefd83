// The delayed updates' in-block terms as pushes on the CPU (fused_kernels.h:
// push_updates). Segment k's update of its columns, delta_k = (updated -
// original)[:, c_k], reaches the first-GEMM outputs of the block's later
// segments as
//   pre[:, offsets[k + 1]:] += delta_k W[offsets[k + 1]:, c_k]^T
// one row at a time: a row of pre is contiguous, so the inner loop runs
// along its outputs and vectorises, and the rows split over the threads.
// No library call, no copy of the block's columns; the arithmetic is that
// of the product over the block's columns it replaces.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

#include "fused_kernels_cpu.h"

namespace gunn_ext {

void push_updates_cpu(const at::Tensor& pre, const at::Tensor& updated, const at::Tensor& original,
                      const at::Tensor& weight, const BlockSegments& block, int64_t from,
                      int64_t to) {
  TORCH_CHECK(pre.is_contiguous() && weight.is_contiguous(),
              "gunn_ext: push_updates: pre and weight must be contiguous");
  const int64_t rows = pre.size(0), F = pre.size(1), N = weight.size(1);
  const auto starts = block.starts, offsets = block.offsets;
  AT_DISPATCH_FLOATING_TYPES(pre.scalar_type(), "push_updates", [&] {
    // W[f, c] for every pushed column c and later output f, contiguous in f:
    // the pushes' weights in the order the row loop reads them.
    std::vector<scalar_t> packed;
    int64_t work = 0;
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    for (int64_t k = from; k < to; ++k) {
      for (int64_t c = starts[k]; c < starts[k + 1]; ++c) {
        for (int64_t f = offsets[k + 1]; f < F; ++f) packed.push_back(w[f * N + c]);
      }
      work += (starts[k + 1] - starts[k]) * (F - offsets[k + 1]);
    }
    const Mat up = mat_of(updated), orig = mat_of(original);
    scalar_t* p = pre.data_ptr<scalar_t>();
    at::parallel_for(0, rows, task_grain(work), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* u = up.ptr<scalar_t>() + r * up.ld;
        const scalar_t* o = orig.ptr<scalar_t>() + r * orig.ld;
        const scalar_t* wk = packed.data();
        for (int64_t k = from; k < to; ++k) {
          scalar_t* out = p + r * F + offsets[k + 1];
          const int64_t outputs = F - offsets[k + 1];
          for (int64_t c = starts[k]; c < starts[k + 1]; ++c, wk += outputs) {
            const scalar_t delta = u[c] - o[c];
            for (int64_t f = 0; f < outputs; ++f) out[f] += delta * wk[f];
          }
        }
      }
    });
  });
}

}  // namespace gunn_ext
