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
void check_like_q(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.device().is_cpu(), "native op (CPU): ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 4, "native op (CPU): ", name, " must be [B, H, L, D], got shape ", t.sizes());
  TORCH_CHECK(t.sizes() == q.sizes(), "native op (CPU): ", name, " must have the shape of q ", q.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "native op (CPU): ", name, " has dtype ", t.scalar_type(),
              " but q has ", q.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "native op (CPU): ", name, " must be contiguous");
}

DType check_q(const at::Tensor& q) {
  TORCH_CHECK(q.device().is_cpu(), "native op (CPU): q must be a CPU tensor, got ", q.device());
  TORCH_CHECK(q.dim() == 4, "native op (CPU): q must be [B, H, L, D], got shape ", q.sizes());
  TORCH_CHECK(q.size(2) >= 1 && q.size(3) >= 1, "native op (CPU): q needs L >= 1 and D >= 1, got shape ", q.sizes());
  TORCH_CHECK(q.is_contiguous(), "native op (CPU): q must be contiguous");
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

// The layout's index values: everything the kernels dereference is checked to be in range and consistent, so
// a malformed layout is an error instead of an out-of-bounds read or two tasks writing one row. O(B * L).
void check_layout_values(Params& p) {
  const int64_t L = p.length, G = p.num_groups, S = p.max_summary;
  int64_t max_run = 1, max_group_summary = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int32_t* seg = p.segment + b * L;
    const int32_t* grp = p.group + b * L;
    const int32_t* start = p.seg_start + b * L;
    const int32_t* end = p.seg_end + b * L;
    int64_t summaries = 0;
    for (int64_t t = 0; t < L; ++t) {
      TORCH_CHECK(seg[t] >= -2, "native op (CPU): segment[", b, ", ", t, "] = ", seg[t], " is below -2");
      TORCH_CHECK(grp[t] >= 0 && grp[t] < G, "native op (CPU): group[", b, ", ", t, "] = ", grp[t],
                  " is outside [0, num_groups=", G, ")");
      if (seg[t] < 0) {
        TORCH_CHECK(start[t] == t && end[t] == t, "native op (CPU): seg_start/seg_end of summary or padding token [",
                    b, ", ", t, "] must both equal ", t);
        summaries += seg[t] == -1;
        continue;
      }
      TORCH_CHECK(start[t] <= t && t < end[t] && end[t] <= L, "native op (CPU): seg_start/seg_end [", start[t], ", ",
                  end[t], ") of token [", b, ", ", t, "] do not contain it");
      // Runs chain: a token after its run start repeats its predecessor's segment and bounds.
      if (t > start[t])
        TORCH_CHECK(seg[t - 1] == seg[t] && start[t - 1] == start[t] && end[t - 1] == end[t],
                    "native op (CPU): token [", b, ", ", t, "] is inside the run [", start[t], ", ", end[t],
                    ") but its predecessor does not belong to that run");
      max_run = std::max<int64_t>(max_run, end[t] - start[t]);
    }
    const int32_t* goff = p.group_offsets + b * (G + 1);
    const int32_t* soff = p.summary_offsets + b * (G + 1);
    TORCH_CHECK(goff[0] == 0 && soff[0] == 0, "native op (CPU): group_offsets and summary_offsets must start at 0");
    for (int64_t g = 0; g < G; ++g) {
      max_group_summary = std::max<int64_t>(max_group_summary, soff[g + 1] - soff[g]);
      TORCH_CHECK(goff[g] <= goff[g + 1] && goff[g + 1] <= L, "native op (CPU): group_offsets[", b,
                  "] must be non-decreasing and <= L=", L);
      TORCH_CHECK(soff[g] <= soff[g + 1] && soff[g + 1] <= S, "native op (CPU): summary_offsets[", b,
                  "] must be non-decreasing and <= max_summary=", S);
      for (int64_t i = goff[g]; i < goff[g + 1]; ++i) {
        const int32_t x = p.group_index[b * L + i];
        TORCH_CHECK(x >= 0 && x < L && seg[x] != -2 && grp[x] == g, "native op (CPU): group_index[", b, ", ", i,
                    "] = ", x, " is not a non-padding token of group ", g);
      }
      for (int64_t i = soff[g]; i < soff[g + 1]; ++i) {
        const int32_t x = p.summary_index[b * S + i];
        TORCH_CHECK(x >= 0 && x < L && seg[x] == -1 && grp[x] == g, "native op (CPU): summary_index[", b, ", ", i,
                    "] = ", x, " is not a summary token of group ", g);
        TORCH_CHECK(i == soff[g] || p.summary_index[b * S + i - 1] < x, "native op (CPU): summary_index[", b,
                    "] must be ascending within a group");
      }
    }
    TORCH_CHECK(soff[G] == summaries, "native op (CPU): summary_offsets[", b, "] lists ", soff[G],
                " summary tokens but segment holds ", summaries);
  }
  p.max_run = max_run;
  p.max_group_summary = max_group_summary;
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
  TORCH_CHECK(std::isfinite(scale), "native op (CPU): scale must be finite, got ", scale);
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
std::tuple<at::Tensor, at::Tensor> native_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const at::Tensor& segment, const at::Tensor& group,
                                                  const at::Tensor& seg_start, const at::Tensor& seg_end,
                                                  const at::Tensor& group_index, const at::Tensor& group_offsets,
                                                  const at::Tensor& summary_index,
                                                  const at::Tensor& summary_offsets, double scale) {
  Params p;
  p.dtype = check_q(q);
  check_like_q(k, "k", q);
  check_like_q(v, "v", q);
  fill_layout(p, q, segment, group, seg_start, seg_end, group_index, group_offsets, summary_index, summary_offsets,
              scale);
  at::Tensor out = new_output(q.sizes(), q.options());
  at::Tensor lse = new_output({p.batch, p.heads, p.length}, q.options().dtype(at::kFloat));
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out_w = out.data_ptr();
  p.lse_w = lse.data_ptr<float>();
  const KernelTable& table = kernel_table();
  run_phase(table, p, p.batch * p.heads * (p.chunks_per_row() + p.max_summary), table.forward);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> native_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& segment, const at::Tensor& group, const at::Tensor& seg_start,
    const at::Tensor& seg_end, const at::Tensor& group_index, const at::Tensor& group_offsets,
    const at::Tensor& summary_index, const at::Tensor& summary_offsets, double scale) {
  Params p;
  p.dtype = check_q(q);
  check_like_q(k, "k", q);
  check_like_q(v, "v", q);
  check_like_q(out, "out", q);
  check_like_q(grad_out, "grad_out", q);
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  lse.sizes() == at::IntArrayRef({q.size(0), q.size(1), q.size(2)}),
              "native op (CPU): lse must be a contiguous float32 CPU tensor [B, H, L] = ",
              at::IntArrayRef({q.size(0), q.size(1), q.size(2)}), ", got ", lse.scalar_type(), " ", lse.sizes());
  fill_layout(p, q, segment, group, seg_start, seg_end, group_index, group_offsets, summary_index, summary_offsets,
              scale);
  at::Tensor dq = new_output(q.sizes(), q.options());
  at::Tensor dk = new_output(q.sizes(), q.options());
  at::Tensor dv = new_output(q.sizes(), q.options());
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.grad_out = grad_out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  const KernelTable& table = kernel_table();
  const int64_t bh = p.batch * p.heads;
  at::Tensor lse64;
  if (p.dtype == DType::Float64) {
    // Recompute the logsumexp in double (Params::lse64); the forward output it also writes is thrown away.
    Params f = p;
    at::Tensor scratch_out = at::empty_like(q);
    at::Tensor scratch_lse = at::empty_like(lse);
    lse64 = at::empty({p.batch, p.heads, p.length}, q.options());
    f.out_w = scratch_out.data_ptr();
    f.lse_w = scratch_lse.data_ptr<float>();
    f.lse64 = lse64.data_ptr<double>();
    run_phase(table, f, bh * (f.chunks_per_row() + f.max_summary), table.forward);
    p.lse64 = f.lse64;
  }
  at::Tensor partials;
  if (p.summary_phase()) {  // rows of one chunk keep theirs in the task's scratch
    // Through the output cache too: megabytes of fresh pages per call would cost more than the sums themselves.
    partials = cached_empty({p.batch, p.heads, p.chunks_per_row(), p.max_summary, 3, p.head_dim},
                            q.options().dtype(p.dtype == DType::Float64 ? at::kDouble : at::kFloat));
    p.summary_partials = partials.data_ptr();
  }
  run_phase(table, p, bh * p.chunks_per_row(), table.backward_runs);
  if (p.summary_phase()) run_phase(table, p, bh * p.max_summary, table.backward_summaries);
  return {dq, dk, dv};
}

}  // namespace
}  // namespace clear_cpu

TORCH_LIBRARY_IMPL(clear_kernels, CPU, m) {
  m.impl("native_fwd", &clear_cpu::native_fwd_cpu);
  m.impl("native_bwd", &clear_cpu::native_bwd_cpu);
}
