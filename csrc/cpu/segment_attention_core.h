// The CPU segment-attention kernel bodies, compiled once per instruction set (kernel_isa_*.cpp define CLEAR_ARCH
// and CLEAR_VEC_BYTES, switch the target, then include this file). No PyTorch header may be included here.
//
// Work decomposition (every output row is written by exactly one task, in a fixed order: deterministic, no
// atomics, and independent of the thread count):
//  * run tasks (b, h, chunk of positions): a chunk owns the segment runs that start in it and its padding rows.
//    A run of n queries attends its n keys plus each query's group summary keys; the run's n x n score block is
//    computed once and reused for dq and for dk/dv of the run's keys. While it runs, the next run's rows are
//    prefetched, one row per row processed.
//  * summary tasks (b, h, summary slot): a summary token's row. The forward gathers its group's keys and values
//    (after the head's runs, so they are in cache). The backward does not gather: each run task adds its tokens'
//    share of their summary tokens' dq/dk/dv to per-chunk partial sums while the rows are hot, and the summary
//    task adds those up in chunk order, plus the token's pairs with the other summary tokens of its group.
// Scores live only in per-thread scratch: one row per query of a run tile, so memory stays O(B*H*L*D).

#include "vector_math.h"

constexpr int32_t kSummary = -1;
constexpr int32_t kPadding = -2;
constexpr int64_t kQueryTile = 32;  // query rows of a run processed together (bounds the score tile)
constexpr int64_t kRows = 8;        // single-row buffers (converted rows of summary tokens and their partners)

// ------------------------------------------------------------------------------------------ element access
inline float bf16_to_float(uint16_t x) {
  const uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  __builtin_memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  __builtin_memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN stays NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);                   // round to nearest even
  return static_cast<uint16_t>(bits >> 16);
}

// `count` consecutive elements of the input as compute type T: the input itself when it already is T,
// otherwise converted into `buf`.
template <typename Src, typename T>
inline const T* as_compute(const Src* src, int64_t count, T* buf) {
  if constexpr (SameType<Src, T>::value) {
    (void)count;
    (void)buf;
    return src;
  } else {
    for (int64_t i = 0; i < count; ++i) buf[i] = bf16_to_float(src[i]);
    return buf;
  }
}

// The rows of one head of a [B, H, L, D] tensor: row t starts `stride` elements after row t - 1.
template <typename P>
struct HeadRows {
  P* base;
  int64_t stride;
  P* operator()(int64_t t) const { return base + t * stride; }
};

// Query head bh's rows of a tensor with the query heads (q, out, grad_out, dq, and dk/dv, which are indexed by
// query head), and the rows of the key/value head that query head reads (k, v).
template <typename P, typename Ptr>
inline HeadRows<P> query_rows(const Params& p, Ptr data, const Strides& st, int64_t bh) {
  return {static_cast<P*>(data) + p.query_head(st, bh), st.row};
}
template <typename P>
inline HeadRows<P> kv_rows(const Params& p, const void* data, const Strides& st, int64_t bh) {
  return {static_cast<P*>(data) + p.kv_head(st, bh), st.row};
}

// Rows [r0, r0 + n) as one block of n x D elements of compute type T: the rows themselves when they already are
// such a block, otherwise copied (strided rows) or converted (bfloat16) into buf. The copy of a strided block costs
// one pass over rows that the kernel reads next anyway, instead of a copy of the whole tensor before the op.
template <typename Src, typename T>
inline const T* load_rows(const HeadRows<const Src>& rows, int64_t r0, int64_t n, int64_t D, T* buf) {
  if constexpr (SameType<Src, T>::value) {
    if (rows.stride == D) return rows(r0);
    for (int64_t i = 0; i < n; ++i) __builtin_memcpy(buf + i * D, rows(r0 + i), D * sizeof(T));
    return buf;
  } else {
    for (int64_t i = 0; i < n; ++i) as_compute(rows(r0 + i), D, buf + i * D);
    return buf;
  }
}

// dst = src * mult, in the storage type.
template <typename Src, typename T>
inline void store_scaled(Src* dst, const T* src, T mult, int64_t D) {
  if constexpr (SameType<Src, T>::value) {
    scale_row_out(dst, src, mult, D);
  } else {
    for (int64_t d = 0; d < D; ++d) dst[d] = float_to_bf16(src[d] * mult);
  }
}

template <typename Src>
inline void store_zero(Src* dst, int64_t D) {
  for (int64_t d = 0; d < D; ++d) dst[d] = Src(0);
}

// -------------------------------------------------------------------------------------------- scratch
// Carves the per-thread buffer (scratch_elems decides its size; both must list the same pieces).
template <typename T>
struct Scratch {
  T *q, *k, *v, *dout, *dq, *dk, *dv;  // max_run rows each
  T* rows;                             // kRows single rows (summary tokens and their partners)
  T* acc;                              // 3 single rows (accumulators of a summary task)
  T *scores, *dscores;                 // score tiles; `scores` also holds one row of L scores
  T *run_lse, *run_delta;              // max_run each
  T* pairs;                            // 4 x pair_cap: a run's pairs with its summary tokens (backward)
  int64_t pair_cap;
  T* summary_delta;                    // max_summary: rowsum(dO * O) of the row's summary tokens, by slot
  T* row_partials;                     // max_summary x 3 x D: the partial sums of a row of one chunk

  // Score rows are padded to whole vectors (exp_shift_sum overwrites up to the next multiple of kExpPad).
  static int64_t round_up(int64_t n) { return (n + 15) / 16 * 16; }  // keeps every piece 64-byte aligned
  static int64_t row_stride(int64_t n) { return round_up(n); }
  static int64_t tile_elems(const Params& p) { return kQueryTile * row_stride(p.max_run + p.max_summary); }
  static int64_t pair_capacity(const Params& p) { return round_up(p.max_run * p.max_group_summary); }
  static int64_t elems(const Params& p) {
    const int64_t D = p.head_dim, R = p.max_run;
    const int64_t tile = round_up(tile_elems(p));
    const int64_t long_tile = tile > round_up(p.length) ? tile : round_up(p.length);
    return 7 * round_up(R * D) + (kRows + 3) * round_up(D) + long_tile + tile + 2 * round_up(R) +
           4 * pair_capacity(p) + round_up(p.max_summary) + round_up(p.max_summary * 3 * D);
  }

  Scratch(const Params& p, void* raw) {
    const int64_t D = p.head_dim, R = p.max_run;
    T* cur = static_cast<T*>(raw);
    auto take = [&cur](int64_t n) {
      T* out = cur;
      cur += round_up(n);
      return out;
    };
    q = take(R * D);
    k = take(R * D);
    v = take(R * D);
    dout = take(R * D);
    dq = take(R * D);
    dk = take(R * D);
    dv = take(R * D);
    rows = cur;
    cur += kRows * round_up(D);
    acc = cur;
    cur += 3 * round_up(D);
    const int64_t tile = tile_elems(p);
    scores = take(tile > p.length ? tile : p.length);
    dscores = take(tile);
    run_lse = take(R);
    run_delta = take(R);
    pair_cap = pair_capacity(p);
    pairs = take(4 * pair_cap);
    summary_delta = take(p.max_summary);
    row_partials = take(p.max_summary * 3 * D);
  }
  T* row(int i, const Params& p) const { return rows + i * round_up(p.head_dim); }
};

// ------------------------------------------------------------------------------------------ layout access
struct LayoutRow {
  const Params& p;
  int64_t b;
  const int32_t* segment() const { return p.segment + b * p.length; }
  const int32_t* group() const { return p.group + b * p.length; }
  const int32_t* seg_start() const { return p.seg_start + b * p.length; }
  const int32_t* seg_end() const { return p.seg_end + b * p.length; }
  // The non-padding tokens of group g, and the summary tokens of group g.
  const int32_t* group_list(int64_t g, int64_t* count) const {
    const int32_t* off = p.group_offsets + b * (p.num_groups + 1);
    *count = off[g + 1] - off[g];
    return p.group_index + b * p.length + off[g];
  }
  const int32_t* summary_list(int64_t g, int64_t* count) const {
    const int32_t* off = p.summary_offsets + b * (p.num_groups + 1);
    *count = off[g + 1] - off[g];
    return p.summary_index + b * p.max_summary + off[g];
  }
  int64_t num_summary() const { return p.summary_offsets[b * (p.num_groups + 1) + p.num_groups]; }
};

// The logsumexp of row t of head bh in compute precision (see Params::lse64).
template <typename T>
inline T row_lse(const Params& p, int64_t bh, int64_t t) {
  if constexpr (SameType<T, double>::value)
    if (p.lse64) return p.lse64[bh * p.length + t];
  return static_cast<T>(p.lse[bh * p.length + t]);
}

template <typename T>
inline void write_lse(const Params& p, int64_t row, T value) {
  if constexpr (SameType<T, double>::value)
    if (p.lse64) {
      p.lse64[row] = value;
      return;
    }
  p.lse_w[row] = static_cast<float>(value);
}

// Scaled scores of `rows` query rows (stride D) against n contiguous keys into s[i * ld + j].
template <typename T>
inline void score_block(const T* qrows, int64_t rows, const T* keys, int64_t n, int64_t D, T scale, T* s,
                        int64_t ld) {
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4)
    for (int64_t j = 0; j < n; ++j) dot4(qrows + i * D, D, keys + j * D, D, s + i * ld + j, ld);
  for (; i < rows; ++i)
    for (int64_t j = 0; j < n; ++j) s[i * ld + j] = dot(qrows + i * D, keys + j * D, D);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j) s[r * ld + j] *= scale;
}

// Asks for the cache lines of one row of D elements ahead of its use (a gathered row the prefetchers cannot guess).
template <typename Src>
inline void prefetch_row(const Src* row, int64_t D) {
  const char* c = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < D * int64_t(sizeof(Src)); b += 64) __builtin_prefetch(c + b, 0, 3);
}

// Software prefetch of the row that the next run of a chunk will read, called once per row processed here so
// the requests are spread out rather than issued in a burst that stalls on the miss queue. The runs walk memory
// in order, yet the hardware prefetchers alone leave each run waiting for its rows: this overlap made the
// passes about a quarter faster at CLEAR's sizes.
template <typename Src>
inline void prefetch_next_run(const HeadRows<const Src>& rows, int64_t t, int64_t run, int64_t L, int64_t D) {
  const int64_t ahead = t + (run > 8 ? run : 8);
  if (ahead < L) prefetch_row(rows(ahead), D);
}

// ------------------------------------------------------------------------------------------------ forward
template <typename Src, typename T>
void forward_run(const Params& p, const LayoutRow& lay, int64_t bh, int64_t r0, int64_t r1, Scratch<T>& s) {
  const int64_t D = p.head_dim, L = p.length, n = r1 - r0;
  const T scale = static_cast<T>(p.scale);
  const auto q = query_rows<const Src>(p, p.q, p.q_st, bh);
  const auto k = kv_rows<const Src>(p, p.k, p.k_st, bh);
  const auto v = kv_rows<const Src>(p, p.v, p.v_st, bh);
  const auto out = query_rows<Src>(p, p.out_w, p.out_st, bh);
  const T* K = load_rows(k, r0, n, D, s.k);
  const T* V = load_rows(v, r0, n, D, s.v);
  const int64_t ld = Scratch<T>::row_stride(n + p.max_summary);
  T* acc = s.acc;
  for (int64_t i0 = r0; i0 < r1; i0 += kQueryTile) {
    const int64_t rows = (r1 - i0 < kQueryTile) ? r1 - i0 : kQueryTile;
    const T* Q = load_rows(q, i0, rows, D, s.q);
    // Causal: the tile needs the run's keys up to its last row only; the keys above the diagonal are not scored
    // (within the tile's own diagonal block, a row's later keys are scored and then left out of its sums).
    score_block(Q, rows, K, p.causal ? i0 + rows - r0 : n, D, scale, s.scores, ld);
    // The tile's scores against its summary keys, four (query, key) pairs per call so that four dot products
    // share one reduction tree. Incomplete groups repeat their first pair: every pair gets the same arithmetic.
    {
      const T* qa[4];
      const T* kb[4];
      T* dst[4];
      int pending = 0;
      auto flush = [&]() {
        for (int r = pending; r < 4; ++r) {
          qa[r] = qa[0];
          kb[r] = kb[0];
        }
        T res[4];
        dot4_pairs(qa[0], kb[0], qa[1], kb[1], qa[2], kb[2], qa[3], kb[3], D, res);
        for (int r = 0; r < pending; ++r) *dst[r] = scale * res[r];
        pending = 0;
      };
      for (int64_t i = 0; i < rows; ++i) {
        int64_t ns;
        const int32_t* sums = lay.summary_list(lay.group()[i0 + i], &ns);
        for (int64_t u = 0; u < ns; ++u) {
          if constexpr (SameType<Src, T>::value) {
            qa[pending] = Q + i * D;
            kb[pending] = k(sums[u]);
            dst[pending] = s.scores + i * ld + n + u;
            if (++pending == 4) flush();
          } else {  // bfloat16: each summary row is converted into its own buffer first
            const T* ks = as_compute(k(sums[u]), D, s.row(0, p));
            s.scores[i * ld + n + u] = scale * dot(Q + i * D, ks, D);
          }
        }
      }
      if (pending > 0) flush();
    }
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t t = i0 + i;
      prefetch_next_run(q, t, n, L, D);
      prefetch_next_run(k, t, n, L, D);
      prefetch_next_run(v, t, n, L, D);
      T* srow = s.scores + i * ld;
      int64_t ns;
      const int32_t* sums = lay.summary_list(lay.group()[t], &ns);
      // The row's run keys: all n, or with causal the first t - r0 + 1; the summary scores move up behind them.
      const int64_t nk = p.causal ? t - r0 + 1 : n;
      for (int64_t u = 0; nk < n && u < ns; ++u) srow[nk + u] = srow[n + u];
      const int64_t m = nk + ns;
      T mx = srow[0];
      for (int64_t j = 1; j < m; ++j) mx = srow[j] > mx ? srow[j] : mx;
      const T sum = exp_shift_sum(srow, m, mx);
      if constexpr (SameType<Src, T>::value) {
        // The run's value rows and the summary tokens' in one register-resident sum.
        combine_rows_at(acc, false, srow, 1, RunThenGathered<T>{V, v.base, sums, nk, D, v.stride}, m, D);
      } else {
        combine_rows(acc, false, srow, 1, V, D, nk, D);
        for (int64_t u = 0; u < ns; ++u)
          axpy(acc, srow[nk + u], as_compute(v(sums[u]), D, s.row(1, p)), D);
      }
      store_scaled(out(t), acc, T(1) / sum, D);
      write_lse<T>(p, bh * L + t, mx + log_scalar(sum));
    }
  }
}

// A summary query attends every token of its group: the group's index list, gathered row by row.
template <typename Src, typename T>
void forward_summary_row(const Params& p, const LayoutRow& lay, int64_t bh, int64_t t, Scratch<T>& s) {
  const int64_t D = p.head_dim, L = p.length;
  const T scale = static_cast<T>(p.scale);
  const auto q = query_rows<const Src>(p, p.q, p.q_st, bh);
  const auto k = kv_rows<const Src>(p, p.k, p.k_st, bh);
  const auto v = kv_rows<const Src>(p, p.v, p.v_st, bh);
  const auto out = query_rows<Src>(p, p.out_w, p.out_st, bh);
  int64_t m;
  const int32_t* keys = lay.group_list(lay.group()[t], &m);
  if (m == 0) {  // cannot happen for a well-formed layout (a summary token is in its own group's list)
    store_zero(out(t), D);
    write_lse<T>(p, bh * L + t, T(0));
    return;
  }
  const T* Q = as_compute(q(t), D, s.row(0, p));
  T* srow = s.scores;
  // Keys four at a time: one pass over q for four scores, one read-modify-write of acc for four value rows.
  // The group's rows are scattered over the sequence (a lead's tokens, one per heartbeat): without asking for
  // them ahead, each gathered row waits a full memory latency.
  constexpr int64_t kAhead = 8;
  for (int64_t u = 0; u < kAhead && u < m; ++u) {
    prefetch_row(k(keys[u]), D);
    prefetch_row(v(keys[u]), D);
  }
  int64_t j = 0;
  for (; j + 4 <= m; j += 4) {
    for (int64_t u = j + kAhead; u < j + kAhead + 4 && u < m; ++u) {
      prefetch_row(k(keys[u]), D);
      prefetch_row(v(keys[u]), D);  // for the second pass below
    }
    const T* kr[4];
    for (int u = 0; u < 4; ++u) kr[u] = as_compute(k(keys[j + u]), D, s.row(1 + u, p));
    dot4p(kr[0], kr[1], kr[2], kr[3], Q, D, srow + j);
    for (int u = 0; u < 4; ++u) srow[j + u] *= scale;
  }
  for (; j < m; ++j) srow[j] = scale * dot(Q, as_compute(k(keys[j]), D, s.row(1, p)), D);
  T mx = srow[0];
  for (int64_t i = 1; i < m; ++i) mx = srow[i] > mx ? srow[i] : mx;
  const T sum = exp_shift_sum(srow, m, mx);
  T* acc = s.acc;
  if constexpr (SameType<Src, T>::value) {
    // Output slices stay in registers while the gathered value rows stream through.
    combine_rows_at(acc, false, srow, 1, GatheredRows<T>{v.base, keys, v.stride}, m, D);
  } else {  // bfloat16: rows are converted one block at a time
    zero(acc, D);
    for (j = 0; j + 4 <= m; j += 4) {
      const T* vr[4];
      for (int u = 0; u < 4; ++u) vr[u] = as_compute(v(keys[j + u]), D, s.row(1 + u, p));
      axpy4(acc, srow + j, vr[0], vr[1], vr[2], vr[3], D);
    }
    for (; j < m; ++j) axpy(acc, srow[j], as_compute(v(keys[j]), D, s.row(1, p)), D);
  }
  store_scaled(out(t), acc, T(1) / sum, D);
  write_lse<T>(p, bh * L + t, mx + log_scalar(sum));
}

// Tasks per head: its run chunks, then its summary slots, so that a summary row (whose keys are spread over the
// whole sequence) finds the head's keys and values already in cache from the runs.
template <typename Src, typename T>
void forward_tasks(const Params& p, int64_t begin, int64_t end, void* raw) {
  Scratch<T> s(p, raw);
  const int64_t chunks = p.chunks_per_row(), per_head = chunks + p.max_summary, L = p.length, D = p.head_dim;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t bh = task / per_head, c = task % per_head;
    const LayoutRow lay{p, bh / p.heads};
    if (c >= chunks) {
      const int64_t slot = c - chunks;
      if (slot < lay.num_summary())
        forward_summary_row<Src, T>(p, lay, bh, p.summary_index[lay.b * p.max_summary + slot], s);
      continue;
    }
    const int64_t t1 = (c + 1) * p.chunk < L ? (c + 1) * p.chunk : L;
    for (int64_t t = c * p.chunk; t < t1; ++t) {
      const int32_t seg = lay.segment()[t];
      if (seg == kPadding) {
        store_zero(query_rows<Src>(p, p.out_w, p.out_st, bh)(t), D);
        write_lse<T>(p, bh * L + t, T(0));
      } else if (seg >= 0 && lay.seg_start()[t] == t) {
        forward_run<Src, T>(p, lay, bh, t, lay.seg_end()[t], s);
      }
    }
  }
  stream_fence();
}

// ----------------------------------------------------------------------------------------------- backward
// Stores token t's dk (times scale) and dv in query head bh's rows, as elements of type Out. Null dk/dv: zeros.
template <typename Out, typename T>
inline void store_kv_rows(const Params& p, int64_t bh, int64_t t, const T* dk, const T* dv, T scale) {
  const int64_t D = p.head_dim;
  Out* gk = query_rows<Out>(p, p.dk, p.dk_st, bh)(t);
  Out* gv = query_rows<Out>(p, p.dv, p.dv_st, bh)(t);
  if (dk) {
    store_scaled(gk, dk, scale, D);
    store_scaled(gv, dv, T(1), D);
  } else {
    store_zero(gk, D);
    store_zero(gv, D);
  }
}

// dk/dv rows are in the storage type, or with grouped-query attention in the compute type, per query head
// (Params::kv_grad_per_query_head).
template <typename Src, typename T>
inline void store_kv_grad(const Params& p, int64_t bh, int64_t t, const T* dk, const T* dv, T scale) {
  if (p.kv_grad_per_query_head)
    store_kv_rows<T>(p, bh, t, dk, dv, scale);
  else
    store_kv_rows<Src>(p, bh, t, dk, dv, scale);
}

// delta = rowsum(dO * O) of every summary token of head bh's row, by slot, into the task's scratch. Every task
// that needs them computes them itself (the same dot products, so the same bits): no phase has to wait for
// another, and a row holds few summary tokens.
template <typename Src, typename T>
void load_summary_delta(const Params& p, const LayoutRow& lay, int64_t bh, Scratch<T>& s) {
  const int64_t D = p.head_dim;
  const auto o = query_rows<const Src>(p, p.out, p.out_st, bh);
  const auto dout = query_rows<const Src>(p, p.grad_out, p.grad_out_st, bh);
  const int64_t count = lay.num_summary();
  for (int64_t u = 0; u < count; ++u) {
    const int64_t t = p.summary_index[lay.b * p.max_summary + u];
    s.summary_delta[u] = dot(as_compute(dout(t), D, s.row(0, p)), as_compute(o(t), D, s.row(1, p)), D);
  }
}

// The partial sums that run chunk `chunk` of head bh leaves for the summary token in slot `slot`: its dq, dk
// and dv contributions from the chunk's heartbeat tokens (unscaled), three rows of D. A row of one chunk keeps
// them in the task's scratch (its summary rows are finished by the same task); longer rows share a buffer.
template <typename T>
inline T* summary_partial(const Params& p, const Scratch<T>& s, int64_t bh, int64_t chunk, int64_t slot) {
  if (!p.summary_phase()) return s.row_partials + slot * 3 * p.head_dim;
  T* base = static_cast<T*>(p.summary_partials);
  return base + ((bh * p.chunks_per_row() + chunk) * p.max_summary + slot) * 3 * p.head_dim;
}

// dq/dk/dv of the run [r0, r1) of head bh, and the run's share of its group summary tokens' gradients (added to
// the chunk's partial sums `part`, indexed by summary slot).
template <typename Src, typename T>
void backward_run(const Params& p, const LayoutRow& lay, int64_t bh, int64_t r0, int64_t r1, T* part, Scratch<T>& s) {
  const int64_t D = p.head_dim, L = p.length, n = r1 - r0;
  const T scale = static_cast<T>(p.scale);
  const auto q = query_rows<const Src>(p, p.q, p.q_st, bh);
  const auto k = kv_rows<const Src>(p, p.k, p.k_st, bh);
  const auto v = kv_rows<const Src>(p, p.v, p.v_st, bh);
  const auto dout = query_rows<const Src>(p, p.grad_out, p.grad_out_st, bh);
  const T* Q = load_rows(q, r0, n, D, s.q);
  const T* K = load_rows(k, r0, n, D, s.k);
  const T* V = load_rows(v, r0, n, D, s.v);
  const T* dO = load_rows(dout, r0, n, D, s.dout);
  for (int64_t i = 0; i < n; ++i) s.run_lse[i] = row_lse<T>(p, bh, r0 + i);

  // The pairs of each token x of the run with each summary token t of its group, both ways round: x attends t
  // and t attends x. First their scores and probabilities (the exponentials in two vector calls), because x's
  // delta needs them: delta_x = rowsum(dO_x * O_x) = sum over x's keys of P * dP, computed from the
  // probabilities at hand instead of reading O from memory.
  T* arg_xt = s.pairs;  // becomes p_xt
  T* arg_tx = s.pairs + s.pair_cap;  // becomes p_tx
  T* dp_xt = s.pairs + 2 * s.pair_cap;
  T* dp_tx = s.pairs + 3 * s.pair_cap;
  int64_t pairs = 0;
  for (int64_t i = 0; i < n; ++i) {
    int64_t ns;
    const int32_t* sums = lay.summary_list(lay.group()[r0 + i], &ns);
    for (int64_t u = 0; u < ns; ++u, ++pairs) {
      const int64_t t = sums[u];
      T prod[4];  // q_x.k_t, q_t.k_x, dO_x.v_t, dO_t.v_x
      dot4_pairs(Q + i * D, as_compute(k(t), D, s.row(0, p)), as_compute(q(t), D, s.row(1, p)), K + i * D,
                 dO + i * D, as_compute(v(t), D, s.row(2, p)), as_compute(dout(t), D, s.row(3, p)), V + i * D, D,
                 prod);
      arg_xt[pairs] = scale * prod[0] - s.run_lse[i];
      arg_tx[pairs] = scale * prod[1] - row_lse<T>(p, bh, t);
      dp_xt[pairs] = prod[2];
      dp_tx[pairs] = prod[3];
    }
  }
  if (pairs > 0) {
    exp_shift_sum(arg_xt, pairs, T(0));
    exp_shift_sum(arg_tx, pairs, T(0));
  }
  for (int64_t i = 0, pr = 0; i < n; ++i) {
    int64_t ns;
    lay.summary_list(lay.group()[r0 + i], &ns);
    T d = T(0);
    for (int64_t u = 0; u < ns; ++u, ++pr) d += arg_xt[pr] * dp_xt[pr];
    s.run_delta[i] = d;  // the summary keys' share; the run keys' share is added below
  }

  // Segment part: the n x n block, one query tile at a time. P = exp(S - lse), dS = P * (dP - delta).
  const int64_t ld = Scratch<T>::row_stride(n);
  for (int64_t i0 = 0; i0 < n; i0 += kQueryTile) {
    const int64_t rows = (n - i0 < kQueryTile) ? n - i0 : kQueryTile;
    T* P = s.scores;
    T* dS = s.dscores;
    // Causal: only the keys up to the tile's last row (see forward_run); each row then uses its first i + 1.
    const int64_t kn = p.causal ? i0 + rows : n;
    score_block(Q + i0 * D, rows, K, kn, D, scale, P, ld);
    score_block(dO + i0 * D, rows, V, kn, D, T(1), dS, ld);
    for (int64_t i = 0; i < rows; ++i) {
      prefetch_next_run(q, r0 + i0 + i, n, L, D);
      prefetch_next_run(k, r0 + i0 + i, n, L, D);
      prefetch_next_run(v, r0 + i0 + i, n, L, D);
      prefetch_next_run(dout, r0 + i0 + i, n, L, D);
      T* prow = P + i * ld;
      T* dsrow = dS + i * ld;
      const int64_t nk = p.causal ? i0 + i + 1 : n;
      exp_shift_sum(prow, nk, s.run_lse[i0 + i]);
      const T di = s.run_delta[i0 + i] + dot_padded(prow, dsrow, nk);
      s.run_delta[i0 + i] = di;
      for (int64_t j = 0; j < nk; ++j) dsrow[j] = prow[j] * (dsrow[j] - di);
      combine_rows(s.dq + (i0 + i) * D, false, dsrow, 1, K, D, nk, D);
    }
    // Key j gets the tile's rows that see it: all of them, or with causal the rows at or after j. Its sums start
    // in the first tile that reaches it (tile 0, or with causal j's own tile) and accumulate after that.
    for (int64_t j = 0; j < kn; ++j) {
      const int64_t first = p.causal && j > i0 ? j - i0 : 0;
      const bool accumulate = p.causal ? j < i0 : i0 > 0;
      combine_rows(s.dk + j * D, accumulate, dS + first * ld + j, ld, Q + (i0 + first) * D, D, rows - first, D);
      combine_rows(s.dv + j * D, accumulate, P + first * ld + j, ld, dO + (i0 + first) * D, D, rows - first, D);
    }
  }

  // Then the pairs' gradients: x's dq (x attends t), x's dk and dv (t attends x), and the summary tokens'
  // shares, added to the chunk's partial sums (indexed by summary slot) which the summary tasks add up in chunk
  // order.
  const int32_t* slots = p.summary_index + lay.b * p.max_summary;
  for (int64_t i = 0, pr = 0; i < n; ++i) {
    int64_t ns;
    const int32_t* sums = lay.summary_list(lay.group()[r0 + i], &ns);
    for (int64_t u = 0; u < ns; ++u, ++pr) {
      const int64_t t = sums[u];
      const T p_xt = arg_xt[pr], p_tx = arg_tx[pr];
      const T ds_xt = p_xt * (dp_xt[pr] - s.run_delta[i]);
      const T ds_tx = p_tx * (dp_tx[pr] - s.summary_delta[sums + u - slots]);
      const T* qt = as_compute(q(t), D, s.row(0, p));
      const T* kt = as_compute(k(t), D, s.row(1, p));
      const T* dot_ = as_compute(dout(t), D, s.row(3, p));
      axpy(s.dq + i * D, ds_xt, kt, D);
      axpy(s.dk + i * D, ds_tx, qt, D);
      axpy(s.dv + i * D, p_tx, dot_, D);
      T* acc = part + (sums + u - slots) * 3 * D;
      axpy(acc, ds_tx, K + i * D, D);           // t's dq
      axpy(acc + D, ds_xt, Q + i * D, D);       // t's dk
      axpy(acc + 2 * D, p_xt, dO + i * D, D);   // t's dv
    }
  }

  const auto dq = query_rows<Src>(p, p.dq, p.dq_st, bh);
  for (int64_t i = 0; i < n; ++i) {
    store_scaled(dq(r0 + i), s.dq + i * D, scale, D);
    store_kv_grad<Src, T>(p, bh, r0 + i, s.dk + i * D, s.dv + i * D, scale);
  }
}

// A summary token's gradients: the run chunks' partial sums (added in chunk order) plus its pairs with the
// summary tokens of its group, itself included.
template <typename Src, typename T>
void backward_summary_row(const Params& p, const LayoutRow& lay, int64_t bh, int64_t slot, Scratch<T>& s) {
  const int64_t D = p.head_dim, S = p.max_summary, chunks = p.chunks_per_row();
  const T scale = static_cast<T>(p.scale);
  const int64_t t = p.summary_index[lay.b * S + slot];
  const auto q = query_rows<const Src>(p, p.q, p.q_st, bh);
  const auto k = kv_rows<const Src>(p, p.k, p.k_st, bh);
  const auto v = kv_rows<const Src>(p, p.v, p.v_st, bh);
  const auto dout = query_rows<const Src>(p, p.grad_out, p.grad_out_st, bh);
  const int32_t* slots = p.summary_index + lay.b * S;
  const T delta_t = s.summary_delta[slot];  // load_summary_delta ran for this row in this task

  T* dq = s.acc;
  T* dk = s.acc + Scratch<T>::round_up(D);
  T* dv = s.acc + 2 * Scratch<T>::round_up(D);
  const T* first = summary_partial<T>(p, s, bh, 0, slot);
  for (int64_t d = 0; d < D; ++d) {
    dq[d] = first[d];
    dk[d] = first[D + d];
    dv[d] = first[2 * D + d];
  }
  for (int64_t c = 1; c < chunks; ++c) {
    const T* part = summary_partial<T>(p, s, bh, c, slot);
    axpy(dq, T(1), part, D);
    axpy(dk, T(1), part + D, D);
    axpy(dv, T(1), part + 2 * D, D);
  }

  const T* qt = as_compute(q(t), D, s.row(0, p));
  const T* kt = as_compute(k(t), D, s.row(1, p));
  const T* vt = as_compute(v(t), D, s.row(2, p));
  const T* dot_ = as_compute(dout(t), D, s.row(3, p));
  const T lse_t = row_lse<T>(p, bh, t);
  int64_t ns;
  const int32_t* sums = lay.summary_list(lay.group()[t], &ns);
  for (int64_t u = 0; u < ns; ++u) {
    const int64_t y = sums[u];
    const T delta_y = s.summary_delta[sums + u - slots];
    const T* qy = as_compute(q(y), D, s.row(4, p));
    const T* ky = as_compute(k(y), D, s.row(5, p));
    const T* vy = as_compute(v(y), D, s.row(6, p));
    const T* doy = as_compute(dout(y), D, s.row(7, p));
    T probs[kExpPad];
    probs[0] = scale * dot(qt, ky, D) - lse_t;              // t attends y
    probs[1] = scale * dot(qy, kt, D) - row_lse<T>(p, bh, y);  // y attends t
    exp_shift_sum(probs, 2, T(0));
    const T ds_ty = probs[0] * (dot(dot_, vy, D) - delta_t);
    const T ds_yt = probs[1] * (dot(doy, vt, D) - delta_y);
    axpy(dq, ds_ty, ky, D);
    axpy(dk, ds_yt, qy, D);
    axpy(dv, probs[1], doy, D);
  }
  store_scaled(query_rows<Src>(p, p.dq, p.dq_st, bh)(t), dq, scale, D);
  store_kv_grad<Src, T>(p, bh, t, dk, dv, scale);
}

// Backward phase 1 over (b, h, chunk) tasks: the runs that start in the chunk (zeros for padding rows), and the
// chunk's partial sums for every summary slot of the row (zeroed first: a chunk may hold no token of a group);
// in a row of one chunk, then its summary rows as well.
template <typename Src, typename T>
void backward_run_tasks(const Params& p, int64_t begin, int64_t end, void* raw) {
  Scratch<T> s(p, raw);
  const int64_t chunks = p.chunks_per_row(), L = p.length, D = p.head_dim;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t bh = task / chunks, c = task % chunks;
    const LayoutRow lay{p, bh / p.heads};
    T* part = p.max_summary > 0 ? summary_partial<T>(p, s, bh, c, 0) : nullptr;
    if (part) {
      zero(part, p.max_summary * 3 * D);
      load_summary_delta<Src, T>(p, lay, bh, s);
    }
    const int64_t t1 = (c + 1) * p.chunk < L ? (c + 1) * p.chunk : L;
    for (int64_t t = c * p.chunk; t < t1; ++t) {
      const int32_t seg = lay.segment()[t];
      if (seg == kPadding) {
        store_zero(query_rows<Src>(p, p.dq, p.dq_st, bh)(t), D);
        store_kv_grad<Src, T>(p, bh, t, static_cast<const T*>(nullptr), nullptr, T(0));
      } else if (seg >= 0 && lay.seg_start()[t] == t) {
        backward_run<Src, T>(p, lay, bh, t, lay.seg_end()[t], part, s);
      }
    }
    if (!p.summary_phase())
      for (int64_t slot = 0; slot < lay.num_summary(); ++slot) backward_summary_row<Src, T>(p, lay, bh, slot, s);
  }
  stream_fence();
}

// Backward phase 2 over (b, h, summary slot) tasks, for rows of more than one chunk (a row of one chunk has its
// summary rows done by its run task, while its rows are still in cache).
template <typename Src, typename T>
void backward_summary_tasks(const Params& p, int64_t begin, int64_t end, void* raw) {
  Scratch<T> s(p, raw);
  int64_t loaded = -1;  // the head whose summary deltas are in s.summary_delta
  for (int64_t task = begin; task < end; ++task) {
    const int64_t bh = task / p.max_summary, slot = task % p.max_summary;
    const LayoutRow lay{p, bh / p.heads};
    if (slot >= lay.num_summary()) continue;
    if (bh != loaded) {
      load_summary_delta<Src, T>(p, lay, bh, s);
      loaded = bh;
    }
    backward_summary_row<Src, T>(p, lay, bh, slot, s);
  }
  stream_fence();
}

// ------------------------------------------------------------------------------------- dtype dispatch
// Storage type -> compute type: float32 and bfloat16 (stored as raw uint16_t) compute in float, float64 in double.
#define CLEAR_DISPATCH_DTYPE(FN, ...)                          \
  switch (p.dtype) {                                           \
    case DType::Float32: FN<float, float>(__VA_ARGS__); break; \
    case DType::BFloat16: FN<uint16_t, float>(__VA_ARGS__); break; \
    case DType::Float64: FN<double, double>(__VA_ARGS__); break; \
  }

inline int64_t scratch_bytes(const Params& p) {
  if (p.dtype == DType::Float64) return Scratch<double>::elems(p) * int64_t(sizeof(double));
  return Scratch<float>::elems(p) * int64_t(sizeof(float));
}
inline void run_forward(const Params& p, int64_t b, int64_t e, void* s) { CLEAR_DISPATCH_DTYPE(forward_tasks, p, b, e, s) }
inline void run_backward_runs(const Params& p, int64_t b, int64_t e, void* s) {
  CLEAR_DISPATCH_DTYPE(backward_run_tasks, p, b, e, s)
}
inline void run_backward_summaries(const Params& p, int64_t b, int64_t e, void* s) {
  CLEAR_DISPATCH_DTYPE(backward_summary_tasks, p, b, e, s)
}
#undef CLEAR_DISPATCH_DTYPE

const KernelTable& make_kernel_table() {
  static const KernelTable table{CLEAR_ARCH_NAME, &scratch_bytes, &run_forward, &run_backward_runs,
                                 &run_backward_summaries};
  return table;
}
