// 16 float32 lanes of AVX-512 for the decode kernels (decode_kernels.h). Included only by
// decode_kernels_avx512.cpp, inside its `#pragma GCC target`, so nothing here is ever
// compiled into code that a CPU without AVX-512 might run.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "decode_kernels_api.h"

namespace vlmq::avx512 {

struct Vec {
  static constexpr int kLanes = 16;
  __m512 v;

  static Vec zero() { return {_mm512_setzero_ps()}; }
  static Vec set1(float x) { return {_mm512_set1_ps(x)}; }
  static Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
  // 16 weights of a 16-bit type, widened to float32 exactly: bfloat16 is float32's top half; F16C's conversion.
  static Vec load(const BFloat16* p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(wide, 16))};
  }
  static Vec load(const Float16* p) { return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))}; }
  // The first n < kLanes floats at p, the other lanes 0 (never reads past p + n).
  static Vec load_first(const float* p, int64_t n) { return {_mm512_maskz_loadu_ps(first_lanes(n), p)}; }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void store_first(float* p, int64_t n) const { _mm512_mask_storeu_ps(p, first_lanes(n), v); }

  Vec operator+(Vec b) const { return {_mm512_add_ps(v, b.v)}; }
  Vec operator-(Vec b) const { return {_mm512_sub_ps(v, b.v)}; }
  Vec operator*(Vec b) const { return {_mm512_mul_ps(v, b.v)}; }
  Vec operator/(Vec b) const { return {_mm512_div_ps(v, b.v)}; }
  static Vec fma(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  static Vec max(Vec a, Vec b) { return {_mm512_max_ps(a.v, b.v)}; }
  static Vec min(Vec a, Vec b) { return {_mm512_min_ps(a.v, b.v)}; }
  // a where x ≥ limit, else 0.
  static Vec zero_below(Vec a, Vec x, Vec limit) { return {_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x.v, limit.v, _CMP_GE_OQ), a.v)}; }
  static Vec round(Vec a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
  // a · 2^n for integral n.
  static Vec scale_pow2(Vec a, Vec n) { return {_mm512_scalef_ps(a.v, n.v)}; }
  float sum() const { return _mm512_reduce_add_ps(v); }
  // out[0 … 3] = a.sum(), b.sum(), c.sum(), d.sum(): each 128-bit lane's [a, b, c, d] partial sums, then the lanes added.
  static void sum4(Vec a, Vec b, Vec c, Vec d, float* out) {
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a.v, b.v), _mm512_unpackhi_ps(a.v, b.v));  // [a, b, a, b] per lane
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c.v, d.v), _mm512_unpackhi_ps(c.v, d.v));
    const __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));
    const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1)));
  }
  float max_lane() const { return _mm512_reduce_max_ps(v); }

 private:
  static __mmask16 first_lanes(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }
};

}  // namespace vlmq::avx512
