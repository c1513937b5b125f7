// Instantiation of the CPU attention kernels (flash_fwd_tile.hpp) for the avx512
// vector API.
// Compiled with the avx512 flags by the *_avx512.cpp rule of kernels/CMakeLists.txt.
// GCC 12 reports the deliberately undefined lanes of its own AVX-512 intrinsics
// (_mm512_undefined_*) as (maybe-)uninitialized once they are inlined here.
#if !defined(__clang__)  // clang has no -Wmaybe-uninitialized (and no such report)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#pragma GCC diagnostic ignored "-Wuninitialized"

#include "cpu/flash_fwd_tile.hpp"
#include "cpu/simd_avx512.hpp"

namespace ringattn::detail::cpu {

void flash_fwd_avx512(const AttnProblem& p, int threads) { run_flash_fwd<SimdAvx512>(p, threads); }

}  // namespace ringattn::detail::cpu
