// Matmul engine of the CPU attention kernels for bf16 storage on the bf16 dot-product
// instruction (vdpbf16ps, AVX512-BF16), written over the pair-vector vocabulary B
// (simd_avx512_bf16.hpp). flash_fwd_tile.hpp calls it through the engine interface
// documented there (FlashFwd's template parameter E); the online softmax between the
// two products stays in fp32 and is not part of the engine.
//
// Layouts (bf16 elements; kTile = kKeyTile keys per tile):
//   Q    row-major [rows][ldq], ldq = q_ld(d) (a multiple of 32), zero padded: the
//        pairs (q[2i], q[2i+1]) are adjacent as they are in memory.
//   K    packed tile [d/2][kTile][2]: for each pair of head dims, the (K[j][2i],
//        K[j][2i+1]) pairs of the tile's keys (pair-interleaved along d), keys past nc 0.
//        One 64-byte load = 16 keys x one pair of dims.
//   P    row-major [rows][ldp] bf16, rounded from the fp32 softmax numerators (round
//        to nearest even, as FlashAttention-3 rounds P for 16-bit inputs).
//   V    packed tile [kTile/2][dvp][2]: for each pair of keys, the (V[2k][c],
//        V[2k+1][c]) pairs of every column (pair-interleaved along keys), padding 0.
// Decode reads K and V rows in place: K rows already hold pairs along d, and two V
// rows are interleaved in registers (B::interleave).
//
// Accumulation is fp32 throughout; the only roundings beyond the fp32 path are the
// bf16 rounding of P and the flush of denormals by the instruction (docs/cpu-backend.md,
// "bf16 engine", states the error bound).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "ringattn/dtype.hpp"

namespace ringattn::detail::cpu {

template <class B, int kTile>
struct DpBf16Engine {
  using V = typename B::V;
  using P = typename B::P;
  static constexpr int L = B::kLanes;   // fp32 lanes = bf16 pairs per vector
  static constexpr int kPairs = 2 * L;  // bf16 values per pair vector
  static constexpr int MR = 8;          // prefill register block: 8 rows x 2 vectors
  static constexpr int NV = 2;
  static_assert(kTile % (NV * L) == 0 && kTile % 2 == 0, "tile must hold whole blocks");

  static int q_ld(int d) { return (d + kPairs - 1) / kPairs * kPairs; }
  static std::int64_t k_pack_elems(int d) { return std::int64_t{(d + 1) / 2} * 2 * kTile; }
  static std::int64_t v_pack_elems(int dvp) { return std::int64_t{kTile} * dvp; }

  static void prefetch(const bf16_t* a) { __builtin_prefetch(a, 0, 1); }

  // ---- packing ----

  // Q row: n values (raw bf16, no scaling) into dst, zero up to q_ld(n).
  static void pack_q(const bf16_t* src, int n, bf16_t* dst) {
    std::memcpy(dst, src, sizeof(bf16_t) * static_cast<std::size_t>(n));
    std::memset(dst + n, 0, sizeof(bf16_t) * static_cast<std::size_t>(q_ld(n) - n));
  }

  // K tile: row(j) -> key j's [d] row, j < nc. A 32-bit transpose (each pair is one
  // 32-bit word): dst32[i][j] = row(j)32[i].
  template <class RowFn>
  static void pack_k(RowFn&& row, int nc, int d, bf16_t* dst) {
    const int np = d / 2;  // d is even
    auto* out = reinterpret_cast<std::uint32_t*>(dst);
    for (int j = 0; j < nc; ++j) {
      const bf16_t* r = row(j);
      for (int i = 0; i < np; ++i) std::memcpy(out + i * kTile + j, r + 2 * i, 4);
    }
    if (nc < kTile)
      for (int i = 0; i < np; ++i) std::fill(out + i * kTile + nc, out + (i + 1) * kTile, 0u);
  }

  // V tile: row(j) -> key j's [dv] row, j < nc; dst [kTile/2][dvp][2], zero padded
  // (columns past dv, keys past nc).
  template <class RowFn>
  static void pack_v(RowFn&& row, int nc, int dv, int dvp, bf16_t* dst) {
    for (int k = 0; k < kTile / 2; ++k) {
      bf16_t* o = dst + std::int64_t{k} * dvp * 2;
      for (int e = 0; e < 2; ++e) {
        const int j = 2 * k + e;
        if (j < nc) {
          const bf16_t* r = row(j);
          for (int c = 0; c < dv; ++c) o[2 * c + e] = r[c];
        } else {
          for (int c = 0; c < dv; ++c) o[2 * c + e] = bf16_t{0};
        }
      }
      for (int c = 2 * dv; c < 2 * dvp; ++c) o[c] = bf16_t{0};
    }
  }

  // P: rows x ncols (a multiple of L) of s (row stride lds) -> pb (row stride ldp),
  // rounded to nearest even.
  static void pack_p(const float* s, int lds, int rows, int ncols, bf16_t* pb, int ldp) {
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < ncols; c += L) B::store_bf16(pb + r * ldp + c, B::load(s + r * lds + c));
  }

  // ---- prefill micro-kernels (packed K / V) ----

  // S[R][ncols] = mul * Q[R][d] K^T (ncols a multiple of NV * L, s row stride kTile).
  // Register block: R rows x NV vectors; per pair of dims, NV loads of K pairs and R
  // broadcasts of Q pairs feed R * NV dot products (2 FMAs each).
  template <int R>
  static void qk_block(const bf16_t* q, int ldq, const bf16_t* kp, int d, float mul, float* s,
                       int ncols) {
    const int np = d / 2;
    const V vm = B::set1(mul);
    for (int c0 = 0; c0 < ncols; c0 += NV * L) {
      V acc[R][NV];
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = B::zero();
      const bf16_t* k = kp + 2 * c0;
      for (int i = 0; i < np; ++i) {
        P b[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) b[v] = B::load_pairs(k + v * kPairs);
        k += 2 * kTile;
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          const P a = B::bcast_pair(q + r * ldq + 2 * i);
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) acc[r][v] = B::dot2(acc[r][v], a, b[v]);
        }
      }
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) B::store(s + r * kTile + c0 + v * L, B::mul(acc[r][v], vm));
    }
  }
  template <int R = MR>
  static void qk(int rows, const bf16_t* q, int ldq, const bf16_t* kp, int d, float mul, float* s,
                 int ncols) {
    if constexpr (R > 0) {
      if (rows == R) return qk_block<R>(q, ldq, kp, d, mul, s, ncols);
      return qk<R - 1>(rows, q, ldq, kp, d, mul, s, ncols);
    }
  }

  // O[R][c0 .. c0 + NVv * L) = O * alpha + P[R][0 .. nk) V (nk rounded up to a pair:
  // P is 0 there and the packed V row is 0 or a real row past the visible keys).
  template <int R, int NVv>
  static void pv_block(const bf16_t* pb, int ldp, const bf16_t* vp, int nk, int c0, int dvp,
                       const float* alpha, float* o, int ldo) {
    const int npairs = (nk + 1) / 2;
    V acc[R][NVv];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const V al = B::set1(alpha[r]);
#pragma GCC unroll 4
      for (int v = 0; v < NVv; ++v) acc[r][v] = B::mul(B::load(o + r * ldo + c0 + v * L), al);
    }
    const bf16_t* vk = vp + 2 * c0;
    for (int k = 0; k < npairs; ++k) {
      P b[NVv];
#pragma GCC unroll 4
      for (int v = 0; v < NVv; ++v) b[v] = B::load_pairs(vk + v * kPairs);
      vk += 2 * dvp;
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const P a = B::bcast_pair(pb + r * ldp + 2 * k);
#pragma GCC unroll 4
        for (int v = 0; v < NVv; ++v) acc[r][v] = B::dot2(acc[r][v], a, b[v]);
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NVv; ++v) B::store(o + r * ldo + c0 + v * L, acc[r][v]);
  }
  // All dvp columns (a multiple of L): blocks of NV vectors, then one of a single vector.
  template <int R>
  static void pv_cols(const bf16_t* pb, int ldp, const bf16_t* vp, int nk, int dvp,
                      const float* alpha, float* o, int ldo) {
    int c0 = 0;
    for (; c0 + NV * L <= dvp; c0 += NV * L)
      pv_block<R, NV>(pb, ldp, vp, nk, c0, dvp, alpha, o, ldo);
    for (; c0 < dvp; c0 += L) pv_block<R, 1>(pb, ldp, vp, nk, c0, dvp, alpha, o, ldo);
  }
  template <int R = MR>
  static void pv(int rows, const bf16_t* pb, int ldp, const bf16_t* vp, int nk, int dvp,
                 const float* alpha, float* o, int ldo) {
    if constexpr (R > 0) {
      if (rows == R) return pv_cols<R>(pb, ldp, vp, nk, dvp, alpha, o, ldo);
      return pv<R - 1>(rows, pb, ldp, vp, nk, dvp, alpha, o, ldo);
    }
  }

  // ---- decode micro-kernels (K / V rows read in place) ----

  // s[r * kTile + k] = mul * q[r] . krows[k] for R rows (R a power of two <= L), keys
  // KB = L / R at a time: R x KB accumulators = L independent chains, finished by one
  // transposed reduction (as the fp32 decode kernel does). Each pair-vector step covers
  // 32 dims. krows / pf hold round_up(nk, KB) pointers (padding repeats a real row).
  template <int R>
  static void qk_rows(const bf16_t* q, int ldq, const bf16_t* const* krows, const bf16_t* const* pf,
                      int nk, int d, float mul, float* s) {
    constexpr int KB = L / R;
    static_assert(R * KB == L, "rows must divide the vector width");
    const int dfull = d / kPairs * kPairs;
    const int tail = d - dfull;
    const V vm = B::set1(mul);
    for (int k0 = 0; k0 < nk; k0 += KB) {
      V acc[L];
#pragma GCC unroll 16
      for (int i = 0; i < L; ++i) acc[i] = B::zero();
      const bf16_t* kr[KB];
      const bf16_t* kf[KB];
#pragma GCC unroll 16
      for (int kb = 0; kb < KB; ++kb) {
        kr[kb] = krows[k0 + kb];
        kf[kb] = pf[k0 + kb];
      }
      for (int c = 0; c < dfull; c += kPairs) {
        P b[KB];
#pragma GCC unroll 16
        for (int kb = 0; kb < KB; ++kb) prefetch(kf[kb] + c);
#pragma GCC unroll 16
        for (int kb = 0; kb < KB; ++kb) b[kb] = B::load_pairs(kr[kb] + c);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          const P a = B::load_pairs(q + r * ldq + c);
#pragma GCC unroll 16
          for (int kb = 0; kb < KB; ++kb) acc[r * KB + kb] = B::dot2(acc[r * KB + kb], a, b[kb]);
        }
      }
      if (tail) {
#pragma GCC unroll 16
        for (int kb = 0; kb < KB; ++kb) prefetch(kf[kb] + dfull);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          const P a = B::load_pairs(q + r * ldq + dfull);  // zero padded
#pragma GCC unroll 16
          for (int kb = 0; kb < KB; ++kb)
            acc[r * KB + kb] =
                B::dot2(acc[r * KB + kb], a, B::load_pairs_partial(kr[kb] + dfull, tail));
        }
      }
      alignas(64) float sums[L];
      B::store(sums, B::mul(B::reduce_add_lanes(acc), vm));
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
        for (int kb = 0; kb < KB; ++kb) s[r * kTile + k0 + kb] = sums[r * KB + kb];
    }
  }
  // Any row count: chunks of L, L/2, ..., 1 rows.
  template <int R = L>
  static void qk_rows_any(int rows, int r0, const bf16_t* q, int ldq, const bf16_t* const* krows,
                          const bf16_t* const* pf, int nk, int d, float mul, float* s) {
    for (; rows - r0 >= R; r0 += R)
      qk_rows<R>(q + r0 * ldq, ldq, krows, pf, nk, d, mul, s + r0 * kTile);
    if constexpr (R > 1) qk_rows_any<R / 2>(rows, r0, q, ldq, krows, pf, nk, d, mul, s);
  }

  // O[R][c0 .. c0 + NVv * L) = O * alpha + P[R][0 .. nk) V, V rows read in place: per
  // pair of keys, 32 columns of both rows are loaded and interleaved into two pair
  // vectors (columns [0, 16) and [16, 32)); a key past nk (odd nk) is a zero row.
  // Columns past dv load as 0 (masked); c0 + NVv * L <= dvp.
  template <int R, int NVv>
  static void pv_rows_block(const bf16_t* pb, int ldp, const bf16_t* const* vrows,
                            const bf16_t* const* pf, int nk, int c0, int dv, int dvp,
                            const float* alpha, float* o, int ldo) {
    constexpr int NH = (NVv + 1) / 2;  // 32-column loads per row
    V acc[R][NVv];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const V al = B::set1(alpha[r]);
#pragma GCC unroll 4
      for (int v = 0; v < NVv; ++v) acc[r][v] = B::mul(B::load(o + r * ldo + c0 + v * L), al);
    }
    int cnt[NH];
#pragma GCC unroll 4
    for (int h = 0; h < NH; ++h) cnt[h] = std::clamp(dv - (c0 + h * kPairs), 0, kPairs);
    const auto load = [&](const bf16_t* row, int h) {
      return cnt[h] == kPairs ? B::load_pairs(row + c0 + h * kPairs)
                              : B::load_pairs_partial(row + c0 + h * kPairs, cnt[h]);
    };
    for (int k = 0; k < nk; k += 2) {
      const bool two = k + 1 < nk;
      P b[2 * NH];
#pragma GCC unroll 4
      for (int h = 0; h < NH; ++h) {
        if (cnt[h] > 0) {
          prefetch(pf[k] + c0 + h * kPairs);
          if (two) prefetch(pf[k + 1] + c0 + h * kPairs);
        }
        const P x = cnt[h] > 0 ? load(vrows[k], h) : B::zero_pairs();
        const P y = two && cnt[h] > 0 ? load(vrows[k + 1], h) : B::zero_pairs();
        B::interleave(x, y, b[2 * h], b[2 * h + 1]);
      }
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const P a = B::bcast_pair(pb + r * ldp + k);
#pragma GCC unroll 4
        for (int v = 0; v < NVv; ++v) acc[r][v] = B::dot2(acc[r][v], a, b[v]);
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NVv; ++v) B::store(o + r * ldo + c0 + v * L, acc[r][v]);
  }
  // All columns for R rows (1 .. 8): 4 vectors a block up to 4 rows, else 2.
  template <int R>
  static void pv_rows_cols(const bf16_t* pb, int ldp, const bf16_t* const* vrows,
                           const bf16_t* const* pf, int nk, int dv, int dvp, const float* alpha,
                           float* o, int ldo) {
    constexpr int NVv = R <= 4 ? 4 : 2;
    int c0 = 0;
    for (; c0 + NVv * L <= dvp; c0 += NVv * L)
      pv_rows_block<R, NVv>(pb, ldp, vrows, pf, nk, c0, dv, dvp, alpha, o, ldo);
    for (; c0 + 2 * L <= dvp; c0 += 2 * L)
      pv_rows_block<R, 2>(pb, ldp, vrows, pf, nk, c0, dv, dvp, alpha, o, ldo);
    if (c0 < dvp) pv_rows_block<R, 1>(pb, ldp, vrows, pf, nk, c0, dv, dvp, alpha, o, ldo);
  }
  template <int R = 8>
  static void pv_rows(int rows, const bf16_t* pb, int ldp, const bf16_t* const* vrows,
                      const bf16_t* const* pf, int nk, int dv, int dvp, const float* alpha,
                      float* o, int ldo) {
    if constexpr (R > 0) {
      if (rows == R) return pv_rows_cols<R>(pb, ldp, vrows, pf, nk, dv, dvp, alpha, o, ldo);
      return pv_rows<R - 1>(rows, pb, ldp, vrows, pf, nk, dv, dvp, alpha, o, ldo);
    }
  }
};

}  // namespace ringattn::detail::cpu
