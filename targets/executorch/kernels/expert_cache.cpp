#include "expert_cache.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "expert_file.h"
#include "expert_pack.h"

namespace ossedge {
namespace {

using Clock = std::chrono::steady_clock;

enum class State { kAbsent, kLoading, kReady, kFailed };

struct Entry {
  int64_t layer = 0, expert = 0;
  int64_t file_offset = 0, used = 0;
  uint64_t checksum = 0;
  float frequency = 0.0f;
  State state = State::kAbsent;
  int64_t slot = -1;
  int refs = 0;
  bool pinned = false;
  bool prefetched = false;  // read on a lookahead hint and not yet asked for
  uint64_t last_use = 0;
  int chunks_left = 0;
  std::string error;
};

struct Job {
  Entry* entry;
  int64_t offset, length;  // within the extent
};

class Cache;

class LayerSource final : public ExpertSource {
 public:
  LayerSource(Cache* cache, int64_t layer, WeightFormat format, int64_t hidden,
              int64_t intermediate)
      : cache_(cache), layer_(layer), format_(format), hidden_(hidden), inter_(intermediate) {}
  int64_t capacity() const override;
  bool start(const int64_t* ids, int64_t n, std::string* error) override;
  int64_t next_ready(const int64_t* ids, int64_t n, const uint8_t* done, ExpertView* view,
                     std::string* error) override;
  void release(const int64_t* ids, int64_t n) override;
  bool residency(uint8_t* flags, int64_t n) const override;
  void count_rerouted(int64_t n) override;
  void prefetch(const int64_t* ids, int64_t n) override;

 private:
  Cache* cache_;
  int64_t layer_;
  WeightFormat format_;
  int64_t hidden_, inter_;
};

std::string at_text(const Entry& e) {
  return "expert " + std::to_string(e.expert) + " of layer " + std::to_string(e.layer) +
         " (byte " + std::to_string(e.file_offset) + ")";
}

class Cache final : public ExpertCache {
 public:
  Cache(const CacheOptions& o, int fd, bool direct) : opt_(o), fd_(fd), direct_(direct) {}

  ~Cache() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    work_cv_.notify_all();
    for (auto& t : workers_) t.join();
    if (slab_ != nullptr) munmap(slab_, slab_bytes_);
    close(fd_);
  }

  ExpertSource* layer_source(const uint8_t* mapped, int64_t experts, int64_t stride,
                             WeightFormat format, int64_t hidden, int64_t intermediate,
                             std::string* error) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto found = by_base_.find(mapped);
    if (found != by_base_.end()) return found->second;
    if (by_base_.empty()) advise_random(opt_.path);
    // The headers are read through the program's mapping: without this, each of these E page
    // faults would read ahead by the device's read-ahead size (8 MiB here), megabytes per layer.
    advise_random_range(mapped, experts * stride);
    pack::Header h{};
    std::vector<Entry> entries(experts);
    int64_t layer = -1, layers = 0;
    for (int64_t e = 0; e < experts; ++e) {
      std::memcpy(&h, mapped + e * stride, sizeof h);
      const bool ok = h.magic == pack::kMagic && h.version == pack::kVersion &&
                      h.expert == e && h.experts == experts && h.stride == stride &&
                      h.format == (format == WeightFormat::kMxfp4 ? 0u : 1u) &&
                      h.hidden == hidden && h.intermediate == intermediate &&
                      h.used == pack::layout(format, hidden, intermediate).used &&
                      (e == 0 || (h.layer == layer && h.layers == layers)) &&
                      h.layer >= 0 && h.layer < h.layers && h.file_offset % pack::kExtentAlign == 0;
      if (!ok) {
        *error = opt_.path + ": the packed experts' header " + std::to_string(e) +
                 " does not describe this program's experts; convert the artifact again";
        return nullptr;
      }
      layer = h.layer;
      layers = h.layers;
      Entry& en = entries[e];
      en.layer = h.layer;
      en.expert = e;
      en.file_offset = h.file_offset;
      en.used = h.used;
      en.checksum = h.checksum;
      en.frequency = h.frequency;
    }
    if (stride_ == 0) {
      stride_ = stride;
      layers_ = layers;
      if (!make_slab(error)) return nullptr;
    } else if (stride != stride_ || layers != layers_) {
      *error = opt_.path + ": layers with different expert sizes; convert the artifact again";
      return nullptr;
    }
    if (layer_entries_.count(layer)) {
      *error = opt_.path + ": two expert tensors claim layer " + std::to_string(layer);
      return nullptr;
    }
    auto& stored = layer_entries_[layer];
    stored = std::move(entries);
    sources_.push_back(std::make_unique<LayerSource>(this, layer, format, hidden, intermediate));
    by_base_[mapped] = sources_.back().get();
    if (static_cast<int64_t>(layer_entries_.size()) == layers_) choose_pinned();
    return sources_.back().get();
  }

  CacheStats stats() const override {
    std::lock_guard<std::mutex> lock(mu_);
    CacheStats s = stats_;
    s.slots = slots_;
    s.stride = stride_;
    s.layers_seen = static_cast<int64_t>(layer_entries_.size());
    s.direct = direct_;
    s.resident = slots_ - static_cast<int64_t>(free_.size());
    s.pinned = pinned_;
    return s;
  }

  void reset_stats() override {
    std::lock_guard<std::mutex> lock(mu_);
    stats_ = CacheStats{};
  }

  void set_routing(int64_t keep, int64_t pool) override {
    std::lock_guard<std::mutex> lock(mu_);
    opt_.route_keep = keep;
    opt_.route_pool = pool;
  }

  void routing(int64_t* keep, int64_t* pool) const override {
    std::lock_guard<std::mutex> lock(mu_);
    *keep = opt_.route_keep;
    *pool = opt_.route_pool;
  }

  int64_t capacity() const { return std::max<int64_t>(1, slots_ - pin_quota_); }

  // flags[e]: expert e of `layer` is read or being read (using it costs no new read).
  void residency(int64_t layer, uint8_t* flags, int64_t n) const {
    std::lock_guard<std::mutex> lock(mu_);
    const auto found = layer_entries_.find(layer);
    for (int64_t e = 0; e < n; ++e) {
      const bool have = found != layer_entries_.end() && e < static_cast<int64_t>(found->second.size());
      const State s = have ? found->second[e].state : State::kAbsent;
      flags[e] = s == State::kReady || s == State::kLoading ? 1 : 0;
    }
  }

  void count_rerouted(int64_t n) {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.rerouted += n;
  }

  // Starts reading those of experts ids[0 .. n) of `layer` that are absent, behind every read a
  // caller waits for, into free or evictable LRU slots only (never waiting for one).
  void prefetch(int64_t layer, const int64_t* ids, int64_t n) {
    std::unique_lock<std::mutex> lock(mu_);
    auto found = layer_entries_.find(layer);
    if (found == layer_entries_.end() || slab_ == nullptr) return;
    for (int64_t i = 0; i < n; ++i) {
      if (ids[i] < 0 || ids[i] >= static_cast<int64_t>(found->second.size())) continue;
      Entry& e = found->second[ids[i]];
      if (e.state != State::kAbsent || !take_slot(e, lock, nullptr, /*wait=*/false)) continue;
      e.prefetched = true;
      e.last_use = ++tick_;  // the newest: not the next LRU victim
      ++stats_.prefetched;
      queue_read(e, &prefetch_jobs_);
    }
  }

  // Takes a reference on each expert and starts the reads of those not resident.
  bool start(int64_t layer, const int64_t* ids, int64_t n, std::string* error) {
    std::unique_lock<std::mutex> lock(mu_);
    std::vector<Entry>& entries = layer_entries_[layer];
    for (int64_t i = 0; i < n; ++i) {
      Entry& e = entries[ids[i]];
      ++e.refs;
      if (e.prefetched) {
        e.prefetched = false;
        ++stats_.prefetch_used;
        if (e.state == State::kLoading) promote(e);
      }
      if (e.state == State::kReady || e.state == State::kLoading) {
        ++stats_.hits;
        continue;
      }
      if (e.state == State::kFailed) drop(e);  // read it again
      ++stats_.misses;
      if (!start_read(e, lock, error)) return false;
    }
    if (!prefetch_jobs_.empty()) cancel_unused_prefetches(entries);
    return true;
  }

  // The layer's own call has come: hints it did not ask for whose reads have not begun are
  // dropped (their slots freed), so that a wrong guess costs no disk time once I/O-bound.
  void cancel_unused_prefetches(std::vector<Entry>& entries) {
    for (Entry& e : entries) {
      if (!e.prefetched || e.refs > 0 || e.state != State::kLoading) continue;
      int pending = 0;
      int64_t bytes = 0;
      for (const Job& j : prefetch_jobs_) {
        if (j.entry == &e) ++pending, bytes += j.length;
      }
      if (pending != e.chunks_left) continue;  // a chunk is being read: let it finish
      for (auto it = prefetch_jobs_.begin(); it != prefetch_jobs_.end();) {
        it = it->entry == &e ? prefetch_jobs_.erase(it) : it + 1;
      }
      // (counted when queued; a reset_stats() in between leaves nothing to take back)
      stats_.bytes_read = std::max<int64_t>(0, stats_.bytes_read - bytes);
      stats_.prefetched = std::max<int64_t>(0, stats_.prefetched - 1);
      if (--in_flight_ == 0) stats_.busy_ns += (Clock::now() - busy_since_).count();
      e.prefetched = false;
      e.chunks_left = 0;
      drop(e);
    }
    slot_cv_.notify_all();
  }

  // The lowest i with !done[i] whose expert is readable (waiting for one when none is yet).
  int64_t next_ready(int64_t layer, const int64_t* ids, int64_t n, const uint8_t* done,
                     const uint8_t** extent, std::string* error) {
    std::unique_lock<std::mutex> lock(mu_);
    std::vector<Entry>& entries = layer_entries_[layer];
    Clock::time_point t0{};
    for (;;) {
      for (int64_t i = 0; i < n; ++i) {
        if (done[i]) continue;
        const Entry& e = entries[ids[i]];
        if (e.state == State::kReady) {
          if (t0 != Clock::time_point{}) stats_.wait_ns += (Clock::now() - t0).count();
          *extent = slab_ + e.slot * stride_;
          return i;
        }
        if (e.state == State::kFailed) {
          *error = e.error;
          return -1;
        }
        if (e.state == State::kAbsent) {
          *error = opt_.path + ": " + at_text(e) + " was not started";
          return -1;
        }
      }
      if (t0 == Clock::time_point{}) t0 = Clock::now();
      ready_cv_.wait(lock);
    }
  }

  void release(int64_t layer, const int64_t* ids, int64_t n) {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<Entry>& entries = layer_entries_[layer];
    for (int64_t i = 0; i < n; ++i) {
      Entry& e = entries[ids[i]];
      --e.refs;
      e.last_use = ++tick_;
      if (e.state == State::kFailed && e.refs == 0) drop(e);  // a later call reads again
    }
    slot_cv_.notify_all();
  }

  bool init(std::string* error) {
    for (int i = 0; i < std::max(1, opt_.io_threads); ++i) workers_.emplace_back([this] { work(); });
    (void)error;
    return true;
  }

 private:
  bool make_slab(std::string* error) {
    slots_ = cache_slots(opt_.budget_bytes, stride_);
    if (slots_ < 1) {
      *error = "an expert cache of " + std::to_string(opt_.budget_bytes) +
               " bytes holds no expert (one is " + std::to_string(stride_) + " bytes)";
      return false;
    }
    slab_bytes_ = static_cast<size_t>(slots_ * stride_);
    void* p = mmap(nullptr, slab_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1,
                   0);
    if (p == MAP_FAILED) {
      *error = "cannot reserve " + std::to_string(slab_bytes_ >> 20) +
               " MiB for the expert cache (" + std::strerror(errno) + "); give a smaller budget";
      return false;
    }
    slab_ = static_cast<uint8_t*>(p);
#ifdef MADV_HUGEPAGE
    if (!std::getenv("OSSEDGE_NO_THP")) madvise(slab_, slab_bytes_, MADV_HUGEPAGE);  // a hint
#endif
    for (int64_t s = slots_ - 1; s >= 0; --s) free_.push_back(s);
    pin_quota_ = slots_ - lru_slots();
    return true;
  }

  int64_t lru_slots() const {
    const int64_t share = static_cast<int64_t>(static_cast<double>(slots_) * opt_.lru_share + 0.5);
    return std::min(slots_, std::max<int64_t>(1, share));
  }

  // With a routing profile (frequencies in the headers): pins the most frequently selected
  // experts of all layers together in all but lru_slots() of the slots, once every layer has
  // been seen. Without one, the first experts read are pinned up to that quota (under uniform
  // routing any fixed set does as well, and a cyclic sweep over the layers defeats plain LRU
  // as soon as a token's experts outnumber the slots).
  void choose_pinned() {
    std::vector<Entry*> all;
    for (auto& [layer, entries] : layer_entries_) {
      for (Entry& e : entries) {
        if (e.frequency > 0.0f) all.push_back(&e);
      }
    }
    if (all.empty()) return;
    profiled_ = true;
    for (auto& [layer, entries] : layer_entries_) {
      for (Entry& e : entries) e.pinned = false;
    }
    pinned_ = 0;
    const int64_t quota = std::min<int64_t>(static_cast<int64_t>(all.size()), slots_ - lru_slots());
    pin_quota_ = std::max<int64_t>(0, quota);
    std::stable_sort(all.begin(), all.end(),
                     [](const Entry* a, const Entry* b) { return a->frequency > b->frequency; });
    for (int64_t i = 0; i < pin_quota_; ++i) {
      all[i]->pinned = true;
      if (all[i]->slot >= 0) ++pinned_;
    }
  }

  // A slot for `e`: a free one, else the least recently used unpinned, unreferenced expert's.
  // Waits for a release when every slot is in use (only when callers together want more experts
  // at once than capacity()).
  bool take_slot(Entry& e, std::unique_lock<std::mutex>& lock, std::string* error,
                 bool wait = true) {
    for (;;) {
      if (!free_.empty()) {
        e.slot = free_.back();
        free_.pop_back();
        if (e.pinned) ++pinned_;
        return true;
      }
      Entry* victim = nullptr;
      for (auto& [layer, entries] : layer_entries_) {
        for (Entry& c : entries) {
          if (c.state == State::kReady && !c.pinned && c.refs == 0 &&
              (victim == nullptr || c.last_use < victim->last_use)) {
            victim = &c;
          }
        }
      }
      if (victim != nullptr) {
        e.slot = victim->slot;
        victim->slot = -1;
        victim->state = State::kAbsent;
        victim->prefetched = false;  // a hint that was never used
        if (e.pinned) ++pinned_;
        return true;
      }
      if (!wait) return false;
      if (stop_) {
        *error = "the expert cache is closing";
        return false;
      }
      slot_cv_.wait(lock);
    }
  }

  void drop(Entry& e) {
    if (e.slot >= 0) {
      free_.push_back(e.slot);
      if (e.pinned) --pinned_;
    }
    e.slot = -1;
    e.state = State::kAbsent;
  }

  bool start_read(Entry& e, std::unique_lock<std::mutex>& lock, std::string* error) {
    // Without a profile, first come, pinned: an equal share of the pinned slots per layer, so
    // that every layer keeps some experts (which cache-aware routing can then choose).
    if (!profiled_ && !e.pinned && pinned_ < pin_quota_ && layers_ > 0 &&
        first_pins_[e.layer] < pin_quota_ / layers_ + (e.layer < pin_quota_ % layers_ ? 1 : 0)) {
      e.pinned = true;
      ++first_pins_[e.layer];
    }
    if (!take_slot(e, lock, error)) return false;
    queue_read(e, &jobs_);
    return true;
  }

  // Queues the reads of `e` (which holds a slot) on `queue`: jobs_ (callers wait for them) or
  // prefetch_jobs_ (taken only when jobs_ is empty).
  void queue_read(Entry& e, std::deque<Job>* queue) {
    e.state = State::kLoading;
    e.error.clear();
    const int64_t length = pack::align_up(e.used, pack::kExtentAlign);
    const int64_t chunk = std::max<int64_t>(pack::kExtentAlign, opt_.chunk_bytes);
    e.chunks_left = static_cast<int>((length + chunk - 1) / chunk);
    for (int64_t at = 0; at < length; at += chunk) {
      queue->push_back({&e, at, std::min(chunk, length - at)});
    }
    stats_.bytes_read += length;
    if (in_flight_++ == 0) busy_since_ = Clock::now();
    work_cv_.notify_all();
  }

  // A prefetched expert a caller now waits for: its reads not yet taken move to jobs_.
  void promote(Entry& e) {
    for (auto it = prefetch_jobs_.begin(); it != prefetch_jobs_.end();) {
      if (it->entry == &e) {
        jobs_.push_back(*it);
        it = prefetch_jobs_.erase(it);
      } else {
        ++it;
      }
    }
  }

  void work() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      work_cv_.wait(lock, [this] { return stop_ || !jobs_.empty() || !prefetch_jobs_.empty(); });
      if (stop_) return;
      std::deque<Job>& from = jobs_.empty() ? prefetch_jobs_ : jobs_;
      Job job = from.front();
      from.pop_front();
      Entry& e = *job.entry;
      uint8_t* dst = slab_ + e.slot * stride_ + job.offset;
      const int64_t where = e.file_offset + job.offset;
      lock.unlock();
      std::string why = read_at(dst, job.length, where);
      lock.lock();
      if (!why.empty() && e.error.empty()) e.error = why;
      if (--e.chunks_left > 0) continue;
      if (e.error.empty()) {
        lock.unlock();
        std::string bad = check(e, slab_ + e.slot * stride_);
        lock.lock();
        e.error = bad;
      }
      e.state = e.error.empty() ? State::kReady : State::kFailed;
      if (--in_flight_ == 0) stats_.busy_ns += (Clock::now() - busy_since_).count();
      ready_cv_.notify_all();
      // A finished prefetch (no reference) is evictable now, or freed when its read failed (a
      // caller that wants it reads again and gets the error): someone may wait for a slot.
      if (e.refs == 0) {
        if (e.state == State::kFailed) {
          drop(e);
          e.prefetched = false;
        }
        slot_cv_.notify_all();
      }
    }
  }

  std::string read_at(uint8_t* dst, int64_t length, int64_t where) {
    int64_t done = 0;
    while (done < length) {
      const ssize_t n = pread(fd_, dst + done, static_cast<size_t>(length - done), where + done);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        return opt_.path + ": reading " + std::to_string(length) + " bytes at byte " +
               std::to_string(where + done) + " failed (" + std::strerror(errno) + ")";
      }
      if (n == 0) {
        return opt_.path + ": ends at byte " + std::to_string(where + done) +
               ", inside the packed experts (truncated; convert the artifact again)";
      }
      done += n;
    }
#ifdef POSIX_FADV_DONTNEED
    if (!direct_) posix_fadvise(fd_, where, length, POSIX_FADV_DONTNEED);
#endif
    return "";
  }

  std::string check(const Entry& e, const uint8_t* extent) const {
    pack::Header h{};
    std::memcpy(&h, extent, sizeof h);
    if (h.magic != pack::kMagic || h.layer != e.layer || h.expert != e.expert ||
        h.file_offset != e.file_offset || h.checksum != e.checksum || h.used != e.used) {
      return opt_.path + ": " + at_text(e) +
             " has a header that does not match the program; the file is not this artifact's "
             "model.ptd or is damaged — convert again";
    }
    if (pack::checksum(extent + pack::kHeaderBytes, e.used - pack::kHeaderBytes) != e.checksum) {
      return opt_.path + ": " + at_text(e) +
             " fails its checksum (the file is damaged); convert the artifact again";
    }
    return "";
  }

  CacheOptions opt_;
  int fd_;
  bool direct_;
  mutable std::mutex mu_;
  std::condition_variable work_cv_, ready_cv_, slot_cv_;
  std::vector<std::thread> workers_;
  std::deque<Job> jobs_, prefetch_jobs_;
  bool stop_ = false;
  std::map<const uint8_t*, LayerSource*> by_base_;
  std::vector<std::unique_ptr<LayerSource>> sources_;
  std::map<int64_t, std::vector<Entry>> layer_entries_;
  int64_t stride_ = 0, layers_ = 0, slots_ = 0, pin_quota_ = 0, pinned_ = 0;
  std::map<int64_t, int64_t> first_pins_;  // per layer, without a profile
  bool profiled_ = false;
  uint8_t* slab_ = nullptr;
  size_t slab_bytes_ = 0;
  std::vector<int64_t> free_;
  uint64_t tick_ = 0;
  int64_t in_flight_ = 0;  // experts being read
  Clock::time_point busy_since_{};
  CacheStats stats_;
};

int64_t LayerSource::capacity() const { return cache_->capacity(); }

bool LayerSource::start(const int64_t* ids, int64_t n, std::string* error) {
  return cache_->start(layer_, ids, n, error);
}

int64_t LayerSource::next_ready(const int64_t* ids, int64_t n, const uint8_t* done,
                                ExpertView* view, std::string* error) {
  const uint8_t* extent = nullptr;
  const int64_t i = cache_->next_ready(layer_, ids, n, done, &extent, error);
  if (i >= 0) *view = pack::view(extent, format_, hidden_, inter_);
  return i;
}

void LayerSource::release(const int64_t* ids, int64_t n) { cache_->release(layer_, ids, n); }

bool LayerSource::residency(uint8_t* flags, int64_t n) const {
  cache_->residency(layer_, flags, n);
  return true;
}

void LayerSource::count_rerouted(int64_t n) { cache_->count_rerouted(n); }

void LayerSource::prefetch(const int64_t* ids, int64_t n) { cache_->prefetch(layer_, ids, n); }

}  // namespace

int64_t cache_slots(int64_t budget_bytes, int64_t stride) {
  return stride > 0 && budget_bytes > 0 ? budget_bytes / stride : 0;
}

std::unique_ptr<ExpertCache> ExpertCache::open(const CacheOptions& options, std::string* error) {
  bool direct = false;
  const int fd = open_for_reads(options.path, options.direct, &direct);
  if (fd < 0) {
    *error = options.path + ": cannot open for the expert cache (" + std::strerror(errno) + ")";
    return nullptr;
  }
  auto cache = std::make_unique<Cache>(options, fd, direct);
  if (!cache->init(error)) return nullptr;
  return cache;
}

}  // namespace ossedge

