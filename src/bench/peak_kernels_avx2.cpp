// AVX2+FMA bench loops (compiled with -mavx2 -mfma; see peak_kernels.hpp): the peak loops
// and the decode_memory_order stream.
#include <immintrin.h>

#include <initializer_list>

#include "bench/peak_kernels.hpp"

namespace ringattn::bench_detail {

namespace {

// Sum of the 8 lanes of v.
float lane_sum(__m256 v) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  float r = 0.0f;
  for (const float x : lanes) r += x;
  return r;
}

}  // namespace

// 12 independent accumulators: Zen 3 / Intel cores issue 2 FMAs per cycle with a
// latency of 4-5 cycles, so at least 8-10 chains are needed to keep both ports busy.
float fma_loop_avx2(std::int64_t iters) {
  const __m256 m = _mm256_set1_ps(0.999999f);
  const __m256 c = _mm256_set1_ps(1e-7f);
  __m256 a0 = _mm256_set1_ps(0.1f), a1 = _mm256_set1_ps(0.2f), a2 = _mm256_set1_ps(0.3f);
  __m256 a3 = _mm256_set1_ps(0.4f), a4 = _mm256_set1_ps(0.5f), a5 = _mm256_set1_ps(0.6f);
  __m256 a6 = _mm256_set1_ps(0.7f), a7 = _mm256_set1_ps(0.8f), a8 = _mm256_set1_ps(0.9f);
  __m256 a9 = _mm256_set1_ps(1.0f), a10 = _mm256_set1_ps(1.1f), a11 = _mm256_set1_ps(1.2f);
  for (std::int64_t i = 0; i < iters; ++i) {
    a0 = _mm256_fmadd_ps(a0, m, c);
    a1 = _mm256_fmadd_ps(a1, m, c);
    a2 = _mm256_fmadd_ps(a2, m, c);
    a3 = _mm256_fmadd_ps(a3, m, c);
    a4 = _mm256_fmadd_ps(a4, m, c);
    a5 = _mm256_fmadd_ps(a5, m, c);
    a6 = _mm256_fmadd_ps(a6, m, c);
    a7 = _mm256_fmadd_ps(a7, m, c);
    a8 = _mm256_fmadd_ps(a8, m, c);
    a9 = _mm256_fmadd_ps(a9, m, c);
    a10 = _mm256_fmadd_ps(a10, m, c);
    a11 = _mm256_fmadd_ps(a11, m, c);
  }
  __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                           _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
  s = _mm256_add_ps(s, _mm256_add_ps(_mm256_add_ps(a8, a9), _mm256_add_ps(a10, a11)));
  return lane_sum(s);
}

// Four 8-lane accumulators (32 floats = two cache lines per iteration).
float read_sum_avx2(const float* x, std::size_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  __m256 s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
  std::size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm256_add_ps(s0, _mm256_loadu_ps(x + i));
    s1 = _mm256_add_ps(s1, _mm256_loadu_ps(x + i + 8));
    s2 = _mm256_add_ps(s2, _mm256_loadu_ps(x + i + 16));
    s3 = _mm256_add_ps(s3, _mm256_loadu_ps(x + i + 24));
  }
  float r = lane_sum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
  for (; i < n; ++i) r += x[i];
  return r;
}

// Tiles of kMemoryOrderTileKeys keys; in each, the K block then the V block, every
// block's kMemoryOrderHeads * kMemoryOrderTileKeys rows of two 64-byte lines visited by
// step s: head-major (head s / tile keys, key s % tile keys) with a prefetch of step s
// of the next tile's block in memory order, or key-major (key s / heads, head
// s % heads) without one. Each line feeds kMemoryOrderFmaPerLine FMAs (8 chains).
float memory_order_stream_avx2(const std::byte* k, const std::byte* v, std::int64_t keys,
                               bool head_major, float seed) {
  constexpr int kHeads = kMemoryOrderHeads, kTile = kMemoryOrderTileKeys;
  constexpr std::int64_t kKeyBytes = std::int64_t{kHeads} * kMemoryOrderRowBytes;
  __m256 acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = _mm256_set1_ps(seed + 1e-3f * static_cast<float>(j));
  const __m256 m = _mm256_set1_ps(0.999f);
  for (std::int64_t j0 = 0; j0 < keys; j0 += kTile) {
    const bool next = j0 + kTile < keys;
    for (const std::byte* block : {k + j0 * kKeyBytes, v + j0 * kKeyBytes}) {
      for (int s = 0; s < kHeads * kTile; ++s) {
        const int h = head_major ? s / kTile : s % kHeads;
        const int key = head_major ? s % kTile : s / kHeads;
        const std::byte* row = block + key * kKeyBytes + h * kMemoryOrderRowBytes;
        for (int c = 0; c < kMemoryOrderRowBytes; c += 64) {
          if (head_major && next)
            _mm_prefetch(reinterpret_cast<const char*>(block + kTile * kKeyBytes +
                                                       std::int64_t{s} * kMemoryOrderRowBytes + c),
                         _MM_HINT_T1);
          const __m256 x0 = _mm256_loadu_ps(reinterpret_cast<const float*>(row + c));
          const __m256 x1 = _mm256_loadu_ps(reinterpret_cast<const float*>(row + c + 32));
#pragma GCC unroll 32
          for (int f = 0; f < kMemoryOrderFmaPerLine; ++f)
            acc[f % 8] = _mm256_fmadd_ps(acc[f % 8], m, f % 2 ? x1 : x0);
        }
      }
    }
  }
  __m256 t = acc[0];
  for (int j = 1; j < 8; ++j) t = _mm256_add_ps(t, acc[j]);
  return lane_sum(t);
}

}  // namespace ringattn::bench_detail
