// ExecuTorch kernels for ossedge::moe_mxfp4.out and ossedge::moe_int4.out (schemas in
// targets/executorch/ops.py). Shapes and dtypes are checked here; the math is in moe_core.cpp.
#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>

#include "et_parallel.h"
#include "et_tensors.h"
#include "moe_core.h"

namespace {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

using ossedge::kParallel;

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
  ET_KERNEL_CHECK_MSG(ctx, ossedge::moe_forward(a, out.mutable_data_ptr<float>()),
                      InvalidArgument, out, "ossedge moe: an expert id is out of range");
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

}  // namespace

EXECUTORCH_LIBRARY(ossedge, "moe_mxfp4.out", moe_mxfp4_out);
EXECUTORCH_LIBRARY(ossedge, "moe_int4.out", moe_int4_out);

// For hosts that load the library with dlopen/ctypes: which SIMD path the kernels use, and a way
// to choose another (returns 0 when this build or CPU lacks it).
extern "C" const char* ossedge_moe_isa() { return ossedge::moe_isa(); }
extern "C" int ossedge_moe_set_isa(const char* name) { return ossedge::moe_set_isa(name) ? 1 : 0; }
