// The decode kernels for CPUs with AVX-512 (F, DQ for the reductions). The system headers
// come first, outside the target pragma: only vlmq's own kernel code is compiled for it.
#include <immintrin.h>

#include <cstdint>

#pragma GCC target("avx512f,avx512dq,avx2,fma")

#include "decode_vec512.h"
#include "decode_kernels.h"

namespace vlmq {

const DecodeKernels& decode_kernels_avx512(bool prefetch) {
  static const DecodeKernels with = Kernels<avx512::Vec>::table("avx512", true);
  static const DecodeKernels without = Kernels<avx512::Vec>::table("avx512", false);
  return prefetch ? with : without;
}

}  // namespace vlmq
