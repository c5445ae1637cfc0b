// Vector building blocks of the CPU kernel, written with GCC/Clang vector extensions so that one source compiles
// to SSE2, AVX2 or AVX-512 depending on the target of the translation unit that includes it (see
// kernel_isa_*.cpp). Included only inside `namespace clear_cpu::CLEAR_ARCH`, after the target switch, so every
// function here is private to one instruction set.
//
// Needs CLEAR_VEC_BYTES (16, 32 or 64) defined by the includer.

template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(CLEAR_VEC_BYTES)));
  typedef int32_t itype __attribute__((vector_size(CLEAR_VEC_BYTES)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(CLEAR_VEC_BYTES)));
  typedef int64_t itype __attribute__((vector_size(CLEAR_VEC_BYTES)));
};

// Horizontal sums by halving with shuffles (a fixed tree: deterministic). One overload per vector width that
// this translation unit's vectors can have; wider ones would be emulated, so they are left out.
typedef float f32x4 __attribute__((vector_size(16)));
typedef double f64x2 __attribute__((vector_size(16)));
inline float reduce_lanes(f32x4 v) {
  v = v + __builtin_shufflevector(v, v, 2, 3, 0, 1);
  v = v + __builtin_shufflevector(v, v, 1, 0, 3, 2);
  return v[0];
}
inline double reduce_lanes(f64x2 v) { return v[0] + v[1]; }
#if CLEAR_VEC_BYTES >= 32
typedef float f32x8 __attribute__((vector_size(32)));
typedef double f64x4 __attribute__((vector_size(32)));
inline float reduce_lanes(f32x8 v) {
  return reduce_lanes(f32x4(__builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7)));
}
inline double reduce_lanes(f64x4 v) {
  return reduce_lanes(f64x2(__builtin_shufflevector(v, v, 0, 1) + __builtin_shufflevector(v, v, 2, 3)));
}
#endif
#if CLEAR_VEC_BYTES >= 64
typedef float f32x16 __attribute__((vector_size(64)));
typedef double f64x8 __attribute__((vector_size(64)));
inline float reduce_lanes(f32x16 v) {
  return reduce_lanes(f32x8(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                            __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15)));
}
inline double reduce_lanes(f64x8 v) {
  return reduce_lanes(f64x4(__builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7)));
}
#endif

template <typename T>
struct Vec {
  using V = typename VecOf<T>::type;
  static constexpr int W = CLEAR_VEC_BYTES / static_cast<int>(sizeof(T));

  // memcpy keeps the loads and stores unaligned-safe; compilers turn them into single vmovups.
  static inline V load(const T* p) {
    V v;
    __builtin_memcpy(&v, p, sizeof(V));
    return v;
  }
  static inline void store(T* p, V v) { __builtin_memcpy(p, &v, sizeof(V)); }
  // x - 0 is exactly x (x + 0 is not, for x = -0), so the compiler emits a bare broadcast.
  static inline V splat(T x) { return x - V{}; }
  static inline T hsum(V v) { return reduce_lanes(v); }
  // {0, 1, ..., W - 1}: compared with a count, it masks the lanes of a partial last vector.
  static inline V iota() {
    V v{};
    for (int l = 0; l < W; ++l) v[l] = T(l);
    return v;
  }
};

// a . b over d < D: two accumulators to hide the FMA latency, then the scalar tail.
template <typename T>
inline T dot(const T* a, const T* b, int64_t D) {
  using VT = Vec<T>;
  constexpr int W = VT::W;
  typename VT::V acc0{}, acc1{};
  int64_t d = 0;
  for (; d + 2 * W <= D; d += 2 * W) {
    acc0 += VT::load(a + d) * VT::load(b + d);
    acc1 += VT::load(a + d + W) * VT::load(b + d + W);
  }
  for (; d + W <= D; d += W) acc0 += VT::load(a + d) * VT::load(b + d);
  T s = VT::hsum(acc0 + acc1);
  for (; d < D; ++d) s += a[d] * b[d];
  return s;
}

// a . b over d < n for rows padded to whole vectors (like exp_shift_sum's): the last, partial vector is loaded
// whole and its lanes past n are masked out, so short rows (a heartbeat's 12 keys) take one vector step
// instead of a chain of scalar FMAs. Lanes past n may hold anything, NaN included.
template <typename T>
inline T dot_padded(const T* a, const T* b, int64_t n) {
  using VT = Vec<T>;
  using V = typename VT::V;
  constexpr int W = VT::W;
  V acc{};
  int64_t d = 0;
  for (; d + W <= n; d += W) acc += VT::load(a + d) * VT::load(b + d);
  if (d < n) {
    const V prod = VT::load(a + d) * VT::load(b + d);
    acc += VT::iota() < VT::splat(T(n - d)) ? prod : V{};
  }
  return VT::hsum(acc);
}

template <typename A, typename B>
struct SameType {
  static constexpr bool value = false;
};
template <typename A>
struct SameType<A, A> {
  static constexpr bool value = true;
};

// out[0..3] = the horizontal sums of four accumulators. With 16 float lanes one shuffle tree folds all four at
// once (13 shuffles/adds instead of 32); other widths sum each one.
template <typename T>
inline void reduce4(typename Vec<T>::V s0, typename Vec<T>::V s1, typename Vec<T>::V s2, typename Vec<T>::V s3,
                    T* out) {
#if CLEAR_VEC_BYTES == 64
  if constexpr (SameType<T, float>::value) {
    // Lanes 0-7 of t01 hold a0's halves folded, lanes 8-15 a1's; then quarters; then pairs within each quarter.
    const f32x16 t01 = __builtin_shufflevector(s0, s1, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                       __builtin_shufflevector(s0, s1, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    const f32x16 t23 = __builtin_shufflevector(s2, s3, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                       __builtin_shufflevector(s2, s3, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    f32x16 u = __builtin_shufflevector(t01, t23, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
               __builtin_shufflevector(t01, t23, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    u = u + __builtin_shufflevector(u, u, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    u = u + __builtin_shufflevector(u, u, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    out[0] = u[0];
    out[1] = u[4];
    out[2] = u[8];
    out[3] = u[12];
    return;
  }
#endif
  out[0] = Vec<T>::hsum(s0);
  out[1] = Vec<T>::hsum(s1);
  out[2] = Vec<T>::hsum(s2);
  out[3] = Vec<T>::hsum(s3);
}

// out[r] = a_r . b_r for four pairs of vectors: four independent accumulators, one reduction tree for all.
template <typename T>
inline void dot4_pairs(const T* a0, const T* b0, const T* a1, const T* b1, const T* a2, const T* b2, const T* a3,
                       const T* b3, int64_t D, T* out) {
  using VT = Vec<T>;
  constexpr int W = VT::W;
  typename VT::V s0{}, s1{}, s2{}, s3{};
  int64_t d = 0;
  for (; d + W <= D; d += W) {
    s0 += VT::load(a0 + d) * VT::load(b0 + d);
    s1 += VT::load(a1 + d) * VT::load(b1 + d);
    s2 += VT::load(a2 + d) * VT::load(b2 + d);
    s3 += VT::load(a3 + d) * VT::load(b3 + d);
  }
  reduce4<T>(s0, s1, s2, s3, out);
  for (; d < D; ++d) {
    out[0] += a0[d] * b0[d];
    out[1] += a1[d] * b1[d];
    out[2] += a2[d] * b2[d];
    out[3] += a3[d] * b3[d];
  }
}

// out[r] = a_r . b for four vectors a_r against one vector b (b's loads are shared once inlined).
template <typename T>
inline void dot4p(const T* a0, const T* a1, const T* a2, const T* a3, const T* b, int64_t D, T* out) {
  dot4_pairs(a0, b, a1, b, a2, b, a3, b, D, out);
}

// out[r * out_stride] = a_r . b for four rows a_r with stride lda.
template <typename T>
inline void dot4(const T* a, int64_t lda, const T* b, int64_t D, T* out, int64_t out_stride) {
  T r[4];
  dot4p(a, a + lda, a + 2 * lda, a + 3 * lda, b, D, r);
  out[0] = r[0];
  out[out_stride] = r[1];
  out[2 * out_stride] = r[2];
  out[3 * out_stride] = r[3];
}

// out += c[0] * x0 + c[1] * x1 + c[2] * x2 + c[3] * x3: out is read and written once for four rows.
template <typename T>
inline void axpy4(T* out, const T* c, const T* x0, const T* x1, const T* x2, const T* x3, int64_t D) {
  using VT = Vec<T>;
  constexpr int W = VT::W;
  const auto c0 = VT::splat(c[0]), c1 = VT::splat(c[1]), c2 = VT::splat(c[2]), c3 = VT::splat(c[3]);
  int64_t d = 0;
  for (; d + W <= D; d += W)
    VT::store(out + d, VT::load(out + d) + c0 * VT::load(x0 + d) + c1 * VT::load(x1 + d) + c2 * VT::load(x2 + d) +
                           c3 * VT::load(x3 + d));
  for (; d < D; ++d) out[d] += c[0] * x0[d] + c[1] * x1[d] + c[2] * x2[d] + c[3] * x3[d];
}

// One slice of NV vectors of combine_rows_at: the NV accumulators stay in registers while the m rows stream
// through, so out is read and written once per call, not once per row.
template <int NV, typename T, typename Rows>
inline void combine_slice(T* out, bool accumulate, const T* coef, int64_t cs, Rows rows, int64_t m, int64_t d) {
  using VT = Vec<T>;
  using V = typename VT::V;
  constexpr int W = VT::W;
  V a[NV];
  for (int x = 0; x < NV; ++x) a[x] = accumulate ? VT::load(out + d + x * W) : V{};
  for (int64_t j = 0; j < m; ++j) {
    const V c = VT::splat(coef[j * cs]);
    const T* r = rows(j) + d;
    for (int x = 0; x < NV; ++x) a[x] += c * VT::load(r + x * W);
  }
  for (int x = 0; x < NV; ++x) VT::store(out + d + x * W, a[x]);
}

// out (+)= sum_j coef[j * cs] * rows(j)[:] for j < m, in slices of up to eight vectors: a head dim of 96 floats
// (six AVX-512 vectors) is one pass over the rows, not a pass of four vectors and another of two.
template <typename T, typename Rows>
inline void combine_rows_at(T* out, bool accumulate, const T* coef, int64_t cs, Rows rows, int64_t m, int64_t D) {
  constexpr int W = Vec<T>::W;
  int64_t d = 0;
  for (; d + 8 * W <= D; d += 8 * W) combine_slice<8>(out, accumulate, coef, cs, rows, m, d);
  switch ((D - d) / W) {
    case 7: combine_slice<7>(out, accumulate, coef, cs, rows, m, d); break;
    case 6: combine_slice<6>(out, accumulate, coef, cs, rows, m, d); break;
    case 5: combine_slice<5>(out, accumulate, coef, cs, rows, m, d); break;
    case 4: combine_slice<4>(out, accumulate, coef, cs, rows, m, d); break;
    case 3: combine_slice<3>(out, accumulate, coef, cs, rows, m, d); break;
    case 2: combine_slice<2>(out, accumulate, coef, cs, rows, m, d); break;
    case 1: combine_slice<1>(out, accumulate, coef, cs, rows, m, d); break;
    default: break;
  }
  d += (D - d) / W * W;
  for (; d < D; ++d) {
    T a = accumulate ? out[d] : T(0);
    for (int64_t j = 0; j < m; ++j) a += coef[j * cs] * rows(j)[d];
    out[d] = a;
  }
}

// Row j at rows + j * stride (a contiguous block) ...
template <typename T>
struct StridedRows {
  const T* base;
  int64_t stride;
  const T* operator()(int64_t j) const { return base + j * stride; }
};
// ... or at base + index[j] * D (a summary token's group, gathered).
template <typename T>
struct GatheredRows {
  const T* base;
  const int32_t* index;
  int64_t stride;  // between consecutive rows of base
  const T* operator()(int64_t j) const { return base + int64_t(index[j]) * stride; }
};

// ... or a run's n contiguous rows followed by rows gathered by index (a query's keys: its heartbeat, then its
// group's summary tokens).
template <typename T>
struct RunThenGathered {
  const T* run;
  const T* base;
  const int32_t* index;
  int64_t n, run_stride, stride;  // rows of run, and of base, are run_stride and stride elements apart
  const T* operator()(int64_t j) const {
    return j < n ? run + j * run_stride : base + int64_t(index[j - n]) * stride;
  }
};

template <typename T>
inline void combine_rows(T* out, bool accumulate, const T* coef, int64_t cs, const T* rows, int64_t rs, int64_t m,
                         int64_t D) {
  combine_rows_at(out, accumulate, coef, cs, StridedRows<T>{rows, rs}, m, D);
}

// out += c * x
template <typename T>
inline void axpy(T* out, T c, const T* x, int64_t D) {
  using VT = Vec<T>;
  constexpr int W = VT::W;
  const auto cv = VT::splat(c);
  int64_t d = 0;
  for (; d + W <= D; d += W) VT::store(out + d, VT::load(out + d) + cv * VT::load(x + d));
  for (; d < D; ++d) out[d] += c * x[d];
}

// Streaming (non-temporal) stores of whole vectors, for output rows that this op writes once and never reads:
// they skip the read-for-ownership of the destination line, a third of the memory traffic of a backward pass
// at CLEAR's sizes. The stores are weakly ordered, so every task list ends with stream_fence().
#if (defined(__x86_64__) || defined(_M_X64)) && (CLEAR_VEC_BYTES == 64)
#define CLEAR_STREAM_STORES 1
inline void stream_vec(float* p, Vec<float>::V v) { _mm512_stream_ps(p, (__m512)v); }
inline void stream_vec(double* p, Vec<double>::V v) { _mm512_stream_pd(p, (__m512d)v); }
#elif (defined(__x86_64__) || defined(_M_X64)) && (CLEAR_VEC_BYTES == 32)
#define CLEAR_STREAM_STORES 1
inline void stream_vec(float* p, Vec<float>::V v) { _mm256_stream_ps(p, (__m256)v); }
inline void stream_vec(double* p, Vec<double>::V v) { _mm256_stream_pd(p, (__m256d)v); }
#elif (defined(__x86_64__) || defined(_M_X64))
#define CLEAR_STREAM_STORES 1
inline void stream_vec(float* p, Vec<float>::V v) { _mm_stream_ps(p, (__m128)v); }
inline void stream_vec(double* p, Vec<double>::V v) { _mm_stream_pd(p, (__m128d)v); }
#else
#define CLEAR_STREAM_STORES 0
#endif

inline void stream_fence() {
#if CLEAR_STREAM_STORES
  _mm_sfence();
#endif
}

// dst[d] = src[d] * mult for d < D, streamed when dst is vector aligned and D a whole number of vectors
// (otherwise plain stores: same values either way).
template <typename T>
inline void scale_row_out(T* dst, const T* src, T mult, int64_t D) {
  using VT = Vec<T>;
  constexpr int W = VT::W;
#if CLEAR_STREAM_STORES
  if (D % W == 0 && reinterpret_cast<uintptr_t>(dst) % CLEAR_VEC_BYTES == 0) {
    const auto m = VT::splat(mult);
    for (int64_t d = 0; d < D; d += W) stream_vec(dst + d, VT::load(src + d) * m);
    return;
  }
#endif
  for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * mult;
}

template <typename T>
inline void zero(T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = T(0);
}

// exp of a float vector, Cephes-style: 2^n * exp(r) with |r| <= ln2/2 and a degree-6 polynomial (about 1 ulp).
// Inputs are clamped to [-87, 88]: softmax arguments are <= 0 (up to rounding), and exp(-87) ~ 1.6e-38 is as
// good as zero next to the row maximum's exp(0) = 1, while keeping 2^n a normal number.
inline typename VecOf<float>::type exp_vec(typename VecOf<float>::type x) {
  using V = typename VecOf<float>::type;
  using VI = typename VecOf<float>::itype;
  const V lo = Vec<float>::splat(-87.0f), hi = Vec<float>::splat(88.0f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  // Round x / ln2 to the nearest integer with the 1.5 * 2^23 trick (no floor instruction needed).
  const V magic = Vec<float>::splat(12582912.0f);
  V n = (x * 1.44269504088896341f + magic) - magic;
  V r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V y = Vec<float>::splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  VI e = (__builtin_convertvector(n, VI) + 127) << 23;
  return y * (V)e;  // same-size vector cast: reinterprets the bits
}

// x[j] = exp(x[j] - shift) for j < m; returns the sum (float: vectorised; double: libm, for exact tests).
// x must have room for m rounded up to a whole vector (kExpPad floats): the last, partial vector is loaded and
// stored whole (its lanes past m are overwritten with junk) so that it never takes a scalar detour through the
// stack, which costs a store-forwarding stall per row.
constexpr int64_t kExpPad = 16;
inline float exp_shift_sum(float* x, int64_t m, float shift) {
  using VT = Vec<float>;
  using V = typename VT::V;
  constexpr int W = VT::W;
  V acc{};
  int64_t j = 0;
  const V sv = VT::splat(shift);
  for (; j + W <= m; j += W) {
    const V e = exp_vec(VT::load(x + j) - sv);
    VT::store(x + j, e);
    acc += e;
  }
  if (j < m) {
    // Lanes past m get -100 (exp clamps it to exp(-87) ~ 1.6e-38, negligible against the row maximum's 1).
    const V e = exp_vec(VT::iota() < VT::splat(float(m - j)) ? VT::load(x + j) - sv : VT::splat(-100.0f));
    VT::store(x + j, e);
    acc += e;
  }
  return VT::hsum(acc);
}

inline double exp_shift_sum(double* x, int64_t m, double shift) {
  double s = 0.0;
  for (int64_t j = 0; j < m; ++j) {
    x[j] = __builtin_exp(x[j] - shift);
    s += x[j];
  }
  return s;
}

inline float log_scalar(float x) { return __builtin_logf(x); }
inline double log_scalar(double x) { return __builtin_log(x); }
