// A standalone driver of moe_forward for tests: no ExecuTorch, so it also runs cross-compiled for
// arm64 under qemu. Usage: moe_check INPUT OUTPUT [PACKED BUDGET [CALLS]]. INPUT (little
// endian): int64 format (0 MXFP4, 1 int4), T, topk, E, H, I; float32 limit, alpha; then x f32
// [T,H], ids i64 [T,topk], weights f32 [T,topk], and gate_up and down as data, scales, bias f32.
// OUTPUT: the ISA name line, then out f32 [T,H].
//
// With PACKED (the same layer as one packed tensor [E, stride], written at offset 0 of that
// file: expert_pack.h) the experts come through an ExpertCache of BUDGET bytes reading PACKED,
// CALLS times (default 1; OUTPUT holds the last), and the cache's counters are printed to stdout
// as `hits misses bytes_read slots`. BUDGET "concurrent" instead has 8 threads acquire expert 0
// at once through an ample cache and prints the same counters. $MOE_CHECK_MAPPED names another
// file to map for the headers (as the program maps an intact model.ptd while the cache reads a
// damaged one).
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "expert_cache.h"
#include "expert_pack.h"
#include "moe_core.h"

namespace {

template <typename T>
bool read(FILE* f, std::vector<T>* v, size_t n) {
  v->resize(n);
  return std::fread(v->data(), sizeof(T), n, f) == n;
}

}  // namespace

// The packed file mapped read-only, as ExecuTorch maps model.ptd.
const uint8_t* map_file(const char* path, size_t* size) {
  const int fd = open(path, O_RDONLY);
  struct stat st {};
  if (fd < 0 || fstat(fd, &st) != 0) return nullptr;
  *size = static_cast<size_t>(st.st_size);
  void* p = mmap(nullptr, *size, PROT_READ, MAP_PRIVATE, fd, 0);
  close(fd);
  return p == MAP_FAILED ? nullptr : static_cast<const uint8_t*>(p);
}

void print_stats(const ossedge::ExpertCache& cache) {
  const ossedge::CacheStats s = cache.stats();
  std::printf("%lld %lld %lld %lld\n", static_cast<long long>(s.hits),
              static_cast<long long>(s.misses), static_cast<long long>(s.bytes_read),
              static_cast<long long>(s.slots));
}

int main(int argc, char** argv) {
  if (argc != 3 && argc != 5 && argc != 6) {
    std::fprintf(stderr, "usage: moe_check INPUT OUTPUT [PACKED BUDGET [CALLS]]\n");
    return 2;
  }
  FILE* in = std::fopen(argv[1], "rb");
  if (in == nullptr) {
    std::perror(argv[1]);
    return 1;
  }
  std::vector<int64_t> dims;
  std::vector<float> params;
  if (!read(in, &dims, 6) || !read(in, &params, 2)) return 1;
  const bool fp4 = dims[0] == 0;
  const int64_t t = dims[1], k = dims[2], e = dims[3], h = dims[4], inter = dims[5];
  std::vector<float> x, w, b1, b2;
  std::vector<int64_t> ids;
  std::vector<uint8_t> d1, s1, d2, s2;
  const size_t scale_bytes = fp4 ? 1 : 2;
  bool ok = read(in, &x, t * h) && read(in, &ids, t * k) && read(in, &w, t * k) &&
            read(in, &d1, e * 2 * inter * h / 2) &&
            read(in, &s1, e * 2 * inter * h / 32 * scale_bytes) &&
            read(in, &b1, e * 2 * inter) && read(in, &d2, e * h * inter / 2) &&
            read(in, &s2, e * h * inter / 32 * scale_bytes) && read(in, &b2, e * h);
  std::fclose(in);
  if (!ok) {
    std::fprintf(stderr, "%s: truncated input\n", argv[1]);
    return 1;
  }
  const auto format = fp4 ? ossedge::WeightFormat::kMxfp4 : ossedge::WeightFormat::kInt4;
  ossedge::MoeArgs a{};
  a.x = x.data();
  a.ids = ids.data();
  a.weights = w.data();
  a.tokens = t;
  a.topk = k;
  a.experts = e;
  a.hidden = h;
  a.intermediate = inter;
  a.gate_up = {format, d1.data(), s1.data(), 2 * inter, h};
  a.gate_up_bias = b1.data();
  a.down = {format, d2.data(), s2.data(), h, inter};
  a.down_bias = b2.data();
  a.limit = params[0];
  a.alpha = params[1];
  std::vector<float> out(t * h);
  std::unique_ptr<ossedge::ExpertCache> cache;
  int calls = 1;
  if (argc >= 5) {
    size_t size = 0;
    const char* mapped = std::getenv("MOE_CHECK_MAPPED");
    const uint8_t* packed = map_file(mapped != nullptr ? mapped : argv[3], &size);
    const int64_t stride = ossedge::pack::stride(format, h, inter);
    if (packed == nullptr || size < static_cast<size_t>(e * stride)) {
      std::fprintf(stderr, "%s: cannot map a packed layer of %lld bytes\n", argv[3],
                   static_cast<long long>(e * stride));
      return 1;
    }
    const bool concurrent = std::strcmp(argv[4], "concurrent") == 0;
    ossedge::CacheOptions o;
    o.path = argv[3];
    o.budget_bytes = concurrent ? e * stride : std::atoll(argv[4]);
    o.chunk_bytes = 8192;  // several reads per expert, even for tiny ones
    std::string error;
    cache = ossedge::ExpertCache::open(o, &error);
    ossedge::ExpertSource* source =
        cache ? cache->layer_source(packed, e, stride, format, h, inter, &error) : nullptr;
    if (source == nullptr) {
      std::fprintf(stderr, "%s\n", error.c_str());
      return 1;
    }
    if (concurrent) {
      std::vector<std::thread> threads;
      for (int i = 0; i < 8; ++i) {
        threads.emplace_back([source] {
          const int64_t id = 0;
          ossedge::ExpertView view;
          std::string why;
          if (source->acquire(&id, 1, &view, &why)) source->release(&id, 1);
        });
      }
      for (auto& th : threads) th.join();
      print_stats(*cache);
      return 0;
    }
    a.source = source;
    if (argc == 6) calls = std::atoi(argv[5]);
  }
  for (int c = 0; c < calls; ++c) {
    std::string error;
    if (!ossedge::moe_forward(a, out.data(), &error)) {
      std::fprintf(stderr, "%s\n", error.c_str());
      return 1;
    }
  }
  if (cache) print_stats(*cache);
  FILE* o = std::fopen(argv[2], "wb");
  if (o == nullptr) {
    std::perror(argv[2]);
    return 1;
  }
  std::fprintf(o, "%s\n", ossedge::moe_isa());
  std::fwrite(out.data(), sizeof(float), out.size(), o);
  std::fclose(o);
  return 0;
}
