// What the ExecuTorch kernels (moe_et.cpp, attend_et.cpp) check of their tensor arguments.
#pragma once

#include <executorch/runtime/core/exec_aten/util/tensor_util.h>

#include <initializer_list>

namespace ossedge {

// Every tensor contiguous, and of `dtype` unless that is Undefined.
inline bool tensors_ok(std::initializer_list<const executorch::aten::Tensor*> tensors,
                       executorch::aten::ScalarType dtype =
                           executorch::aten::ScalarType::Undefined) {
  using executorch::aten::ScalarType;
  for (const executorch::aten::Tensor* t : tensors) {
    if (!executorch::runtime::tensor_is_contiguous(*t)) return false;
    if (dtype != ScalarType::Undefined && t->scalar_type() != dtype) return false;
  }
  return true;
}

}  // namespace ossedge
