// ExecuTorch kernel for ossedge::attend.out (schema in targets/executorch/ops.py). Shapes and
// dtypes are checked here; the math is in attend_core.cpp.
#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>

#include "attend_core.h"
#include "et_parallel.h"
#include "et_tensors.h"

namespace {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

Tensor& attend_out(KernelRuntimeContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                   const Tensor& mask, const Tensor& sinks, Tensor& out) {
  const bool floats = ossedge::tensors_ok({&q, &k, &v, &mask, &sinks, &out}, ScalarType::Float);
  ET_KERNEL_CHECK_MSG(ctx, floats, InvalidArgument, out,
                      "ossedge attend: every tensor must be float32 and contiguous");
  bool ok = q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && mask.dim() == 2 && sinks.dim() == 2;
  ok = ok && k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(1) == v.size(1) &&
       k.size(2) == q.size(2) && v.size(2) == q.size(2) && mask.size(0) == q.size(1) &&
       mask.size(1) == k.size(1) && sinks.size(0) == q.size(0) && sinks.size(1) == q.size(1);
  ET_KERNEL_CHECK_MSG(ctx, ok, InvalidArgument, out,
                      "ossedge attend: q [KV, R, D], k and v [KV, S, D], mask [R, S], sinks "
                      "[KV, R] expected");
  ET_KERNEL_CHECK_MSG(ctx, executorch::runtime::resize_tensor(out, q.sizes()) == Error::Ok,
                      InvalidArgument, out, "ossedge attend: cannot resize out to [KV, R, D]");
  ossedge::AttendArgs a{};
  a.q = q.const_data_ptr<float>();
  a.k = k.const_data_ptr<float>();
  a.v = v.const_data_ptr<float>();
  a.mask = mask.const_data_ptr<float>();
  a.sinks = sinks.const_data_ptr<float>();
  a.heads = q.size(0);
  a.rows = q.size(1);
  a.slots = k.size(1);
  a.dim = q.size(2);
  a.parallel = ossedge::kParallel;
  ossedge::attend_forward(a, out.mutable_data_ptr<float>());
  return out;
}

}  // namespace

EXECUTORCH_LIBRARY(ossedge, "attend.out", attend_out);
