// Launchers of the CUDA segment-attention kernels: pick the element type and the per-lane width (EPL, head dim
// rounded up to a multiple of 32 from a few buckets) at run time, launch on the caller's stream, and report the
// launch error. Declared in segment_attention_launch.h.
#include <type_traits>

#include "segment_attention_kernels.cuh"

namespace clear_kernels {
namespace cuda {
namespace {

// Calls fn(std::integral_constant<int, EPL>) for the head dim's bucket (elements_per_lane).
template <typename Fn>
cudaError_t with_elements_per_lane(int head_dim, Fn&& fn) {
  if (head_dim < 1 || head_dim > kMaxHeadDim) return cudaErrorInvalidValue;
  switch (elements_per_lane(head_dim)) {
    case 1: return fn(std::integral_constant<int, 1>{});
    case 2: return fn(std::integral_constant<int, 2>{});
    case 3: return fn(std::integral_constant<int, 3>{});
    case 4: return fn(std::integral_constant<int, 4>{});
    case 6: return fn(std::integral_constant<int, 6>{});
    default: return fn(std::integral_constant<int, 8>{});
  }
}

bool grid_for(int64_t rows, dim3* grid) {
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks > 0x7fffffff) return false;
  *grid = dim3(static_cast<unsigned>(blocks));
  return true;
}

template <typename T>
cudaError_t forward_typed(const ForwardArgs<T>& args, cudaStream_t stream) {
  if (args.kv_heads < 1 || args.heads % args.kv_heads != 0) return cudaErrorInvalidValue;
  const int64_t rows = static_cast<int64_t>(args.batch) * args.heads * args.length;
  if (rows == 0) return cudaSuccess;
  dim3 grid;
  if (!grid_for(rows, &grid)) return cudaErrorInvalidConfiguration;
  return with_elements_per_lane(args.head_dim, [&](auto epl) {
    segment_attention_forward_kernel<T, decltype(epl)::value>
        <<<grid, kWarpsPerBlock * kWarpSize, 0, stream>>>(args, rows);
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t backward_typed(const BackwardArgs<T>& args, cudaStream_t stream) {
  if (args.kv_heads < 1 || args.heads % args.kv_heads != 0) return cudaErrorInvalidValue;
  const int64_t rows = static_cast<int64_t>(args.batch) * args.heads * args.length;
  const int64_t kv_rows = static_cast<int64_t>(args.batch) * args.kv_heads * args.length;  // the dk/dv pass
  if (rows == 0) return cudaSuccess;
  dim3 grid, kv_grid;
  if (!grid_for(rows, &grid) || !grid_for(kv_rows, &kv_grid)) return cudaErrorInvalidConfiguration;
  return with_elements_per_lane(args.head_dim, [&](auto epl) {
    constexpr int kEpl = decltype(epl)::value;
    // The dk/dv pass reads the delta of other rows, so it must follow the dq pass (same stream: ordered).
    segment_attention_grad_query_kernel<T, kEpl><<<grid, kWarpsPerBlock * kWarpSize, 0, stream>>>(args, rows);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    segment_attention_grad_key_kernel<T, kEpl><<<kv_grid, kWarpsPerBlock * kWarpSize, 0, stream>>>(args, kv_rows);
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t forward_as(const void* q, const void* k, const void* v, void* out, float* lse, const LayoutView& layout,
                       int batch, int heads, int kv_heads, int length, int head_dim, float scale, bool causal,
                       cudaStream_t stream) {
  const ForwardArgs<T> args{static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
                            static_cast<T*>(out), lse, layout, batch, heads, length, head_dim, scale, kv_heads,
                            causal};
  return forward_typed(args, stream);
}

template <typename T>
cudaError_t backward_as(const void* grad_out, const void* q, const void* k, const void* v, const void* out,
                        const float* lse, float* delta, void* grad_q, void* grad_k, void* grad_v,
                        const LayoutView& layout, int batch, int heads, int kv_heads, int length, int head_dim,
                        float scale, bool causal, cudaStream_t stream) {
  const BackwardArgs<T> args{static_cast<const T*>(grad_out), static_cast<const T*>(q), static_cast<const T*>(k),
                             static_cast<const T*>(v), static_cast<const T*>(out), lse, delta,
                             static_cast<T*>(grad_q), static_cast<T*>(grad_k), static_cast<T*>(grad_v),
                             layout, batch, heads, length, head_dim, scale, kv_heads, causal};
  return backward_typed(args, stream);
}

}  // namespace

cudaError_t launch_segment_attention_forward(
    ScalarKind kind, const void* q, const void* k, const void* v, void* out, float* lse, const LayoutView& layout,
    int batch, int heads, int kv_heads, int length, int head_dim, float scale, bool causal, cudaStream_t stream) {
  switch (kind) {
    case ScalarKind::kFloat32:
      return forward_as<float>(q, k, v, out, lse, layout, batch, heads, kv_heads, length, head_dim, scale, causal,
                               stream);
    case ScalarKind::kFloat16:
      return forward_as<__half>(q, k, v, out, lse, layout, batch, heads, kv_heads, length, head_dim, scale, causal,
                                stream);
    case ScalarKind::kBFloat16:
      return forward_as<__nv_bfloat16>(q, k, v, out, lse, layout, batch, heads, kv_heads, length, head_dim, scale,
                                       causal, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_segment_attention_backward(
    ScalarKind kind, const void* grad_out, const void* q, const void* k, const void* v, const void* out,
    const float* lse, float* delta, void* grad_q, void* grad_k, void* grad_v, const LayoutView& layout,
    int batch, int heads, int kv_heads, int length, int head_dim, float scale, bool causal, cudaStream_t stream) {
  switch (kind) {
    case ScalarKind::kFloat32:
      return backward_as<float>(grad_out, q, k, v, out, lse, delta, grad_q, grad_k, grad_v, layout, batch, heads,
                                kv_heads, length, head_dim, scale, causal, stream);
    case ScalarKind::kFloat16:
      return backward_as<__half>(grad_out, q, k, v, out, lse, delta, grad_q, grad_k, grad_v, layout, batch, heads,
                                 kv_heads, length, head_dim, scale, causal, stream);
    case ScalarKind::kBFloat16:
      return backward_as<__nv_bfloat16>(grad_out, q, k, v, out, lse, delta, grad_q, grad_k, grad_v, layout, batch,
                                        heads, kv_heads, length, head_dim, scale, causal, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace clear_kernels
