// Fused CPU AdamW over compressed optimizer state: raw pointers and sizes only (no Python here).
//
// One pass per chunk of kChunk elements: decode master, m, v -> AdamW in fp32 (torch's op order)
// -> encode m, v, master -> emit the compute weights. The codecs are the ones of
// fuyou/optim/codecs.py, whose plain-torch versions are the references this code must match.
#pragma once
#include <cstdint>

namespace fuyou_adam {

enum StateCodec : int { kStateFp32 = 0, kStateBf16 = 1, kStateFp8 = 2, kStateDe8 = 3 };
enum MasterCodec : int { kMasterFp32 = 0, kMasterBf16Rem = 1 };
enum WeightsCodec : int { kWeightsFp32 = 0, kWeightsBf16 = 1 };

constexpr int kFp8Group = 128;
constexpr int kDe8Block = 256;
// Elements per work item: a multiple of both groups; 4 fp32 arrays of 1024 stay in L1 (16 KiB).
constexpr int64_t kChunk = 1024;

struct MomentBuf {
  int codec;
  void* values;     // fp32 / bf16 values, or u8 codes (fp8, de8)
  float* scale;     // per-group (fp8) / per-block (de8) absmax
  uint8_t* k16;     // fp8: per-group 16*k
};

struct Tables {
  const float* fp8_root;          // [256][128]: (e4m3(q)/448)^(16/k16)
  const float* de8_signed_map;    // 256 ascending values
  const float* de8_signed_mid;    // 255 midpoints, then two +inf
  const float* de8_unsigned_map;
  const float* de8_unsigned_mid;
  const uint8_t* de8_signed_bucket;    // [65536 + 4]: midpoints below each fp32 top-16-bit key
  const uint8_t* de8_unsigned_bucket;
};

struct Hyper {
  float decay;            // 1 - lr * weight_decay
  float lerp_w;           // 1 - beta1 (torch lerp weight)
  float beta2;
  float one_minus_beta2;
  float bc2_sqrt;         // sqrt(1 - beta2^step)
  float eps;
  float neg_step_size;    // -lr / (1 - beta1^step)
  float grad_scale;
  bool scale_grad;
};

// What one call computes. kFull: the whole update. The other two split the fp32 update around a
// square root the caller computes (fuyou's fp32 mode takes torch's own sqrt, so that it trains
// exactly like torch.optim.AdamW): kMoments decays the master and updates m and v in place;
// kApply then adds the step from m and `root` = sqrt(v) and emits the weights.
enum Phase : int { kFull = 0, kMoments = 1, kApply = 2 };

struct AdamArgs {
  int64_t numel;
  int phase;              // Phase; kMoments / kApply need fp32 master and moments
  const float* root;      // kApply: sqrt(v), numel values
  const float* grad;
  int master_codec;
  void* master_hi;        // fp32 values, or bf16 high halves
  void* master_lo;        // int16 remainders (bf16+rem)
  MomentBuf m, v;
  int weights_codec;
  void* weights;
  Hyper h;
  Tables t;
};

bool cpu_has_avx2_fma();
// Runs the update over all chunks with `threads` OpenMP threads; `simd` picks the AVX2/FMA build
// when the CPU has it (false: the portable build, for tests of both).
void fused_adamw(const AdamArgs& a, int threads, bool simd);

// One chunk of n elements at `begin`.
namespace generic { void run_chunk(const AdamArgs& a, int64_t begin, int64_t n); }
namespace avx2 { void run_chunk(const AdamArgs& a, int64_t begin, int64_t n); }

}  // namespace fuyou_adam
