// An expert cache in anonymous memory under one byte budget, for the packed experts of version-2
// artifacts (expert_pack.h). The MoE kernel asks it for the experts a call selected; a miss reads
// the whole extent (one expert: gate_up and down codes, scales, biases) from model.ptd with
// pread on a pool of I/O threads — O_DIRECT where the file system allows it, else pread and
// posix_fadvise(DONTNEED) (F_NOCACHE on Apple), so the page cache holds no second copy — and
// checks its header and checksum before anything reads it.
//
// Policy: all but `lru_share` of the slots hold pinned experts (never evicted): when the routing
// profile in the extents' headers gives frequencies, the most frequently selected experts of all
// layers together; without one, the first experts read in each layer (an equal share of the
// pinned slots per layer). The other slots hold recently used
// experts (LRU), and bound how many experts one call may hold at once. Plain C++17 with POSIX
// I/O; no ExecuTorch dependency.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "moe_core.h"

namespace ossedge {

struct CacheOptions {
  std::string path;          // model.ptd
  int64_t budget_bytes = 0;  // slots = budget / extent stride
  int io_threads = 4;
  double lru_share = 0.1;    // share of the slots that are never pinned (at least one)
  int64_t chunk_bytes = int64_t{4} << 20;  // one pread at most this long
  bool direct = true;        // try O_DIRECT (F_NOCACHE) first
  int64_t route_keep = 0;    // cache-aware routing (MoeArgs::route_keep); 0: exact top-k
  int64_t route_pool = 0;    // its candidates: the router's top route_pool
};

struct CacheStats {
  int64_t hits = 0, misses = 0, bytes_read = 0;
  int64_t wait_ns = 0;   // time callers spent waiting for reads
  int64_t busy_ns = 0;   // time at least one read was in flight
  int64_t slots = 0, stride = 0, pinned = 0, resident = 0;
  int64_t layers_seen = 0;
  int64_t rerouted = 0;  // expert choices cache-aware routing changed
  // lookahead reads (not counting those cancelled before they began), and those asked for
  int64_t prefetched = 0, prefetch_used = 0;
  bool direct = false;
};

class ExpertCache {
 public:
  // nullptr and *error when the file cannot be opened or the budget holds no expert.
  static std::unique_ptr<ExpertCache> open(const CacheOptions& options, std::string* error);
  virtual ~ExpertCache() = default;

  // The source of one layer's packed tensor [E, stride] at `mapped` (the program's memory-mapped
  // constant; only its E headers are read). nullptr and *error when the headers do not describe
  // such a tensor or the extents do not fit the budget. Sources live as long as the cache.
  virtual ExpertSource* layer_source(const uint8_t* mapped, int64_t experts, int64_t stride,
                                     WeightFormat format, int64_t hidden, int64_t intermediate,
                                     std::string* error) = 0;
  virtual CacheStats stats() const = 0;
  virtual void reset_stats() = 0;
  // Cache-aware routing for the calls to come (see CacheOptions).
  virtual void set_routing(int64_t keep, int64_t pool) = 0;
  virtual void routing(int64_t* keep, int64_t* pool) const = 0;
};

// The slots a budget buys for extents of `stride` bytes (0 when it buys none).
int64_t cache_slots(int64_t budget_bytes, int64_t stride);

}  // namespace ossedge

namespace ossedge {

// The process's one expert cache, used by the packed MoE kernels when it is open. Opening
// replaces (and closing drops) the previous one; do it between forward calls.
bool open_global_cache(const CacheOptions& options, std::string* error);
void close_global_cache();
// The global cache's source for a layer tensor (see layer_source), or nullptr with an empty
// *error when no cache is open.
ExpertSource* global_layer_source(const uint8_t* mapped, int64_t experts, int64_t stride,
                                  WeightFormat format, int64_t hidden, int64_t intermediate,
                                  std::string* error);
bool global_cache_stats(CacheStats* stats);
// The global cache's routing (keep = pool = 0 when no cache is open), and a way to set it
// (false when no cache is open).
void global_cache_routing(int64_t* keep, int64_t* pool);
bool set_global_cache_routing(int64_t keep, int64_t pool);
void reset_global_cache_stats();

}  // namespace ossedge
