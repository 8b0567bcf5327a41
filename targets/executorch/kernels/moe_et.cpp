// ExecuTorch kernels for ossedge::moe_mxfp4.out and ossedge::moe_int4.out (schemas in
// targets/executorch/ops.py). Shapes and dtypes are checked here; the math is in moe_core.cpp.
#include <cstdio>
#include <string>
#include <vector>

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>

#include "et_parallel.h"
#include "et_tensors.h"
#include "expert_cache.h"
#include "expert_pack.h"
#include "moe_core.h"
#include "routing_trace.h"

namespace {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

using ossedge::kParallel;

// moe_forward, and the routing it chose appended to the record when one is being kept.
bool forward_traced(ossedge::MoeArgs& a, float* out, std::string* error) {
  if (!ossedge::routing_trace_on()) return ossedge::moe_forward(a, out, error);
  std::vector<int64_t> ids(a.tokens * a.topk);
  std::vector<float> weights(ids.size());
  a.chosen_ids = ids.data();
  a.chosen_weights = weights.data();
  if (!ossedge::moe_forward(a, out, error)) return false;
  ossedge::routing_trace_add(a.tokens, a.experts, a.topk, ids.data(), weights.data(), a.logits);
  return true;
}

bool weight_ok(const Tensor& data, const Tensor& scales, const Tensor& bias,
               ossedge::WeightFormat format, ossedge::ExpertWeight* w) {
  const bool fp4 = format == ossedge::WeightFormat::kMxfp4;
  if (data.scalar_type() != ScalarType::Byte) return false;
  if (scales.scalar_type() != (fp4 ? ScalarType::Byte : ScalarType::Half)) return false;
  if (bias.scalar_type() != ScalarType::Float || scales.dim() != 3 || bias.dim() != 2) return false;
  const int64_t e = scales.size(0), n = scales.size(1), k = scales.size(2) * 32;
  if (fp4 && (data.dim() != 4 || data.size(2) != k / 32 || data.size(3) != 16)) return false;
  if (!fp4 && (data.dim() != 3 || data.size(2) != k / 2)) return false;
  if (data.size(0) != e || data.size(1) != n) return false;
  if (bias.size(0) != e || bias.size(1) != n) return false;
  *w = {format, data.const_data_ptr<uint8_t>(), scales.const_data_ptr(), n, k};
  return true;
}

Tensor& moe_out(KernelRuntimeContext& ctx, ossedge::WeightFormat format, const Tensor& x,
                const Tensor& ids, const Tensor& weights, const Tensor& d1, const Tensor& s1,
                const Tensor& b1, const Tensor& d2, const Tensor& s2, const Tensor& b2,
                double limit, double alpha, Tensor& out) {
  ossedge::MoeArgs a{};
  const bool ok_inputs = x.scalar_type() == ScalarType::Float && x.dim() == 2 &&
                         ids.scalar_type() == ScalarType::Long && ids.dim() == 2 &&
                         weights.scalar_type() == ScalarType::Float &&
                         weights.dim() == 2 && ids.size(0) == x.size(0) &&
                         weights.size(0) == x.size(0) && weights.size(1) == ids.size(1) &&
                         out.scalar_type() == ScalarType::Float;
  ET_KERNEL_CHECK_MSG(ctx, ok_inputs, InvalidArgument, out,
                      "ossedge moe: x must be float [T, H], ids long [T, K], weights float [T, K]");
  ET_KERNEL_CHECK_MSG(ctx,
                      ossedge::tensors_ok({&x, &ids, &weights, &d1, &s1, &b1, &d2, &s2, &b2, &out}),
                      InvalidArgument, out,
                      "ossedge moe: every tensor must be contiguous");
  ET_KERNEL_CHECK_MSG(ctx, weight_ok(d1, s1, b1, format, &a.gate_up) &&
                               weight_ok(d2, s2, b2, format, &a.down),
                      InvalidArgument, out, "ossedge moe: expert weights have the wrong layout");
  const int64_t h = x.size(1), inter = a.down.cols;
  ET_KERNEL_CHECK_MSG(ctx, a.gate_up.cols == h && a.gate_up.rows == 2 * inter && a.down.rows == h &&
                               s1.size(0) == s2.size(0),
                      InvalidArgument, out, "ossedge moe: expert weight shapes do not match x");
  ET_KERNEL_CHECK_MSG(ctx, executorch::runtime::resize_tensor(out, x.sizes()) == Error::Ok,
                      InvalidArgument, out, "ossedge moe: cannot resize out to [T, H]");
  a.x = x.const_data_ptr<float>();
  a.ids = ids.const_data_ptr<int64_t>();
  a.weights = weights.const_data_ptr<float>();
  a.tokens = x.size(0);
  a.topk = ids.size(1);
  a.experts = s1.size(0);
  a.hidden = h;
  a.intermediate = inter;
  a.gate_up_bias = b1.const_data_ptr<float>();
  a.down_bias = b2.const_data_ptr<float>();
  a.limit = static_cast<float>(limit);
  a.alpha = static_cast<float>(alpha);
  a.parallel = kParallel;
  ET_KERNEL_CHECK_MSG(ctx, forward_traced(a, out.mutable_data_ptr<float>(), nullptr),
                      InvalidArgument, out, "ossedge moe: an expert id is out of range");
  return out;
}

// A packed tensor [E, stride] read in place (no cache open, or a program run by a host that
// never opens one: the memory-mapped .ptd serves the experts, as in version 1).
class PackedInPlace final : public ossedge::ExpertSource {
 public:
  PackedInPlace(const uint8_t* base, int64_t experts, int64_t stride, ossedge::WeightFormat f,
                int64_t hidden, int64_t inter)
      : base_(base), experts_(experts), stride_(stride), format_(f), hidden_(hidden),
        inter_(inter) {}
  int64_t capacity() const override { return experts_; }
  bool start(const int64_t*, int64_t, std::string*) override { return true; }
  int64_t next_ready(const int64_t* ids, int64_t n, const uint8_t* done, ossedge::ExpertView* view,
                     std::string*) override {
    int64_t i = 0;
    while (i < n - 1 && done[i]) ++i;
    *view = ossedge::pack::view(base_ + ids[i] * stride_, format_, hidden_, inter_);
    return i;
  }
  void release(const int64_t*, int64_t) override {}

 private:
  const uint8_t* base_;
  int64_t experts_, stride_;
  ossedge::WeightFormat format_;
  int64_t hidden_, inter_;
};

Tensor& moe_packed_out(KernelRuntimeContext& ctx, ossedge::WeightFormat format, const Tensor& x,
                       const Tensor& logits, const Tensor& experts, int64_t top_k,
                       int64_t inter, double limit, double alpha, Tensor& out,
                       const Tensor* next_logits = nullptr, const Tensor* next_experts = nullptr) {
  const bool ok_inputs = x.scalar_type() == ScalarType::Float && x.dim() == 2 &&
                         logits.scalar_type() == ScalarType::Float && logits.dim() == 2 &&
                         logits.size(0) == x.size(0) && experts.scalar_type() == ScalarType::Byte &&
                         experts.dim() == 2 && logits.size(1) == experts.size(0) &&
                         out.scalar_type() == ScalarType::Float;
  ET_KERNEL_CHECK_MSG(ctx, ok_inputs, InvalidArgument, out,
                      "ossedge moe: x must be float [T, H], router logits float [T, E], experts "
                      "uint8 [E, stride]");
  ET_KERNEL_CHECK_MSG(ctx, ossedge::tensors_ok({&x, &logits, &experts, &out}), InvalidArgument,
                      out, "ossedge moe: every tensor must be contiguous");
  const int64_t h = x.size(1), e = experts.size(0), stride = experts.size(1);
  ET_KERNEL_CHECK_MSG(ctx, h % 32 == 0 && inter > 0 && inter % 32 == 0 &&
                               stride == ossedge::pack::stride(format, h, inter) &&
                               top_k >= 1 && top_k <= e,
                      InvalidArgument, out, "ossedge moe: packed experts do not match x");
  ET_KERNEL_CHECK_MSG(ctx, executorch::runtime::resize_tensor(out, x.sizes()) == Error::Ok,
                      InvalidArgument, out, "ossedge moe: cannot resize out to [T, H]");
  const uint8_t* base = experts.const_data_ptr<uint8_t>();
  std::string error;
  ossedge::ExpertSource* cached =
      ossedge::global_layer_source(base, e, stride, format, h, inter, &error);
  if (cached == nullptr && !error.empty()) {
    std::fprintf(stderr, "ossedge moe: %s\n", error.c_str());  // ET_LOG may be compiled out
    ctx.fail(Error::InvalidProgram);
    return out;
  }
  PackedInPlace in_place(base, e, stride, format, h, inter);
  ossedge::MoeArgs a{};
  a.x = x.const_data_ptr<float>();
  a.logits = logits.const_data_ptr<float>();
  a.tokens = x.size(0);
  a.topk = top_k;
  a.experts = e;
  a.hidden = h;
  a.intermediate = inter;
  a.gate_up.format = a.down.format = format;
  a.limit = static_cast<float>(limit);
  a.alpha = static_cast<float>(alpha);
  a.parallel = kParallel;
  a.source = cached != nullptr ? cached : &in_place;
  if (cached != nullptr) ossedge::global_cache_routing(&a.route_keep, &a.route_pool);
  if (cached != nullptr && next_logits != nullptr && next_experts != nullptr) {
    // Lookahead: the next layer's experts tensor has this layer's shape (checked at its header).
    const bool ok_next = next_logits->scalar_type() == ScalarType::Float &&
                         next_logits->dim() == 2 && next_logits->size(0) == x.size(0) &&
                         next_experts->scalar_type() == ScalarType::Byte &&
                         next_experts->dim() == 2 && next_experts->size(1) == stride &&
                         next_logits->size(1) == next_experts->size(0) &&
                         ossedge::tensors_ok({next_logits, next_experts});
    ET_KERNEL_CHECK_MSG(ctx, ok_next, InvalidArgument, out,
                        "ossedge moe: next-layer logits float [T, E] and experts uint8 [E, stride]");
    a.next_source = ossedge::global_layer_source(next_experts->const_data_ptr<uint8_t>(),
                                                 next_experts->size(0), stride, format, h, inter,
                                                 &error);
    if (a.next_source == nullptr && !error.empty()) {
      std::fprintf(stderr, "ossedge moe: %s\n", error.c_str());
      ctx.fail(Error::InvalidProgram);
      return out;
    }
    a.next_logits = next_logits->const_data_ptr<float>();
    a.next_experts = next_experts->size(0);
  }
  if (!forward_traced(a, out.mutable_data_ptr<float>(), &error)) {
    std::fprintf(stderr, "ossedge moe: %s\n", error.c_str());  // ET_LOG may be compiled out
    ctx.fail(Error::InvalidProgram);
  }
  return out;
}

// One kernel per stored format: the .out schema of both operators is the same.
template <ossedge::WeightFormat kFormat>
Tensor& moe_format_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& ids,
                       const Tensor& weights, const Tensor& d1, const Tensor& s1, const Tensor& b1,
                       const Tensor& d2, const Tensor& s2, const Tensor& b2, double limit,
                       double alpha, Tensor& out) {
  return moe_out(ctx, kFormat, x, ids, weights, d1, s1, b1, d2, s2, b2, limit, alpha, out);
}

constexpr auto moe_mxfp4_out = moe_format_out<ossedge::WeightFormat::kMxfp4>;
constexpr auto moe_int4_out = moe_format_out<ossedge::WeightFormat::kInt4>;

template <ossedge::WeightFormat kFormat>
Tensor& moe_packed_format_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& logits,
                              const Tensor& experts, int64_t top_k, int64_t inter, double limit,
                              double alpha, Tensor& out) {
  return moe_packed_out(ctx, kFormat, x, logits, experts, top_k, inter, limit, alpha, out);
}

constexpr auto moe_mxfp4_packed_out = moe_packed_format_out<ossedge::WeightFormat::kMxfp4>;
constexpr auto moe_int4_packed_out = moe_packed_format_out<ossedge::WeightFormat::kInt4>;

// The lookahead variant: also the next layer's router logits (from this layer's hidden state)
// and packed experts, whose likely experts the cache starts reading while this layer computes.
template <ossedge::WeightFormat kFormat>
Tensor& moe_ahead_format_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& logits,
                             const Tensor& experts, const Tensor& next_logits,
                             const Tensor& next_experts, int64_t top_k, int64_t inter,
                             double limit, double alpha, Tensor& out) {
  return moe_packed_out(ctx, kFormat, x, logits, experts, top_k, inter, limit, alpha, out,
                        &next_logits, &next_experts);
}

constexpr auto moe_mxfp4_ahead_out = moe_ahead_format_out<ossedge::WeightFormat::kMxfp4>;
constexpr auto moe_int4_ahead_out = moe_ahead_format_out<ossedge::WeightFormat::kInt4>;

}  // namespace

EXECUTORCH_LIBRARY(ossedge, "moe_mxfp4.out", moe_mxfp4_out);
EXECUTORCH_LIBRARY(ossedge, "moe_int4.out", moe_int4_out);
EXECUTORCH_LIBRARY(ossedge, "moe_mxfp4_packed.out", moe_mxfp4_packed_out);
EXECUTORCH_LIBRARY(ossedge, "moe_int4_packed.out", moe_int4_packed_out);
EXECUTORCH_LIBRARY(ossedge, "moe_mxfp4_ahead.out", moe_mxfp4_ahead_out);
EXECUTORCH_LIBRARY(ossedge, "moe_int4_ahead.out", moe_int4_ahead_out);

// For hosts that load the library with dlopen/ctypes: which SIMD path the kernels use, and a way
// to choose another (returns 0 when this build or CPU lacks it).
extern "C" const char* ossedge_moe_isa() { return ossedge::moe_isa(); }
extern "C" int ossedge_moe_set_isa(const char* name) { return ossedge::moe_set_isa(name) ? 1 : 0; }

// The expert cache of version-2 artifacts (expert_cache.h), for hosts: open it on model.ptd with
// a byte budget before running the program (0 on success; else -1 and a message in `error`),
// close it to read experts from the mapped file again, and read its counters:
// stats[0..11) = hits, misses, bytes read, ns waited for reads, slots, slot bytes, pinned,
// resident, layers seen, 1 if reads bypass the page cache, ns with a read in flight, expert
// choices changed by cache-aware routing, lookahead reads, lookahead reads later asked for.
extern "C" int ossedge_expert_cache_open(const char* path, int64_t budget_bytes, int io_threads,
                                         double lru_share, char* error, int64_t error_len) {
  ossedge::CacheOptions o;
  o.path = path;
  o.budget_bytes = budget_bytes;
  if (io_threads > 0) o.io_threads = io_threads;
  if (lru_share >= 0.0 && lru_share <= 1.0) o.lru_share = lru_share;
  std::string why;
  if (ossedge::open_global_cache(o, &why)) return 0;
  if (error != nullptr && error_len > 0) std::snprintf(error, error_len, "%s", why.c_str());
  return -1;
}

extern "C" void ossedge_expert_cache_close() { ossedge::close_global_cache(); }

extern "C" int ossedge_expert_cache_stats(int64_t* stats, int64_t n) {
  ossedge::CacheStats s;
  if (!ossedge::global_cache_stats(&s)) return -1;
  const int64_t v[] = {s.hits,  s.misses,   s.bytes_read, s.wait_ns,     s.slots,
                       s.stride, s.pinned, s.resident,   s.layers_seen, s.direct ? 1 : 0,
                       s.busy_ns, s.rerouted, s.prefetched, s.prefetch_used};
  for (int64_t i = 0; i < n && i < 14; ++i) stats[i] = v[i];
  return 0;
}

extern "C" void ossedge_expert_cache_reset_stats() { ossedge::reset_global_cache_stats(); }

// Cache-aware routing (lossy, off by default) for the open cache's one-token calls: keep the
// router's top `keep` experts and fill the other slots with cached experts from its top `pool`
// (moe_core.h route_cache_aware). keep = 0 restores the exact top-k. 0 on success; -1 when no
// cache is open or pool < 0.
extern "C" int ossedge_expert_cache_set_routing(int64_t keep, int64_t pool) {
  if (keep < 0 || pool < 0) return -1;
  return ossedge::set_global_cache_routing(keep, pool) ? 0 : -1;
}

// The routing rule itself, for hosts that check or simulate it: one token's logits [experts],
// resident flags [experts] → ids [k] and weights [k]; returns how many choices differ from the
// exact top-k.
extern "C" int64_t ossedge_route_cache_aware(const float* logits, int64_t experts, int64_t k,
                                             int64_t keep, int64_t pool, const uint8_t* resident,
                                             int64_t* ids, float* weights) {
  if (experts < 1 || k < 1 || k > experts || keep < 0 || pool < 0) return -1;
  return ossedge::route_cache_aware(logits, experts, k, keep, pool, resident, ids, weights);
}
