// Test double of kernels/src/cpu/amx_tiles.hpp for CPUs without AMX: the constants and the
// block helpers that mla_decode_amx.cpp uses, computed by plain loops on emulated tiles
// (tmm0-3 as fp32 arrays, A / B read from memory at their strides). tests/CMakeLists.txt
// compiles mla_decode_amx.cpp against it (this directory first on the include path) as
// run_unit_amx_emulated, so test_mla.cpp checks the AMX path's layouts and loops anywhere
// AVX512-BF16 runs. The functions have internal linkage (no clash with the real ones);
// the constants are the real header's.
#pragma once

#include <cstdint>
#include <cstring>

#include "ringattn/dtype.hpp"

namespace ringattn::detail::cpu::amx {

inline constexpr int kTileRows = 16;
inline constexpr int kTileBytes = 64;
inline constexpr int kBlockRows = 32;
inline constexpr int kDepth = 32;
inline constexpr int kTileElems = kTileRows * kDepth;

// C: tile t covers rows 16 * (t / 2) .. and columns 16 * (t % 2) .. of the 32 x 32 block.
static thread_local float tmm[4][kTileRows][kTileRows];

static inline void configure() {}
static inline void release() {}
static inline void zero_block() { std::memset(tmm, 0, sizeof tmm); }
static inline void load_block(const float* c, long ldc) {
  for (int t = 0; t < 4; ++t)
    for (int i = 0; i < kTileRows; ++i)
      for (int j = 0; j < kTileRows; ++j)
        tmm[t][i][j] = c[(i + kTileRows * (t / 2)) * ldc + j + kTileRows * (t % 2)];
}
static inline void store_block(float* c, long ldc) {
  for (int t = 0; t < 4; ++t)
    for (int i = 0; i < kTileRows; ++i)
      for (int j = 0; j < kTileRows; ++j)
        c[(i + kTileRows * (t / 2)) * ldc + j + kTileRows * (t % 2)] = tmm[t][i][j];
}
static inline float bf16_at(const void* base, long byte_offset) {
  std::uint16_t h;
  std::memcpy(&h, static_cast<const char*>(base) + byte_offset, 2);
  return bf16_to_f32(h);
}
// tdpbf16ps: C[m][n] += sum_k A[m][2k + e] * B[k][n][e] over 16 pairs k and e in {0, 1}.
static inline void block_step(const void* a0, const void* a1, long sa, const void* b0,
                              const void* b1, long sb) {
  const void* a[2] = {a0, a1};
  const void* b[2] = {b0, b1};
  for (int t = 0; t < 4; ++t)
    for (int m = 0; m < kTileRows; ++m)
      for (int n = 0; n < kTileRows; ++n) {
        float s = tmm[t][m][n];
        for (int k = 0; k < kTileRows; ++k)
          for (int e = 0; e < 2; ++e)
            s += bf16_at(a[t / 2], m * sa + (2 * k + e) * 2) *
                 bf16_at(b[t % 2], k * sb + (2 * n + e) * 2);
        tmm[t][m][n] = s;
      }
}

}  // namespace ringattn::detail::cpu::amx
