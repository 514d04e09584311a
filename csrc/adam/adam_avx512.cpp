// AVX-512 build of the chunk kernel: the portable body compiled for AVX-512 (its loops vectorize to
// 16 lanes) plus the hand-vectorized chunk of avx512_chunk.inc; called only after best_isa() found
// the instructions, so the module still loads and runs on CPUs without them. AVX512-BF16 is in the
// target for one instruction, used only where __builtin_cpu_supports finds it (avx512_chunk.inc).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <type_traits>

#include "adam.h"

namespace fuyou_adam {
namespace avx512 {
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
#define FUYOU_FMA 1
#define FUYOU_AVX512 1
#include "kernel_body.inc"
#undef FUYOU_AVX512
#undef FUYOU_FMA
#pragma GCC pop_options
}  // namespace avx512
}  // namespace fuyou_adam
