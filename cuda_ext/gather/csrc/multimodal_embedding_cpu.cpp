// The multimodal embedding gather on the CPU, from the same per-token code as the CUDA
// kernel (gather_row.h): the proof of the kernel's index logic and row copy that runs
// without a GPU, and a CPU path of its own.
#include "binding.h"

namespace vlmq {
namespace {

// One token after another on the calling thread: the loop is bound by memory, and
// at::parallel_for would need OpenMP in this extension, a second OpenMP runtime beside
// torch's. Tokens in order, so the first offender of each slot is the first one seen.
template <typename Word>
void gather_cpu(const GatherArgs<Word>& args, int32_t* error_tokens) {
  for (int64_t t = 0; t < args.num_tokens; ++t) {
    const GatherSource source = gather_token(args, t, /*lane=*/0, /*lanes=*/1);
    if (!is_gather_error(source)) continue;
    int32_t& slot = error_tokens[source == GatherSource::kOutsideVocab ? kErrorSlotOutsideVocab : kErrorSlotUnbound];
    if (slot == args.num_tokens) slot = static_cast<int32_t>(t);
  }
}

// ids: Long[T], table: [V, D], ranges: Long[C, 2], rows: [R, D] → (out [T, D], error_tokens Int32[2]).
std::tuple<at::Tensor, at::Tensor> multimodal_embedding(const at::Tensor& ids, const at::Tensor& table,
                                                        const at::Tensor& ranges, const at::Tensor& rows, int64_t base) {
  check_gather_inputs(ids, table, ranges, rows);
  TORCH_CHECK(table.device().is_cpu(), "the CPU gather takes CPU tensors, got ", table.device());
  GatherTensors tensors(ids, table, ranges, rows);
  if (table.element_size() == 4) {
    gather_cpu(tensors.args<uint32_t>(base), tensors.error_tokens.data_ptr<int32_t>());
  } else {
    gather_cpu(tensors.args<uint16_t>(base), tensors.error_tokens.data_ptr<int32_t>());
  }
  return tensors.result();
}

}  // namespace
}  // namespace vlmq

// torch.ops.vlmq_gather_cpu.multimodal_embedding
TORCH_LIBRARY(vlmq_gather_cpu, m) {
  m.def("multimodal_embedding(Tensor ids, Tensor table, Tensor ranges, Tensor rows, int base) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vlmq_gather_cpu, CPU, m) { m.impl("multimodal_embedding", &vlmq::multimodal_embedding); }
