// The per-row algorithms of the CUDA segment-attention kernels, written once for two executors:
//
// * on the GPU a warp runs one row, the head dim spread across its 32 lanes (see WarpLanes in
//   segment_attention_kernels.cuh);
// * on the host, for the tests: one "lane" runs the whole row (SerialLanes below), or 32 threads simulate a warp
//   (tests/csrc/segment_attention_host_rows.cpp). tests/test_cuda_host_rows.py compares both with the float64
//   reference, so the key walk, the online softmax, the backward formulas and the lane mapping are checked on
//   machines without a GPU. Only the shuffle instructions and the launches are GPU-only.
//
// Needs only the CUDA toolkit headers (for __half / __nv_bfloat16); no PyTorch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "segment_attention_launch.h"

#if defined(__CUDACC__)
#define CLEAR_HD __host__ __device__ __forceinline__
#else
#define CLEAR_HD inline
#endif
// Unrolling hints for the device pass only: the host compiler would warn about an unknown pragma.
#if defined(__CUDA_ARCH__)
#define CLEAR_UNROLL _Pragma("unroll")
#else
#define CLEAR_UNROLL
#endif

namespace clear_kernels {
namespace cuda {

constexpr int kSummary = -1;
constexpr int kPadding = -2;
// Keys scored per step of a row: their dot-product reductions are independent, so the shuffles overlap.
constexpr int kKeysPerStep = 4;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Elements per lane of a warp for a head dim: ceil(D / 32), rounded up to one of 1, 2, 3, 4, 6, 8 so that few
// kernels are instantiated (D = 160 runs with 6 and masks the tail). The launchers and the host tests share it.
CLEAR_HD constexpr int elements_per_lane(int head_dim) {
  return (head_dim + 31) / 32 <= 4 ? (head_dim + 31) / 32 : ((head_dim + 31) / 32 <= 6 ? 6 : 8);
}

// ------------------------------------------------------------------------------------------ element conversions
CLEAR_HD float to_float(float x) { return x; }
CLEAR_HD float to_float(__half x) { return __half2float(x); }
CLEAR_HD float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
CLEAR_HD T from_float(float x);
template <>
CLEAR_HD float from_float<float>(float x) { return x; }
template <>
CLEAR_HD __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
CLEAR_HD __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

CLEAR_HD float fast_exp2(float x) {
#if defined(__CUDA_ARCH__)
  return exp2f(x);  // ex2.approx under --use_fast_math
#else
  return std::exp2(x);
#endif
}

// ------------------------------------------------------------------------------------------ the layout
// LayoutView (the raw index tensors) is declared in segment_attention_launch.h.

// The keys a token attends as a query: first a contiguous run of positions, then a list of positions. Because
// the attention rule is symmetric, the same walk also lists the queries that attend the token as a key, which is
// what makes the dk/dv pass a gather with no atomics. With causal segments the run is the one part that is not
// symmetric: as a query, token t of run [s, e) walks [s, t]; as a key it is seen by [t, e) (walk_of's as_key).
// The walks hold only those positions, so no work above the diagonal is done.
struct KeyWalk {
  int run_start;
  int run_len;
  const int32_t* list;
  int list_len;

  CLEAR_HD int size() const { return run_len + list_len; }
  CLEAR_HD int key(int i) const { return i < run_len ? run_start + i : list[i - run_len]; }
};

// Heartbeat token: its run [seg_start, seg_end) plus its group's summary tokens. Summary token: every non-padding
// token of its group (itself included). Padding: nothing.
CLEAR_HD KeyWalk walk_of(const LayoutView& lay, int length, int b, int t, bool causal = false, bool as_key = false) {
  KeyWalk walk{t, 0, nullptr, 0};
  const int64_t bt = static_cast<int64_t>(b) * length + t;
  const int seg = lay.segment[bt];
  if (seg <= kPadding) return walk;  // padding (ids below -2 are malformed; treated alike)
  const int g = lay.group[bt];
  if (g < 0 || g >= lay.num_groups) return walk;  // a malformed layout must not make us read out of bounds
  const int64_t off_row = static_cast<int64_t>(b) * (lay.num_groups + 1);
  if (seg >= 0) {
    walk.run_start = causal && as_key ? t : lay.seg_start[bt];
    walk.run_len = (causal && !as_key ? t + 1 : lay.seg_end[bt]) - walk.run_start;
    const int32_t* offsets = lay.summary_offsets + off_row;
    walk.list_len = offsets[g + 1] - offsets[g];
    if (walk.list_len > 0) walk.list = lay.summary_index + static_cast<int64_t>(b) * lay.max_summary + offsets[g];
  } else {
    const int32_t* offsets = lay.group_offsets + off_row;
    walk.list_len = offsets[g + 1] - offsets[g];
    if (walk.list_len > 0) walk.list = lay.group_index + static_cast<int64_t>(b) * length + offsets[g];
  }
  return walk;
}

// ------------------------------------------------------------------------------------------ the host executor
// One lane that holds the whole row; the reduction over lanes is the identity.
struct SerialLanes {
  static constexpr int kWidth = 1;
  int lane = 0;
  CLEAR_HD float sum(float x) const { return x; }
};

// ------------------------------------------------------------------------------------------ the operands
// k and v (and their gradients) have kv_heads heads; query head h reads kv head h / (heads / kv_heads)
// (grouped-query attention; kv_heads == heads is plain multi-head attention).
template <typename T>
struct ForwardArgs {
  const T* q;  // [B, H, L, D]
  const T* k;  // [B, H_kv, L, D]
  const T* v;
  T* out;      // [B, H, L, D]
  float* lse;  // [B, H, L], natural log
  LayoutView layout;
  int batch, heads, length, head_dim;
  float scale;
  int kv_heads;
  bool causal;
};

// Element offset of the (b, kv head) slice that query row `row` = (b * H + h) * L + t reads.
CLEAR_HD int64_t kv_head_base(int64_t row, int heads, int kv_heads, int length, int head_dim) {
  const int64_t bh = row / length;
  const int64_t b = bh / heads, h = bh % heads;
  return (b * kv_heads + h / (heads / kv_heads)) * length * head_dim;
}

template <typename T>
struct BackwardArgs {
  const T* grad_out;  // [B, H, L, D]
  const T* q;
  const T* k;
  const T* v;
  const T* out;
  const float* lse;   // [B, H, L]
  float* delta;       // [B, H, L] workspace: rowsum(grad_out * out), written by the dq pass, read by dk/dv
  T* grad_q;
  T* grad_k;          // [B, H_kv, L, D]
  T* grad_v;
  LayoutView layout;
  int batch, heads, length, head_dim;
  float scale;
  int kv_heads;
  bool causal;
};

// Lane `lane` of a row owns elements lane, lane + W, lane + 2W, ... (coalesced loads across a warp).
template <int EPL, typename Lanes, typename T>
CLEAR_HD void load_row(float (&dst)[EPL], const T* row, int head_dim, const Lanes& lanes, float factor = 1.f) {
CLEAR_UNROLL
  for (int i = 0; i < EPL; ++i) {
    const int d = lanes.lane + Lanes::kWidth * i;
    dst[i] = d < head_dim ? to_float(row[d]) * factor : 0.f;
  }
}

template <int EPL, typename Lanes, typename T>
CLEAR_HD void store_row(T* row, const float (&src)[EPL], int head_dim, const Lanes& lanes, float factor) {
CLEAR_UNROLL
  for (int i = 0; i < EPL; ++i) {
    const int d = lanes.lane + Lanes::kWidth * i;
    if (d < head_dim) row[d] = from_float<T>(src[i] * factor);
  }
}

// This lane's share of dot(a, row).
template <int EPL, typename Lanes, typename T>
CLEAR_HD float partial_dot(const float (&a)[EPL], const T* row, int head_dim, const Lanes& lanes) {
  float acc = 0.f;
CLEAR_UNROLL
  for (int i = 0; i < EPL; ++i) {
    const int d = lanes.lane + Lanes::kWidth * i;
    if (d < head_dim) acc += a[i] * to_float(row[d]);
  }
  return acc;
}

// acc += w * row
template <int EPL, typename Lanes, typename T>
CLEAR_HD void add_scaled(float (&acc)[EPL], float w, const T* row, int head_dim, const Lanes& lanes) {
CLEAR_UNROLL
  for (int i = 0; i < EPL; ++i) {
    const int d = lanes.lane + Lanes::kWidth * i;
    if (d < head_dim) acc[i] += w * to_float(row[d]);
  }
}

// ------------------------------------------------------------------------------------------ forward
// Row `row` = (b * H + h) * L + t: out[row] = softmax(scale * q k^T) v over the row's keys, online softmax in the
// log2 domain (q is pre-scaled by scale * log2(e)), lse in natural log; padding rows get 0 and 0.
template <int EPL, typename Lanes, typename T>
CLEAR_HD void forward_row(const ForwardArgs<T>& a, int64_t row, const Lanes& lanes) {
  const int D = a.head_dim;
  const int t = static_cast<int>(row % a.length);
  const int b = static_cast<int>(row / (static_cast<int64_t>(a.heads) * a.length));
  const int64_t head_base = kv_head_base(row, a.heads, a.kv_heads, a.length, D);  // the k/v slice it reads
  const KeyWalk walk = walk_of(a.layout, a.length, b, t, a.causal);

  float qrow[EPL], acc[EPL];
  load_row(qrow, a.q + row * D, D, lanes, a.scale * kLog2e);
CLEAR_UNROLL
  for (int i = 0; i < EPL; ++i) acc[i] = 0.f;
  float running_max = -INFINITY, denom = 0.f;

  const int n = walk.size();
  for (int first = 0; first < n; first += kKeysPerStep) {
    int keys[kKeysPerStep];
    float score[kKeysPerStep];
CLEAR_UNROLL
    for (int c = 0; c < kKeysPerStep; ++c) {
      keys[c] = first + c < n ? walk.key(first + c) : -1;
      score[c] = keys[c] >= 0 ? partial_dot(qrow, a.k + head_base + static_cast<int64_t>(keys[c]) * D, D, lanes) : 0.f;
    }
    float step_max = running_max;
CLEAR_UNROLL
    for (int c = 0; c < kKeysPerStep; ++c) {
      score[c] = lanes.sum(score[c]);
      if (keys[c] >= 0) step_max = fmaxf(step_max, score[c]);
    }
    // running_max is -inf only before the first key, when acc and denom are still 0.
    const float correction = running_max == -INFINITY ? 0.f : fast_exp2(running_max - step_max);
    denom *= correction;
CLEAR_UNROLL
    for (int i = 0; i < EPL; ++i) acc[i] *= correction;
CLEAR_UNROLL
    for (int c = 0; c < kKeysPerStep; ++c) {
      if (keys[c] < 0) continue;
      const float p = fast_exp2(score[c] - step_max);
      denom += p;
      add_scaled(acc, p, a.v + head_base + static_cast<int64_t>(keys[c]) * D, D, lanes);
    }
    running_max = step_max;
  }

  const bool any = denom > 0.f;
  store_row(a.out + row * D, acc, D, lanes, any ? 1.f / denom : 0.f);
  if (lanes.lane == 0) a.lse[row] = any ? (running_max + log2f(denom)) * kLn2 : 0.f;
}

// ------------------------------------------------------------------------------------------ backward
// Pass 1, per query row: delta = rowsum(dO * O) (stored for pass 2) and
// dq = scale * sum_k P[q,k] (dO[q].v[k] - delta) k[k], with P recomputed from the saved lse.
template <int EPL, typename Lanes, typename T>
CLEAR_HD void grad_query_row(const BackwardArgs<T>& a, int64_t row, const Lanes& lanes) {
  const int D = a.head_dim;
  const int t = static_cast<int>(row % a.length);
  const int b = static_cast<int>(row / (static_cast<int64_t>(a.heads) * a.length));
  const int64_t head_base = kv_head_base(row, a.heads, a.kv_heads, a.length, D);
  const KeyWalk walk = walk_of(a.layout, a.length, b, t, a.causal);
  const int n = walk.size();

  float dout[EPL], qrow[EPL], acc[EPL];
  load_row(dout, a.grad_out + row * D, D, lanes);
  float out_row[EPL];
  load_row(out_row, a.out + row * D, D, lanes);
  float delta_part = 0.f;
CLEAR_UNROLL
  for (int i = 0; i < EPL; ++i) {
    delta_part += dout[i] * out_row[i];
    acc[i] = 0.f;
  }
  const float delta = n > 0 ? lanes.sum(delta_part) : 0.f;
  if (lanes.lane == 0) a.delta[row] = delta;
  load_row(qrow, a.q + row * D, D, lanes, a.scale * kLog2e);
  const float lse2 = a.lse[row] * kLog2e;

  for (int first = 0; first < n; first += kKeysPerStep) {
    int keys[kKeysPerStep];
    float score[kKeysPerStep], dp[kKeysPerStep];
CLEAR_UNROLL
    for (int c = 0; c < kKeysPerStep; ++c) {
      keys[c] = first + c < n ? walk.key(first + c) : -1;
      const int64_t at = head_base + static_cast<int64_t>(keys[c] >= 0 ? keys[c] : t) * D;
      score[c] = keys[c] >= 0 ? partial_dot(qrow, a.k + at, D, lanes) : 0.f;
      dp[c] = keys[c] >= 0 ? partial_dot(dout, a.v + at, D, lanes) : 0.f;
    }
CLEAR_UNROLL
    for (int c = 0; c < kKeysPerStep; ++c) {
      score[c] = lanes.sum(score[c]);
      dp[c] = lanes.sum(dp[c]);
    }
CLEAR_UNROLL
    for (int c = 0; c < kKeysPerStep; ++c) {
      if (keys[c] < 0) continue;
      const float ds = fast_exp2(score[c] - lse2) * (dp[c] - delta);
      add_scaled(acc, ds, a.k + head_base + static_cast<int64_t>(keys[c]) * D, D, lanes);
    }
  }
  store_row(a.grad_q + row * D, acc, D, lanes, a.scale);
}

// Pass 2, per key row of a kv head, row = (b * H_kv + j) * L + t: the queries that attend key t are the tokens
// t attends (symmetric rule; with causal segments, walk_of's as_key walk), in each query head that reads kv head j,
// so dv[t] = sum_q P[q,t] dO[q] and dk[t] = scale * sum_q P[q,t] (dO[q].v[t] - delta[q]) q[q], the query heads
// taken in order (deterministic); padding keys get 0.
template <int EPL, typename Lanes, typename T>
CLEAR_HD void grad_key_row(const BackwardArgs<T>& a, int64_t row, const Lanes& lanes) {
  const int D = a.head_dim;
  const int t = static_cast<int>(row % a.length);
  const int64_t bj = row / a.length;
  const int b = static_cast<int>(bj / a.kv_heads);
  const int group_size = a.heads / a.kv_heads;
  const KeyWalk walk = walk_of(a.layout, a.length, b, t, a.causal, true);
  const int n = walk.size();

  float krow[EPL], vrow[EPL], dk[EPL], dv[EPL];
  load_row(krow, a.k + row * D, D, lanes, a.scale * kLog2e);
  load_row(vrow, a.v + row * D, D, lanes);
CLEAR_UNROLL
  for (int i = 0; i < EPL; ++i) dk[i] = dv[i] = 0.f;

  for (int hq = 0; hq < group_size; ++hq) {
    // Row index of token 0 of query head (b, (bj % H_kv) * group_size + hq).
    const int64_t head_row = (static_cast<int64_t>(b) * a.heads + (bj % a.kv_heads) * group_size + hq) * a.length;
    const int64_t head_base = head_row * D;
    for (int first = 0; first < n; first += kKeysPerStep) {
      int queries[kKeysPerStep];
      float score[kKeysPerStep], dp[kKeysPerStep];
CLEAR_UNROLL
      for (int c = 0; c < kKeysPerStep; ++c) {
        queries[c] = first + c < n ? walk.key(first + c) : -1;
        const int64_t at = head_base + static_cast<int64_t>(queries[c] >= 0 ? queries[c] : t) * D;
        score[c] = queries[c] >= 0 ? partial_dot(krow, a.q + at, D, lanes) : 0.f;
        dp[c] = queries[c] >= 0 ? partial_dot(vrow, a.grad_out + at, D, lanes) : 0.f;
      }
CLEAR_UNROLL
      for (int c = 0; c < kKeysPerStep; ++c) {
        score[c] = lanes.sum(score[c]);
        dp[c] = lanes.sum(dp[c]);
      }
CLEAR_UNROLL
      for (int c = 0; c < kKeysPerStep; ++c) {
        if (queries[c] < 0) continue;
        const int64_t qrow_index = head_row + queries[c];
        const float p = fast_exp2(score[c] - a.lse[qrow_index] * kLog2e);
        const float ds = p * (dp[c] - a.delta[qrow_index]);
        add_scaled(dv, p, a.grad_out + qrow_index * D, D, lanes);
        add_scaled(dk, ds, a.q + qrow_index * D, D, lanes);
      }
    }
  }
  store_row(a.grad_k + row * D, dk, D, lanes, a.scale);
  store_row(a.grad_v + row * D, dv, D, lanes, 1.f);
}

}  // namespace cuda
}  // namespace clear_kernels
