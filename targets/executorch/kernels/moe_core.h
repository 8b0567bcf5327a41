// gpt-oss MoE over MXFP4 or int4-g32 expert weights, read in place: only the selected experts'
// bytes are decoded, a block of 32 weights at a time in registers, and tokens are grouped per
// expert so that each decoded block serves up to 4 tokens at once (prefill decodes each expert's
// weights ceil(tokens / 4) times, decode once).
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
// nibble) and `scales` fp16 bits [E, N, K/32]. N and K are multiples of 32.
struct ExpertWeight {
  WeightFormat format;
  const uint8_t* data;
  const void* scales;
  int64_t rows;  // N
  int64_t cols;  // K
};

// Runs task(ctx, i) for every i in [0, n), in any order, possibly on several threads at once.
using ParallelFor = void (*)(int64_t n, void (*task)(void* ctx, int64_t i), void* ctx);

// f(i) for every i in [0, n) through `parallel` (nullptr, or n < 2: in order on this thread).
template <typename F>
void parallel_for(ParallelFor parallel, int64_t n, F& f) {
  if (parallel == nullptr || n < 2) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  parallel(n, [](void* ctx, int64_t i) { (*static_cast<F*>(ctx))(i); }, &f);
}

struct MoeArgs {
  const float* x;              // [T, H]
  const int64_t* ids;          // [T, topk]
  const float* weights;        // [T, topk]
  int64_t tokens;              // T
  int64_t topk;
  int64_t experts;             // E
  int64_t hidden;              // H
  int64_t intermediate;        // I
  ExpertWeight gate_up;        // [E, 2I, H], outputs interleaved gate/up
  const float* gate_up_bias;   // [E, 2I]
  ExpertWeight down;           // [E, H, I]
  const float* down_bias;      // [E, H]
  float limit;
  float alpha;
  ParallelFor parallel;        // nullptr: one thread
};

// The instruction set the kernel uses: "avx512vnni", "avx512", "avx2", "neon" or "scalar". The
// best one this CPU has, unless $OSSEDGE_KERNEL_ISA or moe_set_isa chose another.
const char* moe_isa();

// Use the path `name` from now on; false (and no change) when this build or CPU lacks it.
bool moe_set_isa(const char* name);

// out [T, H] = sum over each token's chosen experts of weight * expert(x). Returns false (and
// leaves `out` unspecified) when an expert id is out of range or a size is not a multiple of 32.
// The result does not depend on `parallel`: every output is summed in the same order.
bool moe_forward(const MoeArgs& args, float* out);

}  // namespace ossedge
