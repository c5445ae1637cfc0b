// Host build of the CUDA kernels' per-row algorithms (csrc/cuda/segment_attention_rows.cuh) for the tests, run
// through the very functions the GPU warps run, by two executors:
// * serial: every row on one host "lane" holding the whole head dim;
// * simulated warp: 32 host threads, one per lane, with the head dim spread across them exactly as on the GPU
//   (elements_per_lane buckets, masked tails) and the shuffle butterfly reproduced through a barrier.
// tests/test_cuda_host_rows.py compiles this into a shared library (C++20 for std::barrier) and compares both with
// the float64 reference, which checks the key walk, the online softmax, the backward formulas and the lane
// mapping without a GPU.
#include <barrier>
#include <cstdint>
#include <thread>
#include <type_traits>
#include <vector>

#include "segment_attention_rows.cuh"

using namespace clear_kernels::cuda;

namespace {

LayoutView make_layout(const int32_t* const* ids, int num_groups, int max_summary) {
  return LayoutView{ids[0], ids[1], ids[2], ids[3], ids[4], ids[5], max_summary > 0 ? ids[6] : nullptr, ids[7],
                    num_groups, max_summary};
}

template <typename T>
void serial_forward_all(const ForwardArgs<T>& args) {
  const int64_t rows = static_cast<int64_t>(args.batch) * args.heads * args.length;
  for (int64_t row = 0; row < rows; ++row) forward_row<kMaxHeadDim>(args, row, SerialLanes{});
}

template <typename T>
void serial_backward_all(const BackwardArgs<T>& args) {
  const int64_t rows = static_cast<int64_t>(args.batch) * args.heads * args.length;
  const int64_t kv_rows = static_cast<int64_t>(args.batch) * args.kv_heads * args.length;
  // Same order as on the GPU: every delta exists before any dk/dv row reads it.
  for (int64_t row = 0; row < rows; ++row) grad_query_row<kMaxHeadDim>(args, row, SerialLanes{});
  for (int64_t row = 0; row < kv_rows; ++row) grad_key_row<kMaxHeadDim>(args, row, SerialLanes{});
}

// ------------------------------------------------------------------------------------------ simulated warp
struct SimulatedWarp {
  std::barrier<> sync{32};
  float slots[32];
};

// One lane of a SimulatedWarp. sum() returns what the device's xor-shuffle butterfly leaves in this lane: at each
// step every lane adds the value of the lane whose index differs in one bit, all lanes at once.
struct SimulatedLanes {
  static constexpr int kWidth = 32;
  int lane;
  SimulatedWarp* warp;

  float sum(float x) const {
    warp->slots[lane] = x;
    warp->sync.arrive_and_wait();
    float value[32], next[32];
    for (int j = 0; j < 32; ++j) value[j] = warp->slots[j];
    for (int offset = 16; offset > 0; offset /= 2) {
      for (int j = 0; j < 32; ++j) next[j] = value[j] + value[j ^ offset];
      for (int j = 0; j < 32; ++j) value[j] = next[j];
    }
    warp->sync.arrive_and_wait();  // nobody overwrites the slots before every lane has read them
    return value[lane];
  }
};

// Runs body(lanes) on 32 threads, one per lane, like one warp that executes every row in turn.
template <typename Body>
void run_simulated_warp(Body body) {
  SimulatedWarp warp;
  std::vector<std::thread> lanes;
  for (int lane = 0; lane < 32; ++lane) lanes.emplace_back([&warp, &body, lane] { body(SimulatedLanes{lane, &warp}); });
  for (auto& t : lanes) t.join();
}

template <typename Fn>
void with_elements_per_lane(int head_dim, Fn fn) {
  switch (elements_per_lane(head_dim)) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 6: fn(std::integral_constant<int, 6>{}); break;
    default: fn(std::integral_constant<int, 8>{}); break;
  }
}

template <typename T>
void warp_forward_all(const ForwardArgs<T>& args) {
  const int64_t rows = static_cast<int64_t>(args.batch) * args.heads * args.length;
  with_elements_per_lane(args.head_dim, [&](auto epl) {
    run_simulated_warp([&](const SimulatedLanes& lanes) {
      for (int64_t row = 0; row < rows; ++row) forward_row<decltype(epl)::value>(args, row, lanes);
    });
  });
}

template <typename T>
void warp_backward_all(const BackwardArgs<T>& args) {
  const int64_t rows = static_cast<int64_t>(args.batch) * args.heads * args.length;
  const int64_t kv_rows = static_cast<int64_t>(args.batch) * args.kv_heads * args.length;
  with_elements_per_lane(args.head_dim, [&](auto epl) {
    run_simulated_warp([&](const SimulatedLanes& lanes) {
      for (int64_t row = 0; row < rows; ++row) grad_query_row<decltype(epl)::value>(args, row, lanes);
      lanes.warp->sync.arrive_and_wait();  // the second kernel launch: every delta is written
      for (int64_t row = 0; row < kv_rows; ++row) grad_key_row<decltype(epl)::value>(args, row, lanes);
    });
  });
}

template <typename T>
void forward_all(bool simulate_warp, const void* q, const void* k, const void* v, void* out, float* lse,
                 const LayoutView& layout, int batch, int heads, int kv_heads, int length, int head_dim, float scale,
                 bool causal) {
  const ForwardArgs<T> args{static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
                            static_cast<T*>(out), lse, layout, batch, heads, length, head_dim, scale, kv_heads,
                            causal};
  simulate_warp ? warp_forward_all(args) : serial_forward_all(args);
}

template <typename T>
void backward_all(bool simulate_warp, const void* grad_out, const void* q, const void* k, const void* v,
                  const void* out, const float* lse, float* delta, void* grad_q, void* grad_k, void* grad_v,
                  const LayoutView& layout, int batch, int heads, int kv_heads, int length, int head_dim,
                  float scale, bool causal) {
  const BackwardArgs<T> args{static_cast<const T*>(grad_out), static_cast<const T*>(q), static_cast<const T*>(k),
                             static_cast<const T*>(v), static_cast<const T*>(out), lse, delta,
                             static_cast<T*>(grad_q), static_cast<T*>(grad_k), static_cast<T*>(grad_v),
                             layout, batch, heads, length, head_dim, scale, kv_heads, causal};
  simulate_warp ? warp_backward_all(args) : serial_backward_all(args);
}

}  // namespace

// kind: 0 float32, 1 float16, 2 bfloat16. simulate_warp: 0 serial, 1 32-lane simulated warp. ids: the 8 layout
// tensors in op-schema order. k and v have kv_heads heads; causal: causal segments. Returns 0, or -1 for a bad
// kind, head dim or kv_heads.
extern "C" int host_rows_forward(int kind, int simulate_warp, const void* q, const void* k, const void* v, void* out,
                                 float* lse, const int32_t* const* ids, int num_groups, int max_summary, int batch,
                                 int heads, int kv_heads, int length, int head_dim, float scale, int causal) {
  if (head_dim < 1 || head_dim > kMaxHeadDim || kv_heads < 1 || heads % kv_heads) return -1;
  const LayoutView layout = make_layout(ids, num_groups, max_summary);
  const bool warp = simulate_warp != 0, c = causal != 0;
  switch (kind) {
    case 0:
      forward_all<float>(warp, q, k, v, out, lse, layout, batch, heads, kv_heads, length, head_dim, scale, c);
      return 0;
    case 1:
      forward_all<__half>(warp, q, k, v, out, lse, layout, batch, heads, kv_heads, length, head_dim, scale, c);
      return 0;
    case 2:
      forward_all<__nv_bfloat16>(warp, q, k, v, out, lse, layout, batch, heads, kv_heads, length, head_dim, scale,
                                 c);
      return 0;
    default: return -1;
  }
}

extern "C" int host_rows_backward(int kind, int simulate_warp, const void* grad_out, const void* q, const void* k,
                                  const void* v, const void* out, const float* lse, float* delta, void* grad_q,
                                  void* grad_k, void* grad_v, const int32_t* const* ids, int num_groups,
                                  int max_summary, int batch, int heads, int kv_heads, int length, int head_dim,
                                  float scale, int causal) {
  if (head_dim < 1 || head_dim > kMaxHeadDim || kv_heads < 1 || heads % kv_heads) return -1;
  const LayoutView layout = make_layout(ids, num_groups, max_summary);
  const bool warp = simulate_warp != 0, c = causal != 0;
  switch (kind) {
    case 0:
      backward_all<float>(warp, grad_out, q, k, v, out, lse, delta, grad_q, grad_k, grad_v, layout, batch, heads,
                          kv_heads, length, head_dim, scale, c);
      return 0;
    case 1:
      backward_all<__half>(warp, grad_out, q, k, v, out, lse, delta, grad_q, grad_k, grad_v, layout, batch, heads,
                           kv_heads, length, head_dim, scale, c);
      return 0;
    case 2:
      backward_all<__nv_bfloat16>(warp, grad_out, q, k, v, out, lse, delta, grad_q, grad_k, grad_v, layout, batch,
                                  heads, kv_heads, length, head_dim, scale, c);
      return 0;
    default: return -1;
  }
}

// The keys token t of batch element b attends (as_key: the queries that attend it), in walk order, into
// keys[0:L]; returns how many.
extern "C" int host_rows_key_walk(const int32_t* const* ids, int num_groups, int max_summary, int length, int b,
                                  int t, int causal, int as_key, int32_t* keys) {
  const KeyWalk walk = walk_of(make_layout(ids, num_groups, max_summary), length, b, t, causal != 0, as_key != 0);
  const int n = walk.size();
  for (int i = 0; i < n && i < length; ++i) keys[i] = walk.key(i);
  return n;
}
