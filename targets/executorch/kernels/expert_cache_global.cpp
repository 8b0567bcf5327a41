// The process's one expert cache (expert_cache.h: open_global_cache and friends), which the
// packed MoE kernels use when it is open.
#include <memory>
#include <mutex>

#include "expert_cache.h"

namespace ossedge {
namespace {

std::mutex g_mu;
std::shared_ptr<ExpertCache> g_cache;

}  // namespace

bool open_global_cache(const CacheOptions& options, std::string* error) {
  std::shared_ptr<ExpertCache> cache = ExpertCache::open(options, error);
  if (!cache) return false;
  std::lock_guard<std::mutex> lock(g_mu);
  g_cache = std::move(cache);
  return true;
}

void close_global_cache() {
  std::lock_guard<std::mutex> lock(g_mu);
  g_cache.reset();
}

ExpertSource* global_layer_source(const uint8_t* mapped, int64_t experts, int64_t stride,
                                  WeightFormat format, int64_t hidden, int64_t intermediate,
                                  std::string* error) {
  std::shared_ptr<ExpertCache> cache;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    cache = g_cache;
  }
  error->clear();
  if (!cache) return nullptr;
  return cache->layer_source(mapped, experts, stride, format, hidden, intermediate, error);
}

bool global_cache_stats(CacheStats* stats) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (!g_cache) return false;
  *stats = g_cache->stats();
  return true;
}

void global_cache_routing(int64_t* keep, int64_t* pool) {
  std::lock_guard<std::mutex> lock(g_mu);
  *keep = *pool = 0;
  if (g_cache) g_cache->routing(keep, pool);
}

bool set_global_cache_routing(int64_t keep, int64_t pool) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (!g_cache) return false;
  g_cache->set_routing(keep, pool);
  return true;
}

void reset_global_cache_stats() {
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_cache) g_cache->reset_stats();
}

}  // namespace ossedge
