// The first GEMMs' in-block terms of the delayed updates as pushes on the
// CPU (fused_kernels.h: push_updates). Segment k's update of its columns,
// delta_k = (updated - original)[:, c_k], reaches the first-GEMM outputs of
// the block's later segments as
//   pre[:, offsets[k + 1]:] += delta_k W[offsets[k + 1]:, c_k]^T
// one row at a time: a row of pre and a row of W^T are contiguous, so the
// inner loop runs along the outputs and vectorises, and the rows split over
// the threads. No library call, no copy of the block's columns. The sum is
// the product over the block's columns it replaces, rounded differently:
// x W^T + sum_k delta_k W_k^T instead of S W^T.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "fused_kernels_cpu.h"

namespace gunn_ext {

void push_updates_cpu(const at::Tensor& pre, const at::Tensor& updated, const at::Tensor& original,
                      const at::Tensor& own_weight, const BlockSegments& block, int64_t from,
                      int64_t to) {
  const auto starts = block.starts, offsets = block.offsets;
  const int64_t rows = pre.size(0), F = pre.size(1), begin = starts.front();
  TORCH_INTERNAL_ASSERT(pre.is_contiguous() && own_weight.is_contiguous() &&
                        updated.stride(1) == 1 && original.stride(1) == 1 &&
                        F == offsets.back() && own_weight.size(1) == F &&
                        own_weight.size(0) == starts.back() - begin &&
                        updated.scalar_type() == pre.scalar_type() &&
                        original.scalar_type() == pre.scalar_type() &&
                        own_weight.scalar_type() == pre.scalar_type());
  int64_t work = 0;
  for (int64_t k = from; k < to; ++k) work += (starts[k + 1] - starts[k]) * (F - offsets[k + 1]);
  AT_DISPATCH_FLOATING_TYPES(pre.scalar_type(), "push_updates", [&] {
    const Mat up = mat_of(updated), orig = mat_of(original);
    const scalar_t* wt = own_weight.const_data_ptr<scalar_t>();  // [c - begin][f]
    scalar_t* p = pre.data_ptr<scalar_t>();
    at::parallel_for(0, rows, task_grain(work), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* u = up.ptr<scalar_t>() + r * up.ld;
        const scalar_t* o = orig.ptr<scalar_t>() + r * orig.ld;
        for (int64_t k = from; k < to; ++k) {
          const int64_t later = offsets[k + 1], outputs = F - later;
          scalar_t* out = p + r * F + later;
          for (int64_t c = starts[k]; c < starts[k + 1]; ++c) {
            const scalar_t delta = u[c] - o[c];
            const scalar_t* w = wt + (c - begin) * F + later;
            for (int64_t f = 0; f < outputs; ++f) out[f] += delta * w[f];
          }
        }
      }
    });
  });
}

}  // namespace gunn_ext
