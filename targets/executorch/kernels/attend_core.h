// Attention with per-head sinks over a KV cache, skipping the slots a mask excludes: what gpt-oss
// needs at every layer, for ExecuTorch programs whose caches are far longer than what has been
// written (a 4096-slot cache holds 1,100 positions after a 1k prompt; the rest costs nothing).
//
// Plain C++17 with no ExecuTorch or torch dependency, like moe_core.
#pragma once

#include <cstdint>

#include "moe_core.h"  // ParallelFor

namespace ossedge {

struct AttendArgs {
  const float* q;      // [KV, R, D] queries, already scaled by 1/sqrt(D)
  const float* k;      // [KV, S, D]
  const float* v;      // [KV, S, D]
  const float* mask;   // [R, S] additive, shared by the KV heads; -inf slots are skipped
  const float* sinks;  // [KV, R] each row's sink logit (an extra softmax column, no value)
  int64_t heads;       // KV
  int64_t rows;        // R (query heads per KV head x tokens)
  int64_t slots;       // S
  int64_t dim;         // D
  ParallelFor parallel;
};

// out [KV, R, D] = softmax over (the unmasked slots' q.k + mask, the sink) of the slots' values.
// A row whose every slot is masked gives zeros (all the weight is on the sink).
void attend_forward(const AttendArgs& args, float* out);

}  // namespace ossedge
