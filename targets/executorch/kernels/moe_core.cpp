#include "moe_core.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "moe_tiles.h"
#if defined(__x86_64__)
#include "moe_tiles_x86.h"
#endif
#if defined(__aarch64__)
#include "moe_tiles_neon.h"
#endif

namespace ossedge {
namespace {

using detail::kBlock;
using detail::kMaxTokens;
using detail::kRows;
using detail::TileFn;

struct Isa {
  const char* name;
  bool (*available)();
  TileFn tiles[kMaxTokens];  // tiles[m - 1] takes m tokens
};

bool always() { return true; }

// Best first: the default is the first one this CPU has.
const Isa kIsas[] = {
#if defined(__x86_64__)
    {"avx512", detail::has_avx512,
     {detail::tile_avx512<1>, detail::tile_avx512<2>, detail::tile_avx512<3>,
      detail::tile_avx512<4>}},
    {"avx2", detail::has_avx2,
     {detail::tile_avx2<1>, detail::tile_avx2<2>, detail::tile_avx2<3>, detail::tile_avx2<4>}},
#endif
#if defined(__aarch64__)
    {"neon", always,
     {detail::tile_neon<1>, detail::tile_neon<2>, detail::tile_neon<3>, detail::tile_neon<4>}},
#endif
    {"scalar", always,
     {detail::tile_scalar<1>, detail::tile_scalar<2>, detail::tile_scalar<3>,
      detail::tile_scalar<4>}},
};

const Isa* find_isa(const char* name) {
  for (const Isa& isa : kIsas) {
    if (std::strcmp(isa.name, name) == 0 && isa.available()) return &isa;
  }
  return nullptr;
}

const Isa* initial_isa() {
  const char* forced = std::getenv("OSSEDGE_KERNEL_ISA");
  if (forced != nullptr && *forced != '\0') {
    if (const Isa* isa = find_isa(forced)) return isa;
    std::fprintf(stderr, "ossedge kernels: OSSEDGE_KERNEL_ISA=%s is not available here\n", forced);
  }
  for (const Isa& isa : kIsas) {
    if (isa.available()) return &isa;
  }
  return &kIsas[sizeof kIsas / sizeof kIsas[0] - 1];
}

std::atomic<const Isa*> g_isa{nullptr};

const Isa& current_isa() {
  const Isa* isa = g_isa.load();
  if (isa == nullptr) {
    const Isa* chosen = initial_isa();
    isa = g_isa.compare_exchange_strong(isa, chosen) ? chosen : isa;
  }
  return *isa;
}

constexpr int64_t kChunkRows = 64;  // weight rows per parallel task

// One call's state, shared by the tasks; each task writes only its own part of `act` or `out`.
struct Plan {
  const MoeArgs* a;
  const Isa* isa;
  std::vector<int64_t> order;    // (token, slot) pairs, grouped by expert in ascending order
  std::vector<int64_t> active;   // experts with at least one pair
  std::vector<int64_t> start;    // active[i]'s pairs are order[start[i] .. start[i + 1])
  std::vector<float> xs;         // [T, H] the tokens, split (see moe_tiles.h)
  std::vector<float> act;        // [P, I] SwiGLU output of order[p]'s pair, split
  float* out;
};

// emit(q, n, dots) for rows n, n + kRows of expert e over [n0, n1) and pairs q in [q0, q1):
// dots[r] = row (n + r) . input(q). Tiles of kRows rows by up to kMaxTokens pairs.
template <typename Input, typename Emit>
void expert_rows(const Isa& isa, const ExpertWeight& w, int64_t e, int64_t n0, int64_t n1,
                 int64_t q0, int64_t q1, Input input, Emit emit) {
  float dots[kMaxTokens * kRows];
  const float* inputs[kMaxTokens];
  for (int64_t n = n0; n < n1; n += kRows) {
    for (int64_t q = q0; q < q1; q += kMaxTokens) {
      const int m = static_cast<int>(std::min<int64_t>(kMaxTokens, q1 - q));
      for (int j = 0; j < m; ++j) inputs[j] = input(q + j);
      isa.tiles[m - 1](w, e, n, inputs, dots);
      for (int j = 0; j < m; ++j) emit(q + j, n, dots + j * kRows);
    }
  }
}

// Task: a chunk of gate_up rows of one active expert, for all its tokens, through the SwiGLU.
void gate_up_task(Plan& p, int64_t i, int64_t n0, int64_t n1) {
  const MoeArgs& a = *p.a;
  const int64_t e = p.active[i], h = a.hidden, inter = a.intermediate;
  const float* bias = a.gate_up_bias + e * 2 * inter;
  const auto input = [&](int64_t q) { return p.xs.data() + (p.order[q] / a.topk) * h; };
  const auto emit = [&](int64_t q, int64_t n, const float* dots) {
    float* act = p.act.data() + q * inter;
    for (int r = 0; r < kRows; r += 2) {
      const float gate = std::fmin(dots[r] + bias[n + r], a.limit);
      const float up = std::fmax(std::fmin(dots[r + 1] + bias[n + r + 1], a.limit), -a.limit);
      act[detail::split_index((n + r) / 2)] =
          (up + 1.0f) * gate / (1.0f + std::exp(-a.alpha * gate));
    }
  };
  expert_rows(*p.isa, a.gate_up, e, n0, n1, p.start[i], p.start[i + 1], input, emit);
}

// Task: a chunk of output columns, summed over every active expert (so no two tasks write the
// same output, and each output is summed in the same order whatever the threads).
void down_task(const Plan& p, int64_t n0, int64_t n1) {
  const MoeArgs& a = *p.a;
  const int64_t h = a.hidden, inter = a.intermediate;
  const auto input = [&](int64_t q) { return p.act.data() + q * inter; };
  for (size_t i = 0; i < p.active.size(); ++i) {
    const int64_t e = p.active[i];
    const float* bias = a.down_bias + e * h;
    const auto emit = [&](int64_t q, int64_t n, const float* dots) {
      const int64_t pair = p.order[q];
      float* out = p.out + (pair / a.topk) * h;
      for (int r = 0; r < kRows; ++r) out[n + r] += a.weights[pair] * (dots[r] + bias[n + r]);
    };
    expert_rows(*p.isa, a.down, e, n0, n1, p.start[i], p.start[i + 1], input, emit);
  }
}

template <typename F>
void parallel_for(ParallelFor parallel, int64_t n, F& f) {
  if (parallel == nullptr || n < 2) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  parallel(n, [](void* ctx, int64_t i) { (*static_cast<F*>(ctx))(i); }, &f);
}

int64_t chunks(int64_t rows) { return (rows + kChunkRows - 1) / kChunkRows; }

}  // namespace

const char* moe_isa() { return current_isa().name; }

bool moe_set_isa(const char* name) {
  const Isa* isa = find_isa(name);
  if (isa != nullptr) g_isa.store(isa);
  return isa != nullptr;
}

bool moe_forward(const MoeArgs& a, float* out) {
  const int64_t h = a.hidden, inter = a.intermediate, pairs = a.tokens * a.topk;
  if (h % kBlock != 0 || inter % kBlock != 0) return false;
  Plan p{&a, &current_isa(), {}, {}, {}, {}, {}, out};
  // Counting sort of the (token, slot) pairs by expert.
  std::vector<int64_t> count(a.experts + 1, 0);
  for (int64_t q = 0; q < pairs; ++q) {
    if (a.ids[q] < 0 || a.ids[q] >= a.experts) return false;
    ++count[a.ids[q] + 1];
  }
  for (int64_t e = 0; e < a.experts; ++e) {
    if (count[e + 1] > 0) p.active.push_back(e);
    count[e + 1] += count[e];
  }
  for (int64_t e : p.active) p.start.push_back(count[e]);
  p.start.push_back(pairs);
  p.order.resize(pairs);
  for (int64_t q = 0; q < pairs; ++q) p.order[count[a.ids[q]]++] = q;

  p.xs.resize(a.tokens * h);
  for (int64_t t = 0; t < a.tokens; ++t) {
    for (int64_t i = 0; i < h; ++i) p.xs[t * h + detail::split_index(i)] = a.x[t * h + i];
  }
  p.act.resize(pairs * inter);
  std::memset(out, 0, sizeof(float) * a.tokens * h);

  const int64_t up_chunks = chunks(2 * inter);
  auto up = [&](int64_t task) {
    const int64_t n0 = (task % up_chunks) * kChunkRows;
    gate_up_task(p, task / up_chunks, n0, std::min(n0 + kChunkRows, 2 * inter));
  };
  parallel_for(a.parallel, static_cast<int64_t>(p.active.size()) * up_chunks, up);
  auto down = [&](int64_t task) {
    const int64_t n0 = task * kChunkRows;
    down_task(p, n0, std::min(n0 + kChunkRows, h));
  };
  parallel_for(a.parallel, chunks(h), down);
  return true;
}

}  // namespace ossedge
