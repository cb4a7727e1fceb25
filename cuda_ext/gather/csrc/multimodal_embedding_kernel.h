// Launcher of the CUDA multimodal embedding gather: raw pointers, no torch, so the
// kernel compiles with nvcc alone and the torch binding is a thin .cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "gather_row.h"

namespace vlmq {

// Writes out[t] for every token t on `stream`; error_tokens: Int32[2] on the device,
// preset to num_tokens, left holding the first offending token of each error slot
// (see gather_index.h). Word: uint32_t for float32, uint16_t for bfloat16/float16.
template <typename Word>
cudaError_t launch_multimodal_embedding(const GatherArgs<Word>& args, int32_t* error_tokens, cudaStream_t stream);

}  // namespace vlmq
