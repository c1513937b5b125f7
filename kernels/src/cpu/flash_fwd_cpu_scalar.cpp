// Instantiation of the CPU attention kernels (flash_fwd_tile.hpp) for the scalar
// vector API.
#include "cpu/flash_fwd_tile.hpp"
#include "cpu/simd_scalar.hpp"

namespace ringattn::detail::cpu {

void flash_fwd_scalar(const AttnProblem& p, int threads) { run_flash_fwd<SimdScalar>(p, threads); }

}  // namespace ringattn::detail::cpu
