// AVX2/FMA build of the chunk kernel: the same source compiled under a target attribute, called
// only after cpu_has_avx2_fma() (so the module still loads and runs on CPUs without AVX2).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <immintrin.h>

#include "adam.h"

namespace fuyou_adam {
namespace avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define FUYOU_FMA 1
#include "kernel_body.inc"
#undef FUYOU_FMA
#pragma GCC pop_options
}  // namespace avx2
}  // namespace fuyou_adam
