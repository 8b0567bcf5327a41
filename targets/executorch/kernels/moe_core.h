// gpt-oss MoE over MXFP4 or int4-g32 expert weights, read in place: only the selected experts'
// bytes are decoded, one row at a time, and each decoded row serves every token that chose the
// expert (tokens are grouped per expert, so prefill decodes each weight once).
//
// Plain C++17 with no ExecuTorch or torch dependency, so the same code runs inside the
// ExecuTorch kernel and in standalone tests (e.g. an arm64 build under qemu).
#pragma once

#include <cstddef>
#include <cstdint>

namespace ossedge {

enum class WeightFormat { kMxfp4, kInt4 };

// One stacked expert weight [E, N, K]: MXFP4 `data` u8 [E, N, K/32, 16] and `scales` u8
// [E, N, K/32] (exponent, bias 127); int4 `data` u8 [E, N, K/2] (code - 8, element 2j in the low
// nibble) and `scales` fp16 bits [E, N, K/32].
struct ExpertWeight {
  WeightFormat format;
  const uint8_t* data;
  const void* scales;
  int64_t rows;  // N
  int64_t cols;  // K, a multiple of 32
};

struct MoeArgs {
  const float* x;           // [T, H]
  const int64_t* ids;       // [T, topk]
  const float* weights;     // [T, topk]
  int64_t tokens;           // T
  int64_t topk;
  int64_t experts;          // E
  int64_t hidden;           // H
  int64_t intermediate;     // I
  ExpertWeight gate_up;     // [E, 2I, H], outputs interleaved gate/up
  const float* gate_up_bias;  // [E, 2I]
  ExpertWeight down;        // [E, H, I]
  const float* down_bias;   // [E, H]
  float limit;
  float alpha;
};

// Which instruction set the kernel uses on this CPU: "avx512", "avx2", "neon" or "scalar".
const char* moe_isa();

// out [T, H] = sum over each token's chosen experts of weight * expert(x). Returns false (and
// leaves `out` unspecified) when an expert id is out of range.
bool moe_forward(const MoeArgs& args, float* out);

}  // namespace ossedge
