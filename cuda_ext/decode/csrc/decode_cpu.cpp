// The CPU decode step of a Llama-style layer as one torch op, the matrix-vector product
// alone (the LM head), and the gated activation in place (the vision towers' MLPs).
// Batch-1 decoding reads every weight once per token, so its
// speed is memory bandwidth; eager PyTorch spends ~35 ops per layer around the four
// weight reads, each with dispatch overhead while memory idles. Here a layer is the four
// products (decode_kernels.h, split over torch's threads) with the small steps between
// them (norms, RoPE, the KV-cache write, attention over the cache) done in place.
//
// The torch reference is `generator_service.models.decoder.DecoderLayer`'s own decode path (the test oracle);
// the semantics are its: interleaved RoPE pairs, the softmax scale folded into Q's rows,
// token n's keys read through row n of a block table (the paged cache), an additive mask where
// rows see different prefixes.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "decode_kernels_api.h"

namespace vlmq {

float* widen_scratch(int64_t values) {
  thread_local std::vector<float> scratch;
  if (static_cast<int64_t>(scratch.size()) < values) scratch.resize(values);
  return scratch.data();
}

namespace {

// Rows of a product per unit of work split between threads: 16 floats of y, one cache line.
constexpr int64_t kRowUnit = 16;
// The least work worth a thread hand-off, in bytes streamed (weights; the KV cache for
// attention). at::parallel_for hands work to a second thread only when the whole exceeds one
// grain, so each thread streams at least half of it. A grain of rows instead sent every product
// of a tiny model to both threads, a few µs of work per hand-off; where busy threads outnumber
// cores (two workers of 2 threads on 2 cores) a hand-off waits for a descheduled thread, and
// demo-size decode steps took 64 ms at the 99th percentile instead of 0.1 ms.
constexpr int64_t kGrainBytes = 256 * 1024;

// The grain for at::parallel_for over units of unit_bytes each.
int64_t grain(int64_t unit_bytes) {
  return unit_bytes <= 0 ? 1 : std::max<int64_t>(1, (kGrainBytes + unit_bytes - 1) / unit_bytes);
}

const DecodeKernels* best_kernels(bool prefetch) {
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")) return &decode_kernels_avx512(prefetch);
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return &decode_kernels_avx2(prefetch);
  return nullptr;
}

const DecodeKernels* g_kernels = best_kernels(true);  // cuda_ext.decode times the products without prefetching too

const DecodeKernels& kernels() {
  TORCH_CHECK(g_kernels != nullptr, "the CPU decode kernels need AVX2 and FMA; this CPU has neither AVX2 nor AVX-512");
  return *g_kernels;
}

// Rows [0, M) of a product split into per-thread contiguous ranges (each thread streams one
// region of the weight), row_bytes of weight per row; body(m0, m1).
template <class Body>
void parallel_rows(int64_t m, int64_t row_bytes, const Body& body) {
  at::parallel_for(0, (m + kRowUnit - 1) / kRowUnit, grain(kRowUnit * row_bytes), [&](int64_t u0, int64_t u1) {
    body(u0 * kRowUnit, std::min(u1 * kRowUnit, m));
  });
}

void matvec_parallel(const MatvecArgs& args, int64_t m) {
  const DecodeKernels& k = kernels();
  parallel_rows(m, args.k * static_cast<int64_t>(sizeof(float)), [&](int64_t m0, int64_t m1) { k.matvec(args, m0, m1); });
}

int64_t value_bytes(WeightType type) { return type == WeightType::kFloat32 ? 4 : 2; }

// y = x wᵀ (+ bias) (+ residual) for the M outputs of a panel-packed w, split between threads.
void panel_product(const MatvecArgs& args, int64_t m) {
  const DecodeKernels& k = kernels();
  parallel_rows(m, args.k * value_bytes(args.w_type), [&](int64_t m0, int64_t m1) { k.panel_product(args, m0, m1); });
}

// y[n] = x[n] / rms(x[n]) · w, as F.rms_norm (the sum of squares in double: no order to match).
void rms_norm(const float* x, const float* w, int64_t rows, int64_t d, double eps, float* y) {
  for (int64_t n = 0; n < rows; ++n) {
    const float* xn = x + n * d;
    double squares = 0;
    for (int64_t i = 0; i < d; ++i) squares += static_cast<double>(xn[i]) * xn[i];
    const float inv = static_cast<float>(1.0 / std::sqrt(squares / static_cast<double>(d) + eps));
    for (int64_t i = 0; i < d; ++i) y[n * d + i] = xn[i] * inv * w[i];
  }
}

// y = residual + rms_norm(z) · w, row by row; z is normed in place.
void add_norm(const float* residual, float* z, const float* w, int64_t rows, int64_t d, double eps, float* y) {
  rms_norm(z, w, rows, d, eps, z);
  for (int64_t i = 0; i < rows * d; ++i) y[i] = residual[i] + z[i];
}

// Keys per unit of attention work: a KV head's cache is split into chunks of at most this many
// positions, attended separately (on any thread) and merged, so that one sequence's few KV heads
// keep both threads streaming (three heads on two threads left one idle a third of the time). 128
// keys of K and V at hd 64 are 64 KB: they stay in L1/L2 while the kernel's passes reread them. A
// chunk spans blocks (the kernel walks the block table): chunks of one 16-position block each made
// the per-chunk work (softmax, merge) cost more than the keys' (decode with 800 keys ran at half the
// memory bandwidth its KV reads needed).
constexpr int64_t kKeysPerChunk = 128;

int64_t key_chunks(int64_t kv_len) { return (kv_len + kKeysPerChunk - 1) / kKeysPerChunk; }

// attn[n, heads of KV head g] = softmax(q kᵀ + mask) v over the first kv_len positions of row n's
// blocks (table: [N, width], blocks of block_size positions), for N tokens × Hkv KV heads, each
// head's keys in chunks. chunk_out holds, per chunk and query head, the chunk's softmax-weighted
// values [hd], then its max score and Σ e^(score - max); a chunk whose keys are all masked
// (another row's longer prefix, a sliding window) is skipped.
void attend_cache(const DecodeKernels& k, const float* qkv, int64_t qkv_size, const float* kc, const float* vc,
                  const float* mask, const int64_t* table, int64_t width, int64_t rows, int64_t hkv, int64_t group,
                  int64_t block_size, int64_t hd, int64_t kv_len, float* scores, float* chunk_out, float* attn) {
  const int64_t chunks = key_chunks(kv_len), q_size = hkv * group * hd;
  const int64_t stride = group * (hd + 2);  // chunk_out floats per chunk
  const int64_t chunk_bytes = 2 * std::min(kv_len, kKeysPerChunk) * hd * static_cast<int64_t>(sizeof(float));
  at::parallel_for(0, rows * hkv * chunks, grain(chunk_bytes), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t head = i / chunks, c = i % chunks, n = head / hkv, g = head % hkv;
      const int64_t first = c * kKeysPerChunk, keys = std::min(kKeysPerChunk, kv_len - first);
      const float* m = mask != nullptr ? mask + n * kv_len + first : nullptr;
      float* part = chunk_out + i * stride;
      float* sums = part + group * (hd + 1);
      if (m != nullptr && std::all_of(m, m + keys, [](float v) { return std::isinf(v); })) {
        std::fill_n(sums, group, 0.0f);
        continue;
      }
      const int64_t head_at = g * block_size * hd;  // KV head g of block 0: the cache is [blocks, Hkv, bs, hd]
      k.attend({qkv + n * qkv_size + g * group * hd, kc + head_at, vc + head_at, table + n * width + first / block_size,
                hkv * block_size * hd, block_size, first % block_size, m, keys, group, hd,
                scores + head * group * kv_len + first * group, part, part + group * hd, sums});
    }
  });
  // Merge each head's chunks: Σ_c w_c out_c / Σ_c w_c, w_c = sum_c · e^(max_c - max).
  for (int64_t head = 0; head < rows * hkv; ++head) {
    const float* base = chunk_out + head * chunks * stride;
    for (int64_t j = 0; j < group; ++j) {
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < chunks; ++c) {
        const float* stats = base + c * stride + group * hd;  // [group] maxima, then [group] sums
        if (stats[group + j] > 0) top = std::max(top, stats[j]);
      }
      float* out = attn + (head / hkv) * q_size + ((head % hkv) * group + j) * hd;
      std::fill_n(out, hd, 0.0f);
      float total = 0;
      for (int64_t c = 0; c < chunks; ++c) {
        const float* part = base + c * stride;
        const float* stats = part + group * hd;
        if (stats[group + j] <= 0) continue;  // skipped: every key masked
        const float w = stats[group + j] * std::exp(stats[j] - top);
        total += w;
        for (int64_t e = 0; e < hd; ++e) out[e] += w * part[j * hd + e];
      }
      for (int64_t e = 0; e < hd; ++e) out[e] /= total;
    }
  }
}

void check_float(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == dim, name,
              " must be a contiguous float32 CPU tensor of ", dim, " dimensions, got ", t.scalar_type(), " ", t.sizes(),
              " on ", t.device());
}

void check_weight(const at::Tensor& w, const char* name, int64_t rows, int64_t cols) {
  check_float(w, name, 2);
  TORCH_CHECK(w.size(0) == rows && w.size(1) == cols, name, " must be [", rows, ", ", cols, "], got ", w.sizes());
}

// w: a [rows, cols] weight panel-packed (decode_kernels_api.h), [ceil(rows / kPanel), cols, kPanel], in float32,
// bfloat16 or float16; returns its type.
WeightType check_panels(const at::Tensor& w, const char* name, int64_t rows, int64_t cols) {
  const auto type = w.scalar_type();
  TORCH_CHECK(w.device().is_cpu() && (type == at::kFloat || type == at::kBFloat16 || type == at::kHalf) && w.is_contiguous() &&
                  w.dim() == 3,
              name, " must be contiguous float32, bfloat16 or float16 CPU panels of 3 dimensions, got ", type, " ", w.sizes(),
              " on ", w.device());
  const int64_t panels = (rows + kPanel - 1) / kPanel;
  TORCH_CHECK(w.size(0) == panels && w.size(1) == cols && w.size(2) == kPanel, name, " must be [", rows, ", ", cols,
              "] in panels, [", panels, ", ", cols, ", ", kPanel, "], got ", w.sizes());
  return type == at::kFloat ? WeightType::kFloat32 : type == at::kBFloat16 ? WeightType::kBFloat16 : WeightType::kFloat16;
}

// k/v_cache: float32 [blocks, Hkv, bs, hd], one shape.
void check_caches(const at::Tensor& k_cache, const at::Tensor& v_cache) {
  check_float(k_cache, "k_cache", 4);
  check_float(v_cache, "v_cache", 4);
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "k_cache and v_cache must have one shape, got ", k_cache.sizes(), " and ",
              v_cache.sizes());
}

// block_table: Long[N, width] naming blocks of a cache of num_blocks, covering kv_len positions; mask: None or
// [N, 1, 1, kv_len] float.
void check_table(const at::Tensor& block_table, int64_t rows, int64_t num_blocks, int64_t block_size, int64_t kv_len,
                 const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(block_table.scalar_type() == at::kLong && block_table.is_contiguous() && block_table.dim() == 2 &&
                  block_table.size(0) == rows,
              "block_table must be Long[N, width], got ", block_table.scalar_type(), " ", block_table.sizes());
  const int64_t width = block_table.size(1);
  TORCH_CHECK(0 < kv_len && kv_len <= width * block_size, "kv_len ", kv_len, " outside the block tables' 1 … ",
              width * block_size);
  const int64_t* table = block_table.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows * width; ++i) {
    TORCH_CHECK(0 <= table[i] && table[i] < num_blocks, "block_table names block ", table[i], " of a cache of ", num_blocks);
  }
  if (mask.has_value()) {
    check_float(*mask, "mask", 4);
    TORCH_CHECK(mask->numel() == rows * kv_len, "mask must be [N, 1, 1, kv_len], got ", mask->sizes());
  }
}

// x: [N, K], w: [M, K] → x wᵀ: [N, M].
at::Tensor linear(const at::Tensor& x, const at::Tensor& w) {
  check_float(x, "x", 2);
  check_weight(w, "w", w.size(0), x.size(1));
  const int64_t rows = x.size(0), m = w.size(0);
  at::Tensor y = at::empty({rows, m}, x.options());
  matvec_parallel({w.data_ptr<float>(), x.size(1), x.data_ptr<float>(), rows, nullptr, nullptr, y.data_ptr<float>(), m}, m);
  return y;
}

// x: [N, K], w: [ceil(M / kPanel), K, kPanel] panel-packed → x wᵀ (+ bias) (+ residual): [N, M].
at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& w, int64_t m, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& residual) {
  check_float(x, "x", 2);
  const int64_t rows = x.size(0), k = x.size(1);
  const WeightType w_type = check_panels(w, "w", m, k);
  if (bias) {
    check_float(*bias, "bias", 1);
    TORCH_CHECK(bias->size(0) == m, "bias must be [", m, "], got ", bias->sizes());
  }
  if (residual) {
    check_float(*residual, "residual", 2);
    TORCH_CHECK(residual->size(0) == rows && residual->size(1) == m, "residual must be [", rows, ", ", m, "], got ", residual->sizes());
  }
  at::Tensor y = at::empty({rows, m}, x.options());
  const MatvecArgs args{w.data_ptr(), k, x.data_ptr<float>(), rows, bias ? bias->data_ptr<float>() : nullptr,
                        residual ? residual->data_ptr<float>() : nullptr, y.data_ptr<float>(), m, w_type};
  panel_product(args, m);
  return y;
}

using ActMul = void (*)(const float* gate, const float* up, float* out, int64_t count);

ActMul act_mul_kernel(const DecodeKernels& k, const std::string& act) {
  if (act == "silu") return k.silu_mul;
  if (act == "gelu_tanh") return k.gelu_tanh_mul;
  TORCH_CHECK(false, "unknown activation \"", act, "\": expected \"silu\" or \"gelu_tanh\"");
}

// x = act(x) · up (act(x) without up), in place: the activation after a vision tower's GEMM
// (embedder_service.models.clip), one pass where torch's silu and tanh GELU take one and a product another.
at::Tensor& activation_(at::Tensor& x, const std::optional<at::Tensor>& up, const std::string& act) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "activation_: x must be contiguous float32");
  TORCH_CHECK(!up || (up->scalar_type() == at::kFloat && up->is_contiguous() && up->sizes() == x.sizes()),
              "activation_: up must be contiguous float32 of x's shape");
  const ActMul act_mul = act_mul_kernel(kernels(), act);
  float* data = x.data_ptr<float>();
  const float* up_data = up ? up->data_ptr<float>() : nullptr;
  constexpr int64_t kUnit = 4096;  // floats per unit of work: 16 KB
  const int64_t count = x.numel();
  const int64_t unit_bytes = kUnit * static_cast<int64_t>(sizeof(float)) * (up ? 2 : 1);
  at::parallel_for(0, (count + kUnit - 1) / kUnit, grain(unit_bytes), [&](int64_t u0, int64_t u1) {
    const int64_t i0 = u0 * kUnit, i1 = std::min(u1 * kUnit, count);
    act_mul(data + i0, up_data != nullptr ? up_data + i0 : nullptr, data + i0, i1 - i0);
  });
  return x;
}

// One decode step of a pre-norm Llama layer for N tokens, token n in cache row n:
//   x += o(attention(rope(qkv(norm1(x))))), then x += down(silu(gate(h)) · up(h)), h = norm2(x).
// Gemma 3's layer is the same with three options: qk_scale ([H + Hkv, hd]: an RMSNorm over each
// head of Q and K before RoPE, scaled by these rows, the softmax scale in Q's), attn_out_norm and
// mlp_out_norm (each output normed before its residual add), and act "gelu_tanh" (GeGLU).
// x: [N, D]; the weights panel-packed (decode_kernels_api.h): wqkv [(H + 2 Hkv) hd, D] (Q rows scaled and
// RoPE-interleaved), bqkv: [(H + 2 Hkv) hd] or None; wo: [D, H hd]; w_gate_up: [2I, D] (gate rows, then up
// rows); w_down: [D, I]; k/v_cache: [blocks, Hkv, bs, hd],
// written at write_index (Long[N · Hkv], flat rows of the cache viewed as [blocks · Hkv · bs, hd]);
// rotations: [N, 1, hd/2] complex64; token n attends over the first kv_len positions of row n of
// block_table (Long[N, width]: position p in block table[n, p / bs] at offset p % bs), plus mask
// [N, 1, 1, kv_len] (0 / -inf) when rows differ. Returns the new x: [N, D].
at::Tensor decode_layer(const at::Tensor& x, const at::Tensor& input_norm, const at::Tensor& wqkv,
                        const std::optional<at::Tensor>& bqkv, const at::Tensor& wo, const at::Tensor& post_norm,
                        const at::Tensor& w_gate_up, const at::Tensor& w_down, at::Tensor& k_cache, at::Tensor& v_cache,
                        const at::Tensor& rotations, const at::Tensor& write_index, const at::Tensor& block_table, int64_t kv_len,
                        const std::optional<at::Tensor>& mask, double eps, const std::optional<at::Tensor>& qk_scale,
                        const std::optional<at::Tensor>& attn_out_norm, const std::optional<at::Tensor>& mlp_out_norm,
                        const std::string& act) {
  check_float(x, "x", 2);
  check_caches(k_cache, v_cache);
  const int64_t rows = x.size(0), d = x.size(1);
  const int64_t num_blocks = k_cache.size(0), hkv = k_cache.size(1), block_size = k_cache.size(2), hd = k_cache.size(3);
  TORCH_CHECK(wo.dim() == 3 && wo.size(1) % hd == 0, "wo must be [D, H hd] in panels, got ", wo.sizes());
  const int64_t heads = wo.size(1) / hd, q_size = heads * hd, kv_size = hkv * hd, qkv_size = q_size + 2 * kv_size;
  TORCH_CHECK(heads % hkv == 0 && heads > 0, heads, " query heads are not a multiple of ", hkv, " KV heads");
  TORCH_CHECK(w_down.dim() == 3, "w_down must be [D, I] in panels, got ", w_down.sizes());
  const int64_t inter = w_down.size(1);
  const WeightType wqkv_type = check_panels(wqkv, "wqkv", qkv_size, d), wo_type = check_panels(wo, "wo", d, q_size);
  const WeightType gate_up_type = check_panels(w_gate_up, "w_gate_up", 2 * inter, d);
  const WeightType down_type = check_panels(w_down, "w_down", d, inter);
  check_float(input_norm, "input_norm", 1);
  check_float(post_norm, "post_norm", 1);
  TORCH_CHECK(input_norm.size(0) == d && post_norm.size(0) == d, "norm weights must be [", d, "]");
  for (const auto* norm : {&attn_out_norm, &mlp_out_norm}) {
    if (norm->has_value()) {
      check_float(**norm, "attn_out_norm and mlp_out_norm", 1);
      TORCH_CHECK((*norm)->size(0) == d, "attn_out_norm and mlp_out_norm must be [", d, "], got ", (*norm)->sizes());
    }
  }
  if (bqkv.has_value()) {
    check_float(*bqkv, "bqkv", 1);
    TORCH_CHECK(bqkv->size(0) == qkv_size, "bqkv must be [", qkv_size, "], got ", bqkv->sizes());
  }
  check_table(block_table, rows, num_blocks, block_size, kv_len, mask);
  const int64_t width = block_table.size(1);
  const int64_t* table = block_table.data_ptr<int64_t>();
  TORCH_CHECK(rotations.scalar_type() == at::kComplexFloat && rotations.is_contiguous() && rotations.numel() == rows * hd / 2,
              "rotations must be contiguous complex64 [N, 1, hd/2], got ", rotations.scalar_type(), " ", rotations.sizes());
  TORCH_CHECK(write_index.scalar_type() == at::kLong && write_index.is_contiguous() && write_index.numel() == rows * hkv,
              "write_index must be Long[N · Hkv], got ", write_index.scalar_type(), " ", write_index.sizes());
  const int64_t* where = write_index.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows * hkv; ++i) {
    TORCH_CHECK(0 <= where[i] && where[i] < num_blocks * hkv * block_size, "write_index ", where[i], " outside the cache");
  }

  if (qk_scale.has_value()) {
    check_weight(*qk_scale, "qk_scale", heads + hkv, hd);
  }
  const int64_t group = heads / hkv;
  // One scratch buffer per calling thread (the engine's), reused across layers and steps.
  thread_local std::vector<float> scratch;
  const int64_t sizes[] = {rows * d, rows * qkv_size, rows * q_size, rows * d, rows * 2 * inter, rows * inter,
                           rows * hkv * group * kv_len,
                           rows * hkv * key_chunks(kv_len) * group * (hd + 2)};
  int64_t total = 0;
  for (int64_t s : sizes) total += s;
  if (static_cast<int64_t>(scratch.size()) < total) scratch.resize(total);
  float* h = scratch.data();           // [N, D] normed input of each half
  float* qkv = h + sizes[0];           // [N, (H + 2 Hkv) hd]
  float* attn = qkv + sizes[1];        // [N, H hd]
  float* mid = attn + sizes[2];        // [N, D] x after attention
  float* gate_up = mid + sizes[3];     // [N, 2I]
  float* hidden = gate_up + sizes[4];  // [N, I]
  float* scores = hidden + sizes[5];   // [N · Hkv, group, kv_len]
  float* chunk_out = scores + sizes[6];  // [N · Hkv · chunks, group, hd + 2]: see attend_cache
  at::Tensor out = at::empty({rows, d}, x.options());
  const DecodeKernels& k = kernels();
  const ActMul act_mul = act_mul_kernel(k, act);  // an unknown act fails here, before the cache is written

  rms_norm(x.data_ptr<float>(), input_norm.data_ptr<float>(), rows, d, eps, h);
  panel_product({wqkv.data_ptr(), d, h, rows, bqkv ? bqkv->data_ptr<float>() : nullptr, nullptr, qkv, qkv_size, wqkv_type},
                qkv_size);

  // QK-norm if any, RoPE on Q and K (adjacent pairs rotate as complex numbers), then K and V into the cache.
  const float* rot = reinterpret_cast<const float*>(rotations.data_ptr());  // [N, hd/2, (cos, sin)]
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  const float* head_scale = qk_scale ? qk_scale->data_ptr<float>() : nullptr;
  for (int64_t n = 0; n < rows; ++n) {
    float* row = qkv + n * qkv_size;
    const float* rn = rot + n * hd;
    for (int64_t j = 0; j < heads + hkv; ++j) {
      float* head = row + j * hd;
      if (head_scale != nullptr) rms_norm(head, head_scale + j * hd, 1, hd, eps, head);
      for (int64_t p = 0; p < hd / 2; ++p) {
        const float a = head[2 * p], b = head[2 * p + 1], c = rn[2 * p], s = rn[2 * p + 1];
        head[2 * p] = a * c - b * s;
        head[2 * p + 1] = a * s + b * c;
      }
    }
    for (int64_t g = 0; g < hkv; ++g) {
      const int64_t at_row = where[n * hkv + g] * hd;
      std::copy_n(row + q_size + g * hd, hd, kc + at_row);
      std::copy_n(row + q_size + kv_size + g * hd, hd, vc + at_row);
    }
  }

  attend_cache(k, qkv, qkv_size, kc, vc, mask ? mask->data_ptr<float>() : nullptr, table, width, rows, hkv, group, block_size,
               hd, kv_len, scores, chunk_out, attn);
  const float* x_data = x.data_ptr<float>();
  if (attn_out_norm) {  // mid = x + norm(o(attention)), through h (free until the MLP's input norm)
    panel_product({wo.data_ptr(), q_size, attn, rows, nullptr, nullptr, h, d, wo_type}, d);
    add_norm(x_data, h, attn_out_norm->data_ptr<float>(), rows, d, eps, mid);
  } else {
    panel_product({wo.data_ptr(), q_size, attn, rows, nullptr, x_data, mid, d, wo_type}, d);
  }

  rms_norm(mid, post_norm.data_ptr<float>(), rows, d, eps, h);
  const MatvecArgs gate_up_args{w_gate_up.data_ptr(), d, h, rows, nullptr, nullptr, gate_up, 2 * inter, gate_up_type};
  const auto gated = [&](int64_t m0, int64_t m1) {
    for (int64_t n = 0; n < rows; ++n) {
      const float* gn = gate_up + n * 2 * inter;
      act_mul(gn + m0, gn + inter + m0, hidden + n * inter + m0, m1 - m0);
    }
  };
  if (inter % kPanel == 0) {
    // Each thread computes its gate rows and the matching up rows (panel-aligned when I is a multiple of a
    // panel), then their product: no pass in between.
    parallel_rows(inter, 2 * d * value_bytes(gate_up_type), [&](int64_t m0, int64_t m1) {  // a gate row and an up row
      k.panel_product(gate_up_args, m0, m1);
      k.panel_product(gate_up_args, inter + m0, inter + m1);
      gated(m0, m1);
    });
  } else {
    panel_product(gate_up_args, 2 * inter);
    gated(0, inter);
  }
  if (mlp_out_norm) {  // out = mid + norm(down(…)), through h
    panel_product({w_down.data_ptr(), inter, hidden, rows, nullptr, nullptr, h, d, down_type}, d);
    add_norm(mid, h, mlp_out_norm->data_ptr<float>(), rows, d, eps, out.data_ptr<float>());
  } else {
    panel_product({w_down.data_ptr(), inter, hidden, rows, nullptr, mid, out.data_ptr<float>(), d, down_type}, d);
  }
  return out;
}

// Attention of N decode queries over their cached keys (what decode_layer attends, for the torch path's
// decode rows in a step that also prefills): q: [N, H, hd] (RoPE applied, the softmax scale in it);
// k/v_cache: [blocks, Hkv, bs, hd]; block_table, kv_len and mask as decode_layer's → [N, H, hd].
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_table, int64_t kv_len, const std::optional<at::Tensor>& mask) {
  check_float(q, "q", 3);
  check_caches(k_cache, v_cache);
  const int64_t rows = q.size(0), heads = q.size(1), hd = q.size(2);
  const int64_t num_blocks = k_cache.size(0), hkv = k_cache.size(1), block_size = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == hd, "q's head size ", hd, " is not the cache's ", k_cache.size(3));
  TORCH_CHECK(heads % hkv == 0 && heads > 0, heads, " query heads are not a multiple of ", hkv, " KV heads");
  check_table(block_table, rows, num_blocks, block_size, kv_len, mask);
  const int64_t group = heads / hkv;
  thread_local std::vector<float> scratch;  // scores, then the chunks' partial outputs (see attend_cache)
  const int64_t score_size = rows * heads * kv_len;
  const int64_t total = score_size + rows * hkv * key_chunks(kv_len) * group * (hd + 2);
  if (static_cast<int64_t>(scratch.size()) < total) scratch.resize(total);
  at::Tensor out = at::empty(q.sizes(), q.options());
  attend_cache(kernels(), q.data_ptr<float>(), heads * hd, k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
               mask ? mask->data_ptr<float>() : nullptr, block_table.data_ptr<int64_t>(), block_table.size(1), rows, hkv,
               group, block_size, hd, kv_len, scratch.data(), scratch.data() + score_size, out.data_ptr<float>());
  return out;
}

std::string isa() { return g_kernels == nullptr ? "none" : g_kernels->isa; }

// For tests: run the AVX2 kernels on an AVX-512 CPU ("avx2"), or the best this CPU has ("best").
// Returns the instruction set now in use.
std::string use_isa(const std::string& name) {
  const bool prefetch = g_kernels == nullptr || g_kernels->prefetch;
  if (name == "best") {
    g_kernels = best_kernels(prefetch);
  } else if (name == "avx2") {
    TORCH_CHECK(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"),
                "this CPU has no AVX2 + FMA + F16C");
    g_kernels = &decode_kernels_avx2(prefetch);
  } else {
    TORCH_CHECK(false, "use_isa takes \"best\" or \"avx2\", got \"", name, "\"");
  }
  return isa();
}

// Whether the products prefetch weight lines ahead of the hardware prefetcher (which helps on
// some CPUs and costs on others: cuda_ext.decode times both), for the instruction set in use.
// Returns the setting now in use.
bool use_prefetch(bool on) {
  const DecodeKernels& current = kernels();
  g_kernels = current.isa == std::string("avx512") ? &decode_kernels_avx512(on) : &decode_kernels_avx2(on);
  return g_kernels->prefetch;
}

}  // namespace
}  // namespace vlmq

// torch.ops.vlmq_decode_cpu.*
TORCH_LIBRARY(vlmq_decode_cpu, m) {
  m.def("linear(Tensor x, Tensor w) -> Tensor");
  m.def("panel_linear(Tensor x, Tensor w, int m, Tensor? bias=None, Tensor? residual=None) -> Tensor");
  m.def(
      "decode_layer(Tensor x, Tensor input_norm, Tensor wqkv, Tensor? bqkv, Tensor wo, Tensor post_norm, Tensor w_gate_up, "
      "Tensor w_down, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor rotations, Tensor write_index, Tensor block_table, "
      "int kv_len, Tensor? mask, "
      "float eps, Tensor? qk_scale=None, Tensor? attn_out_norm=None, Tensor? mlp_out_norm=None, str act=\"silu\") -> Tensor");
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, int kv_len, Tensor? mask) -> Tensor");
  m.def("activation_(Tensor(a!) x, Tensor? up, str act) -> Tensor(a!)");
  m.def("isa() -> str", &vlmq::isa);  // no tensor arguments: one kernel for every dispatch key
  m.def("use_isa(str name) -> str", &vlmq::use_isa);
  m.def("use_prefetch(bool on) -> bool", &vlmq::use_prefetch);
}

TORCH_LIBRARY_IMPL(vlmq_decode_cpu, CPU, m) {
  m.impl("linear", &vlmq::linear);
  m.impl("panel_linear", &vlmq::panel_linear);
  m.impl("decode_layer", &vlmq::decode_layer);
  m.impl("paged_attention", &vlmq::paged_attention);
  m.impl("activation_", &vlmq::activation_);
}
