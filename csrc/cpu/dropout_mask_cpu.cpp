// clear_kernels::dropout_mask(Tensor like, float p, int seed) -> Tensor: a dropout mask for CPU training.
//
// A tensor of like's shape and dtype holding 1 / (1 - q) where an element is kept and 0 where it is dropped, each
// element dropped with probability q = p rounded to a multiple of 2^-16. Counter-based: 64-bit word w of the
// random stream is splitmix64's output for state seed + (w + 1) * gamma, and its four 16-bit lanes decide
// elements 4w .. 4w + 3. So any thread may fill any word and the mask depends only on (seed, p, shape): the
// same on every machine and thread count. One pass that writes the mask, where bernoulli_ calls the generator once
// per element (clear_hug/dropout.py says why that mattered).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace clear_cpu {
namespace {

constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ull;  // splitmix64's increment (2^64 / golden ratio)
constexpr int64_t kLevels = 1 << 16;                 // each element's share of a word: 16 bits

// splitmix64's output function (Steele, Lea and Flood 2014).
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline uint64_t word(uint64_t seed, int64_t w) { return mix64(seed + static_cast<uint64_t>(w + 1) * kGamma); }

template <typename T>
void fill_mask(T* out, int64_t n, uint64_t seed, uint64_t dropped, T scale) {
  const int64_t full = n / 4;  // words whose four lanes are all elements; a branch-free loop the compiler unrolls
  const T zero(0);
  at::parallel_for(0, full, 4096, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const uint64_t z = word(seed, w);
      T* o = out + 4 * w;
      o[0] = (z & 0xFFFF) >= dropped ? scale : zero;
      o[1] = ((z >> 16) & 0xFFFF) >= dropped ? scale : zero;
      o[2] = ((z >> 32) & 0xFFFF) >= dropped ? scale : zero;
      o[3] = (z >> 48) >= dropped ? scale : zero;
    }
  });
  if (n % 4) {
    const uint64_t z = word(seed, full);
    for (int64_t i = 4 * full, j = 0; i < n; ++i, ++j) out[i] = ((z >> (16 * j)) & 0xFFFF) >= dropped ? scale : zero;
  }
}

at::Tensor dropout_mask_cpu(const at::Tensor& like, double p, int64_t seed) {
  TORCH_CHECK(like.device().is_cpu(), "dropout_mask: like must be a CPU tensor, got ", like.device());
  TORCH_CHECK(at::isFloatingType(like.scalar_type()), "dropout_mask: like must be a floating-point tensor, got ",
              like.scalar_type());
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "dropout_mask: p must be in [0, 1], got ", p);
  const int64_t dropped = std::llround(p * kLevels);
  TORCH_CHECK(dropped < kLevels, "dropout_mask: p = ", p, " drops everything (rounded to 2^-16); the mask would be "
              "0 / 0");
  at::Tensor out = at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
  const double scale = static_cast<double>(kLevels) / static_cast<double>(kLevels - dropped);
  const uint64_t s = static_cast<uint64_t>(seed);
  const uint64_t d = static_cast<uint64_t>(dropped);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, like.scalar_type(), "dropout_mask", [&] {
    fill_mask<scalar_t>(out.data_ptr<scalar_t>(), out.numel(), s, d, static_cast<scalar_t>(scale));
  });
  return out;
}

}  // namespace
}  // namespace clear_cpu

TORCH_LIBRARY_FRAGMENT(clear_kernels, m) { m.def("dropout_mask(Tensor like, float p, int seed) -> Tensor"); }

TORCH_LIBRARY_IMPL(clear_kernels, CPU, m) { m.impl("dropout_mask", &clear_cpu::dropout_mask_cpu); }
