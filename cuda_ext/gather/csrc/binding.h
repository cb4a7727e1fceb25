// Shared by the CPU and CUDA torch bindings: argument checks, and the GatherArgs they
// hand to the per-token code in gather_row.h. Each binding registers its function as a
// torch op (TORCH_LIBRARY, no pybind: a 6 s build instead of 30 s with torch/extension.h).
// Ranges are validated (sorted, counts matching the rows) by the Python dispatcher,
// which can read them on the host; here only what the raw pointers rely on is checked.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "gather_row.h"

namespace vlmq {

inline void check_gather_inputs(const at::Tensor& ids, const at::Tensor& table, const at::Tensor& ranges,
                                const at::Tensor& rows) {
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong, "ids must be Long[T], got ", ids.scalar_type(), " ",
              ids.sizes());
  TORCH_CHECK(ids.numel() <= std::numeric_limits<int32_t>::max(), "at most 2^31 - 1 tokens per call, got ", ids.numel());
  TORCH_CHECK(table.dim() == 2 && rows.dim() == 2 && rows.size(1) == table.size(1), "table must be [V, D] and rows [R, D], got ",
              table.sizes(), " and ", rows.sizes());
  const auto dtype = table.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "the gather kernel supports float32, bfloat16 and float16 tables, got ", dtype);
  TORCH_CHECK(rows.scalar_type() == dtype, "rows must have the table's dtype ", dtype, ", got ", rows.scalar_type());
  TORCH_CHECK(ranges.dim() == 2 && ranges.size(1) == 2 && ranges.scalar_type() == at::kLong, "ranges must be Long[C, 2], got ",
              ranges.scalar_type(), " ", ranges.sizes());
  for (const at::Tensor* t : {&ids, &rows, &ranges}) {
    TORCH_CHECK(t->device() == table.device(), "all inputs must be on the table's device ", table.device(), ", got ",
                t->device());
  }
}

// Long[C]: each container's first row in `rows` (exclusive prefix sum of the counts).
inline at::Tensor container_row_starts(const at::Tensor& ranges) {
  const at::Tensor counts = ranges.select(1, 1);
  return counts.cumsum(0).sub_(counts);
}

// The tensors the GatherArgs pointers point into: contiguous copies where needed, and
// the output and error slots (Int32[2], preset to T = "no offending token").
struct GatherTensors {
  at::Tensor ids, table, ranges, rows, row_starts, out, error_tokens;

  GatherTensors(const at::Tensor& ids_, const at::Tensor& table_, const at::Tensor& ranges_, const at::Tensor& rows_)
      : ids(ids_.contiguous()),
        table(table_.contiguous()),
        ranges(ranges_.contiguous()),
        rows(rows_.contiguous()),
        row_starts(container_row_starts(ranges)),
        out(at::empty({ids.size(0), table.size(1)}, table.options())),
        error_tokens(at::full({2}, ids.size(0), ids.options().dtype(at::kInt))) {}

  template <typename Word>
  GatherArgs<Word> args(int64_t base) const {
    return GatherArgs<Word>{
        ids.const_data_ptr<int64_t>(),
        ids.size(0),
        static_cast<const Word*>(table.const_data_ptr()),
        table.size(0),
        static_cast<const Word*>(rows.const_data_ptr()),
        rows.size(0),
        ranges.const_data_ptr<int64_t>(),
        row_starts.const_data_ptr<int64_t>(),
        ranges.size(0),
        table.size(1),
        base,
        static_cast<Word*>(out.data_ptr()),
    };
  }

  std::tuple<at::Tensor, at::Tensor> result() const { return {out, error_tokens}; }
};

}  // namespace vlmq
