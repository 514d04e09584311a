// Dispatch: picks the ISA build once per call and spreads chunks over OpenMP threads.
#include "adam.h"

#include <omp.h>

namespace fuyou_adam {

int best_isa() {
  __builtin_cpu_init();
  // The AVX-512 build uses F (masks, 512-bit ops), BW (16-bit lanes: bf16, bf16+rem), VL and DQ.
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    return kIsaAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kIsaAvx2;
  return kIsaGeneric;
}

namespace {

// Threads split the chunks in ranges of whole multiples of this many chunks, so two threads never
// write the same cache line of a per-group scale array (8 chunks = 64 fp8/log8 groups = 256 B of
// absmax, 64 B of k16, from parts that start 256-byte aligned in the store's files).
constexpr int64_t kSplitChunks = 8;

void run_range(const AdamArgs& a, int64_t first, int64_t last, int isa) {
  for (int64_t c = first; c < last; ++c) {
    const int64_t begin = c * kChunk;
    const int64_t n = (a.numel - begin) < kChunk ? (a.numel - begin) : kChunk;
    if (isa == kIsaAvx512) {
      avx512::run_chunk(a, begin, n);
    } else if (isa == kIsaAvx2) {
      avx2::run_chunk(a, begin, n);
    } else {
      generic::run_chunk(a, begin, n);
    }
  }
}

}  // namespace

void fused_adamw(const AdamArgs& a, int threads, int isa) {
  const int best = best_isa();
  if (isa < 0 || isa > best) isa = best;
  const int64_t chunks = (a.numel + kChunk - 1) / kChunk;
  const int64_t units = (chunks + kSplitChunks - 1) / kSplitChunks;
  if (threads < 1) threads = 1;
  if (units < threads) threads = static_cast<int>(units > 0 ? units : 1);
  if (threads == 1) {  // no parallel region: nothing to wake, nothing left spinning
    run_range(a, 0, chunks, isa);
    return;
  }
  // Each thread streams one contiguous range of chunks.
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t first = units * t / nt * kSplitChunks, last = units * (t + 1) / nt * kSplitChunks;
    run_range(a, first, last < chunks ? last : chunks, isa);
  }
}

void vml_ex_sqrt(const float* x, float* y, int64_t n, int isa) {
  const int best = best_isa();
  if (isa < 0 || isa > best) isa = best;
  for (int64_t off = 0; off < n; off += kChunk) {
    const int len = int(n - off < kChunk ? n - off : kChunk);
    if (isa == kIsaAvx512) {
      avx512::vml_ex_sqrt_n(x + off, y + off, len);
    } else if (isa == kIsaAvx2) {
      avx2::vml_ex_sqrt_n(x + off, y + off, len);
    } else {
      generic::vml_ex_sqrt_n(x + off, y + off, len);
    }
  }
}

}  // namespace fuyou_adam
