// The kernel bodies for one instruction set: SSE2 only: runs on every x86-64 CPU (and on other architectures, where the compiler maps the 16-byte vectors to NEON and the like).
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

#define CLEAR_ISA_AVAILABLE 1

#define CLEAR_ARCH generic
#define CLEAR_ARCH_NAME "generic"
#define CLEAR_VEC_BYTES 16

#include "kernel_isa_body.inc"
