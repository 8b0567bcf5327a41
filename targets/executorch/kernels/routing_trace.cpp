// The routing record (routing_trace.h) and its C API.
#include "routing_trace.h"

#include <atomic>
#include <cstring>
#include <mutex>
#include <vector>

namespace ossedge {
namespace {

struct Record {
  int64_t tokens, experts, topk;
  std::vector<int64_t> ids;
  std::vector<float> weights, logits;  // logits empty when the call was given its ids
};

std::atomic<bool> g_on{false};
std::mutex g_mu;
std::vector<Record> g_records;

}  // namespace

bool routing_trace_on() { return g_on.load(std::memory_order_relaxed); }

void routing_trace_add(int64_t tokens, int64_t experts, int64_t topk, const int64_t* ids,
                       const float* weights, const float* logits) {
  Record r{tokens, experts, topk, std::vector<int64_t>(ids, ids + tokens * topk),
           std::vector<float>(weights, weights + tokens * topk), {}};
  if (logits != nullptr) r.logits.assign(logits, logits + tokens * experts);
  std::lock_guard<std::mutex> lock(g_mu);
  g_records.push_back(std::move(r));
}

}  // namespace ossedge

// Start (on != 0) or stop recording; either way the record is emptied.
extern "C" void ossedge_routing_trace(int on) {
  std::lock_guard<std::mutex> lock(ossedge::g_mu);
  ossedge::g_records.clear();
  ossedge::g_on.store(on != 0);
}

// How many calls are recorded.
extern "C" int64_t ossedge_routing_trace_count() {
  std::lock_guard<std::mutex> lock(ossedge::g_mu);
  return static_cast<int64_t>(ossedge::g_records.size());
}

// Call i's shape: shape[0..4) = tokens, experts, topk, 1 if its logits were recorded. 0 on
// success, -1 when i is out of range.
extern "C" int ossedge_routing_trace_shape(int64_t i, int64_t* shape) {
  std::lock_guard<std::mutex> lock(ossedge::g_mu);
  if (i < 0 || i >= static_cast<int64_t>(ossedge::g_records.size())) return -1;
  const auto& r = ossedge::g_records[i];
  shape[0] = r.tokens;
  shape[1] = r.experts;
  shape[2] = r.topk;
  shape[3] = r.logits.empty() ? 0 : 1;
  return 0;
}

// Copy call i's ids and weights [tokens, topk] and, when recorded and `logits` is not null, its
// logits [tokens, experts]. 0 on success, -1 when i is out of range.
extern "C" int ossedge_routing_trace_read(int64_t i, int64_t* ids, float* weights, float* logits) {
  std::lock_guard<std::mutex> lock(ossedge::g_mu);
  if (i < 0 || i >= static_cast<int64_t>(ossedge::g_records.size())) return -1;
  const auto& r = ossedge::g_records[i];
  std::memcpy(ids, r.ids.data(), r.ids.size() * sizeof(int64_t));
  std::memcpy(weights, r.weights.data(), r.weights.size() * sizeof(float));
  if (logits != nullptr && !r.logits.empty()) {
    std::memcpy(logits, r.logits.data(), r.logits.size() * sizeof(float));
  }
  return 0;
}
