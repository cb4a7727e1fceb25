// Torch binding of the CUDA multimodal embedding gather (multimodal_embedding_kernel.cu):
// checks, the current device and stream, and the launch. Compiled with the host compiler.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "binding.h"
#include "multimodal_embedding_kernel.h"

namespace vlmq {
namespace {

// ids: Long[T], table: [V, D], ranges: Long[C, 2], rows: [R, D] → (out [T, D], error_tokens Int32[2]),
// both on the table's device, asynchronous on its current stream.
std::tuple<at::Tensor, at::Tensor> multimodal_embedding(const at::Tensor& ids, const at::Tensor& table,
                                                        const at::Tensor& ranges, const at::Tensor& rows, int64_t base) {
  check_gather_inputs(ids, table, ranges, rows);
  TORCH_CHECK(table.is_cuda(), "the CUDA gather takes CUDA tensors, got ", table.device());
  const c10::cuda::CUDAGuard guard(table.device());
  GatherTensors tensors(ids, table, ranges, rows);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (table.element_size() == 4) {
    C10_CUDA_CHECK(launch_multimodal_embedding(tensors.args<uint32_t>(base), tensors.error_tokens.data_ptr<int32_t>(), stream));
  } else {
    C10_CUDA_CHECK(launch_multimodal_embedding(tensors.args<uint16_t>(base), tensors.error_tokens.data_ptr<int32_t>(), stream));
  }
  return tensors.result();
}

}  // namespace
}  // namespace vlmq

// torch.ops.vlmq_gather_cuda.multimodal_embedding
TORCH_LIBRARY(vlmq_gather_cuda, m) {
  m.def("multimodal_embedding(Tensor ids, Tensor table, Tensor ranges, Tensor rows, int base) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vlmq_gather_cuda, CUDA, m) { m.impl("multimodal_embedding", &vlmq::multimodal_embedding); }
