// Where one token's embedding row comes from: the text table or a container's rows.
//
// The one definition of the gather's index logic. The CUDA kernel
// (multimodal_embedding_kernel.cu) and the CPU extension (multimodal_embedding_cpu.cpp)
// both call resolve_gather_index, so the CPU tests against the torch reference check
// the very code the GPU runs. Plain C++: no torch, no CUDA headers.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define VLMQ_HOST_DEVICE __host__ __device__
#else
#define VLMQ_HOST_DEVICE
#endif

namespace vlmq {

enum class GatherSource : int32_t {
  kTable = 0,         // a text ID: row `id` of the embedding table
  kRows = 1,          // a container ID: row of the concatenated container rows
  kOutsideVocab = 2,  // an ID below the base that is negative or ≥ vocab
  kUnbound = 3,       // an ID at or above the base in no container's range
};

// The two error slots of the Int32[2] `error_tokens` both kernels fill with the index
// of the first offending token (num_tokens where none): Python turns them into the
// reference's InvalidInput, checking outside-vocabulary first as the reference does.
constexpr int kErrorSlotOutsideVocab = 0;
constexpr int kErrorSlotUnbound = 1;

struct GatherIndex {
  GatherSource source;
  int64_t row;  // meaningful for kTable and kRows only
};

VLMQ_HOST_DEVICE inline bool is_gather_error(GatherSource source) {
  return source == GatherSource::kOutsideVocab || source == GatherSource::kUnbound;
}

// ranges:     Long[C, 2] row-major (first_token_id, num_tokens), sorted by first ID
// row_starts: Long[C]    each container's first row in the concatenated rows
//
// Every row returned is in bounds — table rows < vocab, container rows < num_rows —
// whatever the ID, so a forged ID can never make a kernel read outside its inputs.
// The row bound also holds for ranges the dispatcher would refuse (it validates them
// before any launch), which keeps this function memory-safe on its own.
VLMQ_HOST_DEVICE inline GatherIndex resolve_gather_index(int64_t id, int64_t vocab, int64_t base,
                                                         const int64_t* ranges, const int64_t* row_starts,
                                                         int64_t num_ranges, int64_t num_rows) {
  if (id < base) {
    if (id < 0 || id >= vocab) return {GatherSource::kOutsideVocab, 0};
    return {GatherSource::kTable, id};
  }
  // Binary search for the last range whose first ID is ≤ id: O(log C) per token, and
  // ranges are sorted because IDs are allocated in increasing order.
  int64_t lo = 0;
  int64_t hi = num_ranges;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (ranges[2 * mid] <= id) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  if (lo == 0) return {GatherSource::kUnbound, 0};  // below every range
  const int64_t c = lo - 1;
  const int64_t offset = id - ranges[2 * c];
  if (offset >= ranges[2 * c + 1]) return {GatherSource::kUnbound, 0};  // in the gap after range c
  const int64_t row = row_starts[c] + offset;
  if (row < 0 || row >= num_rows) return {GatherSource::kUnbound, 0};
  return {GatherSource::kRows, row};
}

}  // namespace vlmq
