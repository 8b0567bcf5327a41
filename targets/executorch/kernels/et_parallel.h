// The kernels' ParallelFor over ExecuTorch's thread pool, the one its other CPU kernels and
// XNNPACK use (size it from Python with portable_lib._unsafe_reset_threadpool); one thread when
// built without it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "moe_core.h"
#if OSSEDGE_THREADPOOL
#include "et_threadpool.h"
#endif

namespace ossedge {

#if OSSEDGE_THREADPOOL
inline void threadpool_for(int64_t n, void (*task)(void* ctx, int64_t i), void* ctx) {
  executorch::extension::threadpool::ThreadPool* pool =
      executorch::extension::threadpool::get_threadpool();
  if (pool == nullptr || pool->get_thread_count() < 2) {
    for (int64_t i = 0; i < n; ++i) task(ctx, i);
    return;
  }
  pool->run([&](size_t i) { task(ctx, static_cast<int64_t>(i)); }, static_cast<size_t>(n));
}
inline constexpr ParallelFor kParallel = threadpool_for;
#else
inline constexpr ParallelFor kParallel = nullptr;
#endif

}  // namespace ossedge
