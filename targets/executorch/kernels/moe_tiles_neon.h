// Internal to moe_core.cpp: the arm64 NEON tiles. Each 16 codes are looked up in the 16-entry
// int8 table with one TBL. "neondot" (CPUs with the dot-product extension, checked at run time)
// multiplies them by the activations' int8 form with SDOT; "neon" widens them to fp32 and
// multiply-adds the dequantized activations. Either way a block's scale is applied once to its
// sum.
#pragma once

#include <arm_neon.h>

#if defined(__linux__)
#include <sys/auxv.h>
#endif
#if defined(__APPLE__)
#include <sys/sysctl.h>
#endif

#include "moe_tiles.h"

namespace ossedge::detail {

// 16 int8 weights to 4 x 4 fp32.
inline void widen(int8x16_t v, float32x4_t* out) {
  const int16x8_t lo = vmovl_s8(vget_low_s8(v)), hi = vmovl_high_s8(v);
  out[0] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo)));
  out[1] = vcvtq_f32_s32(vmovl_high_s16(lo));
  out[2] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi)));
  out[3] = vcvtq_f32_s32(vmovl_high_s16(hi));
}

// Rows one after the other (the weight bytes stream in order); per token, a block's products are
// summed in two chains and scaled into one of two accumulators that take alternate blocks.
template <int M>
void tile_neon(const ExpertWeight& w, int64_t e, int64_t n0, const float* const* x, float* res) {
  const bool fp4 = w.format == WeightFormat::kMxfp4;
  const int8x16_t table = vld1q_s8(codes_int8(w.format));
  const float* e8m0 = e8m0_table();
  const uint8x16_t low = vdupq_n_u8(0xf);
  const int64_t groups = w.cols / kBlock;
  for (int r = 0; r < kRows; ++r) {
    const int64_t first = first_block(w, e, n0 + r);
    float32x4_t acc[2][M];
    for (int j = 0; j < M; ++j) acc[0][j] = acc[1][j] = vdupq_n_f32(0.0f);
    const auto block = [&](int64_t g, float32x4_t* a) {
      const int64_t b = first + g;
      float s;
      if (fp4) {
        s = 0.5f * e8m0[static_cast<const uint8_t*>(w.scales)[b]];  // the table is doubled
      } else {
        __fp16 h;
        std::memcpy(&h, static_cast<const uint16_t*>(w.scales) + b, sizeof h);
        s = static_cast<float>(h);
      }
      const uint8x16_t bytes = vld1q_u8(w.data + b * kBlockBytes);
      float32x4_t v[8];
      widen(vqtbl1q_s8(table, vandq_u8(bytes, low)), v);
      widen(vqtbl1q_s8(table, vshrq_n_u8(bytes, 4)), v + 4);
      for (int j = 0; j < M; ++j) {
        const float* xj = x[j] + g * kBlock;
        float32x4_t p = vmulq_f32(v[0], vld1q_f32(xj));
        float32x4_t q = vmulq_f32(v[1], vld1q_f32(xj + 4));
        for (int i = 2; i < 8; i += 2) {
          p = vfmaq_f32(p, v[i], vld1q_f32(xj + 4 * i));
          q = vfmaq_f32(q, v[i + 1], vld1q_f32(xj + 4 * i + 4));
        }
        a[j] = vfmaq_n_f32(a[j], vaddq_f32(p, q), s);
      }
    };
    int64_t g = 0;
    for (; g + 1 < groups; g += 2) {
      block(g, acc[0]);
      block(g + 1, acc[1]);
    }
    if (g < groups) block(g, acc[0]);
    for (int j = 0; j < M; ++j) res[j * kRows + r] = vaddvq_f32(vaddq_f32(acc[0][j], acc[1][j]));
  }
}

#if defined(__clang__)
#define OSSEDGE_DOTPROD __attribute__((target("dotprod")))
#else
#define OSSEDGE_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))
#endif

inline bool has_dotprod() {
#if defined(__linux__)
  return (getauxval(AT_HWCAP) & (1ul << 20)) != 0;  // HWCAP_ASIMDDP
#elif defined(__APPLE__)
  int value = 0;
  size_t size = sizeof value;
  return sysctlbyname("hw.optional.arm.FEAT_DotProd", &value, &size, nullptr, 0) == 0 && value;
#else
  return false;
#endif
}

// One block g of a row (quad g / 4) into the M tokens' accumulators a[0..M).
template <int M>
OSSEDGE_DOTPROD __attribute__((always_inline)) inline void block_dot(
    const ExpertWeight& w, int8x16_t table, int64_t first, int64_t g, const QuantRow* const* x,
    float32x4_t* a) {
  const int64_t b = first + g;
  float s;
  if (w.format == WeightFormat::kMxfp4) {
    s = e8m0_table()[static_cast<const uint8_t*>(w.scales)[b]];
  } else {
    __fp16 h;
    std::memcpy(&h, static_cast<const uint16_t*>(w.scales) + b, sizeof h);
    s = static_cast<float>(h);
  }
  const uint8x16_t bytes = vld1q_u8(w.data + b * kBlockBytes);
  const int8x16_t lo = vqtbl1q_s8(table, vandq_u8(bytes, vdupq_n_u8(0xf)));
  const int8x16_t hi = vqtbl1q_s8(table, vshrq_n_u8(bytes, 4));
  const int64_t quad = g / kQuadBlocks, in_quad = g % kQuadBlocks;
  for (int j = 0; j < M; ++j) {
    const int8_t* q = x[j]->q + quad * kQuadBytes + in_quad * 16;
    const int32x4_t d = vdotq_s32(vdotq_s32(vdupq_n_s32(0), lo, vld1q_s8(q)), hi,
                                  vld1q_s8(q + kQuadBytes / 2));
    const float xs = x[j]->scale[quad * kQuadLanes + in_quad * 4];  // with the format's unit
    a[j] = vfmaq_n_f32(a[j], vcvtq_f32_s32(d), s * xs);
  }
}

template <int M>
OSSEDGE_DOTPROD void tile_neondot(const ExpertWeight& w, int64_t e, int64_t n0,
                                  const QuantRow* const* x, float* res) {
  const int8x16_t table = vld1q_s8(codes_int8(w.format));  // signed codes: no offset
  const int64_t groups = w.cols / kBlock;
  for (int r = 0; r < kRows; ++r) {
    const int64_t first = first_block(w, e, n0 + r);
    float32x4_t even[M], odd[M];
    for (int j = 0; j < M; ++j) even[j] = odd[j] = vdupq_n_f32(0.0f);
    int64_t g = 0;
    for (; g + 1 < groups; g += 2) {
      block_dot<M>(w, table, first, g, x, even);
      block_dot<M>(w, table, first, g + 1, x, odd);
    }
    if (g < groups) block_dot<M>(w, table, first, g, x, even);
    for (int j = 0; j < M; ++j) res[j * kRows + r] = vaddvq_f32(vaddq_f32(even[j], odd[j]));
  }
}

#undef OSSEDGE_DOTPROD

}  // namespace ossedge::detail
