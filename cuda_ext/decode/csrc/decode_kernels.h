// The CPU decode kernels, written once over a vector type V (decode_vec512.h,
// decode_vec256.h) and compiled once per instruction set. Everything is a member of the
// class template, so each instruction set's copy is a distinct symbol (no inline function
// shared between files compiled for different CPUs).
//
// Decoding reads every weight once per step for one to a few tokens: the matrix-vector
// products are bound by memory bandwidth, and what matters is streaming the row-major
// weight at the rate memory delivers it while the tokens' activations sit in L1.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

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
  static constexpr int64_t kAheadBytes = 4096;  // prefetch distance in each row

  // prefetch: whether the products ask for each row's line kAheadBytes ahead (cuda_ext.decode times both).
  static DecodeKernels table(const char* isa, bool prefetch) {
    return {isa, prefetch, prefetch ? &matvec<true> : &matvec<false>, prefetch ? &panel_product_typed<true> : &panel_product_typed<false>,
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
  // Tokens past which a product over 16-bit panels widens each group to float32 once (panel_groups); a decode
  // step's few tokens read the 16-bit weights directly, at half the bytes.
  static constexpr int64_t kWidenTokens = 4 * kPanelTokens;

  // acc[v][n] = Σ_i w(group vector v)[i] · x[n, i] for NB tokens; w: the group's first panel, of float32 or a
  // 16-bit type (decode_kernels_api.h), widened as it loads.
  template <bool Prefetch, class W, int VW, int NB, int T>
  static void panel_block(const W* w, int64_t k, const float* x, V (&acc)[VW][T]) {
    for (int v = 0; v < VW; ++v)
      for (int n = 0; n < NB; ++n) acc[v][n] = V::zero();
    const int64_t panel = k * kPanel;
    for (int64_t i = 0; i < k; ++i) {
      V wv[VW];
      for (int v = 0; v < VW; ++v) {
        const W* at = w + (v * L / kPanel) * panel + i * kPanel + (v * L) % kPanel;
        if constexpr (Prefetch) {
          if ((v * L) % kPanel == 0) _mm_prefetch(reinterpret_cast<const char*>(at) + kAheadBytes, _MM_HINT_T0);
        }
        wv[v] = V::load(at);
      }
      for (int n = 0; n < NB; ++n) {
        const V xn = V::set1(x[n * k + i]);
        for (int v = 0; v < VW; ++v) acc[v][n] = V::fma(wv[v], xn, acc[v][n]);
      }
    }
  }

  template <bool Prefetch, class W, int VW, int NB, int T>
  static void panel_tokens(int64_t nb, const W* w, int64_t k, const float* x, V (&acc)[VW][T]) {
    if constexpr (NB > 1) {
      if (nb < NB) return panel_tokens<Prefetch, W, VW, NB - 1, T>(nb, w, k, x, acc);
    }
    panel_block<Prefetch, W, VW, NB, T>(w, k, x, acc);
  }

  // Outputs m … min(m + VW·L, end) - 1 for tokens n_lo … n_hi - 1, T tokens a pass; w: their first panel.
  template <bool Prefetch, class W, int VW, int T>
  static void panel_group(const MatvecArgs& a, const W* w, int64_t m, int64_t end, int64_t n_lo, int64_t n_hi) {
    for (int64_t n0 = n_lo; n0 < n_hi; n0 += T) {
      const int64_t nb = n_hi - n0 < T ? n_hi - n0 : T;
      V acc[VW][T];
      panel_tokens<Prefetch, W, VW, T, T>(nb, w, a.k, a.x + n0 * a.k, acc);
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

  // Outputs m0 … m1-1 for tokens n_lo … n_hi - 1, VW vectors of outputs (fewer at the end) by T tokens a pass.
  template <bool Prefetch, class W, int VW, int T>
  static void panel_groups(const MatvecArgs& a, int64_t m0, int64_t m1, int64_t n_lo, int64_t n_hi) {
    for (int64_t m = m0; m < m1; m += VW * L) {
      const int64_t end = m1 - m < VW * L ? m1 : m + VW * L, vecs = (end - m + L - 1) / L;
      if constexpr (VW > 1) {
        if (vecs < VW) return panel_groups<Prefetch, W, VW - 1, T>(a, m, m1, n_lo, n_hi);
      }
      const W* w = static_cast<const W*>(a.w) + (m / kPanel) * a.k * kPanel;
      if constexpr (!std::is_same_v<W, float>) {
        // Many passes over the group (a prompt's tokens) widen it once, into float32 panels that each pass reads
        // as they are: widened every pass instead, a 221-token prefill ran 7% slower than on float32 weights.
        if (n_hi - n_lo > kWidenTokens) {
          const int64_t values = (VW * L + kPanel - 1) / kPanel * a.k * kPanel;
          float* wide = widen_scratch(values);
          for (int64_t i = 0; i < values; i += L) V::load(w + i).store(wide + i);
          panel_group<Prefetch, float, VW, T>(a, wide, m, end, n_lo, n_hi);
          continue;
        }
      }
      panel_group<Prefetch, W, VW, T>(a, w, m, end, n_lo, n_hi);
    }
  }

  // Bytes of x per token block: a quarter of L2, so that the block stays there beside the weights
  // streaming past it; where the size is unknown, 96 tokens at K = 576.
  static int64_t token_block_bytes() {
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return l2 > 0 ? l2 / 4 : kTokenBlock * 576 * static_cast<int64_t>(sizeof(float));
  }

  // Outputs m0 … m1-1 (m0 a multiple of kPanel) of a product over panel-packed weights. Many tokens
  // go a block at a time, each block over all the outputs, so the block's x stays in L2 while the
  // weights stream past it (a prompt's 512 tokens of x at K = 1536 are 3 MB): as many tokens as
  // token_block_bytes holds, at least kTokenBlock; fewer blocks stream the weights fewer times
  // (bench/products.py, 2026-12-06, Xeon with 2 MB L2: 512 tokens 1.11 → 0.97 × MKL's time, the mean
  // of four alternated runs; 221 tokens 0.94 → 0.88). On AVX-512, 7 or 8
  // tokens (batched decode) go in one pass of three vectors by 8 tokens: a second pass of four vectors
  // by 6 for the last one or two rereads every weight from L2 for little work (bench/products.py).
  template <bool Prefetch, class W>
  static void panel_product(const MatvecArgs& a, int64_t m0, int64_t m1) {
    if (a.rows == 0) return;  // no token: no block size to divide by
    static const int64_t x_bytes = token_block_bytes();
    const int64_t most = std::max<int64_t>(kTokenBlock, x_bytes / (std::max<int64_t>(a.k, 1) * static_cast<int64_t>(sizeof(float))));
    const int64_t blocks = (a.rows + most - 1) / most, block = (a.rows + blocks - 1) / blocks;  // even blocks
    for (int64_t n_lo = 0; n_lo < a.rows; n_lo += block) {
      const int64_t n_hi = a.rows - n_lo < block ? a.rows : n_lo + block;
      if constexpr (kGroupVecs == 4) {
        if (n_hi - n_lo > kPanelTokens && n_hi - n_lo <= 8) {
          panel_groups<Prefetch, W, 3, 8>(a, m0, m1, n_lo, n_hi);
          continue;
        }
      }
      panel_groups<Prefetch, W, kGroupVecs, kPanelTokens>(a, m0, m1, n_lo, n_hi);
    }
  }

  // panel_product over panels of args.w_type.
  template <bool Prefetch>
  static void panel_product_typed(const MatvecArgs& a, int64_t m0, int64_t m1) {
    switch (a.w_type) {
      case WeightType::kFloat32: return panel_product<Prefetch, float>(a, m0, m1);
      case WeightType::kBFloat16: return panel_product<Prefetch, BFloat16>(a, m0, m1);
      case WeightType::kFloat16: return panel_product<Prefetch, Float16>(a, m0, m1);
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
        if constexpr (Prefetch) _mm_prefetch(reinterpret_cast<const char*>(w + r * k + i) + kAheadBytes, _MM_HINT_T0);
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
    const float* w = static_cast<const float*>(a.w) + m * a.k;
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

  // e^x to about 1 ulp (Cephes' expf: e^x = 2^n · e^r, |r| ≤ ln2/2, a degree-6 polynomial), for
  // x ≤ 88.7 (clamped there); 0 below -87.3, where e^x is no longer a normal float: a masked key's
  // softmax weight (e^-inf) must be 0, not 1e-38, whose products with the values are subnormal and
  // cost ~100× an FMA each (a batch whose rows see different lengths decoded at half speed).
  static V exp(V x) {
    const V low = V::set1(-87.3f);
    return V::zero_below(exp_normal(V::min(V::max(x, low), V::set1(88.7f))), x, low);
  }

  static V exp_normal(V x) {
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

  // Calls run(i, n, k, v, next) for each stretch of consecutive keys i … i + n - 1 (one block's, at most):
  // their K rows at k, V rows at v, [n, hd] each; next: the K rows of the block after, null for the last.
  template <class Run>
  static void for_each_run(const AttendArgs& a, const Run& run) {
    int64_t offset = a.first;
    for (int64_t i = 0, b = 0; i < a.keys; ++b) {
      const int64_t n = a.block_size - offset < a.keys - i ? a.block_size - offset : a.keys - i;
      const int64_t at = a.blocks[b] * a.block_stride + offset * a.head_dim;
      const float* next = i + n < a.keys ? a.k + a.blocks[b + 1] * a.block_stride : nullptr;
      run(i, n, a.k + at, a.v + at, next);
      i += n;
      offset = 0;
    }
  }

  // Ask for the hd floats of a row at `row` into L1.
  static void prefetch_row(const float* row, int64_t hd) {
    for (int64_t c = 0; c < hd; c += 64 / static_cast<int64_t>(sizeof(float)))
      _mm_prefetch(reinterpret_cast<const char*>(row + c), _MM_HINT_T0);
  }

  // Query heads per pass over the keys: each key's K (V) row, loaded once, feeds this many heads.
  static constexpr int kHeads = L == 16 ? 4 : 2;
  // Vectors of the head dimension per pass of the weighted sum of V: kHeads × kHeadVecs accumulators.
  static constexpr int kHeadVecs = 4;

  // s[j, i] = q[j] · k[i] (+ mask[i]) for the H query heads from j0, 4 keys at a time: their dot products reduce
  // across lanes 4 at once (Vec::sum4), not one by one (4 rows over 800 keys in L2: 2.8 → 2.4 ms for 30 layers).
  template <int H>
  static void scores(const AttendArgs& a, int64_t j0) {
    const int64_t hd = a.head_dim;
    for_each_run(a, [&](int64_t i0, int64_t n, const float* k, const float* v, const float* next) {
      int64_t i = 0;
      for (; i + 4 <= n; i += 4) score_keys<H, 4>(a, j0, i0 + i, k + i * hd, v + i * hd, next ? next + i * hd : nullptr);
      for (; i < n; ++i) score_keys<H, 1>(a, j0, i0 + i, k + i * hd, v + i * hd, next ? next + i * hd : nullptr);
    });
  }

  // scores for the K keys from key i (K rows at k) and the H heads from j0. Asks for the same keys' V rows (the
  // weighted sum reads them next) and, where `next` is not null, the K rows a block ahead: a block holds
  // 16 keys of a head, 4 KiB apart from the next block's, which the hardware prefetcher did not foresee
  // (decode attention over 800 keys drew 19 GB/s from memory, 33 with these requests; AMD EPYC, 2026-12-07).
  template <int H, int K>
  static void score_keys(const AttendArgs& a, int64_t j0, int64_t i, const float* k, const float* v, const float* next) {
    const int64_t hd = a.head_dim;
    for (int64_t r = 0; r < K; ++r) {
      prefetch_row(v + r * hd, hd);
      if (next != nullptr) prefetch_row(next + r * hd, hd);
    }
    V acc[H][K];
    for (int h = 0; h < H; ++h)
      for (int r = 0; r < K; ++r) acc[h][r] = V::zero();
    for (int64_t c = 0; c < hd; c += L) {
      const int64_t left = hd - c;
      V kv[K];
      for (int r = 0; r < K; ++r) kv[r] = left >= L ? V::load(k + r * hd + c) : V::load_first(k + r * hd + c, left);
      for (int h = 0; h < H; ++h) {
        const float* q = a.q + (j0 + h) * hd + c;
        const V qv = left >= L ? V::load(q) : V::load_first(q, left);
        for (int r = 0; r < K; ++r) acc[h][r] = V::fma(qv, kv[r], acc[h][r]);
      }
    }
    for (int h = 0; h < H; ++h) {
      float* out = a.scores + (j0 + h) * a.keys + i;
      if constexpr (K == 4) {
        V::sum4(acc[h][0], acc[h][1], acc[h][2], acc[h][3], out);
      } else {
        out[0] = acc[h][0].sum();
      }
      if (a.mask != nullptr)
        for (int r = 0; r < K; ++r) out[r] += a.mask[i + r];
    }
  }

  // out[j, c … c + VW·L) = Σ_i s[j, i] · v[i, c …] for the H query heads from j0.
  template <int H, int VW>
  static void weighted_values(const AttendArgs& a, int64_t j0, int64_t c) {
    const int64_t hd = a.head_dim, width = hd - c;
    V acc[H][VW];
    for (int h = 0; h < H; ++h)
      for (int u = 0; u < VW; ++u) acc[h][u] = V::zero();
    for_each_run(a, [&](int64_t i0, int64_t n, const float*, const float* v, const float*) {
      for (int64_t i = 0; i < n; ++i) {
        V vv[VW];
        for (int u = 0; u < VW; ++u) {
          const int64_t left = width - u * L;
          vv[u] = left >= L ? V::load(v + i * hd + c + u * L) : V::load_first(v + i * hd + c + u * L, left);
        }
        for (int h = 0; h < H; ++h) {
          const V weight = V::set1(a.scores[(j0 + h) * a.keys + i0 + i]);
          for (int u = 0; u < VW; ++u) acc[h][u] = V::fma(weight, vv[u], acc[h][u]);
        }
      }
    });
    for (int h = 0; h < H; ++h) {
      for (int u = 0; u < VW; ++u) {
        const int64_t left = width - u * L;
        float* out = a.out + (j0 + h) * hd + c + u * L;
        if (left >= L) acc[h][u].store(out);
        else acc[h][u].store_first(out, left);
      }
    }
  }

  // The heads j0 … j0 + H - 1, H ≤ kHeads.
  template <int H>
  static void attend_heads(const AttendArgs& a, int64_t j0) {
    scores<H>(a, j0);
    for (int h = 0; h < H; ++h) softmax(a.scores + (j0 + h) * a.keys, a.keys, a.max + j0 + h, a.sum + j0 + h);
    for (int64_t c = 0; c < a.head_dim; c += kHeadVecs * L) {
      switch ((a.head_dim - c + L - 1) / L) {
        case 1: weighted_values<H, 1>(a, j0, c); break;
        case 2: weighted_values<H, 2>(a, j0, c); break;
        case 3: weighted_values<H, 3>(a, j0, c); break;
        default: weighted_values<H, kHeadVecs>(a, j0, c);
      }
    }
  }

  template <int H>
  static void attend_tail(const AttendArgs& a, int64_t j0, int64_t left) {
    if constexpr (H > 1) {
      if (left < H) return attend_tail<H - 1>(a, j0, left);
    }
    attend_heads<H>(a, j0);
  }

  // Up to kHeads query heads per pass, so that each key's K and V rows are read once per pass, not once per head.
  static void attend(const AttendArgs& a) {
    for (int64_t j0 = 0; j0 < a.group; j0 += kHeads) attend_tail<kHeads>(a, j0, a.group - j0);
  }
};

}  // namespace vlmq
