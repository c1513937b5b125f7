// Instantiation of the CPU attention kernels (flash_fwd_tile.hpp) for the avx2
// vector API.
// Compiled with the avx2 flags by the *_avx2.cpp rule of kernels/CMakeLists.txt.
#include "cpu/flash_fwd_tile.hpp"
#include "cpu/simd_avx2.hpp"

namespace ringattn::detail::cpu {

void flash_fwd_avx2(const AttnProblem& p, int threads) { run_flash_fwd<SimdAvx2>(p, threads); }

}  // namespace ringattn::detail::cpu
