// Matrix engine of the cpu-avx512-bf16 tier for bf16 storage: the prefill products on
// the bf16 dot-product instruction (vdpbf16ps, AVX512-BF16), written over the pair-vector
// vocabulary B (simd_avx512_bf16.hpp). It is the engine E of FlashFwd
// (flash_fwd_tile.hpp documents the hooks): it packs K / V tiles and the task's Q rows
// and runs a prefill key tile as S = Q K^T, FlashFwd's fp32 online softmax (softmax_tile,
// unchanged), P rounded to bf16, O = O * alpha + P V. Decode stays FlashFwd's (memory
// bound: the engine did not change its CPU time, docs/cpu-backend.md).
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
// FA3's qv (score = scale * (q . k + qv . v)): the score's dot product runs over
// dk = d + d_v values, Q rows [q, qv] and the K tile [dk/2][kTile][2] (K's pairs, then
// V's pairs packed the same way, a second copy of V in K's layout), so S = Q K^T is
// one product over dk; d and d_v are even, so no pair straddles the two parts.
//
// Accumulation is fp32 throughout; the only roundings beyond the fp32 path are the
// bf16 rounding of P and the flush of denormals by the instruction (docs/cpu-backend.md,
// "bf16 engine", states the error bound).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/flash_fwd_tile.hpp"
#include "ringattn/dtype.hpp"

namespace ringattn::detail::cpu {
namespace {

template <class B, int kTile>
struct DpBf16Engine {
  using V = typename B::V;
  using P = typename B::P;
  static constexpr int L = B::kLanes;   // fp32 lanes = bf16 pairs per vector
  static constexpr int kPairs = 2 * L;  // bf16 values per pair vector
  static constexpr int MR = 8;          // prefill register block: 8 rows x 2 vectors
  static constexpr int NV = 2;
  static_assert(kTile % (NV * L) == 0 && kTile % 2 == 0, "tile must hold whole blocks");
  static constexpr bool kMatrix = true;
  static constexpr int kKeyTile = kTile;

  static int q_ld(int d) { return (d + kPairs - 1) / kPairs * kPairs; }
  // Values of the score's dot product: d, or d + d_v with qv (the layouts above).
  template <class F>
  static int score_dim(const F& f) {
    return f.has_qv ? f.p.d + f.p.d_v : f.p.d;
  }
  static std::int64_t k_pack_elems(int d) { return std::int64_t{(d + 1) / 2} * 2 * kTile; }
  static std::int64_t v_pack_elems(int dvp) { return std::int64_t{kTile} * dvp; }

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

  // ---- FlashFwd hooks (flash_fwd_tile.hpp, "E hook") ----

  struct Scratch {
    AlignedBuf<bf16_t> q;   // [rows][q_ld(d)] the task's Q rows
    AlignedBuf<bf16_t> pm;  // [rows][kTile] P of the tile
    AlignedBuf<bf16_t> kv;  // packed K and V of one tile (tasks without a pre-pack)
  };

  // Packed K then V of one tile, in floats (the unit of FlashFwd's pack buffer).
  template <class F>
  static std::int64_t tile_floats(const F& f) {
    return (k_pack_elems(score_dim(f)) + v_pack_elems(f.dvp)) * std::int64_t{sizeof(bf16_t)} / 4;
  }

  template <class F, class Sc>
  static void init_scratch(const F& f, Sc& sc) {
    const std::size_t m = static_cast<std::size_t>(f.max_rows);
    sc.mm.q.reset(m * q_ld(score_dim(f)));
    sc.mm.pm.reset(m * kTile);
    sc.mm.kv.reset(static_cast<std::size_t>(k_pack_elems(score_dim(f)) + v_pack_elems(f.dvp)));
  }

  // Keys [j0, j0 + nc) of KV head hk into dst (tile_floats floats): K then V (with qv:
  // K's pairs, V's pairs in K's layout, then V).
  template <class F>
  static void pack_tile(const F& f, const SeqDesc& sd, int hk, std::int64_t j0, int nc,
                        float* dst) {
    bf16_t* const kp = reinterpret_cast<bf16_t*>(dst);
    const auto v_row = [&](int j) { return f.v_row(sd, j0 + j, hk); };
    pack_k([&](int j) { return f.k_row(sd, j0 + j, hk); }, nc, f.p.d, kp);
    if (f.has_qv) pack_k(v_row, nc, f.p.d_v, kp + k_pack_elems(f.p.d));
    pack_v(v_row, nc, f.p.d_v, f.dvp, kp + k_pack_elems(score_dim(f)));
  }

  // The task's Q rows r = g * nq + ii as stored (unscaled; the scale multiplies S),
  // with qv: [q, qv] (zero padded after qv).
  template <class F, class Sc>
  static void begin_task(const F& f, const Task& t, const SeqDesc& sd, Sc& sc, int) {
    const AttnProblem& p = f.p;
    const int dk = score_dim(f), ldq = q_ld(dk);
    for (int g = 0; g < t.nh * f.group; ++g) {
      const int hq = t.hk * f.group + g;
      for (int ii = 0; ii < t.nq; ++ii) {
        bf16_t* const dst = sc.mm.q.get() + (g * t.nq + ii) * ldq;
        const bf16_t* const q = static_cast<const bf16_t*>(p.q) + sd.q_off +
                                (t.q0 + ii) * p.q_row_stride + hq * p.q_head_stride;
        if (!f.has_qv) {
          pack_q(q, p.d, dst);
          continue;
        }
        const bf16_t* const qv = static_cast<const bf16_t*>(p.qv) + sd.qv_off +
                                 (t.q0 + ii) * p.qv_row_stride + hq * p.qv_head_stride;
        std::memcpy(dst, q, sizeof(bf16_t) * static_cast<std::size_t>(p.d));
        std::memcpy(dst + p.d, qv, sizeof(bf16_t) * static_cast<std::size_t>(p.d_v));
        std::memset(dst + dk, 0, sizeof(bf16_t) * static_cast<std::size_t>(ldq - dk));
      }
    }
  }

  // One key tile: S = Q K^T per block of F::MR rows up to the block's last visible key
  // (FlashFwd::block_limits), the fp32 online softmax (FlashFwd::softmax_tile), P packed
  // to bf16, O = O * alpha + P V.
  template <class F, class Sc>
  static void prefill_tile(const F& f, const SeqDesc& sd, const Task& t, Sc& sc, int M, int nq,
                           std::int64_t j0, int nc, bool full, const float* packed) {
    constexpr int FMR = F::MR, W = F::NV * F::L;
    static_assert(MR >= FMR && kTile % W == 0 && W % L == 0,
                  "the engine's blocks must cover the kernel's row blocks and key tile");
    const AttnProblem& p = f.p;
    if (!packed) {
      packed = reinterpret_cast<const float*>(sc.mm.kv.get());
      pack_tile(f, sd, t.hk, j0, nc, reinterpret_cast<float*>(sc.mm.kv.get()));
    }
    const bf16_t* const kp = reinterpret_cast<const bf16_t*>(packed);
    const int dk = score_dim(f);
    const bf16_t* const vp = kp + k_pack_elems(dk);
    const int ncv = static_cast<int>(round_up(nc, W));
    const int ldq = q_ld(dk), dvp = f.dvp;
    const float qmul = p.softcap > 0.0f ? p.scale / p.softcap : p.scale;
    const int* lim = sc.lim.get();
    f.block_limits(sc, M, nq, j0, nc, full);
    for (int r0 = 0, bi = 0; r0 < M; r0 += FMR, ++bi) {
      const int rows = std::min(FMR, M - r0);
      if (lim[bi] > 0)
        qk(rows, sc.mm.q.get() + r0 * ldq, ldq, kp, dk, qmul, sc.s.get() + r0 * kTile,
           static_cast<int>(round_up(lim[bi], W)));
    }
    f.softmax_tile(sc, M, nq, j0, nc, ncv, full);
    for (int r0 = 0, bi = 0; r0 < M; r0 += FMR, ++bi) {
      const int rows = std::min(FMR, M - r0);
      if (lim[bi] == 0) continue;
      const int ncp = static_cast<int>(round_up(lim[bi], L));
      bf16_t* const pb = sc.mm.pm.get() + r0 * kTile;
      pack_p(sc.s.get() + r0 * kTile, kTile, rows, ncp, pb, kTile);
      pv(rows, pb, kTile, vp, lim[bi], dvp, sc.alpha.get() + r0, sc.o.get() + r0 * dvp, dvp);
    }
  }
};

}  // namespace
}  // namespace ringattn::detail::cpu
