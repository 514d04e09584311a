// CRC-32C (Castagnoli): the store's checksum. Hardware CRC32 instructions (SSE4.2) where the CPU
// has them, a table-driven fallback elsewhere; both give the same value.
#pragma once
#include <cstddef>
#include <cstdint>

namespace fuyou::io {

// The CRC-32C of n bytes at data, continuing `crc` (0 to start), as zlib.crc32 continues its value.
uint32_t crc32c(uint32_t crc, const void* data, size_t n);
// The same with the portable code only (to test one against the other).
uint32_t crc32c_portable(uint32_t crc, const void* data, size_t n);
bool crc32c_hardware();

}  // namespace fuyou::io
