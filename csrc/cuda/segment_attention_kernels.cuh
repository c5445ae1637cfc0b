// Device side of the CUDA segment-attention kernels: one warp per (batch, head, token) row, the head dim spread
// across the 32 lanes (EPL elements per lane), dot products reduced with butterfly shuffles so every lane holds
// the full score. Heartbeat rows walk at most a dozen keys, so a row per warp keeps every lane busy without the
// tile padding a matrix-unit kernel would need. Rows of one block are consecutive tokens of one head, so they
// mostly share a segment run and its K/V rows stay in L1.
//
// Every output element is written by exactly one warp, with a fixed key order and no atomics: deterministic.
#pragma once

#include "segment_attention_rows.cuh"

namespace clear_kernels {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 4;

struct WarpLanes {
  static constexpr int kWidth = kWarpSize;
  int lane;
  __device__ __forceinline__ float sum(float x) const {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
  }
};

// The row of this warp, or -1 past the end. A whole warp leaves together, so the full-mask shuffles stay valid.
__device__ __forceinline__ int64_t warp_row(int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  return row < rows ? row : -1;
}

template <typename T, int EPL>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarpSize)
    segment_attention_forward_kernel(const ForwardArgs<T> args, int64_t rows) {
  const int64_t row = warp_row(rows);
  if (row < 0) return;
  forward_row<EPL>(args, row, WarpLanes{static_cast<int>(threadIdx.x % kWarpSize)});
}

template <typename T, int EPL>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarpSize)
    segment_attention_grad_query_kernel(const BackwardArgs<T> args, int64_t rows) {
  const int64_t row = warp_row(rows);
  if (row < 0) return;
  grad_query_row<EPL>(args, row, WarpLanes{static_cast<int>(threadIdx.x % kWarpSize)});
}

template <typename T, int EPL>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarpSize)
    segment_attention_grad_key_kernel(const BackwardArgs<T> args, int64_t rows) {
  const int64_t row = warp_row(rows);
  if (row < 0) return;
  grad_key_row<EPL>(args, row, WarpLanes{static_cast<int>(threadIdx.x % kWarpSize)});
}

}  // namespace cuda
}  // namespace clear_kernels
