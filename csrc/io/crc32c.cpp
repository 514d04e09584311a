// CRC-32C. The SSE4.2 CRC32 instruction has a latency of 3 cycles and a throughput of one per cycle,
// so one stream of it runs at 8 bytes per 3 cycles; three independent streams over the three thirds
// of a block keep it busy every cycle (8 bytes per cycle) and are then joined: the register after A
// then B is shift(register after A, |B|) ^ (register of B from zero), where shift multiplies by
// x^(8 |B|) modulo the polynomial.
#include "crc32c.h"

#include <cstring>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define FUYOU_CRC_X86 1
#endif

namespace fuyou::io {
namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  // CRC-32C, bit-reflected

// a * b modulo the polynomial, both as reflected bit strings (x^0 in the top bit).
uint32_t multmodp(uint32_t a, uint32_t b) {
  uint32_t m = 1u << 31, p = 0;
  for (;;) {
    if (a & m) {
      p ^= b;
      if ((a & (m - 1)) == 0) break;
    }
    m >>= 1;
    b = b & 1 ? (b >> 1) ^ kPoly : b >> 1;
  }
  return p;
}

// x^(8 n) modulo the polynomial: the factor that moves a register past n zero bytes.
uint32_t x8nmodp(uint64_t n) {
  uint32_t power = 1u << 30;  // x^1
  for (int k = 0; k < 3; ++k) power = multmodp(power, power);  // x^8
  uint32_t p = 1u << 31;  // x^0
  for (; n; n >>= 1) {
    if (n & 1) p = multmodp(power, p);
    power = multmodp(power, power);
  }
  return p;
}

struct Tables {
  uint32_t t[8][256];  // slicing by 8
  Tables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = c & 1 ? (c >> 1) ^ kPoly : c >> 1;
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i)
      for (int s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFF];
  }
};
const Tables& tables() {
  static const Tables t;
  return t;
}

uint32_t portable_reg(uint32_t c, const uint8_t* p, size_t n) {
  const Tables& T = tables();
  for (; n >= 8; n -= 8, p += 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);  // little endian, as the reflected CRC reads bytes
    w ^= c;
    c = T.t[7][w & 0xFF] ^ T.t[6][(w >> 8) & 0xFF] ^ T.t[5][(w >> 16) & 0xFF] ^ T.t[4][(w >> 24) & 0xFF] ^
        T.t[3][(w >> 32) & 0xFF] ^ T.t[2][(w >> 40) & 0xFF] ^ T.t[1][(w >> 48) & 0xFF] ^ T.t[0][w >> 56];
  }
  for (; n; --n) c = (c >> 8) ^ T.t[0][(c ^ *p++) & 0xFF];
  return c;
}

#if FUYOU_CRC_X86
// Bytes per stream of a three-stream block. 3 x 256 KiB: a buffer from DRAM is read at the core's
// streaming rate (measured on the 2-core dev box, 256 MiB buffer, median of 5: 8 KiB streams
// 11 GB/s, 64 KiB 17, 256 KiB 22, 1 MiB 18; in L2 every size runs at 25 GB/s = 8 B per cycle).
constexpr size_t kStream = 256 << 10;
// Below this, one stream (the join would cost more than it saves).
constexpr size_t kMinStream = 4096;

__attribute__((target("sse4.2"))) inline uint64_t crc_words(uint64_t c, const uint8_t* p, size_t n) {
  for (size_t i = 0; i < n; i += 8) {
    uint64_t a;
    std::memcpy(&a, p + i, 8);
    c = _mm_crc32_u64(c, a);
  }
  return c;
}

// Three streams over the thirds of `3 stream` bytes at p, joined onto register c.
__attribute__((target("sse4.2"))) uint32_t crc_block(uint32_t c, const uint8_t* p, size_t stream, uint32_t shift1, uint32_t shift2) {
  uint64_t c0 = c, c1 = 0, c2 = 0;
  for (size_t i = 0; i < stream; i += 8) {
    uint64_t a, b, d;
    std::memcpy(&a, p + i, 8);
    std::memcpy(&b, p + stream + i, 8);
    std::memcpy(&d, p + 2 * stream + i, 8);
    c0 = _mm_crc32_u64(c0, a);
    c1 = _mm_crc32_u64(c1, b);
    c2 = _mm_crc32_u64(c2, d);
  }
  return multmodp(shift2, uint32_t(c0)) ^ multmodp(shift1, uint32_t(c1)) ^ uint32_t(c2);
}

__attribute__((target("sse4.2"))) uint32_t hw_reg(uint32_t c, const uint8_t* p, size_t n) {
  static const uint32_t shift1 = x8nmodp(kStream), shift2 = x8nmodp(2 * kStream);
  for (; n && (reinterpret_cast<uintptr_t>(p) & 7); --n) c = _mm_crc32_u8(c, *p++);
  for (; n >= 3 * kStream; n -= 3 * kStream, p += 3 * kStream) c = crc_block(c, p, kStream, shift1, shift2);
  if (n >= 3 * kMinStream) {  // the rest in one shorter block (its two shifts computed here: ~1 us)
    const size_t stream = n / 3 / 8 * 8;
    c = crc_block(c, p, stream, x8nmodp(stream), x8nmodp(2 * stream));
    p += 3 * stream;
    n -= 3 * stream;
  }
  const size_t words = n / 8 * 8;
  c = uint32_t(crc_words(c, p, words));
  for (p += words, n -= words; n; --n) c = _mm_crc32_u8(c, *p++);
  return c;
}
#endif

}  // namespace

bool crc32c_hardware() {
#if FUYOU_CRC_X86
  static const bool has = (__builtin_cpu_init(), __builtin_cpu_supports("sse4.2"));
  return has;
#else
  return false;
#endif
}

uint32_t crc32c_portable(uint32_t crc, const void* data, size_t n) {
  return ~portable_reg(~crc, static_cast<const uint8_t*>(data), n);
}

uint32_t crc32c(uint32_t crc, const void* data, size_t n) {
#if FUYOU_CRC_X86
  if (crc32c_hardware()) return ~hw_reg(~crc, static_cast<const uint8_t*>(data), n);
#endif
  return crc32c_portable(crc, data, n);
}

}  // namespace fuyou::io
