// ossedge_runner: times prefill and greedy decode of an ossedge ExecuTorch artifact (model.pte +
// model.ptd) with the C++ runtime alone, and prints one JSON object on stdout. See README.md.
#include <dlfcn.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <initializer_list>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <executorch/extension/data_loader/buffer_data_loader.h>
#include <executorch/extension/data_loader/mmap_data_loader.h>
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

// The thread pool XNNPACK and the ossedge kernels share (declared there: the wheel lacks the header).
#include "et_threadpool.h"
#include "runner_support.h"

namespace {

using executorch::extension::Module;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using Clock = std::chrono::steady_clock;

std::string error_text(Error e) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "%s (0x%x)", executorch::runtime::to_string(e),
                static_cast<unsigned>(e));
  return buf;
}

struct Args {
  std::string model, kernels;
  long prompt_length = 128, gen_tokens = 32, runs = 3, warmup = 1, threads = 0;
  uint64_t seed = 0;
  bool mlock = false;
  std::string weights = "mmap";  // or "heap"
  std::string expert_cache = "auto";  // "auto", "off" or a size
  int io_threads = 0;               // 0: the cache's default
  double lru_share = -1.0;          // < 0: the cache's default
  long route_keep = 0;              // --cache-aware-routing K (0: exact routing)
  long route_pool = 0;              // --routing-pool M (0: twice the experts per token)
  std::vector<int64_t> prompt_ids;  // overrides the random prompt when given
};

const char* kUsage =
    "usage: ossedge_runner --model DIR [--prompt-length N] [--gen-tokens N] [--runs R]\n"
    "                      [--warmup W] [--threads T] [--mlock] [--weights mmap|heap]\n"
    "                      [--seed S] [--kernels PATH] [--prompt-ids ID,ID,...]\n"
    "                      [--expert-cache auto|off|SIZE] [--io-threads N] [--lru-share F]\n"
    "                      [--cache-aware-routing K [--routing-pool M]]\n";

long to_long(const std::string& flag, const std::string& s, long lo) {
  char* end = nullptr;
  errno = 0;
  long v = std::strtol(s.c_str(), &end, 10);
  if (s.empty() || *end || errno || v < lo)
    fail(flag + " needs an integer >= " + std::to_string(lo) + ", got '" + s + "'");
  return v;
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string f = argv[i];
    if (f == "-h" || f == "--help") {
      std::fputs(kUsage, stderr);
      std::exit(0);
    }
    if (f == "--mlock") {
      a.mlock = true;
      continue;
    }
    if (f.rfind("--", 0) != 0) fail("unexpected argument " + f + " (see --help)");
    if (i + 1 >= argc) fail(f + " needs a value");
    std::string v = argv[++i];
    if (f == "--model") a.model = v;
    else if (f == "--kernels") a.kernels = v;
    else if (f == "--prompt-length") a.prompt_length = to_long(f, v, 1);
    else if (f == "--gen-tokens") a.gen_tokens = to_long(f, v, 1);
    else if (f == "--runs") a.runs = to_long(f, v, 1);
    else if (f == "--warmup") a.warmup = to_long(f, v, 0);
    else if (f == "--threads") a.threads = to_long(f, v, 1);
    else if (f == "--expert-cache") a.expert_cache = v;
    else if (f == "--io-threads") a.io_threads = static_cast<int>(to_long(f, v, 1));
    else if (f == "--cache-aware-routing") a.route_keep = to_long(f, v, 0);
    else if (f == "--routing-pool") a.route_pool = to_long(f, v, 1);
    else if (f == "--lru-share") {
      char* end = nullptr;
      a.lru_share = std::strtod(v.c_str(), &end);
      if (v.empty() || *end || a.lru_share < 0 || a.lru_share > 1)
        fail("--lru-share needs a number in [0, 1], got '" + v + "'");
    }
    else if (f == "--weights") {
      if (v != "mmap" && v != "heap") fail("--weights needs mmap or heap, got '" + v + "'");
      a.weights = v;
    } else if (f == "--seed") a.seed = static_cast<uint64_t>(to_long(f, v, 0));
    else if (f == "--prompt-ids") {
      std::stringstream ss(v);
      for (std::string tok; std::getline(ss, tok, ',');) a.prompt_ids.push_back(to_long(f, tok, 0));
      if (a.prompt_ids.empty()) fail("--prompt-ids needs at least one id");
    } else fail("unknown option " + f + " (see --help)");
  }
  if (a.model.empty()) fail("--model DIR is required");
  if (a.mlock && a.weights == "heap")
    fail("--mlock pins mapped weights; it does not apply to --weights heap");
  if (a.expert_cache != "off" && a.expert_cache != "auto" && a.weights == "heap")
    fail("--expert-cache reads experts from model.ptd; it does not apply to --weights heap");
  if (a.weights == "heap") a.expert_cache = "off";
  if (a.expert_cache != "off" && a.expert_cache != "auto" && parse_size(a.expert_cache) < 0)
    fail("--expert-cache needs auto, off or a size such as 6G or 4500M, got '" + a.expert_cache +
         "'");
  return a;
}

bool is_file(const std::string& p) {
  struct stat st {};
  return stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string dir_of(const std::string& p) {
  auto slash = p.rfind('/');
  return slash == std::string::npos ? "." : p.substr(0, slash);
}

// The ossedge:: operators register themselves from the library's static initializers. RTLD_GLOBAL
// and the library's own dependency on libexecutorch.so (already loaded here, same soname) put them
// into this process's one operator registry.
void* g_kernels = nullptr;

std::string load_kernels(const std::string& given) {
  std::string path = given;
  if (path.empty() && std::getenv("OSSEDGE_KERNELS")) path = std::getenv("OSSEDGE_KERNELS");
  if (path.empty()) {
    char exe[4096];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    path = (n > 0 ? dir_of(std::string(exe, n)) : ".") + "/libossedge_kernels.so";
  }
  if (!is_file(path))
    fail(path + ": the ossedge kernel library is missing; run `make install` or give --kernels");
  if (path.find('/') == std::string::npos) path = "./" + path;  // else dlopen searches the system
  g_kernels = dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL);
  if (!g_kernels) fail(path + ": cannot load the kernel library (" + dlerror() + ")");
  return path;
}

// --weights heap: the .ptd read once into anonymous memory, 2 MiB aligned and, where the kernel
// offers transparent huge pages, advised to use them (a desktop's way of holding weights; the
// default mmap keeps them as file-backed pages the OS may reclaim, as a phone must). The file's
// page cache is dropped after the copy, so the weights are resident once, not twice.
class HeapWeights {
 public:
  explicit HeapWeights(const std::string& path) {
    const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail(path + ": cannot open (" + std::strerror(errno) + ")");
    struct stat st {};
    if (fstat(fd, &st) != 0) fail(path + ": cannot stat (" + std::strerror(errno) + ")");
    size_ = static_cast<size_t>(st.st_size);
    constexpr size_t kHuge = size_t{2} << 20;
    mapped_ = size_ + kHuge;
    base_ = mmap(nullptr, mapped_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base_ == MAP_FAILED)
      fail("cannot reserve " + std::to_string(size_ >> 20) + " MiB for --weights heap (" +
           std::strerror(errno) + "); use --weights mmap");
    const auto start = (reinterpret_cast<uintptr_t>(base_) + kHuge - 1) & ~(kHuge - 1);
    data_ = reinterpret_cast<uint8_t*>(start);
#ifdef MADV_HUGEPAGE
    madvise(data_, (size_ + kHuge - 1) & ~(kHuge - 1), MADV_HUGEPAGE);  // a hint; may be refused
#endif
    for (size_t done = 0; done < size_;) {
      const ssize_t n = read(fd, data_ + done, std::min<size_t>(size_ - done, size_t{64} << 20));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) fail(path + ": read failed at byte " + std::to_string(done));
      done += static_cast<size_t>(n);
    }
#ifdef POSIX_FADV_DONTNEED
    posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
#endif
    close(fd);
  }
  ~HeapWeights() { munmap(base_, mapped_); }
  HeapWeights(const HeapWeights&) = delete;
  HeapWeights& operator=(const HeapWeights&) = delete;
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  void* base_ = nullptr;
  uint8_t* data_ = nullptr;
  size_t size_ = 0, mapped_ = 0;
};

// The program for `a.weights`: both files mapped (mlocked with --mlock), or the .pte mapped and
// the .ptd served from `heap`.
std::unique_ptr<Module> open_module(const Args& a, const std::string& pte, const std::string& ptd,
                                    std::unique_ptr<HeapWeights>& heap) {
  if (a.weights == "mmap") {
    return std::make_unique<Module>(
        pte, ptd, a.mlock ? Module::LoadMode::MmapUseMlockIgnoreErrors : Module::LoadMode::Mmap);
  }
  heap = std::make_unique<HeapWeights>(ptd);
  auto program = executorch::extension::MmapDataLoader::from(
      pte.c_str(), executorch::extension::MmapDataLoader::MlockConfig::NoMlock);
  if (!program.ok()) fail("cannot map " + pte + ": " + error_text(program.error()));
  return std::make_unique<Module>(
      std::make_unique<executorch::extension::MmapDataLoader>(std::move(*program)), nullptr,
      nullptr, nullptr,
      std::make_unique<executorch::extension::BufferDataLoader>(heap->data(), heap->size()));
}

int64_t int_method(Module& m, const char* name) {
  auto r = m.get(name);
  if (!r.ok()) fail(std::string("method ") + name + " failed: " + error_text(r.error()));
  if (!r->isInt()) fail(std::string("method ") + name + " does not return an int");
  return r->toInt();
}

// One forward call: `n` tokens at `pos` → argmax of the logits of the last token.
int64_t step(Module& m, const int64_t* ids, int64_t n, int64_t pos, int64_t vocab) {
  auto tokens = executorch::extension::from_blob(const_cast<int64_t*>(ids),
                                                 {1, static_cast<int>(n)},
                                                 executorch::aten::ScalarType::Long);
  auto position = executorch::extension::from_blob(&pos, {1}, executorch::aten::ScalarType::Long);
  auto out = m.forward({EValue(tokens), EValue(position)});
  if (!out.ok()) fail("forward at position " + std::to_string(pos) + " failed: " +
                      error_text(out.error()));
  const auto& logits = out->at(0).toTensor();
  if (logits.scalar_type() != executorch::aten::ScalarType::Float || logits.numel() < vocab)
    fail("forward returned unexpected logits (want float32 with the last token's " +
         std::to_string(vocab) + " values)");
  // Logits of the last token are the last `vocab` values, whatever the leading dimensions.
  const float* p = logits.const_data_ptr<float>() + (logits.numel() - vocab);
  int64_t best = 0;
  for (int64_t i = 1; i < vocab; ++i)
    if (p[i] > p[best]) best = i;
  return best;
}

struct Run {
  double prefill_s, decode_s;
  std::vector<int64_t> tokens;
  Counters prefill, decode;
};

Run run_once(Module& m, const std::vector<int64_t>& prompt, long gen, int64_t chunk,
             int64_t vocab) {
  Run r;
  const Counters c0 = counters_now();
  auto t0 = Clock::now();
  int64_t pos = 0, tok = 0;
  for (size_t a = 0; a < prompt.size(); a += chunk) {
    int64_t n = std::min<int64_t>(chunk, prompt.size() - a);
    tok = step(m, prompt.data() + a, n, pos, vocab);
    pos += n;
  }
  auto t1 = Clock::now();
  const Counters c1 = counters_now();
  r.tokens.push_back(tok);
  // The first token comes from the prefill's logits; each further one costs a one-token call.
  for (long i = 1; i < gen; ++i) {
    tok = step(m, &tok, 1, pos++, vocab);
    r.tokens.push_back(tok);
  }
  auto t2 = Clock::now();
  r.prefill = c1 - c0;
  r.decode = counters_now() - c1;
  r.prefill_s = std::chrono::duration<double>(t1 - t0).count();
  r.decode_s = std::chrono::duration<double>(t2 - t1).count();
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  Args a = parse(argc, argv);
  const std::string pte = a.model + "/model.pte", ptd = a.model + "/model.ptd";
  struct stat st {};
  if (stat(a.model.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
    fail(a.model + ": no such model directory");
  for (const auto& p : {pte, ptd, a.model + "/manifest.json"})
    if (!is_file(p)) fail(p + ": missing; not an ossedge ExecuTorch artifact directory");
  const std::string kernels = load_kernels(a.kernels);

  auto t0 = Clock::now();
  // Mmap (default): weights stay file-backed pages (RssFile), as on a phone; --mlock pins them.
  std::unique_ptr<HeapWeights> heap;
  std::unique_ptr<Module> module = open_module(a, pte, ptd, heap);
  Module& m = *module;
  if (Error e = m.load(); e != Error::Ok)
    fail("cannot load " + pte + " with " + ptd + ": " + error_text(e));
  const int64_t chunk = int_method(m, "get_max_seq_len");
  const int64_t context = int_method(m, "get_max_context_len");
  const int64_t vocab = int_method(m, "get_vocab_size");
  if (chunk < 1 || vocab < 2) fail("the program's metadata methods return unusable values");
  double load_s = std::chrono::duration<double>(Clock::now() - t0).count();

  std::vector<int64_t> prompt = a.prompt_ids;
  if (prompt.empty()) {
    // Raw mt19937_64 output (standardized), not std::uniform_int_distribution (whose algorithm
    // differs between standard libraries), so every platform draws the same prompt. Ids stay
    // below the top 1100 of the vocabulary, where gpt-oss keeps its special tokens.
    std::mt19937_64 gen(a.seed);
    const uint64_t range = std::max<int64_t>(2, vocab - 1100);
    for (long i = 0; i < a.prompt_length; ++i) prompt.push_back(gen() % range);
  }
  for (int64_t id : prompt)
    if (id >= vocab) fail("prompt id " + std::to_string(id) + " is outside the vocabulary");
  const long n = static_cast<long>(prompt.size());
  if (n + a.gen_tokens > context)
    fail(std::to_string(n) + " prompt + " + std::to_string(a.gen_tokens) +
         " generated tokens exceed the program's context of " + std::to_string(context));

  // The pool (shared by XNNPACK and the ossedge kernels) is sized before forward is loaded, as
  // XNNPACK takes it then. Only now, so that the refusals above come before its start-up logs.
  long threads = a.threads ? a.threads : std::max(1L, sysconf(_SC_NPROCESSORS_ONLN));
  auto* pool = executorch::extension::threadpool::get_threadpool();
  if (!pool) fail("ExecuTorch's thread pool is unavailable");
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"  // upstream marks it experimental
  if (!pool->_unsafe_reset_threadpool(static_cast<uint32_t>(threads)))
    fail("cannot resize ExecuTorch's thread pool to " + std::to_string(threads) + " threads");
#pragma GCC diagnostic pop

  // The costly part of loading: XNNPACK packs its weights here.
  t0 = Clock::now();
  if (Error e = m.load_forward(); e != Error::Ok)
    fail("cannot load method forward of " + pte + ": " + error_text(e));
  load_s += std::chrono::duration<double>(Clock::now() - t0).count();

  // The expert cache, sized from what is resident now: the runtime, XNNPACK's packed linears,
  // the KV cache (initialized at load); plus the rest of the planned arena, whose untouched
  // pages are not resident yet.
  long long arena = 0;
  if (auto meta = m.method_meta("forward"); meta.ok()) {
    for (size_t i = 0; i < meta->num_memory_planned_buffers(); ++i) {
      if (auto b = meta->memory_planned_buffer_size(i); b.ok()) arena += *b;
    }
  }
  const std::string manifest = read_file(a.model + "/manifest.json");
  const long long kv = std::max(0ll, manifest_int(manifest, "kv_cache_bytes"));
  const long long rest = status_kb("VmRSS") * 1024 + std::max(0ll, arena - kv);
  const long long budget = cache_budget(a.expert_cache, a.model, manifest, rest,
                                        file_size(pte) + file_size(ptd));
  if (budget > 0) open_expert_cache(g_kernels, kernels, ptd, budget, a.io_threads, a.lru_share);
  const long long route_pool = set_cache_routing(g_kernels, manifest, a.route_keep, a.route_pool);

  for (long i = 0; i < a.warmup; ++i) run_once(m, prompt, a.gen_tokens, chunk, vocab);
  std::vector<Run> runs;
  for (long i = 0; i < a.runs; ++i) runs.push_back(run_once(m, prompt, a.gen_tokens, chunk, vocab));

  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  std::ostringstream o;
  o.precision(9);
  o << "{\"runner\":\"ossedge_runner\",\"model\":" << json_string(a.model)
    << ",\"kernels\":" << json_string(kernels) << ",\"load_s\":" << load_s
    << ",\"threads\":" << pool->get_thread_count() << ",\"prompt_tokens\":" << n
    << ",\"gen_tokens\":" << a.gen_tokens << ",\"max_seq_len\":" << chunk
    << ",\"max_context\":" << context << ",\"vocab_size\":" << vocab
    << ",\"mlock\":" << (a.mlock ? "true" : "false")
    << ",\"weights\":" << json_string(a.weights) << ",\"warmup_runs\":" << a.warmup
    << ",\"runs\":[";
  for (size_t i = 0; i < runs.size(); ++i) {
    const Run& r = runs[i];
    o << (i ? "," : "") << "{\"ttft_s\":" << r.prefill_s << ",\"prefill_s\":" << r.prefill_s
      << ",\"decode_s\":" << r.decode_s << ",\"prefill_tok_s\":" << n / r.prefill_s
      << ",\"decode_tok_s\":" << (a.gen_tokens > 1 ? (a.gen_tokens - 1) / r.decode_s : 0.0)
      << ",\"prefill_io\":" << counters_json(r.prefill)
      << ",\"decode_io\":" << counters_json(r.decode) << ",\"tokens\":[";
    for (size_t k = 0; k < r.tokens.size(); ++k) o << (k ? "," : "") << r.tokens[k];
    o << "]}";
  }
  o << "],\"rss\":" << rss_json() << ",\"major_faults\":" << ru.ru_majflt;
  o << ",\"expert_cache\":{\"option\":" << json_string(a.expert_cache)
    << ",\"budget_bytes\":" << budget << ",\"rest_bytes\":" << rest;
  if (g_cache.on) {
    int64_t v[10] = {};
    g_cache.stats(v, 10);
    o << ",\"slots\":" << v[4] << ",\"slot_bytes\":" << v[5] << ",\"pinned\":" << v[6]
      << ",\"resident\":" << v[7] << ",\"direct_io\":" << (v[9] ? "true" : "false")
      << ",\"cache_aware_routing\":" << a.route_keep << ",\"routing_pool\":" << route_pool;
  }
  o << "}}\n";
  std::fputs(o.str().c_str(), stdout);
  return 0;
}
