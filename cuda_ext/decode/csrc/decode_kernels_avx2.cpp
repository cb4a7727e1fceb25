// The decode kernels for CPUs with AVX2, FMA and F16C but no AVX-512. The system headers come
// first, outside the target pragma: only vlmq's own kernel code is compiled for it.
#include <immintrin.h>

#include <cstdint>

#pragma GCC target("avx2,fma,f16c")

#include "decode_vec256.h"
#include "decode_kernels.h"

namespace vlmq {

const DecodeKernels& decode_kernels_avx2(bool prefetch) {
  static const DecodeKernels with = Kernels<avx2::Vec>::table("avx2", true);
  static const DecodeKernels without = Kernels<avx2::Vec>::table("avx2", false);
  return prefetch ? with : without;
}

}  // namespace vlmq
