// Plain-C++ interface between the PyTorch-facing op (segment_attention_cpu.cpp) and the ISA-specific kernel
// bodies (kernel_isa_*.cpp). It includes no PyTorch header on purpose: the kernel bodies are compiled for
// several instruction sets in one library, and any inline function they shared with the rest of the library
// could be emitted with AVX-512 instructions and then picked by the linker for a caller on an older CPU.
#pragma once

#include <cstdint>

namespace clear_cpu {

enum class DType : int { Float32 = 0, BFloat16 = 1, Float64 = 2 };

// Element strides of one [B, H, L, D] tensor whose last dimension is contiguous. Inputs come with any such
// strides (heads of a fused projection are views, no copy); the op allocates its outputs as [B, L, H, D] (the
// layout the output projection reads, and the one a projection's gradient has).
struct Strides {
  int64_t batch = 0, head = 0, row = 0;
};

// Everything one op call needs: q-like tensors are [B, H, L, D] with the strides below, lse is a contiguous
// [B, H, L], layout tensors are as documented in clear_kernels/layout.py. Pointers a phase does not use are null.
struct Params {
  int64_t batch = 0, heads = 0, length = 0, head_dim = 0, num_groups = 0, max_summary = 0;
  int64_t max_run = 1;     // longest segment run in the layout: sizes the per-thread scratch
  int64_t max_group_summary = 0;  // most summary tokens in one group (a run's pairs with summary tokens)
  int64_t chunk = 256;     // positions per task in the token passes
  int64_t kv_heads = 0;    // heads of k and v: H, or fewer (grouped-query attention, H % kv_heads == 0)
  double scale = 1.0;
  DType dtype = DType::Float32;
  bool causal = false;     // inside a segment, a query sees only the keys at or before its position
  // Backward with grouped-query attention: dk and dv are [B, H, L, D] in the compute type (float, or double for
  // float64), one row per query head; the caller sums each key/value head's query heads in a fixed order.
  bool kv_grad_per_query_head = false;

  // Strides of q, k, v, out (out_w in the forward), grad_out, dq, dk and dv, in elements. dk and dv are indexed by
  // query head (their heads are the query heads when kv_grad_per_query_head, else there are as many of each).
  Strides q_st, k_st, v_st, out_st, grad_out_st, dq_st, dk_st, dv_st;

  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* out = nullptr;       // backward: the forward output
  const void* grad_out = nullptr;  // backward
  const float* lse = nullptr;      // backward: the forward logsumexp (float32 and bfloat16 inputs)

  void* out_w = nullptr;     // forward outputs
  float* lse_w = nullptr;    // (float32 and bfloat16 inputs)
  void* dq = nullptr;        // backward outputs
  void* dk = nullptr;
  void* dv = nullptr;
  // float64 inputs only: the logsumexp is float64 (a float32 one would cost the backward half of its precision);
  // the forward writes it here instead of lse_w, the backward reads it from here instead of lse.
  double* lse64 = nullptr;
  // Backward scratch [B, H, chunks, max_summary, 3, D] in the compute type (float, or double for float64), only
  // when summary_phase(): each run chunk's share of each summary token's dq, dk and dv, added up in chunk order
  // by phase 2 (deterministic).
  void* summary_partials = nullptr;

  const int32_t* segment = nullptr;
  const int32_t* group = nullptr;
  const int32_t* seg_start = nullptr;
  const int32_t* seg_end = nullptr;
  const int32_t* group_index = nullptr;
  const int32_t* group_offsets = nullptr;
  const int32_t* summary_index = nullptr;
  const int32_t* summary_offsets = nullptr;

  int64_t chunks_per_row() const { return (length + chunk - 1) / chunk; }
  // Element offset of the first row of query head bh (= b * heads + h), and of the k/v head that head reads.
  int64_t query_head(const Strides& st, int64_t bh) const { return (bh / heads) * st.batch + (bh % heads) * st.head; }
  int64_t kv_head(const Strides& st, int64_t bh) const {
    return (bh / heads) * st.batch + ((bh % heads) / (heads / kv_heads)) * st.head;
  }
  // Whether the backward needs its separate summary phase: a row of one chunk has its summary rows finished by
  // its run task (partial sums in the task's scratch); longer rows share Params::summary_partials.
  bool summary_phase() const { return max_summary > 0 && chunks_per_row() > 1; }
};

// One instruction set's kernel bodies. Each phase processes tasks [begin, end) with a caller-provided scratch
// buffer of scratch_bytes(params) bytes; tasks of a phase write disjoint output rows, so phases parallelise
// over tasks with no synchronisation and every output element is computed in one fixed order.
struct KernelTable {
  const char* name;
  int64_t (*scratch_bytes)(const Params&);
  // Forward over (b, h) x (chunks + max_summary) tasks: a chunk's task computes the segment runs starting in it
  // (zeros for padding), a summary slot's task the row of a summary token.
  void (*forward)(const Params&, int64_t begin, int64_t end, void* scratch);
  // Backward phase 1 over (b, h) x chunks tasks: dq/dk/dv of the segment runs starting in the chunk (zeros for
  // padding) and the chunk's partial sums of its summary tokens' gradients (Params::summary_partials).
  void (*backward_runs)(const Params&, int64_t begin, int64_t end, void* scratch);
  // Backward phase 2 over (b, h) x max_summary tasks, only when summary_phase(): a summary token's dq/dk/dv
  // from the partial sums.
  void (*backward_summaries)(const Params&, int64_t begin, int64_t end, void* scratch);
};

namespace generic { const KernelTable& kernel_table(); }
namespace avx2 { const KernelTable& kernel_table(); }
namespace avx512 { const KernelTable& kernel_table(); }

}  // namespace clear_cpu
