#include "moe_core.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define OSSEDGE_X86 1
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace ossedge {
namespace {

constexpr int kBlock = 32;
// E2M1 magnitudes; bit 3 of a code is the sign.
constexpr float kFp4[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                            -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalize
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

float block_scale(const ExpertWeight& w, int64_t index) {
  if (w.format == WeightFormat::kMxfp4) {
    // 2^(e - 127) built from its bits; e = 0 is the subnormal 2^-127.
    const uint32_t e = static_cast<const uint8_t*>(w.scales)[index];
    const uint32_t bits = e == 0 ? (1u << 22) : (e << 23);
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
  return half_to_float(static_cast<const uint16_t*>(w.scales)[index]);
}

// Decode row `n` of expert `e` into `row` [K] floats.
void decode_row_scalar(const ExpertWeight& w, int64_t e, int64_t n, float* row) {
  const int64_t groups = w.cols / kBlock;
  const int64_t first = (e * w.rows + n) * groups;
  const uint8_t* bytes = w.data + first * (kBlock / 2);
  for (int64_t g = 0; g < groups; ++g) {
    const float s = block_scale(w, first + g);
    const uint8_t* b = bytes + g * (kBlock / 2);
    float* r = row + g * kBlock;
    for (int j = 0; j < kBlock / 2; ++j) {
      const int lo = b[j] & 0xf, hi = b[j] >> 4;
      if (w.format == WeightFormat::kMxfp4) {
        r[2 * j] = kFp4[lo] * s;
        r[2 * j + 1] = kFp4[hi] * s;
      } else {
        r[2 * j] = static_cast<float>(lo - 8) * s;
        r[2 * j + 1] = static_cast<float>(hi - 8) * s;
      }
    }
  }
}

float dot_scalar(const float* a, const float* b, int64_t n) {
  float acc = 0.0f;
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

#if OSSEDGE_X86
bool has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

// 8 codes from 4 bytes, in element order (low nibble first), as int32 lanes.
__attribute__((target("avx2,fma"))) inline __m256i nibbles8(const uint8_t* b) {
  uint32_t four;
  std::memcpy(&four, b, 4);
  const __m128i bytes = _mm_cvtsi32_si128(static_cast<int>(four));
  const __m256i dup = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(bytes, bytes));
  const __m256i shift = _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4);
  return _mm256_and_si256(_mm256_srlv_epi32(dup, shift), _mm256_set1_epi32(0xf));
}

// 8 weights (before the block scale) from 4 bytes.
__attribute__((target("avx2,fma"))) inline __m256 decode8(const uint8_t* b, bool fp4) {
  const __m256i code = nibbles8(b);
  if (!fp4) return _mm256_cvtepi32_ps(_mm256_sub_epi32(code, _mm256_set1_epi32(8)));
  const __m256 mag = _mm256_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f);
  const __m256 m = _mm256_permutevar8x32_ps(mag, _mm256_and_si256(code, _mm256_set1_epi32(7)));
  const __m256i sign = _mm256_slli_epi32(_mm256_srli_epi32(code, 3), 31);
  return _mm256_xor_ps(m, _mm256_castsi256_ps(sign));
}

// Row n of expert e dotted with x [K], decoding in registers (the single-token path).
__attribute__((target("avx2,fma"))) float row_dot_avx2(
    const ExpertWeight& w, int64_t e, int64_t n, const float* x) {
  const int64_t groups = w.cols / kBlock;
  const int64_t first = (e * w.rows + n) * groups;
  const uint8_t* bytes = w.data + first * (kBlock / 2);
  const bool fp4 = w.format == WeightFormat::kMxfp4;
  __m256 acc = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* b = bytes + g * (kBlock / 2);
    const float* xg = x + g * kBlock;
    __m256 blk = _mm256_mul_ps(decode8(b, fp4), _mm256_loadu_ps(xg));
    blk = _mm256_fmadd_ps(decode8(b + 4, fp4), _mm256_loadu_ps(xg + 8), blk);
    blk = _mm256_fmadd_ps(decode8(b + 8, fp4), _mm256_loadu_ps(xg + 16), blk);
    blk = _mm256_fmadd_ps(decode8(b + 12, fp4), _mm256_loadu_ps(xg + 24), blk);
    acc = _mm256_fmadd_ps(blk, _mm256_set1_ps(block_scale(w, first + g)), acc);
  }
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

bool has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  return ok;
}

// 16 weights (before the block scale) from 8 bytes: one 16-entry table lookup per lane.
__attribute__((target("avx512f,avx512bw"))) inline __m512 decode16(const uint8_t* b, bool fp4) {
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(_mm_loadl_epi64(
      reinterpret_cast<const __m128i*>(b)), _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b))));
  const __m512i shift = _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
  const __m512i code = _mm512_and_si512(_mm512_srlv_epi32(bytes, shift), _mm512_set1_epi32(0xf));
  if (!fp4) return _mm512_cvtepi32_ps(_mm512_sub_epi32(code, _mm512_set1_epi32(8)));
  return _mm512_permutexvar_ps(code, _mm512_loadu_ps(kFp4));
}

__attribute__((target("avx512f,avx512bw"))) float row_dot_avx512(
    const ExpertWeight& w, int64_t e, int64_t n, const float* x) {
  const int64_t groups = w.cols / kBlock;
  const int64_t first = (e * w.rows + n) * groups;
  const uint8_t* bytes = w.data + first * (kBlock / 2);
  const bool fp4 = w.format == WeightFormat::kMxfp4;
  __m512 acc = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* b = bytes + g * (kBlock / 2);
    const float* xg = x + g * kBlock;
    __m512 blk = _mm512_mul_ps(decode16(b, fp4), _mm512_loadu_ps(xg));
    blk = _mm512_fmadd_ps(decode16(b + 8, fp4), _mm512_loadu_ps(xg + 16), blk);
    acc = _mm512_fmadd_ps(blk, _mm512_set1_ps(block_scale(w, first + g)), acc);
  }
  alignas(64) float lanes[16];  // (GCC 12 warns inside _mm512_reduce_add_ps)
  _mm512_store_ps(lanes, acc);
  float sum = 0.0f;
  for (float v : lanes) sum += v;
  return sum;
}

__attribute__((target("avx2,fma"))) void decode_row_avx2(
    const ExpertWeight& w, int64_t e, int64_t n, float* row) {
  const int64_t groups = w.cols / kBlock;
  const int64_t first = (e * w.rows + n) * groups;
  const uint8_t* bytes = w.data + first * (kBlock / 2);
  const bool fp4 = w.format == WeightFormat::kMxfp4;
  for (int64_t g = 0; g < groups; ++g) {
    const __m256 s = _mm256_set1_ps(block_scale(w, first + g));
    const uint8_t* b = bytes + g * (kBlock / 2);
    for (int q = 0; q < 4; ++q) {
      _mm256_storeu_ps(row + g * kBlock + 8 * q, _mm256_mul_ps(decode8(b + 4 * q, fp4), s));
    }
  }
}

__attribute__((target("avx2,fma"))) float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  __m256 acc = _mm256_add_ps(acc0, acc1);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  float out = _mm_cvtss_f32(s);
  for (; i < n; ++i) out += a[i] * b[i];
  return out;
}
#endif

#if defined(__aarch64__)
float dot_neon(const float* a, const float* b, int64_t n) {
  float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = vdupq_n_f32(0.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    acc0 = vfmaq_f32(acc0, vld1q_f32(a + i), vld1q_f32(b + i));
    acc1 = vfmaq_f32(acc1, vld1q_f32(a + i + 4), vld1q_f32(b + i + 4));
  }
  float out = vaddvq_f32(vaddq_f32(acc0, acc1));
  for (; i < n; ++i) out += a[i] * b[i];
  return out;
}
#endif

// Single-token paths without SIMD decoding: decode the row into a stack-sized buffer, then dot.
template <float (*Dot)(const float*, const float*, int64_t)>
float row_dot_buffered(const ExpertWeight& w, int64_t e, int64_t n, const float* x) {
  thread_local std::vector<float> row;
  row.resize(w.cols);
  decode_row_scalar(w, e, n, row.data());
  return Dot(row.data(), x, w.cols);
}
constexpr auto row_dot_scalar = row_dot_buffered<dot_scalar>;
#if defined(__aarch64__)
constexpr auto row_dot_neon = row_dot_buffered<dot_neon>;
#endif

struct Isa {
  float (*row_dot)(const ExpertWeight&, int64_t, int64_t, const float*);
  void (*decode_row)(const ExpertWeight&, int64_t, int64_t, float*);
  float (*dot)(const float*, const float*, int64_t);
  const char* name;
};

Isa pick_isa() {
  // OSSEDGE_KERNEL_ISA=scalar (or avx2) forces that path: tests compare each with the reference.
  const char* forced = std::getenv("OSSEDGE_KERNEL_ISA");
  if (forced != nullptr && std::strcmp(forced, "scalar") == 0) {
    return {row_dot_scalar, decode_row_scalar, dot_scalar, "scalar"};
  }
#if OSSEDGE_X86
  const bool no512 = forced != nullptr && std::strcmp(forced, "avx2") == 0;
  if (has_avx512() && !no512) return {row_dot_avx512, decode_row_avx2, dot_avx2, "avx512"};
  if (has_avx2()) return {row_dot_avx2, decode_row_avx2, dot_avx2, "avx2"};
#endif
#if defined(__aarch64__)
  return {row_dot_neon, decode_row_scalar, dot_neon, "neon"};
#else
  return {row_dot_scalar, decode_row_scalar, dot_scalar, "scalar"};
#endif
}

const Isa& isa() {
  static const Isa chosen = pick_isa();
  return chosen;
}

}  // namespace

const char* moe_isa() { return isa().name; }

bool moe_forward(const MoeArgs& a, float* out) {
  const Isa& f = isa();
  const int64_t h = a.hidden, inter = a.intermediate;
  std::memset(out, 0, sizeof(float) * a.tokens * h);
  // Group (token, slot) pairs by expert.
  std::vector<std::vector<int64_t>> chosen(a.experts);
  for (int64_t i = 0; i < a.tokens * a.topk; ++i) {
    const int64_t e = a.ids[i];
    if (e < 0 || e >= a.experts) return false;
    chosen[e].push_back(i);
  }
  std::vector<float> row(h > inter ? h : inter);
  std::vector<float> gate_up, act;
  for (int64_t e = 0; e < a.experts; ++e) {
    const std::vector<int64_t>& pairs = chosen[e];
    const int64_t m = static_cast<int64_t>(pairs.size());
    if (m == 0) continue;
    gate_up.assign(m * 2 * inter, 0.0f);
    // One token: decode and dot in one pass. Several: decode each row once for all of them.
    for (int64_t n = 0; n < 2 * inter; ++n) {
      const float bias = a.gate_up_bias[e * 2 * inter + n];
      if (m == 1) {
        gate_up[n] = f.row_dot(a.gate_up, e, n, a.x + (pairs[0] / a.topk) * h) + bias;
        continue;
      }
      f.decode_row(a.gate_up, e, n, row.data());
      for (int64_t j = 0; j < m; ++j) {
        const float* x = a.x + (pairs[j] / a.topk) * h;
        gate_up[j * 2 * inter + n] = f.dot(row.data(), x, h) + bias;
      }
    }
    act.resize(m * inter);
    for (int64_t j = 0; j < m; ++j) {
      for (int64_t i = 0; i < inter; ++i) {
        const float gate = std::fmin(gate_up[j * 2 * inter + 2 * i], a.limit);
        const float up = std::fmax(std::fmin(gate_up[j * 2 * inter + 2 * i + 1], a.limit), -a.limit);
        act[j * inter + i] = (up + 1.0f) * gate / (1.0f + std::exp(-a.alpha * gate));
      }
    }
    for (int64_t n = 0; n < h; ++n) {
      const float bias = a.down_bias[e * h + n];
      if (m == 1) {
        out[(pairs[0] / a.topk) * h + n] +=
            a.weights[pairs[0]] * (f.row_dot(a.down, e, n, act.data()) + bias);
        continue;
      }
      f.decode_row(a.down, e, n, row.data());
      for (int64_t j = 0; j < m; ++j) {
        const int64_t t = pairs[j] / a.topk;
        out[t * h + n] += a.weights[pairs[j]] * (f.dot(row.data(), act.data() + j * inter, inter) + bias);
      }
    }
  }
  return true;
}

}  // namespace ossedge
