// A small cache of the CPU op's large output buffers.
//
// Why: PyTorch's CPU allocator hands large tensors to malloc, which maps fresh pages for every allocation above
// its mmap threshold (32 MiB at most) and unmaps them on free. The kernel's first write to each fresh page then
// faults and the OS zeroes it: at CLEAR's sizes that costs about as much as the attention itself (a 38 MB
// output takes ~12 ms to fault in on the 2-core benchmark machine, ~2 ms to write once mapped). A training loop
// frees and reallocates the same sizes every step, so the op keeps the freed blocks and reuses them.
//
// Only blocks of at least 1 MiB are cached; the cache never holds more than CLEAR_KERNELS_CPU_CACHE_MB of free
// memory (default 1024; 0 disables it), and release_cached_outputs() returns it all to the system.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace clear_cpu {

// An uninitialised CPU tensor of the given sizes, contiguous; its memory comes from the cache when a freed block
// of the same rounded size is there. Tensors below the size threshold are plain at::empty.
at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// {bytes held free in the cache, blocks held, bytes currently handed out to live tensors}.
struct OutputCacheStats {
  int64_t free_bytes, free_blocks, live_bytes;
};
OutputCacheStats output_cache_stats();

// Frees every cached block; returns the number of bytes given back.
int64_t release_cached_outputs();

}  // namespace clear_cpu
