// 8 float32 lanes of AVX2 + FMA for the decode kernels (decode_kernels.h), for CPUs
// without AVX-512 (AMD before Zen 4, Intel client parts). Included only by
// decode_kernels_avx2.cpp, inside its `#pragma GCC target`.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "decode_kernels_api.h"

namespace vlmq::avx2 {

struct Vec {
  static constexpr int kLanes = 8;
  __m256 v;

  static Vec zero() { return {_mm256_setzero_ps()}; }
  static Vec set1(float x) { return {_mm256_set1_ps(x)}; }
  static Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
  // 8 weights of a 16-bit type, widened to float32 exactly (decode_vec512.h).
  static Vec load(const BFloat16* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(wide, 16))};
  }
  static Vec load(const Float16* p) { return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))}; }
  // The first n < kLanes floats at p, the other lanes 0 (masked: never reads past p + n).
  static Vec load_first(const float* p, int64_t n) { return {_mm256_maskload_ps(p, first_lanes(n))}; }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void store_first(float* p, int64_t n) const { _mm256_maskstore_ps(p, first_lanes(n), v); }

  Vec operator+(Vec b) const { return {_mm256_add_ps(v, b.v)}; }
  Vec operator-(Vec b) const { return {_mm256_sub_ps(v, b.v)}; }
  Vec operator*(Vec b) const { return {_mm256_mul_ps(v, b.v)}; }
  Vec operator/(Vec b) const { return {_mm256_div_ps(v, b.v)}; }
  static Vec fma(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  static Vec max(Vec a, Vec b) { return {_mm256_max_ps(a.v, b.v)}; }
  static Vec min(Vec a, Vec b) { return {_mm256_min_ps(a.v, b.v)}; }
  // a where x ≥ limit, else 0.
  static Vec zero_below(Vec a, Vec x, Vec limit) { return {_mm256_and_ps(_mm256_cmp_ps(x.v, limit.v, _CMP_GE_OQ), a.v)}; }
  static Vec round(Vec a) { return {_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
  // a · 2^n for integral n in [-127, 127] (the caller clamps): n goes straight into the exponent
  // bits, in two halves so that n = -127 (a subnormal 2^-127) still comes out as a normal product.
  static Vec scale_pow2(Vec a, Vec n) {
    const __m256i ni = _mm256_cvtps_epi32(n.v);
    const __m256i half = _mm256_srai_epi32(ni, 1);
    const __m256i bias = _mm256_set1_epi32(127);
    const __m256 p1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
    const __m256 p2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), bias), 23));
    return {_mm256_mul_ps(_mm256_mul_ps(a.v, p1), p2)};
  }
  float sum() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // out[0 … 3] = a.sum(), b.sum(), c.sum(), d.sum(): each 128-bit lane's [a, b, c, d] partial sums, then the lanes added.
  static void sum4(Vec a, Vec b, Vec c, Vec d, float* out) {
    const __m256 ab = _mm256_add_ps(_mm256_unpacklo_ps(a.v, b.v), _mm256_unpackhi_ps(a.v, b.v));  // [a, b, a, b] per lane
    const __m256 cd = _mm256_add_ps(_mm256_unpacklo_ps(c.v, d.v), _mm256_unpackhi_ps(c.v, d.v));
    const __m256 abcd = _mm256_add_ps(_mm256_shuffle_ps(ab, cd, 0x44), _mm256_shuffle_ps(ab, cd, 0xEE));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
  }
  float max_lane() const {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }

 private:
  static __m256i first_lanes(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
};

}  // namespace vlmq::avx2
