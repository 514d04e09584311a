// Dequantization of `--weights fp8` tiles (E4M3 codes, an fp32 scale per 128x128 tile of an [N, K]
// weight): value = table[code] * scale, where table is torch's own fp8 -> fp32 conversion of every
// code (handed over by the caller), so each value is the one multiply of the torch reference
// (kernels.reference.weight_dequant_ref). Run by the h2d lane with the GIL released.
#include <cstring>

#include "adam.h"

namespace fuyou_adam {

void fp8_tiles_decode(const uint8_t* codes, const float* scales, int64_t n, int64_t k, const float* table, float* out) {
  const int64_t tile_cols = (k + kFp8Tile - 1) / kFp8Tile;
  for (int64_t r = 0; r < n; ++r) {
    const float* s = scales + (r / kFp8Tile) * tile_cols;
    const uint8_t* c = codes + r * k;
    float* o = out + r * k;
    for (int64_t t = 0; t < tile_cols; ++t) {
      const float scale = s[t];
      const int64_t end = (t + 1) * kFp8Tile < k ? (t + 1) * kFp8Tile : k;
      if (scale != scale) {  // a NaN scale: torch's product is the scale's quiet NaN, whatever the code (a NaN code too)
        uint32_t bits;
        std::memcpy(&bits, &scale, 4);
        bits |= 0x00400000u;
        float q;
        std::memcpy(&q, &bits, 4);
        for (int64_t j = t * kFp8Tile; j < end; ++j) o[j] = q;
        continue;
      }
      for (int64_t j = t * kFp8Tile; j < end; ++j) o[j] = table[c[j]] * scale;  // one NaN operand: it, quieted
    }
  }
}

}  // namespace fuyou_adam
