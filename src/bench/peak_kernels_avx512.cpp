// AVX-512 peak loop (compiled with -mavx512f ...; see peak_kernels.hpp).
#include <immintrin.h>

#include "bench/peak_kernels.hpp"

namespace ringattn::bench_detail {

// 24 independent 16-lane accumulators: covers 2 FMA ports x 4-cycle latency with
// margin and leaves registers for the two constants (32 zmm registers in all).
float fma_loop_avx512(std::int64_t iters) {
  const __m512 m = _mm512_set1_ps(0.999999f);
  const __m512 c = _mm512_set1_ps(1e-7f);
  __m512 a[24];
  for (int j = 0; j < 24; ++j) a[j] = _mm512_set1_ps(0.05f * static_cast<float>(j + 1));
  for (std::int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 24
    for (int j = 0; j < 24; ++j) a[j] = _mm512_fmadd_ps(a[j], m, c);
  }
  __m512 s = a[0];
  for (int j = 1; j < 24; ++j) s = _mm512_add_ps(s, a[j]);
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, s);
  float r = 0.0f;
  for (const float v : lanes) r += v;
  return r;
}

}  // namespace ringattn::bench_detail
