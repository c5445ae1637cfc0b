// PyTorch side of the CUDA backend: checks the tensors, allocates the outputs, and launches the kernels of
// segment_attention_kernels.cu on the current stream. Registered as the CUDA implementation of
// clear_kernels::native_fwd / native_bwd (schemas in csrc/ops.cpp).
//
// Uses c10/cuda (stream, device guard) rather than ATen/cuda/CUDAContext.h: the latter pulls in cuBLAS and
// cuSPARSE headers that this file does not need.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "../layout_check.h"
#include "segment_attention_launch.h"

namespace clear_kernels {
namespace cuda {
namespace {

// Tests set CLEAR_KERNELS_POISON_OUTPUTS=1 so that an output element a kernel forgets to write is NaN, not
// leftover memory that might happen to be right.
bool poison_outputs() {
  const char* flag = std::getenv("CLEAR_KERNELS_POISON_OUTPUTS");
  return flag != nullptr && std::strcmp(flag, "1") == 0;
}

at::Tensor new_output(at::Tensor t) {
  return poison_outputs() ? t.fill_(std::numeric_limits<double>::quiet_NaN()) : t;
}

ScalarKind scalar_kind(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return ScalarKind::kFloat32;
    case at::kHalf: return ScalarKind::kFloat16;
    case at::kBFloat16: return ScalarKind::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "clear_kernels CUDA kernel: dtype ", t.scalar_type(),
                       " is not supported (float32, float16, bfloat16)");
  }
  return ScalarKind::kFloat32;  // unreachable
}

// An operand of the attention: [B, H, L, D] like q (or, for k and v, [B, H_kv, L, D] with H_kv = heads dividing
// q's H: grouped-query attention), same dtype and device; made contiguous.
at::Tensor operand(const at::Tensor& t, const char* name, const at::Tensor& q, int64_t heads = -1) {
  TORCH_CHECK(t.is_cuda(), "clear_kernels CUDA kernel: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == q.device(), "clear_kernels CUDA kernel: ", name, " is on ", t.device(),
              " but q is on ", q.device());
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), "clear_kernels CUDA kernel: ", name, " has dtype ",
                   t.scalar_type(), " but q has ", q.scalar_type());
  if (heads < 0) {
    TORCH_CHECK(t.sizes() == q.sizes(), "clear_kernels CUDA kernel: ", name, " must have the shape of q ",
                q.sizes(), ", got ", t.sizes());
  } else {
    TORCH_CHECK(t.dim() == 4 && t.size(0) == q.size(0) && t.size(1) == heads && t.size(2) == q.size(2) &&
                    t.size(3) == q.size(3) && heads >= 1 && q.size(1) % heads == 0,
                "clear_kernels CUDA kernel: ", name, " must be [B, H_kv, L, D] with H_kv dividing q's ", q.size(1),
                " heads (q is ", q.sizes(), "), got ", t.sizes());
  }
  return t.contiguous();
}

// A layout index tensor: int32, on q's device, of the given shape (-1 = any extent); made contiguous.
at::Tensor layout_tensor(const at::Tensor& t, const char* name, const at::Tensor& q, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.device() == q.device(), "clear_kernels CUDA kernel: layout tensor ", name, " is on ", t.device(),
              " but q is on ", q.device());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, "clear_kernels CUDA kernel: layout tensor ", name,
                   " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && (cols < 0 || t.size(1) == cols),
              "clear_kernels CUDA kernel: layout tensor ", name, " must be [", rows, ", ",
              cols < 0 ? std::string("*") : std::to_string(cols), "], got ", t.sizes());
  return t.contiguous();
}

// The kernels index memory with the layout's values, so they are range-checked like the CPU backend's
// (csrc/layout_check.h): the eight small int32 tensors go to the host in one copy (one synchronisation per call;
// this backend is the fallback where Triton is unavailable, and a wrong index would read out of bounds).
void check_layout_on_host(const at::Tensor (&tensors)[8], int64_t B, int64_t L, int64_t G) {
  std::vector<at::Tensor> flat;
  for (const at::Tensor& t : tensors) flat.push_back(t.reshape({-1}));
  const at::Tensor host = at::cat(flat).to(at::kCPU);
  const int32_t* base = host.data_ptr<int32_t>();
  const int32_t* parts[8];
  int64_t offset = 0;
  for (int i = 0; i < 8; ++i) {
    parts[i] = base + offset;
    offset += tensors[i].numel();
  }
  clear_layout::LayoutPointers lp;
  lp.batch = B;
  lp.length = L;
  lp.num_groups = G;
  lp.max_summary = tensors[6].size(1);
  lp.segment = parts[0];
  lp.group = parts[1];
  lp.seg_start = parts[2];
  lp.seg_end = parts[3];
  lp.group_index = parts[4];
  lp.group_offsets = parts[5];
  lp.summary_index = parts[6];
  lp.summary_offsets = parts[7];
  clear_layout::check_layout_values(lp, "clear_kernels CUDA kernel");
}

// Everything a launch needs about the inputs. Holds the contiguous tensors so their pointers stay valid.
struct Prepared {
  at::Tensor q, k, v;
  at::Tensor layout_tensors[8];
  LayoutView layout;
  int batch, heads, kv_heads, length, head_dim;
};

Prepared prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& segment,
                 const at::Tensor& group, const at::Tensor& seg_start, const at::Tensor& seg_end,
                 const at::Tensor& group_index, const at::Tensor& group_offsets, const at::Tensor& summary_index,
                 const at::Tensor& summary_offsets) {
  TORCH_CHECK(q.is_cuda(), "clear_kernels CUDA kernel: q must be a CUDA tensor, got ", q.device());
  TORCH_CHECK(q.dim() == 4, "clear_kernels CUDA kernel: q must be [B, H, L, D], got ", q.sizes());
  scalar_kind(q);
  const int64_t head_dim = q.size(3);
  TORCH_CHECK(head_dim >= 1 && head_dim <= kMaxHeadDim, "clear_kernels CUDA kernel: head dim ", head_dim,
              " is outside [1, ", kMaxHeadDim, "]");
  TORCH_CHECK(q.size(0) <= std::numeric_limits<int>::max() && q.size(1) <= std::numeric_limits<int>::max() &&
                  q.size(2) <= std::numeric_limits<int>::max(),
              "clear_kernels CUDA kernel: q is too large: ", q.sizes());
  Prepared p;
  p.q = q.contiguous();
  TORCH_CHECK(k.dim() == 4, "clear_kernels CUDA kernel: k must be [B, H_kv, L, D], got ", k.sizes());
  p.k = operand(k, "k", q, k.size(1));
  p.v = operand(v, "v", q, k.size(1));
  p.kv_heads = static_cast<int>(k.size(1));
  p.batch = static_cast<int>(q.size(0));
  p.heads = static_cast<int>(q.size(1));
  p.length = static_cast<int>(q.size(2));
  p.head_dim = static_cast<int>(head_dim);
  const int64_t B = q.size(0), L = q.size(2);
  TORCH_CHECK(group_offsets.dim() == 2 && group_offsets.size(1) >= 2,
              "clear_kernels CUDA kernel: layout tensor group_offsets must be [B, G + 1] with G >= 1, got ",
              group_offsets.sizes());
  const int64_t G1 = group_offsets.size(1);
  p.layout_tensors[0] = layout_tensor(segment, "segment", q, B, L);
  p.layout_tensors[1] = layout_tensor(group, "group", q, B, L);
  p.layout_tensors[2] = layout_tensor(seg_start, "seg_start", q, B, L);
  p.layout_tensors[3] = layout_tensor(seg_end, "seg_end", q, B, L);
  p.layout_tensors[4] = layout_tensor(group_index, "group_index", q, B, L);
  p.layout_tensors[5] = layout_tensor(group_offsets, "group_offsets", q, B, G1);
  p.layout_tensors[6] = layout_tensor(summary_index, "summary_index", q, B, -1);
  p.layout_tensors[7] = layout_tensor(summary_offsets, "summary_offsets", q, B, G1);
  check_layout_on_host(p.layout_tensors, B, L, G1 - 1);
  auto ptr = [&](int i) { return p.layout_tensors[i].data_ptr<int32_t>(); };
  p.layout = LayoutView{ptr(0), ptr(1), ptr(2), ptr(3), ptr(4), ptr(5),
                        p.layout_tensors[6].numel() ? ptr(6) : nullptr, ptr(7),
                        static_cast<int>(G1 - 1), static_cast<int>(p.layout_tensors[6].size(1))};
  return p;
}

// The kernels work with scale * log2(e) in float32 (online softmax in the log2 domain): it must be finite.
float checked_scale(double scale) {
  const float log2_scale = static_cast<float>(scale * 1.4426950408889634);
  TORCH_CHECK(std::isfinite(log2_scale), "clear_kernels CUDA kernel: scale ", scale,
              " overflows float32 (|scale| must be at most float32's max / log2(e), about 2.36e38)");
  return static_cast<float>(scale);
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "clear_kernels CUDA kernel: launching the ", what, " failed: ",
              cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> native_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& segment,
    const at::Tensor& group, const at::Tensor& seg_start, const at::Tensor& seg_end, const at::Tensor& group_index,
    const at::Tensor& group_offsets, const at::Tensor& summary_index, const at::Tensor& summary_offsets,
    double scale, bool is_causal) {
  const c10::cuda::CUDAGuard device_guard(q.device());
  Prepared p = prepare(q, k, v, segment, group, seg_start, seg_end, group_index, group_offsets, summary_index,
                       summary_offsets);
  at::Tensor out = new_output(at::empty_like(p.q));
  at::Tensor lse = new_output(at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat)));
  check_launch(launch_segment_attention_forward(
                   scalar_kind(q), p.q.data_ptr(), p.k.data_ptr(), p.v.data_ptr(), out.data_ptr(),
                   lse.data_ptr<float>(), p.layout, p.batch, p.heads, p.kv_heads, p.length, p.head_dim,
                   checked_scale(scale), is_causal, c10::cuda::getCurrentCUDAStream().stream()),
               "forward kernel");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> native_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& segment, const at::Tensor& group, const at::Tensor& seg_start,
    const at::Tensor& seg_end, const at::Tensor& group_index, const at::Tensor& group_offsets,
    const at::Tensor& summary_index, const at::Tensor& summary_offsets, double scale, bool is_causal) {
  const c10::cuda::CUDAGuard device_guard(q.device());
  Prepared p = prepare(q, k, v, segment, group, seg_start, seg_end, group_index, group_offsets, summary_index,
                       summary_offsets);
  at::Tensor grad_out_c = operand(grad_out, "grad_out", q);
  at::Tensor out_c = operand(out, "out", q);
  TORCH_CHECK(lse.device() == q.device() && lse.scalar_type() == at::kFloat && lse.dim() == 3 &&
                  lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              "clear_kernels CUDA kernel: lse must be float32 [B, H, L] on q's device, got ", lse.scalar_type(),
              " ", lse.sizes(), " on ", lse.device());
  at::Tensor lse_c = lse.contiguous();
  at::Tensor delta = at::empty_like(lse_c);  // workspace, fully written by the dq pass
  at::Tensor grad_q = new_output(at::empty_like(p.q));
  at::Tensor grad_k = new_output(at::empty_like(p.k));
  at::Tensor grad_v = new_output(at::empty_like(p.v));
  check_launch(launch_segment_attention_backward(
                   scalar_kind(q), grad_out_c.data_ptr(), p.q.data_ptr(), p.k.data_ptr(), p.v.data_ptr(),
                   out_c.data_ptr(), lse_c.data_ptr<float>(), delta.data_ptr<float>(), grad_q.data_ptr(),
                   grad_k.data_ptr(), grad_v.data_ptr(), p.layout, p.batch, p.heads, p.kv_heads, p.length,
                   p.head_dim, checked_scale(scale), is_causal, c10::cuda::getCurrentCUDAStream().stream()),
               "backward kernels");
  return {grad_q, grad_k, grad_v};
}

}  // namespace
}  // namespace cuda
}  // namespace clear_kernels

TORCH_LIBRARY_IMPL(clear_kernels, CUDA, m) {
  m.impl("native_fwd", &clear_kernels::cuda::native_fwd_cuda);
  m.impl("native_bwd", &clear_kernels::cuda::native_bwd_cuda);
}
