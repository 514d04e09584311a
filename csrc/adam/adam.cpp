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
  // Each thread streams one contiguous range of chunks (prefetching its next chunk as it goes).
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t first = chunks * t / nt, last = chunks * (t + 1) / nt;
    for (int64_t c = first; c < last; ++c) {
      const int64_t begin = c * kChunk;
      const int64_t n = (a.numel - begin) < kChunk ? (a.numel - begin) : kChunk;
      const int64_t after = begin + n;
      const int64_t next_n = c + 1 < last ? ((a.numel - after) < kChunk ? (a.numel - after) : kChunk) : 0;
      if (use_avx2) {
        avx2::run_chunk(a, begin, n, next_n);
      } else {
        generic::run_chunk(a, begin, n, next_n);
      }
    }
  }
}

}  // namespace fuyou_adam
