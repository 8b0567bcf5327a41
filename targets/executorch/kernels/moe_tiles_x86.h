// Internal to moe_core.cpp: the x86-64 tiles, AVX-512 and AVX2+FMA. Each function carries its
// own target attribute, so the library builds for any x86-64 and picks a path at run time.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "moe_tiles.h"

// GCC 12 flags the deliberately undefined operands inside its own AVX-512 intrinsics once they
// are inlined into a target("avx512f") function (GCC bug 105593).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace ossedge::detail {

inline bool has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("f16c");
}

inline bool has_avx512vnni() {
  return has_avx512() && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

inline bool has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

// A block's scale: MXFP4 from the E8M0 table (a broadcast load), int4 from fp16 with F16C.
__attribute__((target("f16c"))) inline float scale_x86(const ExpertWeight& w, const float* e8m0,
                                                      int64_t block) {
  if (e8m0 != nullptr) return e8m0[static_cast<const uint8_t*>(w.scales)[block]];
  return _cvtsh_ss(static_cast<const uint16_t*>(w.scales)[block]);
}

__attribute__((target("avx2"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx512f"))) inline float hsum512(__m512 v) {
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  return hsum256(_mm256_add_ps(_mm512_castps512_ps256(v), hi));
}

// Two loop orders. Decode (one token): a tile's rows one after the other, so the weight bytes
// stream through memory in order (measured here: about a quarter less time per token than
// advancing the four rows together).
// Prefill (2 to 4 tokens): the rows advance together block by block, so each activation block is
// loaded once for all of them and decoding is shared by the tokens.

// AVX-512: a block is two 16-lane lookups in the table scaled by the block's scale. vpermps reads
// index bits 0-3 only, so the zero-extended byte indexes its low nibble as it is, and shifted
// right by 4 its high nibble. The result is in split order: even elements, then odd ones.
struct Block512 {
  __m512 even, odd;
};

__attribute__((target("avx512f,f16c"), always_inline)) inline Block512 decode_avx512(
    const ExpertWeight& w, const float* e8m0, __m512 values, int64_t block) {
  const __m512 table = _mm512_mul_ps(values, _mm512_set1_ps(scale_x86(w, e8m0, block)));
  const __m512i code = _mm512_cvtepu8_epi32(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.data + block * kBlockBytes)));
  return {_mm512_permutexvar_ps(code, table),
          _mm512_permutexvar_ps(_mm512_srli_epi32(code, 4), table)};
}

// acc[0] += even * x block's first half, acc[1] += odd * its second half.
__attribute__((target("avx512f"), always_inline)) inline void dot_avx512(Block512 d,
                                                                         const float* xg,
                                                                         __m512* acc) {
  acc[0] = _mm512_fmadd_ps(d.even, _mm512_loadu_ps(xg), acc[0]);
  acc[1] = _mm512_fmadd_ps(d.odd, _mm512_loadu_ps(xg + 16), acc[1]);
}

template <int M>
__attribute__((target("avx512f,f16c"))) void tile_avx512(
    const ExpertWeight& w, int64_t e, int64_t n0, const float* const* x, float* res) {
  const __m512 values = _mm512_load_ps(code_values(w.format));
  const float* e8m0 = w.format == WeightFormat::kMxfp4 ? e8m0_table() : nullptr;
  const int64_t groups = w.cols / kBlock;
  if constexpr (M == 1) {
    for (int r = 0; r < kRows; ++r) {
      const int64_t first = first_block(w, e, n0 + r);
      // Four accumulators (even and odd halves of alternate blocks) keep the FMA chains short.
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                       _mm512_setzero_ps()};
      int64_t g = 0;
      for (; g + 1 < groups; g += 2) {
        dot_avx512(decode_avx512(w, e8m0, values, first + g), x[0] + g * kBlock, acc);
        dot_avx512(decode_avx512(w, e8m0, values, first + g + 1), x[0] + (g + 1) * kBlock, acc + 2);
      }
      if (g < groups) dot_avx512(decode_avx512(w, e8m0, values, first + g), x[0] + g * kBlock, acc);
      res[r] = hsum512(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
    }
  } else {
    int64_t first[kRows];
    for (int r = 0; r < kRows; ++r) first[r] = first_block(w, e, n0 + r);
    __m512 acc[M][kRows];
    for (int j = 0; j < M; ++j) {
      for (int r = 0; r < kRows; ++r) acc[j][r] = _mm512_setzero_ps();
    }
    for (int64_t g = 0; g < groups; ++g) {
      __m512 xe[M], xo[M];
      for (int j = 0; j < M; ++j) {
        xe[j] = _mm512_loadu_ps(x[j] + g * kBlock);
        xo[j] = _mm512_loadu_ps(x[j] + g * kBlock + 16);
      }
      for (int r = 0; r < kRows; ++r) {
        const Block512 d = decode_avx512(w, e8m0, values, first[r] + g);
        for (int j = 0; j < M; ++j) {
          acc[j][r] = _mm512_fmadd_ps(d.even, xe[j], acc[j][r]);
          acc[j][r] = _mm512_fmadd_ps(d.odd, xo[j], acc[j][r]);
        }
      }
    }
    for (int j = 0; j < M; ++j) {
      for (int r = 0; r < kRows; ++r) res[j * kRows + r] = hsum512(acc[j][r]);
    }
  }
}

// AVX-512 VNNI: int8 dot products on the activations' int8 form (QuantRow), four blocks (64
// weight bytes) per step. The low and high nibbles are the unsigned codes (int4 as stored,
// MXFP4 through a vpshufb table of doubled values plus 12); vpdpbusd multiplies them by the
// signed activations, four products per int32 lane, into an accumulator that starts at the
// row's offset correction, so each lane ends as the exact integer dot product of its part of a
// block. The lanes are then scaled (weight scale times activation scale) into fp32.
#define OSSEDGE_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c")))

// The four blocks' weight scales, each in its four lanes (of 128-bit lane k: block k's).
template <bool kFp4>
OSSEDGE_VNNI __attribute__((always_inline)) inline __m512 quad_scales(const ExpertWeight& w,
                                                                      int64_t block, int blocks) {
  const __mmask16 m = static_cast<__mmask16>((1u << blocks) - 1);
  if constexpr (kFp4) {
    // the 4 E8M0 bytes in every dword, byte k zero-extended into 128-bit lane k's dwords, moved
    // to the float exponent: 2^(e - 127). (e = 0, 2^-127, becomes 0: no gpt-oss block has it,
    // and its weights would be below 1e-37.)
    const uint8_t* p = static_cast<const uint8_t*>(w.scales) + block;
    __m512i e;
    if (blocks == kQuadBlocks) {
      int32_t four;
      std::memcpy(&four, p, sizeof four);
      e = _mm512_set1_epi32(four);
    } else {
      e = _mm512_broadcastd_epi32(_mm_maskz_loadu_epi8(m, p));
    }
    const auto pick = [](uint32_t k) { return static_cast<int>(0x80808000u | k); };
    const __m512i spread =  // dwords k, 0x80, 0x80, 0x80 (bytes) in 128-bit lane k
        _mm512_set_epi32(pick(3), pick(3), pick(3), pick(3), pick(2), pick(2), pick(2), pick(2),
                         pick(1), pick(1), pick(1), pick(1), pick(0), pick(0), pick(0), pick(0));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_shuffle_epi8(e, spread), 23));
  } else {
    const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    const __m128i h = _mm_maskz_loadu_epi16(m, static_cast<const uint16_t*>(w.scales) + block);
    return _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_cvtph_ps(h)));
  }
}

// How far ahead of the quad being read its weight bytes are prefetched. With the hardware
// prefetcher alone, one-token calls read ~21 GB/s from memory on one core here (AMD EPYC, Zen 5)
// and ~32 on two; 2 KiB ahead (with the arguments held in locals) gave ~22-24 and ~33-35, next
// to the machine's ~36 (moe_decode_bench.cpp).
// A prefetch never faults, so the ones past the last expert's bytes are harmless.
constexpr int kPrefetchBytes = 2048;

// One quad (up to four blocks) of a row into the M tokens' accumulators a[0..M).
template <int M, bool kFp4>
OSSEDGE_VNNI __attribute__((always_inline)) inline void quad_vnni(
    const ExpertWeight& w, int64_t block, int blocks, int64_t quad, const QuantRow* x,
    __m512* a) {
  const __m512i low = _mm512_set1_epi8(0x0f);
  const uint8_t* bytes = w.data + block * kBlockBytes;
  _mm_prefetch(reinterpret_cast<const char*>(bytes) + kPrefetchBytes, _MM_HINT_T0);
  const __m512i b = blocks == kQuadBlocks
      ? _mm512_loadu_si512(bytes)
      : _mm512_maskz_loadu_epi8((1ull << (16 * blocks)) - 1, bytes);
  __m512i lo = _mm512_and_si512(b, low);
  __m512i hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
  if constexpr (kFp4) {
    const __m512i table = _mm512_broadcast_i32x4(
        _mm_load_si128(reinterpret_cast<const __m128i*>(kFp4TwicePlus12)));
    lo = _mm512_shuffle_epi8(table, lo);
    hi = _mm512_shuffle_epi8(table, hi);
  }
  const __m512 ws = quad_scales<kFp4>(w, block, blocks);
  for (int j = 0; j < M; ++j) {
    const QuantRow& xj = x[j];
    const int8_t* q = xj.q + quad * kQuadBytes;
    __m512i dot = _mm512_loadu_si512(xj.corr + quad * kQuadLanes);
    dot = _mm512_dpbusd_epi32(dot, lo, _mm512_loadu_si512(q));
    dot = _mm512_dpbusd_epi32(dot, hi, _mm512_loadu_si512(q + kQuadBytes / 2));
    const __m512 s = _mm512_mul_ps(ws, _mm512_loadu_ps(xj.scale + quad * kQuadLanes));
    a[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, a[j]);
  }
}

template <int M, bool kFp4>
OSSEDGE_VNNI void tile_vnni_format(const ExpertWeight& w, int64_t e, int64_t n0,
                                   const QuantRow* const* x, float* res) {
  const int64_t groups = w.cols / kBlock;
  const int64_t full = groups / kQuadBlocks;  // quads of four blocks
  // local copies: the compiler need not reload them after every store to an accumulator
  const ExpertWeight wl = w;
  QuantRow xl[M];
  for (int j = 0; j < M; ++j) xl[j] = *x[j];
  for (int r = 0; r < kRows; ++r) {
    const int64_t first = first_block(wl, e, n0 + r);
    // two accumulators per token, taking alternate quads, keep the FMA chains short
    __m512 even[M], odd[M];
    for (int j = 0; j < M; ++j) even[j] = odd[j] = _mm512_setzero_ps();
    int64_t quad = 0;
    for (; quad + 1 < full; quad += 2) {
      quad_vnni<M, kFp4>(wl, first + quad * kQuadBlocks, kQuadBlocks, quad, xl, even);
      quad_vnni<M, kFp4>(wl, first + (quad + 1) * kQuadBlocks, kQuadBlocks, quad + 1, xl, odd);
    }
    if (quad < full) {
      quad_vnni<M, kFp4>(wl, first + quad * kQuadBlocks, kQuadBlocks, quad, xl, even);
      ++quad;
    }
    if (const int rest = static_cast<int>(groups - full * kQuadBlocks)) {
      quad_vnni<M, kFp4>(wl, first + quad * kQuadBlocks, rest, quad, xl, odd);
    }
    for (int j = 0; j < M; ++j) res[j * kRows + r] = hsum512(_mm512_add_ps(even[j], odd[j]));
  }
}

template <int M>
void tile_vnni(const ExpertWeight& w, int64_t e, int64_t n0, const QuantRow* const* x,
               float* res) {
  if (w.format == WeightFormat::kMxfp4) {
    tile_vnni_format<M, true>(w, e, n0, x, res);
  } else {
    tile_vnni_format<M, false>(w, e, n0, x, res);
  }
}

#undef OSSEDGE_VNNI

// AVX2: the 16 codes of each nibble half are looked up with one vpshufb in the int8 table
// (codes_int8) and widened to fp32 (fewer instructions than two 8-lane float permutes and a blend
// per 8 weights); w[0..3] hold the block unscaled, in split order.
struct Block256 {
  __m256 w[4];
};

__attribute__((target("avx2"), always_inline)) inline Block256 decode_avx2(
    const ExpertWeight& w, __m128i table, int64_t block) {
  const __m128i low = _mm_set1_epi8(0x0f);
  const __m128i bytes =
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.data + block * kBlockBytes));
  const __m128i even = _mm_shuffle_epi8(table, _mm_and_si128(bytes, low));
  const __m128i odd = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(bytes, 4), low));
  return {{_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(even)),
           _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(even, 8))),
           _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(odd)),
           _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(odd, 8)))}};
}

// acc + scale * (block . x block): the products in two short chains, scaled once.
__attribute__((target("avx2,fma,f16c"), always_inline)) inline __m256 dot_avx2(
    const ExpertWeight& w, const float* e8m0, float unit, __m128i table, int64_t block,
    const float* xg, __m256 acc) {
  const Block256 d = decode_avx2(w, table, block);
  __m256 p = _mm256_mul_ps(d.w[0], _mm256_loadu_ps(xg));
  __m256 q = _mm256_mul_ps(d.w[2], _mm256_loadu_ps(xg + 16));
  p = _mm256_fmadd_ps(d.w[1], _mm256_loadu_ps(xg + 8), p);
  q = _mm256_fmadd_ps(d.w[3], _mm256_loadu_ps(xg + 24), q);
  const __m256 s = _mm256_set1_ps(unit * scale_x86(w, e8m0, block));
  return _mm256_fmadd_ps(_mm256_add_ps(p, q), s, acc);
}

template <int M>
__attribute__((target("avx2,fma,f16c"))) void tile_avx2(
    const ExpertWeight& w, int64_t e, int64_t n0, const float* const* x, float* res) {
  const bool fp4 = w.format == WeightFormat::kMxfp4;
  const __m128i table = _mm_load_si128(reinterpret_cast<const __m128i*>(codes_int8(w.format)));
  const float unit = fp4 ? 0.5f : 1.0f;  // the MXFP4 int8 table holds twice the values
  const float* e8m0 = fp4 ? e8m0_table() : nullptr;
  const int64_t groups = w.cols / kBlock;
  if constexpr (M == 1) {
    for (int r = 0; r < kRows; ++r) {
      const int64_t first = first_block(w, e, n0 + r);
      // The block's products in two short chains, scaled once into one of two accumulators.
      __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
      int64_t g = 0;
      for (; g + 1 < groups; g += 2) {
        acc[0] = dot_avx2(w, e8m0, unit, table, first + g, x[0] + g * kBlock, acc[0]);
        acc[1] = dot_avx2(w, e8m0, unit, table, first + g + 1, x[0] + (g + 1) * kBlock, acc[1]);
      }
      if (g < groups) acc[0] = dot_avx2(w, e8m0, unit, table, first + g, x[0] + g * kBlock, acc[0]);
      res[r] = hsum256(_mm256_add_ps(acc[0], acc[1]));
    }
  } else {
    // Two rows at a time: 2 rows x 4 tokens of accumulators and a decoded block fill the 16 ymm
    // registers; the block is scaled once and shared by the tokens.
    for (int r0 = 0; r0 < kRows; r0 += 2) {
      const int64_t first[2] = {first_block(w, e, n0 + r0), first_block(w, e, n0 + r0 + 1)};
      __m256 acc[M][2];
      for (int j = 0; j < M; ++j) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
      for (int64_t g = 0; g < groups; ++g) {
        for (int r = 0; r < 2; ++r) {
          Block256 d = decode_avx2(w, table, first[r] + g);
          const __m256 s = _mm256_set1_ps(unit * scale_x86(w, e8m0, first[r] + g));
          for (__m256& v : d.w) v = _mm256_mul_ps(v, s);
          for (int j = 0; j < M; ++j) {
            const float* xg = x[j] + g * kBlock;
            for (int k = 0; k < 4; ++k) {
              acc[j][r] = _mm256_fmadd_ps(d.w[k], _mm256_loadu_ps(xg + 8 * k), acc[j][r]);
            }
          }
        }
      }
      for (int j = 0; j < M; ++j) {
        for (int r = 0; r < 2; ++r) res[j * kRows + r0 + r] = hsum256(acc[j][r]);
      }
    }
  }
}

}  // namespace ossedge::detail

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
