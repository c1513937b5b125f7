// Instantiation of the CPU attention kernels (flash_fwd_tile.hpp) for fp8 e4m3 storage on
// the cpu-avx512-bf16 and cpu-amx tiers: decode on vdpbf16ps with the e4m3 bytes converted
// to bf16 by vpermi2b lookups (decode_fp8_dpbf16.hpp), prefill on the AVX-512 vector
// kernels. Compiled with the avx512 + avx512bf16 + avx512vbmi flags by the
// *_avx512_bf16_vbmi.cpp rule of kernels/CMakeLists.txt.
// GCC 12 reports the deliberately undefined lanes of its own AVX-512 intrinsics
// (_mm512_undefined_*) as (maybe-)uninitialized once they are inlined here.
#if !defined(__clang__)  // clang has no -Wmaybe-uninitialized (and no such report)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#pragma GCC diagnostic ignored "-Wuninitialized"

#include "cpu/decode_fp8_dpbf16.hpp"
#include "cpu/flash_fwd_tile.hpp"
#include "cpu/simd_avx512.hpp"
#include "cpu/simd_avx512_bf16_vbmi.hpp"

namespace ringattn::detail::cpu {

void flash_fwd_fp8_avx512_bf16_vbmi(const AttnProblem& p, int threads) {
  if (p.dtype != DType::kFP8E4M3) throw_unsupported_dtype(p.dtype);
  FlashFwd<SimdAvx512, fp8e4m3_t, Fp8DpBf16Decode<SimdAvx512Bf16Vbmi>>(p).run(threads);
}

}  // namespace ringattn::detail::cpu
