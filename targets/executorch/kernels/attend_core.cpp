#include "attend_core.h"

#include <cmath>
#include <limits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace ossedge {
namespace {

float dot_scalar(const float* a, const float* b, int64_t n) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

void axpy_scalar(float* y, float a, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

#if defined(__x86_64__)
// n a multiple of 16
__attribute__((target("avx512f"))) float dot_avx512(const float* a, const float* b, int64_t n) {
  __m512 s = _mm512_mul_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(b));
  for (int64_t i = 16; i < n; i += 16) {
    s = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s);
  }
  return _mm512_reduce_add_ps(s);
}

__attribute__((target("avx512f"))) void axpy_avx512(float* y, float a, const float* x,
                                                    int64_t n) {
  const __m512 va = _mm512_set1_ps(a);
  for (int64_t i = 0; i < n; i += 16) {
    _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  }
}
#endif

#if defined(__aarch64__)
// n a multiple of 4
float dot_neon(const float* a, const float* b, int64_t n) {
  float32x4_t s = vmulq_f32(vld1q_f32(a), vld1q_f32(b));
  for (int64_t i = 4; i < n; i += 4) s = vfmaq_f32(s, vld1q_f32(a + i), vld1q_f32(b + i));
  return vaddvq_f32(s);
}

void axpy_neon(float* y, float a, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; i += 4) {
    vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), vld1q_f32(x + i), a));
  }
}
#endif

struct Vec {
  float (*dot)(const float*, const float*, int64_t);
  void (*axpy)(float*, float, const float*, int64_t);
};

Vec pick(int64_t dim) {
#if defined(__x86_64__)
  if (dim % 16 == 0 && __builtin_cpu_supports("avx512f")) return {dot_avx512, axpy_avx512};
#endif
#if defined(__aarch64__)
  if (dim % 4 == 0) return {dot_neon, axpy_neon};
#endif
  (void)dim;
  return {dot_scalar, axpy_scalar};
}

}  // namespace

void attend_forward(const AttendArgs& a, float* out) {
  const int64_t s_len = a.slots, d = a.dim;
  const Vec vec = pick(d);
  // The unmasked slots of each row, found once for all heads.
  std::vector<int32_t> slots;
  std::vector<int64_t> start(a.rows + 1, 0);
  slots.reserve(a.rows * 64);
  for (int64_t r = 0; r < a.rows; ++r) {
    const float* m = a.mask + r * s_len;
    for (int64_t s = 0; s < s_len; ++s) {
      if (m[s] != -std::numeric_limits<float>::infinity()) slots.push_back(static_cast<int32_t>(s));
    }
    start[r + 1] = static_cast<int64_t>(slots.size());
  }
  auto row = [&](int64_t task) {
    const int64_t h = task / a.rows, r = task % a.rows;
    const float* q = a.q + task * d;
    const float* k = a.k + h * s_len * d;
    const float* v = a.v + h * s_len * d;
    const float* m = a.mask + r * s_len;
    float* o = out + task * d;
    for (int64_t i = 0; i < d; ++i) o[i] = 0.0f;
    const int32_t* idx = slots.data() + start[r];
    const int64_t n = start[r + 1] - start[r];
    thread_local std::vector<float> scores;
    scores.resize(static_cast<size_t>(n));
    const float sink = a.sinks[task];
    float top = sink;
    for (int64_t i = 0; i < n; ++i) {
      scores[i] = vec.dot(q, k + idx[i] * d, d) + m[idx[i]];
      top = std::fmax(top, scores[i]);
    }
    float sum = std::exp(sink - top);
    for (int64_t i = 0; i < n; ++i) {
      const float p = std::exp(scores[i] - top);
      sum += p;
      vec.axpy(o, p, v + idx[i] * d, d);
    }
    const float inv = 1.0f / sum;
    for (int64_t i = 0; i < d; ++i) o[i] *= inv;
  };
  parallel_for(a.parallel, a.heads * a.rows, row);
}

}  // namespace ossedge
