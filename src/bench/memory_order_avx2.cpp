// The streaming loop of the decode_memory_order bench case (bench_memory_order.cpp),
// compiled with -mavx2 -mfma (see peak_kernels.hpp).
#include <immintrin.h>

#include <initializer_list>

#include "bench/peak_kernels.hpp"

namespace ringattn::bench_detail {

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
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, t);
  float r = 0.0f;
  for (const float x : lanes) r += x;
  return r;
}

}  // namespace ringattn::bench_detail
