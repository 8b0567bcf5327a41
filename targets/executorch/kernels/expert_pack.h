// The packed expert layout of version-2 artifacts: every expert of a layer is one contiguous,
// page-aligned extent, so that one expert is one read. A layer's experts are one uint8 tensor
// [E, stride] in model.ptd; extent e holds, at 64-byte aligned offsets:
//
//   header (kHeaderBytes)  | gate_up codes | gate_up scales | gate_up bias (fp32 [2I])
//                          | down codes    | down scales    | down bias (fp32 [H])
//
// codes and scales as in moe_core.h (MXFP4: u8 [N, K/32, 16] + u8 [N, K/32]; int4: u8 [N, K/2] +
// fp16 [N, K/32]). The header names the extent (layer, expert, its absolute offset in the file)
// and carries a checksum of the bytes after it, so a cache that reads the extent with pread can
// tell a wrong, truncated or damaged read from a good one. targets/executorch/pack.py writes the
// same layout; keep the two in step.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "moe_core.h"

namespace ossedge::pack {

constexpr uint64_t kMagic = 0x3150584544455353ull;  // "SSEDEXP1", little-endian
constexpr uint32_t kVersion = 1;
constexpr int64_t kHeaderBytes = 256;
constexpr int64_t kPartAlign = 64;
constexpr int64_t kExtentAlign = 4096;

// The header at the start of every extent (little-endian, 256 bytes with reserved space).
struct Header {
  uint64_t magic;
  uint32_t version;
  uint32_t format;        // 0 MXFP4, 1 int4-g32
  int64_t layer;
  int64_t layers;         // how many layers the artifact has
  int64_t expert;
  int64_t experts;        // E
  int64_t hidden;         // H
  int64_t intermediate;   // I
  int64_t stride;         // bytes from one extent to the next
  int64_t used;           // bytes of this extent in use (header included)
  int64_t file_offset;    // absolute offset of this extent in model.ptd
  uint64_t checksum;      // of bytes [kHeaderBytes, used)
  float frequency;        // share of the layer's selections in the routing profile (0: none)
  uint32_t reserved0;
  uint8_t reserved[256 - 104];
};
static_assert(sizeof(Header) == kHeaderBytes, "the header is 256 bytes");

inline int64_t align_up(int64_t v, int64_t a) { return (v + a - 1) / a * a; }

// Byte offsets of the six parts inside an extent, and the extent's used size.
struct Layout {
  int64_t gate_up_codes, gate_up_scales, gate_up_bias, down_codes, down_scales, down_bias, used;
};

inline Layout layout(WeightFormat format, int64_t hidden, int64_t intermediate) {
  const int64_t scale_bytes = format == WeightFormat::kMxfp4 ? 1 : 2;
  const int64_t n1 = 2 * intermediate, k1 = hidden, n2 = hidden, k2 = intermediate;
  Layout l{};
  int64_t at = kHeaderBytes;
  const auto take = [&at](int64_t bytes) {
    const int64_t here = at;
    at = align_up(at + bytes, kPartAlign);
    return here;
  };
  l.gate_up_codes = take(n1 * k1 / 2);
  l.gate_up_scales = take(n1 * (k1 / 32) * scale_bytes);
  l.gate_up_bias = take(n1 * 4);
  l.down_codes = take(n2 * k2 / 2);
  l.down_scales = take(n2 * (k2 / 32) * scale_bytes);
  l.down_bias = take(n2 * 4);
  l.used = at;
  return l;
}

inline int64_t stride(WeightFormat format, int64_t hidden, int64_t intermediate) {
  return align_up(layout(format, hidden, intermediate).used, kExtentAlign);
}

// Sum over the extent's 64-bit words w[i] of w[i] * (2i + 1), modulo 2^64: odd multipliers make
// any change of one word, and any swap of two, change the sum. `bytes` is a multiple of 8.
inline uint64_t checksum(const uint8_t* p, int64_t bytes) {
  uint64_t sum = 0;
  const int64_t words = bytes / 8;
  for (int64_t i = 0; i < words; ++i) {
    uint64_t w;
    std::memcpy(&w, p + 8 * i, 8);
    sum += w * (2 * static_cast<uint64_t>(i) + 1);
  }
  return sum;
}

// The views of one extent for the MoE kernel (expert index 0 of each view).
inline ExpertView view(const uint8_t* extent, WeightFormat format, int64_t hidden,
                       int64_t intermediate) {
  const Layout l = layout(format, hidden, intermediate);
  ExpertView v{};
  v.gate_up = {format, extent + l.gate_up_codes, extent + l.gate_up_scales, 2 * intermediate,
               hidden};
  v.gate_up_bias = reinterpret_cast<const float*>(extent + l.gate_up_bias);
  v.down = {format, extent + l.down_codes, extent + l.down_scales, hidden, intermediate};
  v.down_bias = reinterpret_cast<const float*>(extent + l.down_bias);
  return v;
}

}  // namespace ossedge::pack
