// The output cache of the CPU op (see output_cache.h for why it exists).
//
// It is a c10::Allocator, so the tensors it makes are ordinary resizable CPU tensors: freeing one runs this
// allocator's deleter, which keeps the block for the next allocation of the same rounded size instead of
// unmapping it. Blocks are 2 MiB aligned and advised as huge pages, so even their first use faults 512 times
// less often.
#include "output_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <list>
#include <mutex>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace clear_cpu {
namespace {

constexpr size_t kMinCachedBytes = size_t(1) << 20;  // below this malloc reuses memory well on its own
constexpr size_t kBlockAlign = size_t(2) << 20;      // one transparent huge page

size_t cache_limit_bytes() {
  const char* env = std::getenv("CLEAR_KERNELS_CPU_CACHE_MB");
  if (!env || !*env) return size_t(1024) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(env, &end, 10);
  TORCH_CHECK(end && *end == '\0' && mb >= 0, "CLEAR_KERNELS_CPU_CACHE_MB must be a whole number of MiB >= 0, got '",
              env, "'");
  // More MiB than a size_t can count in bytes would wrap (2^44 MiB became 0 bytes: the cache silently off).
  constexpr unsigned long long kMaxMb = std::numeric_limits<size_t>::max() >> 20;
  TORCH_CHECK(static_cast<unsigned long long>(mb) <= kMaxMb,
              "CLEAR_KERNELS_CPU_CACHE_MB=", env, " is too large: at most ", kMaxMb, " MiB");
  return size_t(mb) << 20;
}

struct Block {
  void* ptr;
  size_t bytes;  // rounded up to kBlockAlign
};

class OutputCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    const c10::Device cpu(c10::DeviceType::CPU);
    if (nbytes < kMinCachedBytes || limit_ == 0) return c10::GetDefaultCPUAllocator()->allocate(nbytes);
    const size_t bytes = (nbytes + kBlockAlign - 1) / kBlockAlign * kBlockAlign;
    void* ptr = take(bytes);
    if (!ptr) ptr = fresh_block(bytes);
    auto* block = new Block{ptr, bytes};
    {
      std::lock_guard<std::mutex> lock(mutex_);
      live_bytes_ += bytes;
    }
    return {ptr, block, &OutputCache::give_back, cpu};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

  OutputCacheStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {int64_t(free_bytes_), int64_t(free_.size()), int64_t(live_bytes_)};
  }

  int64_t release() {
    std::list<Block> doomed;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      doomed.swap(free_);
      free_bytes_ = 0;
    }
    int64_t bytes = 0;
    for (const Block& b : doomed) {
      bytes += int64_t(b.bytes);
      std::free(b.ptr);
    }
    return bytes;
  }

  static OutputCache& instance() {
    // Never destroyed: tensors may be freed by other static destructors after this one would have run.
    static OutputCache* cache = new OutputCache();
    return *cache;
  }

 private:
  OutputCache() : limit_(cache_limit_bytes()) {}

  // The most recently freed block of exactly this size (a training step asks for the same sizes again).
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = free_.rbegin(); it != free_.rend(); ++it) {
      if (it->bytes != bytes) continue;
      void* ptr = it->ptr;
      free_bytes_ -= bytes;
      free_.erase(std::next(it).base());
      return ptr;
    }
    return nullptr;
  }

  void* fresh_block(size_t bytes) {
    void* ptr = nullptr;
    if (posix_memalign(&ptr, kBlockAlign, bytes) != 0) {
      release();  // the cached blocks of other sizes may be what stands in the way
      ptr = nullptr;
      TORCH_CHECK(posix_memalign(&ptr, kBlockAlign, bytes) == 0, "clear_kernels CPU op: out of memory allocating ",
                  bytes, " bytes for an output");
    }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(ptr, bytes, MADV_HUGEPAGE);  // advice only: ignored where transparent huge pages are off
#endif
    return ptr;
  }

  // Deleter of every cached tensor: keep the block, evicting the oldest free ones beyond the limit.
  static void give_back(void* ctx) {
    auto* block = static_cast<Block*>(ctx);
    OutputCache& self = instance();
    std::list<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(self.mutex_);
      self.live_bytes_ -= block->bytes;
      if (block->bytes <= self.limit_) {
        self.free_.push_back(*block);
        self.free_bytes_ += block->bytes;
        while (self.free_bytes_ > self.limit_) {
          self.free_bytes_ -= self.free_.front().bytes;
          evicted.splice(evicted.end(), self.free_, self.free_.begin());
        }
      } else {
        evicted.push_back(*block);
      }
    }
    for (const Block& b : evicted) std::free(b.ptr);
    delete block;
  }

  const size_t limit_;
  std::mutex mutex_;
  std::list<Block> free_;  // oldest first
  size_t free_bytes_ = 0, live_bytes_ = 0;
};

}  // namespace

at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_CHECK(options.device().is_cpu(), "cached_empty: CPU tensors only");
  return at::detail::empty_generic(sizes, &OutputCache::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), c10::MemoryFormat::Contiguous);
}

OutputCacheStats output_cache_stats() { return OutputCache::instance().stats(); }

int64_t release_cached_outputs() { return OutputCache::instance().release(); }

}  // namespace clear_cpu

// Python access: torch.ops.clear_kernels.cpu_output_cache(release) -> [free bytes, free blocks, live bytes]
// (after releasing everything when `release` is true). Wrapped by clear_kernels.native.cpu_output_cache().
TORCH_LIBRARY_FRAGMENT(clear_kernels, m) {
  m.def("cpu_output_cache(bool release=False) -> int[]", [](bool release) -> std::vector<int64_t> {
    if (release) clear_cpu::release_cached_outputs();
    const clear_cpu::OutputCacheStats s = clear_cpu::output_cache_stats();
    return {s.free_bytes, s.free_blocks, s.live_bytes};
  });
}
