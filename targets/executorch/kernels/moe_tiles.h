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

// The int8 form of one activation row, for the integer dot-product paths. Blocks are taken four
// at a time ("quads", the last one zero-padded): a quad is 128 bytes, the 16 even elements of
// each of its four blocks (64 bytes, block after block), then their 16 odd elements, so that one
// 64-byte load lines up with the low nibbles of 64 weight bytes and the next with their high
// nibbles. Per quad, 16 int32 lanes, a lane per 4 bytes (so lanes 4b..4b+3 belong to block b):
// `scale`, the block's activation scale times the format's unit (1/2 for MXFP4's doubled table),
// and `corr`, minus the code offset times the lane's activation sum, for paths that multiply
// unsigned weight codes (code = value + offset) by signed activations.
struct QuantRow {
  const int8_t* q;       // [quads * 128]
  const float* scale;    // [quads * 16]
  const int32_t* corr;   // [quads * 16]
};

constexpr int kQuadBlocks = 4;
constexpr int kQuadBytes = 2 * kQuadBlocks * 16;
constexpr int kQuadLanes = 16;

// Offset of element i (natural order) of a row in QuantRow::q.
inline int64_t quad_index(int64_t i) {
  const int64_t block = i / kBlock, p = i % kBlock;
  return (block / kQuadBlocks) * kQuadBytes + (p & 1) * (kQuadBytes / 2) +
         (block % kQuadBlocks) * 16 + p / 2;
}

// res as for TileFn, from the int8 rows.
using QuantTileFn = void (*)(const ExpertWeight& w, int64_t e, int64_t n0,
                             const QuantRow* const* x, float* res);

// Unsigned codes for the paths that multiply u8 by s8: E2M1 doubled plus 12, and the int4 code
// as stored (value plus 8).
alignas(16) inline constexpr uint8_t kFp4TwicePlus12[16] = {12, 13, 14, 15, 16, 18, 20, 24,
                                                            12, 11, 10, 9,  8,  6,  4,  0};
inline int code_offset(WeightFormat format) { return format == WeightFormat::kMxfp4 ? 12 : 8; }
inline float code_unit(WeightFormat format) {
  return format == WeightFormat::kMxfp4 ? 0.5f : 1.0f;
}

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
