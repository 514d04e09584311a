// Fused CPU AdamW over compressed optimizer state: raw pointers and sizes only (no Python here).
//
// One pass per chunk of kChunk elements: decode master, m, v -> AdamW in fp32 (torch's op order)
// -> encode m, v, master -> emit the compute weights. The codecs are the ones of
// fuyou/optim/codecs.py, whose plain-torch versions are the references this code must match.
#pragma once
#include <cstdint>

namespace fuyou_adam {

enum StateCodec : int { kStateFp32 = 0, kStateBf16 = 1, kStateFp8 = 2, kStateDe8 = 3, kStateLog8 = 4 };
enum MasterCodec : int { kMasterFp32 = 0, kMasterBf16Rem = 1 };
enum WeightsCodec : int { kWeightsFp32 = 0, kWeightsBf16 = 1 };

constexpr int kFp8Group = 128;
constexpr int kDe8Block = 256;
constexpr int kLog8Group = 128;
// Elements per work item: a multiple of every group size; 4 fp32 arrays of 1024 stay in L1 (16 KiB).
constexpr int64_t kChunk = 1024;

struct MomentBuf {
  int codec;
  void* values;     // fp32 / bf16 values, or u8 codes (fp8, de8, log8)
  float* scale;     // per-group (fp8, log8) / per-block (de8) absmax
  uint8_t* k16;     // fp8, log8: per-group 16*k
};

// Which square root the update takes. fp32 mode must take torch's own (aten's CPU sqrt of fp32 calls
// MKL VML's vmsSqrt, not correctly rounded) so that it trains exactly like torch.optim.AdamW:
//   kSqrtIeee     the correctly rounded sqrt (compressed codecs, and their torch references);
//   kSqrtVmlCall  vmsSqrt itself through AdamArgs::torch_sqrt (resolved by the Python side from the
//                 loaded libtorch_cpu: the kernel never links torch), on each chunk of roots;
//   kSqrtVmlEx    vmsSqrt's generic x86 path (the one MKL runs on this AMD CPU) recomputed in
//                 registers: rsqrtps and two unfused correction steps (vml_ex_sqrt in scalar.inc).
//                 Equal to vmsSqrt on all 2^32 inputs here; fused.py takes it only after it matched
//                 torch.sqrt on a probe reaching every rsqrt table entry, whole and cut into tails.
enum SqrtKind : int { kSqrtIeee = 0, kSqrtVmlCall = 1, kSqrtVmlEx = 2 };
typedef void (*VmlSqrtFn)(const int* n, const float* a, float* r, const int64_t* mode);
// The mode aten passes (MKL VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE).
constexpr int64_t kVmlTorchMode = 0x2 | 0x140000 | 0x100;

struct Tables {
  const float* fp8_root;          // [256][128]: (e4m3(q)/448)^(16/k16)
  const float* de8_signed_map;    // 256 ascending values
  const float* de8_unsigned_map;
  // [65536] per fp32 top-16-bit key: midpoints below the bucket (bits 0-7), the low 16 bits of the
  // bucket's midpoint (bits 16-31; codec_ref.de8_bucket_table)
  const uint32_t* de8_signed_bucket;
  const uint32_t* de8_unsigned_bucket;
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
  int sqrt_kind;          // SqrtKind; kSqrtVml* only for the whole update of fp32 master and moments
  VmlSqrtFn torch_sqrt;   // kSqrtVmlCall: vmsSqrt
  bool bf16_insn;         // AVX-512 build: use AVX512-BF16's conversion where the CPU has it (tests turn it off)
};

// Instruction sets the kernel is built for; the best one the CPU runs is picked at run time.
enum Isa : int { kIsaGeneric = 0, kIsaAvx2 = 1, kIsaAvx512 = 2 };
int best_isa();
// Runs the update over all chunks with `threads` OpenMP threads in the build `isa` (capped at
// best_isa(); lower ones exist for tests of every build).
void fused_adamw(const AdamArgs& a, int threads, int isa);
// Dequantizes fp8 weight tiles (fp8_tiles.cpp): out[r][j] = table[codes[r][j]] * the scale of
// (r, j)'s 128x128 tile, for an [n, k] weight; `table` holds the fp32 value of every code.
constexpr int64_t kFp8Tile = 128;
void fp8_tiles_decode(const uint8_t* codes, const float* scales, int64_t n, int64_t k, const float* table, float* out);
// kSqrtVmlEx on n values in the build `isa` (what fused.py checks against torch.sqrt).
void vml_ex_sqrt(const float* x, float* y, int64_t n, int isa);

// One chunk of n elements at `begin`.
namespace generic { void run_chunk(const AdamArgs& a, int64_t begin, int64_t n); void vml_ex_sqrt_n(const float* x, float* y, int n); }
namespace avx2 { void run_chunk(const AdamArgs& a, int64_t begin, int64_t n); void vml_ex_sqrt_n(const float* x, float* y, int n); }
namespace avx512 { void run_chunk(const AdamArgs& a, int64_t begin, int64_t n); void vml_ex_sqrt_n(const float* x, float* y, int n); }

}  // namespace fuyou_adam
