// Dispatch: picks the ISA build once per call and spreads chunks over OpenMP threads.
#include "adam.h"

#include <omp.h>

namespace fuyou_adam {

bool cpu_has_avx2_fma() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

void fused_adamw(const AdamArgs& a, int threads, bool simd) {
  const bool use_avx2 = simd && cpu_has_avx2_fma();
  const int64_t chunks = (a.numel + kChunk - 1) / kChunk;
  if (threads < 1) threads = 1;
  if (chunks < threads) threads = static_cast<int>(chunks > 0 ? chunks : 1);
  // Each thread streams one contiguous range of chunks.
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t first = chunks * t / nt, last = chunks * (t + 1) / nt;
    for (int64_t c = first; c < last; ++c) {
      const int64_t begin = c * kChunk;
      const int64_t n = (a.numel - begin) < kChunk ? (a.numel - begin) : kChunk;
      if (use_avx2) {
        avx2::run_chunk(a, begin, n);
      } else {
        generic::run_chunk(a, begin, n);
      }
    }
  }
}

}  // namespace fuyou_adam
