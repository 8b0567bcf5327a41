// Internal to moe_core.cpp: the arm64 NEON tile. Each 16 codes are looked up in the 16-entry
// int8 table with one TBL, widened to fp32 and multiply-added in fp32; the block's scale is
// applied once to its sum. The dot-product extension (SDOT) is not used: it multiplies int8 by
// int8, and the activations stay fp32 so that the result matches the reference to fp32 rounding.
#pragma once

#include <arm_neon.h>

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

}  // namespace ossedge::detail
