// One token of the multimodal embedding gather: resolve its source row, copy it out.
//
// Shared by the CUDA kernel (one thread block per token, `lanes` = blockDim.x) and the
// CPU extension (one lane), so the vectorised copy and its scalar tail run on the CPU
// in the tests exactly as written for the GPU. Plain C++: no torch, no CUDA headers.
#pragma once

#include <cstdint>
#include <cstring>

#include "gather_index.h"

namespace vlmq {

// 16 bytes moved as one load and one store (LDG.128/STG.128 on the GPU).
#ifdef __CUDACC__
using Vec16 = uint4;
#else
struct alignas(16) Vec16 {
  uint32_t words[4];
};
#endif

// The inputs and output of one gather, as raw pointers: what a binding fills in from
// its tensors. Word is a 2- or 4-byte integer standing for the element's bits
// (bfloat16/float16 or float32): a gather only moves bits, so no dtype is needed.
template <typename Word>
struct GatherArgs {
  const int64_t* ids;         // [T]
  int64_t num_tokens;         // T
  const Word* table;          // [V, D]
  int64_t vocab;              // V
  const Word* rows;           // [R, D]
  int64_t num_rows;           // R
  const int64_t* ranges;      // [C, 2]
  const int64_t* row_starts;  // [C]
  int64_t num_ranges;         // C
  int64_t hidden;             // D
  int64_t base;               // EMBEDDING_INDEX_BASE
  Word* out;                  // [T, D]
};

// Moves one T. On the GPU through the read-only data path (the inputs are never
// written by the gather); on the host through memcpy: the buffers hold floats, and
// reading them as integers any other way would break strict aliasing.
template <typename T>
VLMQ_HOST_DEVICE inline void move_bits(T* dst, const T* src) {
#ifdef __CUDA_ARCH__
  *dst = __ldg(src);
#else
  std::memcpy(dst, src, sizeof(T));
#endif
}

// Copies `hidden` words from src to dst, lane `lane` of `lanes` taking every lanes-th
// piece: 16-byte pieces while both pointers are 16-byte aligned, then single words for
// the tail (hidden not a multiple of 16 bytes), or single words throughout when either
// pointer is misaligned (an odd row size makes every other row start off 16).
template <typename Word>
VLMQ_HOST_DEVICE inline void copy_row(Word* dst, const Word* src, int64_t hidden, int64_t lane, int64_t lanes) {
  static_assert(sizeof(Vec16) % sizeof(Word) == 0, "a word must divide 16 bytes");
  constexpr int64_t kWordsPerVec = sizeof(Vec16) / sizeof(Word);
  int64_t copied = 0;
  if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) % sizeof(Vec16) == 0) {
    const int64_t vecs = hidden / kWordsPerVec;
    Vec16* dst_vec = reinterpret_cast<Vec16*>(dst);
    const Vec16* src_vec = reinterpret_cast<const Vec16*>(src);
    for (int64_t i = lane; i < vecs; i += lanes) move_bits(dst_vec + i, src_vec + i);
    copied = vecs * kWordsPerVec;
  }
  for (int64_t i = copied + lane; i < hidden; i += lanes) move_bits(dst + i, src + i);
}

// Gathers token t's row into out[t] (nothing is written for an erroneous ID) and
// returns where it came from, for the caller to record errors.
template <typename Word>
VLMQ_HOST_DEVICE inline GatherSource gather_token(const GatherArgs<Word>& args, int64_t t, int64_t lane, int64_t lanes) {
  const GatherIndex where = resolve_gather_index(args.ids[t], args.vocab, args.base, args.ranges, args.row_starts,
                                                 args.num_ranges, args.num_rows);
  if (is_gather_error(where.source)) return where.source;
  const Word* src = (where.source == GatherSource::kTable ? args.table : args.rows) + where.row * args.hidden;
  copy_row(args.out + t * args.hidden, src, args.hidden, lane, lanes);
  return where.source;
}

}  // namespace vlmq
