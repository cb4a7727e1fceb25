// The multimodal embedding gather on CUDA: one thread block per token copies that
// token's row — text table or container rows, chosen by resolve_gather_index — with
// 16-byte loads and stores. The copy is pure bandwidth: no arithmetic, no shared memory.
#include "multimodal_embedding_kernel.h"

namespace vlmq {
namespace {

constexpr int kMaxThreads = 256;

template <typename Word>
__global__ void __launch_bounds__(kMaxThreads)
    multimodal_embedding_kernel(const GatherArgs<Word> args, int32_t* __restrict__ error_tokens) {
  const int64_t t = blockIdx.x;
  // Every thread resolves the (same) index: the ID and ranges are broadcast loads from
  // cache, cheaper than a shared-memory handoff and its __syncthreads.
  const GatherSource source = gather_token(args, t, threadIdx.x, blockDim.x);
  if (is_gather_error(source) && threadIdx.x == 0) {
    const int slot = source == GatherSource::kOutsideVocab ? kErrorSlotOutsideVocab : kErrorSlotUnbound;
    atomicMin(error_tokens + slot, static_cast<int32_t>(t));
  }
}

// Enough warps for one 16-byte piece per thread, so a row is one round of loads;
// small rows get one warp (a block per token keeps the launch free of index math).
int threads_per_row(int64_t hidden, int64_t word_size) {
  const int64_t pieces = (hidden * word_size + sizeof(Vec16) - 1) / sizeof(Vec16);
  const int64_t warps = (pieces + 31) / 32;
  const int64_t threads = warps * 32;
  return static_cast<int>(threads < 32 ? 32 : (threads > kMaxThreads ? kMaxThreads : threads));
}

}  // namespace

template <typename Word>
cudaError_t launch_multimodal_embedding(const GatherArgs<Word>& args, int32_t* error_tokens, cudaStream_t stream) {
  if (args.num_tokens == 0) return cudaSuccess;  // an empty grid is a launch error
  const int threads = threads_per_row(args.hidden, sizeof(Word));
  // num_tokens ≤ INT32_MAX (checked by the binding) fits gridDim.x's limit of 2^31 - 1.
  multimodal_embedding_kernel<Word><<<static_cast<unsigned int>(args.num_tokens), threads, 0, stream>>>(args, error_tokens);
  return cudaGetLastError();
}

template cudaError_t launch_multimodal_embedding<uint16_t>(const GatherArgs<uint16_t>&, int32_t*, cudaStream_t);
template cudaError_t launch_multimodal_embedding<uint32_t>(const GatherArgs<uint32_t>&, int32_t*, cudaStream_t);

}  // namespace vlmq
