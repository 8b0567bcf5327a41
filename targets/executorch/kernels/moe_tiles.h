// Internal to moe_core.cpp: what every instruction-set path shares, and the portable path.
//
// A "tile" is kRows consecutive weight rows of one expert dotted with up to kMaxTokens
// activation vectors. It walks the rows' blocks of 32 weights once, decoding each block (16
// bytes of 4-bit codes and one scale) through a 16-entry table, and multiply-adds it, with the
// block's scale, into every token's accumulator: the bytes are read in place and each decoded
// block serves all the tile's tokens.
#pragma once

#include <cstdint>
#include <cstring>

#include "moe_core.h"

namespace ossedge::detail {

constexpr int kBlock = 32;       // weights per scale
constexpr int kBlockBytes = 16;  // two 4-bit codes per byte
constexpr int kRows = 4;         // even, so that a gate row and its up row share a tile
constexpr int kMaxTokens = 4;

// Activations are passed "split": within each block of 32, the 16 even elements then the 16 odd
// ones. That is the order in which a block's low and high nibbles decode, so no path has to
// interleave decoded weights; the activations are reordered once per token instead.
inline int64_t split_index(int64_t i) {
  const int64_t p = i % kBlock;
  return i - p + ((p & 1) ? 16 + p / 2 : p / 2);
}

// The value of each 4-bit code before the block scale.
alignas(64) inline constexpr float kFp4Values[16] = {
    0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
    -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
alignas(64) inline constexpr float kInt4Values[16] = {
    -8.0f, -7.0f, -6.0f, -5.0f, -4.0f, -3.0f, -2.0f, -1.0f,
    0.0f, 1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.0f, 7.0f};

inline const float* code_values(WeightFormat format) {
  return format == WeightFormat::kMxfp4 ? kFp4Values : kInt4Values;
}

// The same as int8, for byte-shuffle lookups: E2M1 values doubled (they are multiples of 0.5, so
// the block scale is halved to match) and int4 codes minus 8.
alignas(16) inline constexpr int8_t kFp4Twice[16] = {0, 1,  2,  3,  4,  6,  8,  12,
                                                     0, -1, -2, -3, -4, -6, -8, -12};
alignas(16) inline constexpr int8_t kInt4Codes[16] = {-8, -7, -6, -5, -4, -3, -2, -1,
                                                      0,  1,  2,  3,  4,  5,  6,  7};

inline const int8_t* codes_int8(WeightFormat format) {
  return format == WeightFormat::kMxfp4 ? kFp4Twice : kInt4Codes;
}

// res[j * kRows + r] = (row n0 + r of expert e) . x[j], for r < kRows and j < M (x split).
using TileFn = void (*)(const ExpertWeight& w, int64_t e, int64_t n0, const float* const* x,
                        float* res);

// Index of the first block of row n of expert e (blocks and scales share it).
inline int64_t first_block(const ExpertWeight& w, int64_t e, int64_t n) {
  return (e * w.rows + n) * (w.cols / kBlock);
}

inline float from_bits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// E8M0 scale byte e -> 2^(e - 127) (e = 0 is the subnormal 2^-127, 255 is +inf here): a table,
// so that a SIMD path broadcasts a block's scale straight from memory.
inline const float* e8m0_table() {
  static const struct Table {
    float v[256];
    Table() : v() {
      for (uint32_t e = 0; e < 256; ++e) v[e] = from_bits(e == 0 ? (1u << 22) : (e << 23));
    }
  } table;
  return table.v;
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 31) return from_bits(sign | 0x7f800000u | (mant << 13));
  if (exp != 0) return from_bits(sign | ((exp + 127 - 15) << 23) | (mant << 13));
  if (mant == 0) return from_bits(sign);
  exp = 127 - 15 + 1;  // subnormal: renormalize
  while ((mant & 0x400u) == 0) {
    mant <<= 1;
    --exp;
  }
  return from_bits(sign | (exp << 23) | ((mant & 0x3ffu) << 13));
}

inline float block_scale(const ExpertWeight& w, int64_t block) {
  if (w.format == WeightFormat::kMxfp4) {
    return e8m0_table()[static_cast<const uint8_t*>(w.scales)[block]];
  }
  return half_to_float(static_cast<const uint16_t*>(w.scales)[block]);
}

template <int M>
void tile_scalar(const ExpertWeight& w, int64_t e, int64_t n0, const float* const* x,
                 float* res) {
  const float* values = code_values(w.format);
  const int64_t groups = w.cols / kBlock;
  for (int r = 0; r < kRows; ++r) {
    const int64_t b0 = first_block(w, e, n0 + r);
    float acc[M] = {};
    for (int64_t g = 0; g < groups; ++g) {
      const float s = block_scale(w, b0 + g);
      const uint8_t* bytes = w.data + (b0 + g) * kBlockBytes;
      float v[kBlock];
      for (int i = 0; i < kBlockBytes; ++i) {
        v[i] = values[bytes[i] & 0xf] * s;
        v[kBlockBytes + i] = values[bytes[i] >> 4] * s;
      }
      for (int j = 0; j < M; ++j) {
        const float* xj = x[j] + g * kBlock;
        float sum = 0.0f;
        for (int i = 0; i < kBlock; ++i) sum += v[i] * xj[i];
        acc[j] += sum;
      }
    }
    for (int j = 0; j < M; ++j) res[j * kRows + r] = acc[j];
  }
}

}  // namespace ossedge::detail
