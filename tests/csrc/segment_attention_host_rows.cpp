// Host build of the CUDA kernels' per-row algorithms (csrc/cuda/segment_attention_rows.cuh) for the tests:
// every row runs on one host "lane" holding the whole head dim, through the very functions the GPU warps run.
// tests/test_cuda_host_rows.py compiles this into a shared library and compares it with the float64 reference,
// which checks the key walk, the online softmax and the backward formulas without a GPU.
#include <cstdint>

#include "segment_attention_rows.cuh"

using namespace clear_kernels::cuda;

namespace {

LayoutView make_layout(const int32_t* const* ids, int num_groups, int max_summary) {
  return LayoutView{ids[0], ids[1], ids[2], ids[3], ids[4], ids[5], max_summary > 0 ? ids[6] : nullptr, ids[7],
                    num_groups, max_summary};
}

template <typename T>
void forward_all(const void* q, const void* k, const void* v, void* out, float* lse, const LayoutView& layout,
                 int batch, int heads, int length, int head_dim, float scale) {
  const ForwardArgs<T> args{static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
                            static_cast<T*>(out), lse, layout, batch, heads, length, head_dim, scale};
  const int64_t rows = static_cast<int64_t>(batch) * heads * length;
  for (int64_t row = 0; row < rows; ++row) forward_row<kMaxHeadDim>(args, row, SerialLanes{});
}

template <typename T>
void backward_all(const void* grad_out, const void* q, const void* k, const void* v, const void* out,
                  const float* lse, float* delta, void* grad_q, void* grad_k, void* grad_v, const LayoutView& layout,
                  int batch, int heads, int length, int head_dim, float scale) {
  const BackwardArgs<T> args{static_cast<const T*>(grad_out), static_cast<const T*>(q), static_cast<const T*>(k),
                             static_cast<const T*>(v), static_cast<const T*>(out), lse, delta,
                             static_cast<T*>(grad_q), static_cast<T*>(grad_k), static_cast<T*>(grad_v),
                             layout, batch, heads, length, head_dim, scale};
  const int64_t rows = static_cast<int64_t>(batch) * heads * length;
  // Same order as on the GPU: every delta exists before any dk/dv row reads it.
  for (int64_t row = 0; row < rows; ++row) grad_query_row<kMaxHeadDim>(args, row, SerialLanes{});
  for (int64_t row = 0; row < rows; ++row) grad_key_row<kMaxHeadDim>(args, row, SerialLanes{});
}

}  // namespace

// kind: 0 float32, 1 float16, 2 bfloat16. ids: the 8 layout tensors in op-schema order. Returns 0, or -1 for a
// bad kind or head dim.
extern "C" int host_rows_forward(int kind, const void* q, const void* k, const void* v, void* out, float* lse,
                                 const int32_t* const* ids, int num_groups, int max_summary, int batch, int heads,
                                 int length, int head_dim, float scale) {
  if (head_dim < 1 || head_dim > kMaxHeadDim) return -1;
  const LayoutView layout = make_layout(ids, num_groups, max_summary);
  switch (kind) {
    case 0: forward_all<float>(q, k, v, out, lse, layout, batch, heads, length, head_dim, scale); return 0;
    case 1: forward_all<__half>(q, k, v, out, lse, layout, batch, heads, length, head_dim, scale); return 0;
    case 2: forward_all<__nv_bfloat16>(q, k, v, out, lse, layout, batch, heads, length, head_dim, scale); return 0;
    default: return -1;
  }
}

extern "C" int host_rows_backward(int kind, const void* grad_out, const void* q, const void* k, const void* v,
                                  const void* out, const float* lse, float* delta, void* grad_q, void* grad_k,
                                  void* grad_v, const int32_t* const* ids, int num_groups, int max_summary,
                                  int batch, int heads, int length, int head_dim, float scale) {
  if (head_dim < 1 || head_dim > kMaxHeadDim) return -1;
  const LayoutView layout = make_layout(ids, num_groups, max_summary);
  switch (kind) {
    case 0:
      backward_all<float>(grad_out, q, k, v, out, lse, delta, grad_q, grad_k, grad_v, layout, batch, heads, length,
                          head_dim, scale);
      return 0;
    case 1:
      backward_all<__half>(grad_out, q, k, v, out, lse, delta, grad_q, grad_k, grad_v, layout, batch, heads, length,
                           head_dim, scale);
      return 0;
    case 2:
      backward_all<__nv_bfloat16>(grad_out, q, k, v, out, lse, delta, grad_q, grad_k, grad_v, layout, batch, heads,
                                  length, head_dim, scale);
      return 0;
    default: return -1;
  }
}

// The keys token t of batch element b attends, in walk order, into keys[0:L]; returns how many.
extern "C" int host_rows_key_walk(const int32_t* const* ids, int num_groups, int max_summary, int length, int b,
                                  int t, int32_t* keys) {
  const KeyWalk walk = walk_of(make_layout(ids, num_groups, max_summary), length, b, t);
  const int n = walk.size();
  for (int i = 0; i < n && i < length; ++i) keys[i] = walk.key(i);
  return n;
}
