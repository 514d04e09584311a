// Portable build of the chunk kernel (baseline x86-64 / any CPU).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <xmmintrin.h>  // SSE (baseline x86-64): rsqrtss for kSqrtVmlEx

#include "adam.h"

namespace fuyou_adam {
namespace generic {
#define FUYOU_FMA 0
#include "kernel_body.inc"
#undef FUYOU_FMA
}  // namespace generic
}  // namespace fuyou_adam
