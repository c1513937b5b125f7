// Instantiation of the CPU attention kernels (flash_fwd_tile.hpp) for the cpu-amx
// tier, bf16 storage: AVX-512 vector code with the AMX prefill tile (amx_prefill.hpp).
// Compiled with the amx flags by the *_amx.cpp rule of kernels/CMakeLists.txt.
// GCC 12 reports the deliberately undefined lanes of its own AVX-512 intrinsics
// (_mm512_undefined_*) as (maybe-)uninitialized once they are inlined here.
#if !defined(__clang__)  // clang has no -Wmaybe-uninitialized (and no such report)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#pragma GCC diagnostic ignored "-Wuninitialized"

#include "cpu/amx_prefill.hpp"
#include "cpu/flash_fwd_tile.hpp"
#include "cpu/simd_avx512.hpp"

namespace ringattn::detail::cpu {

void flash_fwd_amx(const AttnProblem& p, int threads) {
  if (p.dtype != DType::kBF16) throw_unsupported_dtype(p.dtype);
  if (p.qv) return flash_fwd_avx512(p, threads);  // qv: the vector tiles (no AMX product)
  FlashFwd<SimdAvx512, bf16_t, AmxTiles>(p).run(threads);
}

}  // namespace ringattn::detail::cpu
