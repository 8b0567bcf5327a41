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
#include <string>

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

// One expert's weights: each view holds that expert alone (its expert index is 0).
struct ExpertView {
  ExpertWeight gate_up;        // [1, 2I, H]
  const float* gate_up_bias;   // [2I]
  ExpertWeight down;           // [1, H, I]
  const float* down_bias;      // [H]
};

// Where a call's expert weights come from when they are not the stacked tensors of MoeArgs (a
// packed tensor in place, or a cache that reads experts from a file). A call takes its experts
// in groups of at most capacity(): start() the group, then next_ready() hands them out one at a
// time as they become readable (those already there first, so that computing them hides the
// reads of the others), then release() the group.
class ExpertSource {
 public:
  virtual ~ExpertSource() = default;
  // How many experts one group may hold at once (>= 1).
  virtual int64_t capacity() const = 0;
  // Begins making experts ids[0 .. n) readable (n <= capacity). false, with a message in
  // *error, when they cannot be had; release() the group either way.
  virtual bool start(const int64_t* ids, int64_t n, std::string* error) = 0;
  // Waits for one of the started experts i with done[i] == 0 to be readable: returns i and its
  // weights in *view (valid until release), or -1 with a message in *error (an I/O error, a
  // damaged extent).
  virtual int64_t next_ready(const int64_t* ids, int64_t n, const uint8_t* done,
                             ExpertView* view, std::string* error) = 0;
  virtual void release(const int64_t* ids, int64_t n) = 0;
  // flags[e] = 1 for each of the n experts that is readable now without a read (for cache-aware
  // routing); false when the source cannot tell (everything is then treated as resident).
  virtual bool residency(uint8_t* flags, int64_t n) const {
    (void)flags;
    (void)n;
    return false;
  }
  // Told how many expert choices of a call cache-aware routing changed (for the counters).
  virtual void count_rerouted(int64_t n) { (void)n; }
  // A hint that experts ids[0 .. n) will likely be wanted soon: a source may start reading
  // them (behind the reads callers wait for) without taking a reference. Never blocks.
  virtual void prefetch(const int64_t* ids, int64_t n) {
    (void)ids;
    (void)n;
  }

  // start() and every next_ready(): views[i] for ids[i].
  bool acquire(const int64_t* ids, int64_t n, ExpertView* views, std::string* error);
};

struct MoeArgs {
  const float* x;              // [T, H]
  const int64_t* ids;          // [T, topk], or nullptr with `logits`
  const float* weights;        // [T, topk], or nullptr with `logits`
  const float* logits;         // [T, E] router logits: the kernel takes the top-k and their
                               // softmax itself (nullptr: ids and weights are given)
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
  ExpertSource* source;        // nullptr: the stacked gate_up / down tensors above
  // Cache-aware routing (lossy, opt-in; one-token calls with `logits` and a `source` only): keep
  // the router's top `route_keep` experts and fill the other slots with experts the source holds
  // from the router's top `route_pool` (see route_cache_aware). 0: the exact top-k.
  int64_t route_keep = 0;
  int64_t route_pool = 0;
  // Lookahead (one-token calls): the next layer's router applied to this layer's hidden state,
  // [T, next_experts]; once this call's own reads are started, the top-k of it are handed to
  // `next_source` as a prefetch hint. Changes no result.
  const float* next_logits = nullptr;
  int64_t next_experts = 0;
  ExpertSource* next_source = nullptr;
  // Where each token's chosen ids and weights [T, topk] are copied (nullptr: nowhere); for hosts
  // that record the routing (routing_trace.h).
  int64_t* chosen_ids = nullptr;
  float* chosen_weights = nullptr;
};

// The instruction set the kernel uses: "avx512vnni", "avx512", "avx2", "neon" or "scalar". The
// best one this CPU has, unless $OSSEDGE_KERNEL_ISA or moe_set_isa chose another.
const char* moe_isa();

// Use the path `name` from now on; false (and no change) when this build or CPU lacks it.
bool moe_set_isa(const char* name);

// out [T, H] = sum over each token's chosen experts of weight * expert(x). Returns false (and
// leaves `out` unspecified) when an expert id is out of range or a size is not a multiple of 32.
// The result does not depend on `parallel`: every output is summed in the same order.
// With a `source`, its experts are used in groups of at most capacity() (in ascending expert
// order, so the sums are the same as in one group) and `error` gets the source's message.
bool moe_forward(const MoeArgs& args, float* out, std::string* error = nullptr);

// The top `k` of logits[0 .. experts) (ties: the lower index first, as torch.topk on CPU) and
// their softmax: ids[0 .. k), weights[0 .. k), highest first.
void route_top_k(const float* logits, int64_t experts, int64_t k, int64_t* ids, float* weights);

// Cache-aware routing of one token: the router's top `keep` experts, then, in the router's order,
// those of its top `pool` with resident[e] != 0, then (when still short of k) the router's next
// best; ids and their softmax weights highest logit first, as route_top_k. Returns how many of
// the k differ from the exact top-k. keep >= k (or pool <= keep) gives the exact top-k.
int64_t route_cache_aware(const float* logits, int64_t experts, int64_t k, int64_t keep,
                          int64_t pool, const uint8_t* resident, int64_t* ids, float* weights);

}  // namespace ossedge
