// The seam between the CPU decode binding (decode_cpu.cpp: torch, threads, the order of a
// layer's steps) and the vector kernels, compiled once per instruction set
// (decode_kernels_avx512.cpp, decode_kernels_avx2.cpp) from decode_kernels.h. Plain
// pointers and sizes only: the kernel files include no torch header, so no inline torch
// function is ever compiled for an instruction set the running CPU may lack.
#pragma once

#include <cstdint>

namespace vlmq {

// The 16-bit weight types a panel-packed weight may hold (the bits of one value each): a checkpoint
// saved in bfloat16 or float16 holds values that float32 represents exactly, so its weights keep their
// type and a product reads half the bytes, each value widened to float32 exactly before its FMAs.
struct BFloat16 {
  uint16_t bits;
};
struct Float16 {
  uint16_t bits;
};
enum class WeightType : int32_t { kFloat32, kBFloat16, kFloat16 };

// y[n, m] = Σ_k w[m, k] · x[n, k] (+ bias[m]) (+ residual[n, m]) for n < rows, m0 ≤ m < m1.
struct MatvecArgs {
  const void* w;          // [M, K] row-major float32 (the checkpoint's [out, in] layout), or panel-packed w_type
  int64_t k;              // K
  const float* x;         // [rows, K] contiguous
  int64_t rows;           // tokens: 1 for batch-1 decode, one per sequence in batched decode
  const float* bias;      // [M] or null
  const float* residual;  // [rows, ld] or null; may be y itself
  float* y;               // [rows, ld]
  int64_t ld;             // row stride of y and residual
  WeightType w_type = WeightType::kFloat32;  // panel products only: the row-major matvec reads float32
};

// One KV head of one sequence over T of its keys: softmax(q kᵀ + mask) v for the `group` query
// heads sharing it, and for each head the softmax's max score and Σ e^(score - max), by which
// results over different key ranges of one head merge (decode_cpu.cpp). The softmax scale is
// already in q (folded into the Q weights). The keys lie in blocks of the paged cache: key i is
// at position first + i of the sequence's blocks, blocks[(first + i) / block_size] at offset
// (first + i) % block_size, its K at k + block · block_stride + offset · hd (V likewise).
struct AttendArgs {
  const float* q;         // [group, hd]
  const float* k;         // the cache's K at block 0, offset 0, of this KV head
  const float* v;         // the same in the V cache
  const int64_t* blocks;  // the sequence's block table from the block holding the first key
  int64_t block_stride;   // floats between one block's keys of this KV head and the next block's
  int64_t block_size;
  int64_t first;          // offset of the first key in blocks[0]: < block_size
  const float* mask;      // [T] additive (0 / -inf), or null: every key is seen
  int64_t keys;           // T
  int64_t group;          // query heads per KV head
  int64_t head_dim;       // hd
  float* scores;          // [group, T] scratch
  float* out;             // [group, hd]
  float* max;             // [group]
  float* sum;             // [group]
};

// Panel-packed weights: [ceil(M / kPanel), K, kPanel], panel p holding outputs kPanel·p … kPanel·p + kPanel - 1
// interleaved by k (w[m, k] at [m / kPanel, k, m % kPanel]), zero past M. A product streams each
// panel once, front to back, for every token at once (cuda_ext.decode.ops.pack_panels).
constexpr int64_t kPanel = 16;

struct DecodeKernels {
  const char* isa;
  bool prefetch;  // whether the products ask for weight lines ahead of the hardware prefetcher
  void (*matvec)(const MatvecArgs& args, int64_t m0, int64_t m1);
  // As matvec, args.w panel-packed in args.w_type; m0 a multiple of kPanel, m1 ≤ M.
  void (*panel_product)(const MatvecArgs& args, int64_t m0, int64_t m1);
  // out[i] = act(gate[i]) · up[i] for i < count (act(gate[i]) where up is null): SwiGLU's silu,
  // GeGLU's tanh-approximated GELU. out may be gate.
  void (*silu_mul)(const float* gate, const float* up, float* out, int64_t count);
  void (*gelu_tanh_mul)(const float* gate, const float* up, float* out, int64_t count);
  void (*attend)(const AttendArgs& args);
};

// The calling thread's buffer of at least `values` floats, for a product over 16-bit panels to widen a group of
// them into (decode_kernels.h). Defined in decode_cpu.cpp: the kernel files define no function that the
// standard library's inline code would be compiled into for their instruction sets.
float* widen_scratch(int64_t values);

// Defined in decode_kernels_{avx512,avx2}.cpp; call only where the CPU has the instructions.
const DecodeKernels& decode_kernels_avx512(bool prefetch);
const DecodeKernels& decode_kernels_avx2(bool prefetch);

}  // namespace vlmq
