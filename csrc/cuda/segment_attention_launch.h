// Host-side interface of the CUDA segment-attention kernels: raw pointers, sizes and a stream, so that the
// PyTorch glue (segment_attention_cuda.cpp) is compiled by the host compiler and the kernels (.cu) need nothing but
// the CUDA toolkit.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace clear_kernels {
namespace cuda {

enum class ScalarKind { kFloat32, kFloat16, kBFloat16 };

// Raw views of the SegmentLayout index tensors (int32, contiguous; see clear_kernels/layout.py).
struct LayoutView {
  const int32_t* segment;          // [B, L]
  const int32_t* group;            // [B, L]
  const int32_t* seg_start;        // [B, L]
  const int32_t* seg_end;          // [B, L]
  const int32_t* group_index;      // [B, L]
  const int32_t* group_offsets;    // [B, G + 1]
  const int32_t* summary_index;    // [B, S] (S may be 0)
  const int32_t* summary_offsets;  // [B, G + 1]
  int num_groups;                  // G
  int max_summary;                 // S
};

// The largest head dim the kernels handle (8 elements per lane of a warp).
constexpr int kMaxHeadDim = 256;

// out and lse ([B, H, L], natural log) for q of shape [B, H, L, D] and k, v of shape [B, H_kv, L, D] (H_kv =
// kv_heads divides H: grouped-query attention), contiguous, all of `kind`; `causal`: causal inside each segment.
// Returns the launch error, if any (cudaErrorInvalidValue for a head dim outside [1, kMaxHeadDim] or H_kv not
// dividing H).
cudaError_t launch_segment_attention_forward(
    ScalarKind kind, const void* q, const void* k, const void* v, void* out, float* lse, const LayoutView& layout,
    int batch, int heads, int kv_heads, int length, int head_dim, float scale, bool causal, cudaStream_t stream);

// grad_q, grad_k, grad_v from grad_out and the forward's out and lse. `delta` is a float32 workspace of
// B * H * L elements. Two kernels on `stream`: dq (and delta) per query row, then dk and dv per key row.
// grad_k and grad_v have the shape of k.
cudaError_t launch_segment_attention_backward(
    ScalarKind kind, const void* grad_out, const void* q, const void* k, const void* v, const void* out,
    const float* lse, float* delta, void* grad_q, void* grad_k, void* grad_v, const LayoutView& layout,
    int batch, int heads, int kv_heads, int length, int head_dim, float scale, bool causal, cudaStream_t stream);

}  // namespace cuda
}  // namespace clear_kernels
