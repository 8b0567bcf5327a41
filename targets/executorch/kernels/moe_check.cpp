// A standalone driver of moe_forward for tests: no ExecuTorch, so it also runs cross-compiled for
// arm64 under qemu. Usage: moe_check INPUT OUTPUT. INPUT (little endian): int64 format (0 MXFP4,
// 1 int4), T, topk, E, H, I; float32 limit, alpha; then x f32 [T,H], ids i64 [T,topk],
// weights f32 [T,topk], and gate_up and down as data, scales, bias f32. OUTPUT: the ISA name
// line, then out f32 [T,H].
#include <cstdio>
#include <cstring>
#include <vector>

#include "moe_core.h"

namespace {

template <typename T>
bool read(FILE* f, std::vector<T>* v, size_t n) {
  v->resize(n);
  return std::fread(v->data(), sizeof(T), n, f) == n;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: moe_check INPUT OUTPUT\n");
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
  if (!ossedge::moe_forward(a, out.data())) {
    std::fprintf(stderr, "expert id out of range\n");
    return 1;
  }
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
