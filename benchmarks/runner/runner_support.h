// ossedge_runner's process-side helpers: errors, sizes, what /proc says of this process (RSS,
// storage reads, faults, its memory limit), and the expert cache: sizing it from the manifest and
// the memory limit, opening it through the kernel library's C API, and reading its counters.
// Included once, by ossedge_runner.cpp.
#pragma once

#include <dlfcn.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <initializer_list>
#include <sstream>
#include <string>

namespace {

[[noreturn]] void fail(const std::string& msg) {
  std::fprintf(stderr, "ossedge_runner: %s\n", msg.c_str());
  std::exit(1);
}

// "6G", "4500M", "1.5GiB", "123456" → bytes (powers of 1024); -1 when it is not a size.
long long parse_size(const std::string& text) {
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(text.c_str(), &end);
  if (end == text.c_str() || errno || v <= 0) return -1;
  std::string unit(end);
  for (char& c : unit) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  const char* units[] = {"", "k", "m", "g", "t"};
  for (int i = 0; i < 5; ++i) {
    const std::string u = units[i];
    if (unit == u || (i > 0 && (unit == u + "b" || unit == u + "ib")))
      return static_cast<long long>(v * static_cast<double>(1ll << (10 * i)));
  }
  return -1;
}


// The expert cache's C API in the kernel library (kernels/expert_cache.h), found with dlsym.
struct CacheApi {
  int (*open)(const char*, int64_t, int, double, char*, int64_t) = nullptr;
  int (*stats)(int64_t*, int64_t) = nullptr;
  int (*set_routing)(int64_t, int64_t) = nullptr;
  bool on = false;
};
CacheApi g_cache;

// Counters of one phase of a run: the cache's (hits, misses, bytes read, ns waited), the bytes
// this process read from storage (/proc/self/io read_bytes: page faults and preads alike) and
// its major page faults.
struct Counters {
  int64_t hits = 0, misses = 0, cache_bytes = 0, wait_ns = 0, busy_ns = 0, read_bytes = 0,
      major_faults = 0, rerouted = 0, prefetched = 0, prefetch_used = 0;
};

int64_t proc_read_bytes() {
  std::ifstream f("/proc/self/io");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("read_bytes:", 0) == 0) return std::atoll(line.c_str() + 11);
  }
  return 0;
}

Counters counters_now() {
  Counters c;
  if (g_cache.on) {
    int64_t v[14] = {};
    g_cache.stats(v, 14);
    c.hits = v[0], c.misses = v[1], c.cache_bytes = v[2], c.wait_ns = v[3], c.busy_ns = v[10];
    c.rerouted = v[11], c.prefetched = v[12], c.prefetch_used = v[13];
  }
  c.read_bytes = proc_read_bytes();
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  c.major_faults = ru.ru_majflt;
  return c;
}

Counters operator-(const Counters& a, const Counters& b) {
  return {a.hits - b.hits,           a.misses - b.misses,         a.cache_bytes - b.cache_bytes,
          a.wait_ns - b.wait_ns,       a.busy_ns - b.busy_ns,       a.read_bytes - b.read_bytes,
          a.major_faults - b.major_faults, a.rerouted - b.rerouted,
          a.prefetched - b.prefetched, a.prefetch_used - b.prefetch_used};
}

std::string counters_json(const Counters& c) {
  std::ostringstream o;
  o << "{\"read_bytes\":" << c.read_bytes << ",\"major_faults\":" << c.major_faults;
  if (g_cache.on) {
    o << ",\"cache_hits\":" << c.hits << ",\"cache_misses\":" << c.misses
      << ",\"cache_read_bytes\":" << c.cache_bytes << ",\"cache_wait_s\":" << c.wait_ns * 1e-9
      << ",\"cache_busy_s\":" << c.busy_ns * 1e-9 << ",\"rerouted\":" << c.rerouted
      << ",\"prefetched\":" << c.prefetched << ",\"prefetch_used\":" << c.prefetch_used;
  }
  return o.str() + "}";
}


std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') out += '\\', out += c;
    else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else out += c;
  }
  return out + "\"";
}

// VmHWM (peak RSS), VmRSS, RssAnon, RssFile from /proc/self/status and AnonHugePages (resident
// transparent huge pages) from /proc/self/smaps_rollup, in bytes; a key the kernel lacks is left out.
std::string rss_json() {
  std::string out;
  const auto read_keys = [&out](const char* file, std::initializer_list<const char*> keys) {
    std::ifstream f(file);
    std::string line;
    for (const char* key : keys) {
      f.clear();
      f.seekg(0);
      while (std::getline(f, line)) {
        if (line.rfind(std::string(key) + ":", 0) != 0) continue;
        long long kb = std::atoll(line.c_str() + std::strlen(key) + 1);
        out += (out.empty() ? "" : ",") + json_string(key) + ":" + std::to_string(kb * 1024);
        break;
      }
    }
  };
  read_keys("/proc/self/status", {"VmHWM", "VmRSS", "RssAnon", "RssFile"});
  read_keys("/proc/self/smaps_rollup", {"AnonHugePages"});
  return "{" + out + "}";
}

long long file_size(const std::string& p) {
  struct stat st {};
  return stat(p.c_str(), &st) == 0 ? static_cast<long long>(st.st_size) : 0;
}

// The integer after "key": in the manifest's text from `from` on (-1 when absent): the runner
// needs three numbers of manifest.json and no JSON library.
long long manifest_int(const std::string& text, const std::string& key, size_t from = 0) {
  const size_t at = text.find("\"" + key + "\":", from);
  if (at == std::string::npos) return -1;
  return std::atoll(text.c_str() + at + key.size() + 3);
}

long long status_kb(const char* key) {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind(std::string(key) + ":", 0) == 0) return std::atoll(line.c_str() + std::strlen(key) + 1);
  }
  return 0;
}

// Bytes this process may use: its memory cgroup's limit where one is set, else physical memory.
long long memory_limit() {
  long long limit = static_cast<long long>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGESIZE);
  std::ifstream f("/proc/self/cgroup");
  std::string line;
  while (std::getline(f, line)) {
    const size_t a = line.find(':'), b = line.find(':', a + 1);
    if (a == std::string::npos || b == std::string::npos) continue;
    const std::string controllers = line.substr(a + 1, b - a - 1), path = line.substr(b + 1);
    std::string file;
    if (controllers.empty()) file = "/sys/fs/cgroup" + path + "/memory.max";
    else if (("," + controllers + ",").find(",memory,") != std::string::npos)
      file = "/sys/fs/cgroup/memory" + path + "/memory.limit_in_bytes";
    else continue;
    std::ifstream lf(file);
    std::string v;
    if (lf >> v && v != "max") {
      const long long n = std::atoll(v.c_str());
      if (n > 0 && n < limit) limit = n;
    }
  }
  return limit;
}

// --expert-cache: the budget for `option` given what the process holds now (`rest`) and the
// artifact's sizes; 0 is off. Refuses budgets below one token's experts of one layer.
long long cache_budget(const std::string& option, const std::string& model,
                       const std::string& manifest, long long rest, long long artifact_bytes) {
  if (option == "off") return 0;
  const long long version = manifest_int(manifest, "contract_version");
  const size_t store = manifest.find("\"store\":");
  const long long stride = store == std::string::npos ? -1 : manifest_int(manifest, "stride", store);
  const long long top_k = manifest_int(manifest, "top_k", store);
  const long long layers = manifest_int(manifest, "layers", store);
  const long long experts = manifest_int(manifest, "experts", store);
  if (version < 2 || stride <= 0 || top_k <= 0 || layers <= 0 || experts <= 0) {
    if (option == "auto") return 0;
    fail("--expert-cache needs a version-2 artifact (experts packed one per extent); convert " +
         model + " again");
  }
  const long long all = layers * experts * stride, minimum = top_k * stride;
  constexpr long long kMargin = 256ll << 20;
  long long budget;
  if (option == "auto") {
    const long long limit = memory_limit();
    if (rest + artifact_bytes + kMargin <= limit) return 0;
    budget = std::min(all, limit - rest - kMargin);
    if (budget < minimum)
      fail("the memory limit of " + std::to_string(limit >> 20) + " MiB leaves too little for "
           "experts after the resident rest of " + std::to_string(rest >> 20) + " MiB; the cache "
           "needs at least " + std::to_string((minimum + (1 << 20) - 1) >> 20) + " MiB");
  } else {
    budget = parse_size(option);
    if (budget < minimum)
      fail("--expert-cache " + option + " is below the minimum of " +
           std::to_string((minimum + (1 << 20) - 1) >> 20) + "M (" + std::to_string(top_k) +
           " experts of " + std::to_string(stride) + " bytes)");
    budget = std::min(budget, all);
  }
  return budget;
}


std::string read_file(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Opens the kernel library's expert cache on `ptd` with `budget` bytes.
void open_expert_cache(void* kernels, const std::string& path, const std::string& ptd,
                       long long budget, int io_threads, double lru_share) {
  g_cache.open = reinterpret_cast<decltype(g_cache.open)>(dlsym(kernels, "ossedge_expert_cache_open"));
  g_cache.stats = reinterpret_cast<decltype(g_cache.stats)>(dlsym(kernels, "ossedge_expert_cache_stats"));
  if (!g_cache.open || !g_cache.stats)
    fail(path + ": an older kernel library without the expert cache; run `make install`");
  char err[512] = {};
  if (g_cache.open(ptd.c_str(), budget, io_threads, lru_share, err, sizeof err) != 0)
    fail(std::string("cannot open the expert cache: ") + err);
  g_cache.on = true;
}

// --cache-aware-routing K [--routing-pool M]: checked against the artifact's experts and set on
// the open cache. Returns the pool used (0 when routing stays exact).
long long set_cache_routing(void* kernels, const std::string& manifest, long keep, long pool) {
  if (keep == 0) {
    if (pool != 0) fail("--routing-pool needs --cache-aware-routing K");
    return 0;
  }
  if (!g_cache.on)
    fail("--cache-aware-routing needs the expert cache: give --expert-cache SIZE (auto is off "
         "when the artifact fits in memory)");
  const size_t store = manifest.find("\"store\":");
  const long long top_k = manifest_int(manifest, "top_k", store);
  const long long experts = manifest_int(manifest, "experts", store);
  if (keep >= top_k)
    fail("--cache-aware-routing " + std::to_string(keep) + " must be below the model's " +
         std::to_string(top_k) + " experts per token (it is how many of them to keep)");
  if (pool == 0) pool = std::min<long long>(experts, 2 * top_k);
  if (pool <= top_k || pool > experts)
    fail("--routing-pool " + std::to_string(pool) + " must be above the " + std::to_string(top_k) +
         " experts per token and at most the " + std::to_string(experts) + " experts");
  g_cache.set_routing =
      reinterpret_cast<decltype(g_cache.set_routing)>(dlsym(kernels, "ossedge_expert_cache_set_routing"));
  if (!g_cache.set_routing || g_cache.set_routing(keep, pool) != 0)
    fail("the kernel library has no cache-aware routing; run `make install`");
  return pool;
}

}  // namespace
