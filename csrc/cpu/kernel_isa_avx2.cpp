// The kernel bodies for one instruction set: AVX2 + FMA (Haswell, Zen and later).
//
// Why per-file targets instead of -mavx2 in setup.py: a wheel built with -mavx2 crashes with SIGILL on CPUs
// without it. Instead the same source (segment_attention_core.h) is compiled here under a target pragma, and
// segment_attention_cpu.cpp picks the best table the running CPU supports (as ATen does with CPU_CAPABILITY).
// Only headers included before the pragma are shared with the rest of the library, and they define no
// functions, so no AVX code can leak into a caller on an older CPU.
#include <cstdint>

#include "kernel_params.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>  // the streaming stores of vector_math.h (intrinsics carry their own target attributes)
#endif

#if defined(__x86_64__) || defined(_M_X64)
#define CLEAR_ISA_AVAILABLE 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
#endif

#define CLEAR_ARCH avx2
#define CLEAR_ARCH_NAME "avx2"
#define CLEAR_VEC_BYTES 32

#include "kernel_isa_body.inc"

#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif
#endif
