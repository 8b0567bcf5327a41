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
using detail::QuantTileFn;
using detail::TileFn;

struct Isa {
  const char* name;
  bool (*available)();
  TileFn tiles[kMaxTokens];  // tiles[m - 1] takes m tokens
  // int8 activation paths: qtiles[m - 1] instead of tiles; `offset`: they take unsigned codes
  QuantTileFn qtiles[kMaxTokens];
  bool offset;
};

bool always() { return true; }

// Best first: the default is the first one this CPU has.
const Isa kIsas[] = {
#if defined(__x86_64__)
    {"avx512vnni", detail::has_avx512vnni,
     {},
     {detail::tile_vnni<1>, detail::tile_vnni<2>, detail::tile_vnni<3>, detail::tile_vnni<4>},
     true},
    {"avx512", detail::has_avx512,
     {detail::tile_avx512<1>, detail::tile_avx512<2>, detail::tile_avx512<3>,
      detail::tile_avx512<4>},
     {},
     false},
    {"avx2", detail::has_avx2,
     {detail::tile_avx2<1>, detail::tile_avx2<2>, detail::tile_avx2<3>, detail::tile_avx2<4>},
     {},
     false},
#endif
#if defined(__aarch64__)
    {"neondot", detail::has_dotprod,
     {},
     {detail::tile_neondot<1>, detail::tile_neondot<2>, detail::tile_neondot<3>,
      detail::tile_neondot<4>},
     false},
    {"neon", always,
     {detail::tile_neon<1>, detail::tile_neon<2>, detail::tile_neon<3>, detail::tile_neon<4>},
     {},
     false},
#endif
    {"scalar", always,
     {detail::tile_scalar<1>, detail::tile_scalar<2>, detail::tile_scalar<3>,
      detail::tile_scalar<4>},
     {},
     false},
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

// Activation rows as every path reads them, quantized to int8 per block of 32 (symmetric, scale =
// max |x| / 127, round to nearest even): `f` the dequantized values, split (see moe_tiles.h), for
// the fp32 paths; the int8 form (QuantRow) for the integer ones. Both paths thus compute the
// same products; the reference (quantize/intq.py, round_activations_int8) rounds the same way.
class Acts {
 public:
  Acts(int64_t rows, int64_t width, const Isa& isa, WeightFormat format)
      : width_(width), quads_((width / kBlock + detail::kQuadBlocks - 1) / detail::kQuadBlocks),
        int8_(isa.qtiles[0] != nullptr), offset_(isa.offset ? detail::code_offset(format) : 0),
        unit_(detail::code_unit(format)) {
    if (int8_) {
      q_.assign(rows * quads_ * detail::kQuadBytes, 0);
      scale_.assign(rows * quads_ * detail::kQuadLanes, 0.0f);
      corr_.assign(rows * quads_ * detail::kQuadLanes, 0);
    } else {
      f_.resize(rows * width);
    }
  }

  // Quantizes row `row` from `src` (natural order).
  void set(int64_t row, const float* src) {
    for (int64_t b = 0; b < width_ / kBlock; ++b) {
      const float* xb = src + b * kBlock;
      float amax = 0.0f;
      for (int i = 0; i < kBlock; ++i) amax = std::fmax(amax, std::fabs(xb[i]));
      const float inv = amax > 0.0f ? 127.0f / amax : 0.0f, scale = amax / 127.0f;
      int8_t q[kBlock];
      for (int i = 0; i < kBlock; ++i) {
        const float r = std::nearbyint(xb[i] * inv);  // half to even, as torch.round
        q[i] = static_cast<int8_t>(std::fmax(-127.0f, std::fmin(127.0f, r)));
      }
      if (!int8_) {
        float* f = f_.data() + row * width_ + b * kBlock;
        for (int i = 0; i < kBlock; ++i) f[detail::split_index(i)] = q[i] * scale;
        continue;
      }
      const int64_t quad = b / detail::kQuadBlocks, in_quad = b % detail::kQuadBlocks;
      int8_t* qrow = q_.data() + row * quads_ * detail::kQuadBytes;
      float* srow = scale_.data() + (row * quads_ + quad) * detail::kQuadLanes;
      int32_t* crow = corr_.data() + (row * quads_ + quad) * detail::kQuadLanes;
      for (int i = 0; i < kBlock; ++i) {
        qrow[detail::quad_index(b * kBlock + i)] = q[i];
        crow[in_quad * 4 + (i / 2) / 4] -= offset_ * q[i];
      }
      for (int k = 0; k < 4; ++k) srow[in_quad * 4 + k] = scale * unit_;
    }
  }

  const float* f(int64_t row) const { return f_.data() + row * width_; }
  detail::QuantRow q(int64_t row) const {
    return {q_.data() + row * quads_ * detail::kQuadBytes,
            scale_.data() + row * quads_ * detail::kQuadLanes,
            corr_.data() + row * quads_ * detail::kQuadLanes};
  }

 private:
  int64_t width_, quads_;
  bool int8_;
  int offset_;
  float unit_;
  std::vector<float> f_;
  std::vector<int8_t> q_;
  std::vector<float> scale_;
  std::vector<int32_t> corr_;
};

// One call's state, shared by the tasks; each task writes only its own part of `act`, `acts` or
// `out`.
struct Plan {
  const MoeArgs* a;
  const Isa* isa;
  const int64_t* ids;            // [T, topk]
  const float* weights;          // [T, topk]
  std::vector<int64_t> order;    // (token, slot) pairs, grouped by expert in ascending order
  std::vector<int64_t> active;   // experts with at least one pair
  std::vector<int64_t> start;    // active[i]'s pairs are order[start[i] .. start[i + 1])
  std::vector<ExpertView> views; // active[i]'s weights (valid for the group being computed)
  Acts xs;                       // [T, H] the tokens
  std::vector<float> act;        // [P, I] SwiGLU output of order[p]'s pair, natural order
  Acts acts;                     // the same, quantized
  float* out;
};

// emit(q, n, dots) for rows n, n + kRows of weight w over [n0, n1) and pairs q in [q0, q1):
// dots[r] = row (n + r) . acts row(q). Tiles of kRows rows by up to kMaxTokens pairs.
template <typename Row, typename Emit>
void expert_rows(const Isa& isa, const ExpertWeight& w, int64_t n0, int64_t n1, int64_t q0,
                 int64_t q1, const Acts& acts, Row row, Emit emit) {
  float dots[kMaxTokens * kRows];
  const float* inputs[kMaxTokens];
  detail::QuantRow qrows[kMaxTokens];
  const detail::QuantRow* qinputs[kMaxTokens];
  for (int64_t n = n0; n < n1; n += kRows) {
    for (int64_t q = q0; q < q1; q += kMaxTokens) {
      const int m = static_cast<int>(std::min<int64_t>(kMaxTokens, q1 - q));
      if (isa.qtiles[0] != nullptr) {
        for (int j = 0; j < m; ++j) {
          qrows[j] = acts.q(row(q + j));
          qinputs[j] = &qrows[j];
        }
        isa.qtiles[m - 1](w, 0, n, qinputs, dots);
      } else {
        for (int j = 0; j < m; ++j) inputs[j] = acts.f(row(q + j));
        isa.tiles[m - 1](w, 0, n, inputs, dots);
      }
      for (int j = 0; j < m; ++j) emit(q + j, n, dots + j * kRows);
    }
  }
}

// Task: a chunk of gate_up rows of one active expert, for all its tokens, through the SwiGLU.
void gate_up_task(Plan& p, int64_t i, int64_t n0, int64_t n1) {
  const MoeArgs& a = *p.a;
  const int64_t inter = a.intermediate;
  const ExpertView& v = p.views[i];
  const auto row = [&](int64_t q) { return p.order[q] / a.topk; };
  const auto emit = [&](int64_t q, int64_t n, const float* dots) {
    float* act = p.act.data() + q * inter;
    for (int r = 0; r < kRows; r += 2) {
      const float gate = std::fmin(dots[r] + v.gate_up_bias[n + r], a.limit);
      const float up =
          std::fmax(std::fmin(dots[r + 1] + v.gate_up_bias[n + r + 1], a.limit), -a.limit);
      act[(n + r) / 2] = (up + 1.0f) * gate / (1.0f + std::exp(-a.alpha * gate));
    }
  };
  expert_rows(*p.isa, v.gate_up, n0, n1, p.start[i], p.start[i + 1], p.xs, row, emit);
}

// Task: a chunk of output columns of active expert i, for all its pairs, into `ys` (each
// pair's weighted contribution, so that the sum over experts can be taken in one fixed order).
void down_task(const Plan& p, int64_t i, int64_t n0, int64_t n1, float* ys) {
  const MoeArgs& a = *p.a;
  const int64_t h = a.hidden;
  const auto row = [](int64_t q) { return q; };
  const ExpertView& v = p.views[i];
  const auto emit = [&](int64_t q, int64_t n, const float* dots) {
    const int64_t pair = p.order[q];
    float* y = ys + q * h;
    for (int r = 0; r < kRows; ++r) y[n + r] = p.weights[pair] * (dots[r] + v.down_bias[n + r]);
  };
  expert_rows(*p.isa, v.down, n0, n1, p.start[i], p.start[i + 1], p.acts, row, emit);
}

// Task: a chunk of output columns, summed over every pair in `order`, i.e. for each token over
// its experts in ascending order, whatever order the experts were computed in.
void sum_task(const Plan& p, const float* ys, int64_t n0, int64_t n1) {
  const MoeArgs& a = *p.a;
  const int64_t h = a.hidden, pairs = a.tokens * a.topk;
  for (int64_t q = 0; q < pairs; ++q) {
    float* out = p.out + (p.order[q] / a.topk) * h;
    const float* y = ys + q * h;
    for (int64_t n = n0; n < n1; ++n) out[n] += y[n];
  }
}

int64_t chunks(int64_t rows) { return (rows + kChunkRows - 1) / kChunkRows; }

// Expert e of a stacked weight, alone.
ExpertWeight one_expert(const ExpertWeight& w, int64_t e) {
  const int64_t blocks = w.rows * (w.cols / kBlock);
  const int64_t scale_bytes = w.format == WeightFormat::kMxfp4 ? 1 : 2;
  return {w.format, w.data + e * blocks * detail::kBlockBytes,
          static_cast<const uint8_t*>(w.scales) + e * blocks * scale_bytes, w.rows, w.cols};
}

// The stacked tensors of MoeArgs as a source that holds every expert.
class StackedSource final : public ExpertSource {
 public:
  explicit StackedSource(const MoeArgs& a) : a_(a) {}
  int64_t capacity() const override { return a_.experts; }
  bool start(const int64_t*, int64_t, std::string*) override { return true; }
  int64_t next_ready(const int64_t* ids, int64_t n, const uint8_t* done, ExpertView* view,
                     std::string*) override {
    int64_t i = 0;
    while (i < n - 1 && done[i]) ++i;
    const int64_t e = ids[i];
    *view = {one_expert(a_.gate_up, e), a_.gate_up_bias + e * 2 * a_.intermediate,
             one_expert(a_.down, e), a_.down_bias + e * a_.hidden};
    return i;
  }
  void release(const int64_t*, int64_t) override {}

 private:
  const MoeArgs& a_;
};

}  // namespace

bool ExpertSource::acquire(const int64_t* ids, int64_t n, ExpertView* views, std::string* error) {
  if (!start(ids, n, error)) return false;
  std::vector<uint8_t> done(n, 0);
  for (int64_t k = 0; k < n; ++k) {
    ExpertView view;
    const int64_t i = next_ready(ids, n, done.data(), &view, error);
    if (i < 0) return false;
    done[i] = 1;
    views[i] = view;
  }
  return true;
}

void route_top_k(const float* logits, int64_t experts, int64_t k, int64_t* ids, float* weights) {
  for (int64_t j = 0; j < k; ++j) {
    int64_t best = -1;
    for (int64_t e = 0; e < experts; ++e) {
      bool taken = false;
      for (int64_t i = 0; i < j; ++i) taken = taken || ids[i] == e;
      if (!taken && (best < 0 || logits[e] > logits[best])) best = e;
    }
    ids[j] = best;
  }
  float sum = 0.0f;
  for (int64_t j = 0; j < k; ++j) {
    weights[j] = std::exp(logits[ids[j]] - logits[ids[0]]);
    sum += weights[j];
  }
  for (int64_t j = 0; j < k; ++j) weights[j] /= sum;
}

int64_t route_cache_aware(const float* logits, int64_t experts, int64_t k, int64_t keep,
                          int64_t pool, const uint8_t* resident, int64_t* ids, float* weights) {
  std::vector<int64_t> order(experts);
  for (int64_t e = 0; e < experts; ++e) order[e] = e;
  std::stable_sort(order.begin(), order.end(),
                   [logits](int64_t a, int64_t b) { return logits[a] > logits[b]; });
  keep = std::min(keep, k);
  pool = std::min(pool, experts);
  std::vector<uint8_t> taken(experts, 0);
  int64_t n = 0;
  auto take = [&](int64_t e) {
    taken[e] = 1;
    ids[n++] = e;
  };
  for (int64_t j = 0; j < keep; ++j) take(order[j]);
  for (int64_t j = keep; j < pool && n < k; ++j) {
    if (resident[order[j]]) take(order[j]);
  }
  for (int64_t j = keep; j < experts && n < k; ++j) {
    if (!taken[order[j]]) take(order[j]);
  }
  int64_t changed = 0;
  for (int64_t j = 0; j < k; ++j) changed += taken[order[j]] ? 0 : 1;
  std::sort(ids, ids + k, [logits](int64_t a, int64_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  });
  float sum = 0.0f;
  for (int64_t j = 0; j < k; ++j) {
    weights[j] = std::exp(logits[ids[j]] - logits[ids[0]]);
    sum += weights[j];
  }
  for (int64_t j = 0; j < k; ++j) weights[j] /= sum;
  return changed;
}

const char* moe_isa() { return current_isa().name; }

bool moe_set_isa(const char* name) {
  const Isa* isa = find_isa(name);
  if (isa != nullptr) g_isa.store(isa);
  return isa != nullptr;
}

bool moe_forward(const MoeArgs& a, float* out, std::string* error) {
  const int64_t h = a.hidden, inter = a.intermediate, pairs = a.tokens * a.topk;
  if (h % kBlock != 0 || inter % kBlock != 0) {
    if (error) *error = "hidden and intermediate sizes must be multiples of 32";
    return false;
  }
  const Isa& isa = current_isa();
  const WeightFormat format = a.gate_up.format;
  Plan p{&a, &isa, a.ids, a.weights, {}, {}, {}, {}, Acts(a.tokens, h, isa, format), {},
         Acts(pairs, inter, isa, format), out};
  std::vector<int64_t> routed_ids;
  std::vector<float> routed_weights;
  if (a.logits != nullptr) {
    if (a.topk < 1 || a.topk > a.experts) {
      if (error) *error = "top-k must be 1..experts";
      return false;
    }
    routed_ids.resize(pairs);
    routed_weights.resize(pairs);
    std::vector<uint8_t> resident;
    if (a.route_keep > 0 && a.route_keep < a.topk && a.route_pool > a.route_keep &&
        a.tokens == 1 && a.source != nullptr) {
      resident.resize(a.experts);
      if (!a.source->residency(resident.data(), a.experts)) resident.clear();
    }
    int64_t rerouted = 0;
    for (int64_t t = 0; t < a.tokens; ++t) {
      const float* row = a.logits + t * a.experts;
      int64_t* ids = routed_ids.data() + t * a.topk;
      float* weights = routed_weights.data() + t * a.topk;
      if (resident.empty()) {
        route_top_k(row, a.experts, a.topk, ids, weights);
      } else {
        rerouted += route_cache_aware(row, a.experts, a.topk, a.route_keep, a.route_pool,
                                      resident.data(), ids, weights);
      }
    }
    if (rerouted > 0) a.source->count_rerouted(rerouted);
    p.ids = routed_ids.data();
    p.weights = routed_weights.data();
  }
  if (a.chosen_ids != nullptr) std::copy(p.ids, p.ids + pairs, a.chosen_ids);
  if (a.chosen_weights != nullptr) std::copy(p.weights, p.weights + pairs, a.chosen_weights);
  // Counting sort of the (token, slot) pairs by expert.
  std::vector<int64_t> count(a.experts + 1, 0);
  for (int64_t q = 0; q < pairs; ++q) {
    if (p.ids[q] < 0 || p.ids[q] >= a.experts) {
      if (error) *error = "an expert id is out of range";
      return false;
    }
    ++count[p.ids[q] + 1];
  }
  for (int64_t e = 0; e < a.experts; ++e) {
    if (count[e + 1] > 0) p.active.push_back(e);
    count[e + 1] += count[e];
  }
  for (int64_t e : p.active) p.start.push_back(count[e]);
  p.start.push_back(pairs);
  p.order.resize(pairs);
  for (int64_t q = 0; q < pairs; ++q) p.order[count[p.ids[q]]++] = q;

  StackedSource stacked(a);
  ExpertSource& source = a.source != nullptr ? *a.source : stacked;
  const int64_t n_active = static_cast<int64_t>(p.active.size());
  p.views.resize(n_active);

  auto quantize_x = [&](int64_t t) { p.xs.set(t, a.x + t * h); };
  parallel_for(a.parallel, a.tokens, quantize_x);
  p.act.resize(pairs * inter);
  std::vector<float> ys(pairs * h);
  std::memset(out, 0, sizeof(float) * a.tokens * h);

  const int64_t up_chunks = chunks(2 * inter);
  const int64_t group = std::max<int64_t>(1, source.capacity());
  std::vector<uint8_t> done(n_active, 0);
  for (int64_t i0 = 0; i0 < n_active; i0 += group) {
    const int64_t i1 = std::min(n_active, i0 + group);
    std::string why;
    bool ok = source.start(p.active.data() + i0, i1 - i0, &why);
    if (i0 == 0 && a.next_source != nullptr && a.next_logits != nullptr && a.tokens == 1 &&
        a.topk <= a.next_experts) {
      std::vector<int64_t> next_ids(a.topk);
      std::vector<float> next_weights(a.topk);
      route_top_k(a.next_logits, a.next_experts, a.topk, next_ids.data(), next_weights.data());
      a.next_source->prefetch(next_ids.data(), a.topk);
    }
    for (int64_t k = i0; ok && k < i1; ++k) {
      ExpertView view;
      const int64_t j = source.next_ready(p.active.data() + i0, i1 - i0, done.data() + i0,
                                          &view, &why);
      if (j < 0) {
        ok = false;
        break;
      }
      const int64_t i = i0 + j;
      done[i] = 1;
      p.views[i] = view;
      auto up = [&](int64_t task) {
        const int64_t n0 = task * kChunkRows;
        gate_up_task(p, i, n0, std::min(n0 + kChunkRows, 2 * inter));
      };
      parallel_for(a.parallel, up_chunks, up);
      const int64_t q0 = p.start[i];
      auto quantize_act = [&](int64_t q) { p.acts.set(q0 + q, p.act.data() + (q0 + q) * inter); };
      parallel_for(a.parallel, p.start[i + 1] - q0, quantize_act);
      auto down = [&](int64_t task) {
        const int64_t n0 = task * kChunkRows;
        down_task(p, i, n0, std::min(n0 + kChunkRows, h), ys.data());
      };
      parallel_for(a.parallel, chunks(h), down);
    }
    source.release(p.active.data() + i0, i1 - i0);
    if (!ok) {
      if (error) *error = why;
      return false;
    }
  }
  auto sum = [&](int64_t task) {
    const int64_t n0 = task * kChunkRows;
    sum_task(p, ys.data(), n0, std::min(n0 + kChunkRows, h));
  };
  parallel_for(a.parallel, chunks(h), sum);
  return true;
}

}  // namespace ossedge
