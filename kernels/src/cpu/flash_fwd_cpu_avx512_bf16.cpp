// Instantiation of the CPU attention kernels (flash_fwd_tile.hpp) for the cpu-avx512-bf16
// tier, bf16 storage: AVX-512 vector code with the prefill products on the bf16
// dot-product engine (mm_dpbf16.hpp, vdpbf16ps). fp32 and fp16 storage on this tier run
// flash_fwd_avx512 (cpu_backend.cpp).
// Compiled with the avx512 + avx512bf16 flags by the *_avx512_bf16.cpp rule of
// kernels/CMakeLists.txt.
// GCC 12 reports the deliberately undefined lanes of its own AVX-512 intrinsics
// (_mm512_undefined_*) as (maybe-)uninitialized once they are inlined here.
#if !defined(__clang__)  // clang has no -Wmaybe-uninitialized (and no such report)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#pragma GCC diagnostic ignored "-Wuninitialized"

#include "cpu/flash_fwd_tile.hpp"
#include "cpu/mm_dpbf16.hpp"
#include "cpu/simd_avx512_bf16.hpp"

namespace ringattn::detail::cpu {

void flash_fwd_avx512_bf16(const AttnProblem& p, int threads) {
  if (p.dtype != DType::kBF16) throw_unsupported_dtype(p.dtype);
  FlashFwd<SimdAvx512, bf16_t, DpBf16Engine<SimdAvx512Bf16, kKeyTile>>(p).run(threads);
}

}  // namespace ringattn::detail::cpu
