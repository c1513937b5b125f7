// Single-thread inner loops of the peak measurements (ringattn/bench.hpp), one set
// per ISA. The *_avx2.cpp / *_avx512.cpp files are compiled for that ISA only
// (src/CMakeLists.txt) and must only be called when the CPU supports it.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ringattn::bench_detail {

// Each runs `iters` iterations of a block of independent fp32 FMAs held in
// registers (enough accumulators to cover FMA latency x FMA ports) and returns a
// value derived from all accumulators so that the loop cannot be removed.
// *_flops_per_iter is the flop count of one iteration (FMA = 2 flops).
float fma_loop_generic(std::int64_t iters);
inline constexpr double kFmaFlopsPerIterGeneric = 8 * 4 * 2;  // 8 x 4-lane mul+add
float fma_loop_avx2(std::int64_t iters);
inline constexpr double kFmaFlopsPerIterAvx2 = 12 * 8 * 2;  // 12 x 8-lane FMA
float fma_loop_avx512(std::int64_t iters);
inline constexpr double kFmaFlopsPerIterAvx512 = 24 * 16 * 2;  // 24 x 16-lane FMA

// Streaming sum of x[0, n) with several independent vector accumulators.
float read_sum_generic(const float* x, std::size_t n);
float read_sum_avx2(const float* x, std::size_t n);

// The decode_memory_order case's loop (peak_kernels_avx2.cpp): one thread's pass over
// `keys` keys of a K and a V block shaped [keys][kMemoryOrderHeads][kMemoryOrderRowBytes]
// (an fp8 decode cache), tile by tile, in head-major order with software prefetches or
// in key-major order without; returns a sum of its accumulators (seed feeds them, so
// repeated calls are not folded into one).
inline constexpr int kMemoryOrderHeads = 8, kMemoryOrderRowBytes = 128;
inline constexpr int kMemoryOrderTileKeys = 64;
inline constexpr int kMemoryOrderFmaPerLine = 32;  // 8-lane FMAs per 64-byte line
float memory_order_stream_avx2(const std::byte* k, const std::byte* v, std::int64_t keys,
                               bool head_major, float seed);

}  // namespace ringattn::bench_detail
