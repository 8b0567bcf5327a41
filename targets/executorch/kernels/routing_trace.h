// A record of the MoE kernels' routing, for hosts that compare an artifact with a reference
// routed the same way (ossedge verify): every ossedge::moe_* call appends, in program order, the
// experts it chose per token, their weights and (for the _packed and _ahead operators, which
// route themselves) the router logits it was given. Off unless a host turns it on.
#pragma once

#include <cstdint>

namespace ossedge {

bool routing_trace_on();

// One call's routing: ids and weights [tokens, topk]; logits [tokens, experts] or nullptr.
void routing_trace_add(int64_t tokens, int64_t experts, int64_t topk, const int64_t* ids,
                       const float* weights, const float* logits);

}  // namespace ossedge
