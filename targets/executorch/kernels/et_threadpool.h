// ExecuTorch's shared thread pool, for the kernels in moe_et.cpp and the benchmark runner. The
// executorch 1.5.1 wheel ships libexecutorch_threadpool.so but not
// extension/threadpool/threadpool.h; where that header exists (an ExecuTorch source tree) it is
// used, otherwise the calls used here are declared exactly as that header declares them, which is
// what the library exports.
#pragma once

#if __has_include(<executorch/extension/threadpool/threadpool.h>)
#include <executorch/extension/threadpool/threadpool.h>
#else
#include <cstddef>
#include <cstdint>

#include <executorch/runtime/core/function_ref.h>

namespace executorch::extension::threadpool {

class ThreadPool final {
 public:
  size_t get_thread_count() const;
  bool run(runtime::FunctionRef<void(size_t)> fn, size_t range);
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};

ThreadPool* get_threadpool();

}  // namespace executorch::extension::threadpool
#endif
