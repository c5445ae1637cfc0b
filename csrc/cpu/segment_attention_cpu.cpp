// CPU implementation of clear_kernels::native_fwd / native_bwd (schemas in csrc/ops.cpp).
//
// This file is the PyTorch side: it validates the inputs (a direct call of the registered op with bad tensors
// must raise, not read out of bounds), allocates the outputs, picks the kernel table of the best instruction set
// the running CPU supports, and runs each phase with at::parallel_for. The arithmetic lives in
// segment_attention_core.h, compiled per instruction set by kernel_isa_*.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>

#include "../layout_check.h"
#include "kernel_params.h"
#include "output_cache.h"

namespace clear_cpu {
namespace {

// ------------------------------------------------------------------------------------ instruction set choice
bool cpu_has(const std::string& isa) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (isa == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return isa == "generic";
}

// CLEAR_KERNELS_CPU_ISA=generic|avx2|avx512 forces one table (the tests run every table this CPU supports);
// unset or "auto" takes the best one.
const KernelTable& kernel_table() {
  const char* env = std::getenv("CLEAR_KERNELS_CPU_ISA");
  const std::string wanted = env ? env : "";
  if (!wanted.empty() && wanted != "auto") {
    TORCH_CHECK(wanted == "generic" || wanted == "avx2" || wanted == "avx512",
                "CLEAR_KERNELS_CPU_ISA must be auto, generic, avx2 or avx512, got '", wanted, "'");
    TORCH_CHECK(cpu_has(wanted), "CLEAR_KERNELS_CPU_ISA=", wanted, " but this CPU does not support it");
    if (wanted == "avx512") return avx512::kernel_table();
    if (wanted == "avx2") return avx2::kernel_table();
    return generic::kernel_table();
  }
  static const KernelTable& best = cpu_has("avx512") ? avx512::kernel_table()
                                   : cpu_has("avx2") ? avx2::kernel_table()
                                                     : generic::kernel_table();
  return best;
}

// ------------------------------------------------------------------------------------------- input checks
// q-like tensors are read with any batch, head and row strides (heads sliced out of a fused projection need no
// copy), but each row of D elements must be contiguous for the vector loads: a tensor strided along D (an expanded
// gradient, a transposed view) is copied first.
at::Tensor unit_stride(const at::Tensor& t) {
  return t.dim() == 4 && t.size(3) > 1 && t.stride(3) != 1 ? t.contiguous() : t;
}

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// k or v: [B, H_kv, L, D] like q but with H_kv key/value heads, H_kv dividing q's H (grouped-query attention).
void check_kv(const at::Tensor& t, const char* name, const at::Tensor& q, int64_t kv_heads) {
  TORCH_CHECK(t.device().is_cpu(), "native op (CPU): ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 4 && t.size(0) == q.size(0) && t.size(1) == kv_heads && t.size(2) == q.size(2) &&
                  t.size(3) == q.size(3),
              "native op (CPU): ", name, " must be [B, H_kv, L, D] = [", q.size(0), ", ", kv_heads, ", ", q.size(2),
              ", ", q.size(3), "] (the shape of q, or of k with fewer heads), got shape ", t.sizes());
  TORCH_CHECK(kv_heads >= 1 && q.size(1) % kv_heads == 0, "native op (CPU): the heads of q (", q.size(1),
              ") must be a multiple of the heads of ", name, " (", kv_heads, ")");
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "native op (CPU): ", name, " has dtype ", t.scalar_type(),
              " but q has ", q.scalar_type());
}

void check_like_q(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.device().is_cpu(), "native op (CPU): ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 4, "native op (CPU): ", name, " must be [B, H, L, D], got shape ", t.sizes());
  TORCH_CHECK(t.sizes() == q.sizes(), "native op (CPU): ", name, " must have the shape of q ", q.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "native op (CPU): ", name, " has dtype ", t.scalar_type(),
              " but q has ", q.scalar_type());
}

DType check_q(const at::Tensor& q) {
  TORCH_CHECK(q.device().is_cpu(), "native op (CPU): q must be a CPU tensor, got ", q.device());
  TORCH_CHECK(q.dim() == 4, "native op (CPU): q must be [B, H, L, D], got shape ", q.sizes());
  TORCH_CHECK(q.size(2) >= 1 && q.size(3) >= 1, "native op (CPU): q needs L >= 1 and D >= 1, got shape ", q.sizes());
  switch (q.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kBFloat16: return DType::BFloat16;
    case at::kDouble: return DType::Float64;
    default:
      TORCH_CHECK(false, "native op (CPU): q has dtype ", q.scalar_type(),
                  "; the CPU kernel supports float32, bfloat16 and float64");
  }
  return DType::Float32;  // unreachable: TORCH_CHECK(false) throws
}

void check_index(const at::Tensor& t, const char* name, int64_t batch, int64_t cols) {
  TORCH_CHECK(t.device().is_cpu(), "native op (CPU): layout tensor ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kInt, "native op (CPU): layout tensor ", name, " must be int32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == batch && (cols < 0 || t.size(1) == cols), "native op (CPU): layout tensor ",
              name, " must be [B=", batch, ", ", cols < 0 ? std::string("N") : std::to_string(cols), "], got shape ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), "native op (CPU): layout tensor ", name, " must be contiguous");
}

// The layout's index values: everything the kernels dereference is checked to be in range and consistent
// (csrc/layout_check.h), so a malformed layout is an error instead of an out-of-bounds read or two tasks writing
// one row.
void check_layout_values(Params& p) {
  clear_layout::LayoutPointers lp;
  lp.batch = p.batch;
  lp.length = p.length;
  lp.num_groups = p.num_groups;
  lp.max_summary = p.max_summary;
  lp.segment = p.segment;
  lp.group = p.group;
  lp.seg_start = p.seg_start;
  lp.seg_end = p.seg_end;
  lp.group_index = p.group_index;
  lp.group_offsets = p.group_offsets;
  lp.summary_index = p.summary_index;
  lp.summary_offsets = p.summary_offsets;
  const clear_layout::LayoutStats stats = clear_layout::check_layout_values(lp, "native op (CPU)");
  p.max_run = stats.max_run;
  p.max_group_summary = stats.max_group_summary;
}

void fill_layout(Params& p, const at::Tensor& q, const at::Tensor& segment, const at::Tensor& group,
                 const at::Tensor& seg_start, const at::Tensor& seg_end, const at::Tensor& group_index,
                 const at::Tensor& group_offsets, const at::Tensor& summary_index, const at::Tensor& summary_offsets,
                 double scale) {
  const int64_t B = q.size(0), L = q.size(2);
  check_index(segment, "segment", B, L);
  check_index(group, "group", B, L);
  check_index(seg_start, "seg_start", B, L);
  check_index(seg_end, "seg_end", B, L);
  check_index(group_index, "group_index", B, L);
  check_index(group_offsets, "group_offsets", B, -1);
  TORCH_CHECK(group_offsets.size(1) >= 1, "native op (CPU): group_offsets must be [B, G + 1] with G >= 0");
  check_index(summary_offsets, "summary_offsets", B, group_offsets.size(1));
  check_index(summary_index, "summary_index", B, -1);
  // Below float64 the kernels compute in float32: the scale must be finite there too.
  TORCH_CHECK(std::isfinite(q.scalar_type() == at::kDouble ? scale : static_cast<float>(scale)),
              "native op (CPU): scale must be finite in the compute precision, got ", scale);
  p.batch = B;
  p.heads = q.size(1);
  p.length = L;
  p.head_dim = q.size(3);
  p.num_groups = group_offsets.size(1) - 1;
  p.max_summary = summary_index.size(1);
  p.scale = scale;
  p.segment = segment.data_ptr<int32_t>();
  p.group = group.data_ptr<int32_t>();
  p.seg_start = seg_start.data_ptr<int32_t>();
  p.seg_end = seg_end.data_ptr<int32_t>();
  p.group_index = group_index.data_ptr<int32_t>();
  p.group_offsets = group_offsets.data_ptr<int32_t>();
  p.summary_index = summary_index.data_ptr<int32_t>();
  p.summary_offsets = summary_offsets.data_ptr<int32_t>();
  check_layout_values(p);
}

// Outputs are NaN-filled under CLEAR_KERNELS_POISON_OUTPUTS=1 (the tests), so an unwritten row fails parity.
// Their memory comes from the output cache (output_cache.h): fresh pages would cost as much as the kernel.
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = cached_empty(sizes, options);
  const char* poison = std::getenv("CLEAR_KERNELS_POISON_OUTPUTS");
  if (poison && std::strcmp(poison, "1") == 0) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// An output [B, H, L, D] laid out as [B, L, H, D]: the heads of a token side by side, as the output projection reads
// them and as the gradient of a fused q/k/v projection holds them (no copy on either side).
at::Tensor new_token_major(int64_t batch, int64_t heads, int64_t length, int64_t head_dim,
                           const at::TensorOptions& options) {
  return new_output({batch, length, heads, head_dim}, options).permute({0, 2, 1, 3});
}

// Runs tasks [0, count) of one phase in parallel; each worker gets its own scratch buffer. Workers take blocks of
// tasks from a shared counter instead of a fixed half each: on a busy machine a descheduled thread then delays
// one block, not half the phase, and uneven tasks (long summary rows) balance out. Which thread runs a task
// never changes what the task computes, so the results stay bitwise identical.
void run_phase(const KernelTable& table, const Params& p, int64_t count,
               void (*phase)(const Params&, int64_t, int64_t, void*)) {
  if (count <= 0) return;
  const int64_t bytes = table.scratch_bytes(p) + 64;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t block = std::max<int64_t>(1, count / (threads * 16));
  const int64_t blocks = (count + block - 1) / block;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, blocks), 1, [&](int64_t, int64_t) {
    // Uninitialised on purpose: the kernels write every scratch element before reading it.
    std::unique_ptr<char[]> raw(new char[bytes]);
    void* aligned = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(raw.get()) + 63) & ~uintptr_t(63));
    for (int64_t b = next.fetch_add(1); b < blocks; b = next.fetch_add(1))
      phase(p, b * block, std::min(count, (b + 1) * block), aligned);
  });
}

// ------------------------------------------------------------------------------------------------- ops
std::tuple<at::Tensor, at::Tensor> native_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                  const at::Tensor& v_in, const at::Tensor& segment,
                                                  const at::Tensor& group, const at::Tensor& seg_start,
                                                  const at::Tensor& seg_end, const at::Tensor& group_index,
                                                  const at::Tensor& group_offsets, const at::Tensor& summary_index,
                                                  const at::Tensor& summary_offsets, double scale, bool is_causal) {
  const at::Tensor q = unit_stride(q_in), k = unit_stride(k_in), v = unit_stride(v_in);
  Params p;
  p.dtype = check_q(q);
  TORCH_CHECK(k.dim() == 4, "native op (CPU): k must be [B, H_kv, L, D], got shape ", k.sizes());
  check_kv(k, "k", q, k.size(1));
  check_kv(v, "v", q, k.size(1));
  fill_layout(p, q, segment, group, seg_start, seg_end, group_index, group_offsets, summary_index, summary_offsets,
              scale);
  p.kv_heads = k.size(1);
  p.causal = is_causal;
  at::Tensor out = new_token_major(p.batch, p.heads, p.length, p.head_dim, q.options());
  // The logsumexp in float64 for float64 inputs (float32 would cost the backward half of its precision).
  const bool lse_double = p.dtype == DType::Float64;
  at::Tensor lse =
      new_output({p.batch, p.heads, p.length}, q.options().dtype(lse_double ? at::kDouble : at::kFloat));
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out_w = out.data_ptr();
  p.q_st = strides_of(q);
  p.k_st = strides_of(k);
  p.v_st = strides_of(v);
  p.out_st = strides_of(out);
  if (lse_double)
    p.lse64 = lse.data_ptr<double>();
  else
    p.lse_w = lse.data_ptr<float>();
  const KernelTable& table = kernel_table();
  run_phase(table, p, p.batch * p.heads * (p.chunks_per_row() + p.max_summary), table.forward);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> native_bwd_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse, const at::Tensor& segment, const at::Tensor& group,
    const at::Tensor& seg_start, const at::Tensor& seg_end, const at::Tensor& group_index,
    const at::Tensor& group_offsets, const at::Tensor& summary_index, const at::Tensor& summary_offsets,
    double scale, bool is_causal) {
  const at::Tensor grad_out = unit_stride(grad_out_in), q = unit_stride(q_in), k = unit_stride(k_in),
                   v = unit_stride(v_in), out = unit_stride(out_in);
  Params p;
  p.dtype = check_q(q);
  TORCH_CHECK(k.dim() == 4, "native op (CPU): k must be [B, H_kv, L, D], got shape ", k.sizes());
  check_kv(k, "k", q, k.size(1));
  check_kv(v, "v", q, k.size(1));
  check_like_q(out, "out", q);
  check_like_q(grad_out, "grad_out", q);
  const bool lse_double = p.dtype == DType::Float64;
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == (lse_double ? at::kDouble : at::kFloat) &&
                  lse.is_contiguous() && lse.sizes() == at::IntArrayRef({q.size(0), q.size(1), q.size(2)}),
              "native op (CPU): lse must be a contiguous ", lse_double ? "float64" : "float32",
              " CPU tensor [B, H, L] = ",
              at::IntArrayRef({q.size(0), q.size(1), q.size(2)}), ", got ", lse.scalar_type(), " ", lse.sizes());
  fill_layout(p, q, segment, group, seg_start, seg_end, group_index, group_offsets, summary_index, summary_offsets,
              scale);
  p.kv_heads = k.size(1);
  p.causal = is_causal;
  // Grouped-query attention: every query head writes its own dk/dv rows in the compute type, and the heads that
  // share a key/value head are summed below, in head order (deterministic, and rounded to bfloat16 once).
  p.kv_grad_per_query_head = p.kv_heads != p.heads;
  const at::ScalarType compute = p.dtype == DType::Float64 ? at::kDouble : at::kFloat;
  const at::TensorOptions kv_grad_options = p.kv_grad_per_query_head ? q.options().dtype(compute) : q.options();
  at::Tensor dq = new_token_major(p.batch, p.heads, p.length, p.head_dim, q.options());
  at::Tensor dk = new_token_major(p.batch, p.heads, p.length, p.head_dim, kv_grad_options);
  at::Tensor dv = new_token_major(p.batch, p.heads, p.length, p.head_dim, kv_grad_options);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.grad_out = grad_out.data_ptr();
  if (lse_double)
    p.lse64 = lse.data_ptr<double>();
  else
    p.lse = lse.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.q_st = strides_of(q);
  p.k_st = strides_of(k);
  p.v_st = strides_of(v);
  p.out_st = strides_of(out);
  p.grad_out_st = strides_of(grad_out);
  p.dq_st = strides_of(dq);
  p.dk_st = strides_of(dk);
  p.dv_st = strides_of(dv);
  const KernelTable& table = kernel_table();
  const int64_t bh = p.batch * p.heads;
  at::Tensor partials;
  if (p.summary_phase()) {  // rows of one chunk keep theirs in the task's scratch
    // Through the output cache too: megabytes of fresh pages per call would cost more than the sums themselves.
    partials = cached_empty({p.batch, p.heads, p.chunks_per_row(), p.max_summary, 3, p.head_dim},
                            q.options().dtype(p.dtype == DType::Float64 ? at::kDouble : at::kFloat));
    p.summary_partials = partials.data_ptr();
  }
  run_phase(table, p, bh * p.chunks_per_row(), table.backward_runs);
  if (p.summary_phase()) run_phase(table, p, bh * p.max_summary, table.backward_summaries);
  if (p.kv_grad_per_query_head) {
    const int64_t group_size = p.heads / p.kv_heads;
    // g is [B, H, L, D] over [B, L, H, D] memory: sum the query heads of each key/value head there, so the result
    // is token-major too.
    auto fold = [&](const at::Tensor& g) {
      return g.permute({0, 2, 1, 3})
          .view({p.batch, p.length, p.kv_heads, group_size, p.head_dim})
          .sum(3)
          .to(q.scalar_type())
          .permute({0, 2, 1, 3});
    };
    return {dq, fold(dk), fold(dv)};
  }
  return {dq, dk, dv};
}

}  // namespace
}  // namespace clear_cpu

TORCH_LIBRARY_IMPL(clear_kernels, CPU, m) {
  m.impl("native_fwd", &clear_cpu::native_fwd_cpu);
  m.impl("native_bwd", &clear_cpu::native_bwd_cpu);
}
