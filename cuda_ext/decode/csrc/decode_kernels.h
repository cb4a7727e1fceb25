// The CPU decode kernels, written once over a vector type V (decode_vec512.h,
// decode_vec256.h) and compiled once per instruction set. Everything is a member of the
// class template, so each instruction set's copy is a distinct symbol (no inline function
// shared between files compiled for different CPUs).
//
// Decoding reads every weight once per step for one to a few tokens: the matrix-vector
// products are bound by memory bandwidth, and what matters is streaming the row-major
// weight at the rate memory delivers it while the tokens' activations sit in L1.
#pragma once

#include <cstdint>

#include "decode_kernels_api.h"

namespace vlmq {

template <class V>
struct Kernels {
  static constexpr int L = V::kLanes;
  static constexpr int kRows = 4;        // weight rows per block: 4 streams, 4 × tokens accumulators
  static constexpr int kTokens = 4;      // tokens per pass over a block; more tokens reread it from L1
  // With 32 vector registers (AVX-512), 5 to 8 tokens go in one pass over blocks of 2 rows (16
  // accumulators): a second pass over a block reads it from L1, and while it computes no weight
  // streams from memory.
  static constexpr int kWideTokens = L == 16 ? 8 : kTokens;
  static constexpr int64_t kAhead = 1024;  // floats: prefetch distance, 4 KiB ahead in each row

  // prefetch: whether the products ask for each row's line kAhead floats ahead (cuda_ext.decode times both).
  static DecodeKernels table(const char* isa, bool prefetch) {
    return {isa, prefetch, prefetch ? &matvec<true> : &matvec<false>, prefetch ? &panel_product<true> : &panel_product<false>,
            &act_mul<&Kernels::silu_mul>, &act_mul<&Kernels::gelu_tanh_mul>, &attend};
  }

  // -- Products over panel-packed weights (decode_kernels_api.h: kPanel) --------------------------
  // A pass covers kGroupVecs vectors of outputs (64 outputs, four panels, on AVX-512; 16, one panel, on AVX2)
  // for up to kPanelTokens tokens: per k, the group's weights are one vector load from each panel, each token's
  // x[k] a broadcast, and each load feeds several FMAs (no horizontal sums). On AVX-512 four vectors by 6 tokens
  // beat two by 12 (bench/products.py, 2026-12-06: 221 tokens 168 vs 184 ms): fewer loads per FMA.
  static constexpr int kGroupVecs = L == 16 ? 4 : 2;
  static constexpr int kGroup = kGroupVecs * L;
  static constexpr int kPanelTokens = 6;  // accumulators: 24 of 32 registers (AVX-512), 12 of 16 (AVX2)
  static constexpr int64_t kTokenBlock = 96;

  // acc[v][n] = Σ_i w(group vector v)[i] · x[n, i] for NB tokens; w: the group's first panel.
  template <bool Prefetch, int VW, int NB>
  static void panel_block(const float* w, int64_t k, const float* x, V acc[kGroupVecs][kPanelTokens]) {
    for (int v = 0; v < VW; ++v)
      for (int n = 0; n < NB; ++n) acc[v][n] = V::zero();
    const int64_t panel = k * kPanel;
    for (int64_t i = 0; i < k; ++i) {
      V wv[VW];
      for (int v = 0; v < VW; ++v) {
        const float* at = w + (v * L / kPanel) * panel + i * kPanel + (v * L) % kPanel;
        if constexpr (Prefetch) {
          if ((v * L) % kPanel == 0) _mm_prefetch(reinterpret_cast<const char*>(at + kAhead), _MM_HINT_T0);
        }
        wv[v] = V::load(at);
      }
      for (int n = 0; n < NB; ++n) {
        const V xn = V::set1(x[n * k + i]);
        for (int v = 0; v < VW; ++v) acc[v][n] = V::fma(wv[v], xn, acc[v][n]);
      }
    }
  }

  template <bool Prefetch, int VW, int T>
  static void panel_tokens(int64_t nb, const float* w, int64_t k, const float* x, V acc[kGroupVecs][kPanelTokens]) {
    if constexpr (T > 1) {
      if (nb < T) return panel_tokens<Prefetch, VW, T - 1>(nb, w, k, x, acc);
    }
    panel_block<Prefetch, VW, T>(w, k, x, acc);
  }

  // Outputs m … min(m + VW·L, end) - 1 for tokens n_lo … n_hi - 1.
  template <bool Prefetch, int VW>
  static void panel_group(const MatvecArgs& a, int64_t m, int64_t end, int64_t n_lo, int64_t n_hi) {
    const float* w = a.w + (m / kPanel) * a.k * kPanel;
    for (int64_t n0 = n_lo; n0 < n_hi; n0 += kPanelTokens) {
      const int64_t nb = n_hi - n0 < kPanelTokens ? n_hi - n0 : kPanelTokens;
      V acc[kGroupVecs][kPanelTokens];
      panel_tokens<Prefetch, VW, kPanelTokens>(nb, w, a.k, a.x + n0 * a.k, acc);
      for (int64_t n = 0; n < nb; ++n) {
        for (int v = 0; v < VW; ++v) {
          const int64_t first = m + v * L, width = end - first < L ? end - first : L;
          if (width <= 0) break;
          const int64_t at = (n0 + n) * a.ld + first;
          V y = acc[v][n];
          if (width == L) {
            if (a.bias != nullptr) y = y + V::load(a.bias + first);
            if (a.residual != nullptr) y = y + V::load(a.residual + at);
            y.store(a.y + at);
          } else {
            if (a.bias != nullptr) y = y + V::load_first(a.bias + first, width);
            if (a.residual != nullptr) y = y + V::load_first(a.residual + at, width);
            y.store_first(a.y + at, width);
          }
        }
      }
    }
  }

  // Outputs m0 … m1-1 (m0 a multiple of kPanel) of a product over panel-packed weights. Many tokens
  // go kTokenBlock at a time, each block over all the outputs, so the block's x stays in L2 while
  // the weights stream past it (a prompt's 512 tokens of x at K = 1536 are 3 MB).
  template <bool Prefetch>
  static void panel_product(const MatvecArgs& a, int64_t m0, int64_t m1) {
    for (int64_t n_lo = 0; n_lo < a.rows; n_lo += kTokenBlock) {
      const int64_t n_hi = a.rows - n_lo < kTokenBlock ? a.rows : n_lo + kTokenBlock;
      for (int64_t m = m0; m < m1; m += kGroup) {
        const int64_t end = m1 - m < kGroup ? m1 : m + kGroup, vecs = (end - m + L - 1) / L;
        if constexpr (kGroupVecs >= 4) {
          if (vecs == 4) { panel_group<Prefetch, 4>(a, m, end, n_lo, n_hi); continue; }
          if (vecs == 3) { panel_group<Prefetch, 3>(a, m, end, n_lo, n_hi); continue; }
        }
        if (vecs >= 2) {
          panel_group<Prefetch, 2>(a, m, end, n_lo, n_hi);
        } else {
          panel_group<Prefetch, 1>(a, m, end, n_lo, n_hi);
        }
      }
    }
  }

  // out[r][n] = w[r, :] · x[n, :] for R rows of w and NB tokens of x.
  template <bool Prefetch, int R, int NB>
  static void dot_block(const float* w, int64_t k, const float* x, float out[kRows][kWideTokens]) {
    V acc[R][NB];
    for (int r = 0; r < R; ++r)
      for (int n = 0; n < NB; ++n) acc[r][n] = V::zero();
    int64_t i = 0;
    for (; i + L <= k; i += L) {
      V xs[NB];
      for (int n = 0; n < NB; ++n) xs[n] = V::load(x + n * k + i);
      for (int r = 0; r < R; ++r) {
        // On the Intel Xeon measured, the hardware prefetcher alone left this single-stream-per-row
        // loop short of the bandwidth a core can draw, and asking for the line 4 KiB ahead kept more
        // misses in flight; on the AMD EPYC measured, the same requests cost 7–15% of the stream.
        if constexpr (Prefetch) _mm_prefetch(reinterpret_cast<const char*>(w + r * k + i + kAhead), _MM_HINT_T0);
        const V wv = V::load(w + r * k + i);
        for (int n = 0; n < NB; ++n) acc[r][n] = V::fma(wv, xs[n], acc[r][n]);
      }
    }
    if (i < k) {
      V xs[NB];
      for (int n = 0; n < NB; ++n) xs[n] = V::load_first(x + n * k + i, k - i);
      for (int r = 0; r < R; ++r) {
        const V wv = V::load_first(w + r * k + i, k - i);
        for (int n = 0; n < NB; ++n) acc[r][n] = V::fma(wv, xs[n], acc[r][n]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int n = 0; n < NB; ++n) out[r][n] = acc[r][n].sum();
  }

  // dot_block<R, nb> for the nb ≤ T tokens left in a pass.
  template <bool Prefetch, int R, int T>
  static void dot_tokens(int64_t nb, const float* w, int64_t k, const float* x, float out[kRows][kWideTokens]) {
    if constexpr (T > 1) {
      if (nb < T) return dot_tokens<Prefetch, R, T - 1>(nb, w, k, x, out);
    }
    dot_block<Prefetch, R, T>(w, k, x, out);
  }

  // Rows m … m+R-1 of y for every token, T at a time.
  template <bool Prefetch, int R, int T>
  static void row_block(const MatvecArgs& a, int64_t m) {
    const float* w = a.w + m * a.k;
    for (int64_t n0 = 0; n0 < a.rows; n0 += T) {
      float out[kRows][kWideTokens];
      const int64_t nb = a.rows - n0 < T ? a.rows - n0 : T;
      dot_tokens<Prefetch, R, T>(nb, w, a.k, a.x + n0 * a.k, out);
      for (int64_t n = 0; n < nb; ++n) {
        for (int r = 0; r < R; ++r) {
          const int64_t at = (n0 + n) * a.ld + m + r;
          float y = out[r][n];
          if (a.bias != nullptr) y += a.bias[m + r];
          if (a.residual != nullptr) y += a.residual[at];
          a.y[at] = y;
        }
      }
    }
  }

  template <bool Prefetch, int R, int T>
  static void rows_in_blocks(const MatvecArgs& a, int64_t m0, int64_t m1) {
    int64_t m = m0;
    for (; m + R <= m1; m += R) row_block<Prefetch, R, T>(a, m);
    for (; m < m1; ++m) row_block<Prefetch, 1, T>(a, m);
  }

  template <bool Prefetch>
  static void matvec(const MatvecArgs& a, int64_t m0, int64_t m1) {
    if (a.rows > kTokens && kWideTokens > kTokens) return rows_in_blocks<Prefetch, 2, kWideTokens>(a, m0, m1);
    rows_in_blocks<Prefetch, kRows, kTokens>(a, m0, m1);
  }

  // e^x to about 1 ulp (Cephes' expf: e^x = 2^n · e^r, |r| ≤ ln2/2, a degree-6 polynomial).
  // Clamped to [-87.3, 88.7], so e^-inf comes out as 1e-38, not 0: as a softmax weight
  // beside the maximum's 1 that is 0 in float32 arithmetic.
  static V exp(V x) {
    x = V::min(V::max(x, V::set1(-87.3f)), V::set1(88.7f));
    const V n = V::round(x * V::set1(1.44269504088896341f));
    V r = V::fma(n, V::set1(-0.693359375f), x);  // ln 2 in two parts: n · ln2 without rounding error
    r = V::fma(n, V::set1(2.12194440e-4f), r);
    V p = V::set1(1.9875691500e-4f);
    p = V::fma(p, r, V::set1(1.3981999507e-3f));
    p = V::fma(p, r, V::set1(8.3334519073e-3f));
    p = V::fma(p, r, V::set1(4.1665795894e-2f));
    p = V::fma(p, r, V::set1(1.6666665459e-1f));
    p = V::fma(p, r, V::set1(5.0000001201e-1f));
    p = V::fma(p * r, r, r + V::set1(1.0f));
    return V::scale_pow2(p, n);
  }

  static V silu_mul(V g, V u) { return g / (V::set1(1.0f) + exp(V::zero() - g)) * u; }

  // tanh-approximated GELU, ½g(1 + tanh(z)) with z = √(2/π)(g + 0.044715 g³), written as
  // g / (1 + e^(-2z)): the same value, one exp and no tanh.
  static V gelu_tanh_mul(V g, V u) {
    const V z2 = g * V::fma(g * g, V::set1(2.0f * 0.7978845608028654f * 0.044715f), V::set1(2.0f * 0.7978845608028654f));
    return g / (V::set1(1.0f) + exp(V::zero() - z2)) * u;
  }

  // out[i] = act(gate[i]) · up[i] for i < count; act(gate[i]) where up is null.
  template <V (*Act)(V, V)>
  static void act_mul(const float* gate, const float* up, float* out, int64_t count) {
    const V one = V::set1(1.0f);
    int64_t i = 0;
    for (; i + L <= count; i += L) Act(V::load(gate + i), up != nullptr ? V::load(up + i) : one).store(out + i);
    if (i < count) {
      const V u = up != nullptr ? V::load_first(up + i, count - i) : one;
      Act(V::load_first(gate + i, count - i), u).store_first(out + i, count - i);
    }
  }

  static float dot(const float* a, const float* b, int64_t n) {
    V acc = V::zero();
    int64_t i = 0;
    for (; i + L <= n; i += L) acc = V::fma(V::load(a + i), V::load(b + i), acc);
    if (i < n) acc = V::fma(V::load_first(a + i, n - i), V::load_first(b + i, n - i), acc);
    return acc.sum();
  }

  // s[0 … T-1] → softmax(s) in place; *max_out = max(s), *sum_out = Σ e^(s - max).
  static void softmax(float* s, int64_t t, float* max_out, float* sum_out) {
    V top = V::set1(-3.0e38f);
    int64_t i = 0;
    for (; i + L <= t; i += L) top = V::max(top, V::load(s + i));
    float m = top.max_lane();
    for (; i < t; ++i) m = s[i] > m ? s[i] : m;
    const V mv = V::set1(m);
    V total = V::zero();
    for (i = 0; i + L <= t; i += L) {
      const V e = exp(V::load(s + i) - mv);
      e.store(s + i);
      total = total + e;
    }
    if (i < t) {
      const V e = exp(V::load_first(s + i, t - i) - mv);
      e.store_first(s + i, t - i);
      total = total + V::load_first(s + i, t - i);  // e's lanes past t are e^(0 - max), not 0
    }
    *max_out = m;
    *sum_out = total.sum();
    const V inv = V::set1(1.0f / *sum_out);
    for (i = 0; i + L <= t; i += L) (V::load(s + i) * inv).store(s + i);
    if (i < t) (V::load_first(s + i, t - i) * inv).store_first(s + i, t - i);
  }

  static void attend(const AttendArgs& a) {
    const int64_t t = a.keys, hd = a.head_dim;
    for (int64_t j = 0; j < a.group; ++j) {
      float* s = a.scores + j * t;
      for (int64_t p = 0; p < t; ++p) s[p] = dot(a.q + j * hd, a.k + p * hd, hd) + (a.mask != nullptr ? a.mask[p] : 0.0f);
      softmax(s, t, a.max + j, a.sum + j);
    }
    // out[j] = Σ_p s[j, p] · v[p], 4 vectors of the head at a time in registers.
    for (int64_t j = 0; j < a.group; ++j) {
      const float* s = a.scores + j * t;
      float* out = a.out + j * hd;
      for (int64_t c = 0; c < hd; c += 4 * L) {
        const int64_t width = hd - c < 4 * L ? hd - c : 4 * L;
        V acc[4] = {V::zero(), V::zero(), V::zero(), V::zero()};
        for (int64_t p = 0; p < t; ++p) {
          const V weight = V::set1(s[p]);
          const float* v = a.v + p * hd + c;
          for (int u = 0; u < 4; ++u) {
            const int64_t left = width - u * L;
            if (left >= L) acc[u] = V::fma(weight, V::load(v + u * L), acc[u]);
            else if (left > 0) acc[u] = V::fma(weight, V::load_first(v + u * L, left), acc[u]);
          }
        }
        for (int u = 0; u < 4; ++u) {
          const int64_t left = width - u * L;
          if (left >= L) acc[u].store(out + c + u * L);
          else if (left > 0) acc[u].store_first(out + c + u * L, left);
        }
      }
    }
  }
};

}  // namespace vlmq
