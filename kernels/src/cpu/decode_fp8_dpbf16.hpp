// Decode engine for fp8 e4m3 caches on the AVX512-BF16 tiers (cpu-avx512-bf16, cpu-amx):
// both decode products on the bf16 dot-product instruction (vdpbf16ps), written over the
// pair-vector vocabulary B (simd_avx512_bf16_vbmi.hpp). It is the engine E of
// FlashFwd<S, fp8e4m3_t, E> (flash_fwd_tile.hpp documents the decode hooks); prefill
// keeps FlashFwd's fp32 vector kernels, and the task loop, masks, splits, merges and
// softmax are FlashFwd's; the engine sets the decode tile (kDecodeTile keys).
//
// Why: the fp32 decode kernel widens each 16 e4m3 values with 4 vector instructions
// and spends one FMA per product, so fp8 decode was as slow as bf16 although it reads
// half the bytes (docs/cpu-backend.md, "fp8 e4m3 q/k/v"). Here the e4m3 bytes become
// bf16 exactly (table lookups, 5 instructions per 64 values, 4 of them shuffles) and
// every vdpbf16ps does 32 products:
//   S = q K^T   q (e4m3, exact in bf16) converted once per task; K rows converted in
//               place, R rows x L / R keys of accumulators, one transposed reduction
//               per L dot products (as FlashFwd's qk_rows); 4 rows (GQA 4) take two
//               keys per conversion and vector, one reduction level less (qk_rows4);
//               the softmax scale and the descales multiply the sums.
//   P           FlashFwd's fp32 online softmax (softmax_tile), then P rounded to bf16
//               (round to nearest even, as FlashAttention-3 does for 16-bit inputs; the
//               row sum keeps the fp32 P).
//   O += P V    over pairs of keys: two V rows converted and interleaved into pairs
//               (B::fp8_pairs), up to 4 rows x 4 vectors (64 columns) of accumulators.
// Error: products of two bf16 values are exact in fp32, so S carries only fp32
// summation error; P to bf16 moves each weight by at most 2^-8 relative, an output
// element by at most 2^-8 max|v| (docs/cpu-backend.md).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu/flash_fwd_tile.hpp"
#include "ringattn/dtype.hpp"

namespace ringattn::detail::cpu {
namespace {

template <class B>
struct Fp8DpBf16Decode {
  using V = typename B::V;
  using P = typename B::P;
  static constexpr int L = B::kLanes;       // fp32 lanes = bf16 pairs per vector
  static constexpr int kChunk = 64;         // e4m3 values per conversion (one 64-byte load)
  static constexpr int kHalf = kChunk / 2;  // values per key in qk_rows4's conversions
  // Bytes per prefetch_l2 call: 32, one prefetch per 64-byte load, so each line of a
  // 64-byte-aligned row is asked for once. Asking twice, as the fp32 kernel does, cost
  // the fp8 engine 2-7 % on 2 threads from DRAM once its prefetches walk memory in order
  // (decode_tile): the extra prefetch is an issue slot in a loop that is compute-bound.
  static constexpr int kPrefetchBytes = 32;
  // Keys per decode tile: 64 (FlashFwd's head-major tile has 16) spreads the per-tile
  // work of each row (softmax reductions, O loaded, rescaled and stored once per tile)
  // over 4x the keys: in L2, one thread, 25 -> 22-23 ns per key-head (4 query rows)
  // from 32-key tiles, 26-28 with 16 (docs/cpu-backend.md).
  static constexpr int kTile = 64;
  static constexpr int kDecodeTile = kTile;
  static_assert(kTile % L == 0 && cpu::kKeyTile % kTile == 0, "tile: whole vectors");
  static constexpr bool kMatrix = false;  // prefill: FlashFwd's vector kernels
  static constexpr bool kDecode = true;
  static constexpr int kKeyTile = cpu::kKeyTile;

  struct Scratch {
    AlignedBuf<bf16_t> q;         // [rows][qld] q rows in B::fp8_to_bf16 order, zero padded
    AlignedBuf<std::uint32_t> p;  // [rows][kTile / 2] P of the tile as bf16 pairs
    AlignedBuf<bf16_t> q2;        // [rows][q2ld] the same, each 32 values twice (qk_rows4)
    AlignedBuf<float> mul;        // [rows] score factor (scale x descales x 256^2)
    int qld = 0, q2ld = 0;
  };

  template <class F>
  static void init_scratch(const F& f, typename F::Scratch& sc) {
    const std::size_t m = static_cast<std::size_t>(f.max_rows);
    sc.mm.qld = static_cast<int>(round_up(f.p.d, kChunk));
    sc.mm.q.reset(m * static_cast<std::size_t>(sc.mm.qld));
    sc.mm.q2ld = static_cast<int>(2 * round_up(f.p.d, kHalf));
    sc.mm.q2.reset(m * static_cast<std::size_t>(sc.mm.q2ld));
    sc.mm.p.reset(m * kTile / 2);
    sc.mm.mul.reset(m);
    // FlashFwd's prefetch row lists, enlarged to [heads][kTile] (decode_tile).
    sc.kpf.reset(static_cast<std::size_t>(f.p.h_k) * kTile);
    sc.vpf.reset(static_cast<std::size_t>(f.p.h_k) * kTile);
  }

  // A decode task's q rows (r = g * nq + ii, as FlashFwd's) as bf16 of value / 256, in
  // the order of the 64-value conversions (qk_rows) and, for qk_rows4, of 32 values
  // loaded into both halves; and each row's score factor.
  template <class F>
  static void begin_decode_task(const F& f, const Task& t, const SeqDesc& sd,
                                typename F::Scratch& sc, int M) {
    const AttnProblem& p = f.p;
    const int nq = t.nq, gq = M / nq;
    const float qmul = p.softcap > 0.0f ? p.scale / p.softcap : p.scale;
    const typename B::Fp8Tables tab = B::fp8_tables();
    for (int g = 0; g < gq; ++g) {
      const int hq = t.hk * f.group + g;
      for (int ii = 0; ii < nq; ++ii) {
        const int r = g * nq + ii;
        const fp8e4m3_t* src = static_cast<const fp8e4m3_t*>(p.q) + sd.q_off +
                               (t.q0 + ii) * p.q_row_stride + hq * p.q_head_stride;
        bf16_t* dst = sc.mm.q.get() + std::int64_t{r} * sc.mm.qld;
        for (int c = 0; c < p.d; c += kChunk) {
          P a, b;
          B::fp8_to_bf16(tab, B::load_fp8_bytes(src + c, std::min(kChunk, p.d - c)), a, b);
          B::store_pairs(dst + c, a);
          B::store_pairs(dst + c + kChunk / 2, b);
        }
        bf16_t* dst2 = sc.mm.q2.get() + std::int64_t{r} * sc.mm.q2ld;
        for (int c = 0; c < p.d; c += kHalf) {
          P a, b;
          const int n = std::min(kHalf, p.d - c);
          B::fp8_to_bf16(tab, B::load_fp8_halves(src + c, src + c, n), a, b);
          B::store_pairs(dst2 + 2 * c, a);
          B::store_pairs(dst2 + 2 * c + kHalf, b);
        }
        sc.mm.mul[static_cast<std::size_t>(r)] = qmul * p.qk_factor(sd, hq / f.group);
      }
    }
  }

  // qk_rows for R = 4 rows (GQA groups of 4 at s_q = 1), in blocks of 8 keys with one
  // reduction level less: each conversion takes 32 values of key k0 + kp and the same 32
  // of key k0 + 4 + kp (B::load_fp8_halves), so an accumulator's 256-bit halves are the
  // dot products of two keys against q2 (q's 32 values in both halves). The 16
  // accumulators (row r, pair kp) then reduce to 32 scores in 2 vectors whose 256-bit
  // halves are the rows' 8 keys in order (B::reduce_add_halves): 42 reduction
  // instructions per 32 scores instead of 45 per 16, the same conversions and dot
  // products. In L2, one thread: 19.0 -> 17.4 ns per key-head (docs/cpu-backend.md).
  [[gnu::flatten]] static void qk_rows4(const typename B::Fp8Tables& tab, const bf16_t* q2,
                                        int q2ld, const float* mul, const fp8e4m3_t* const* krows,
                                        const fp8e4m3_t* const* kf, std::int64_t off, int nk, int d,
                                        float* s) {
    static_assert(L == 16, "two 8-lane halves per vector");
    alignas(64) float mv[L];  // rows 0, 1 (then 2, 3): 8 lanes each
    for (int i = 0; i < L; ++i) mv[i] = mul[i / 8];
    const V mul01 = B::load(mv);
    for (int i = 0; i < L; ++i) mv[i] = mul[2 + i / 8];
    const V mul23 = B::load(mv);
    const int dfull = d / kHalf * kHalf;
    for (int k0 = 0; k0 < nk; k0 += 8) {
      V acc[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) acc[i] = B::zero();
      // 32 values of every key of the block (n < 32: masked loads).
      const auto chunk = [&](int c, auto tail, int n) {
#pragma GCC unroll 4
        for (int kp = 0; kp < 4; ++kp) {
          const fp8e4m3_t* a = krows[k0 + kp] + off + c;
          const fp8e4m3_t* b = krows[k0 + 4 + kp] + off + c;
          if (c % kChunk == 0) {  // one prefetch per 64 bytes of a row
            prefetch_l2<kPrefetchBytes>(kf[k0 + kp] + c);
            prefetch_l2<kPrefetchBytes>(kf[k0 + 4 + kp] + c);
          }
          typename B::Bytes x;
          if constexpr (decltype(tail)::value) {
            x = B::load_fp8_halves(a, b, n);
          } else {
            x = B::load_fp8_halves(a, b);
          }
          P ka, kb;
          B::fp8_to_bf16(tab, x, ka, kb);
#pragma GCC unroll 4
          for (int r = 0; r < 4; ++r) {
            const P qa = B::load_pairs(q2 + r * q2ld + 2 * c);
            const P qb = B::load_pairs(q2 + r * q2ld + 2 * c + kHalf);
            acc[r * 4 + kp] = B::dot2(B::dot2(acc[r * 4 + kp], qa, ka), qb, kb);
          }
        }
      };
      for (int c = 0; c < dfull; c += kHalf) chunk(c, std::false_type{}, kHalf);
      if (dfull < d) chunk(dfull, std::true_type{}, d - dfull);
      V w[2];
      B::reduce_add_halves(acc, w);
      B::template store_groups<8>(s + k0, kDecodeRowStride, B::mul(w[0], mul01));
      B::template store_groups<8>(s + k0 + 2 * kDecodeRowStride, kDecodeRowStride,
                                  B::mul(w[1], mul23));
    }
  }

  // Scores of R rows (a power of two <= L) against the keys' rows krows[k] + off, k in
  // [0, nk) (padded to a multiple of KB = L / R): R x KB accumulators = L independent
  // dot-product chains, finished by one transposed reduction whose lanes (r KB + kb)
  // are multiplied by mul[r] and stored as R runs of KB scores. Each 64-byte K load is
  // paired with a prefetch of the same offset in kf[k] (decode_tile's prefetch list).
  template <int R>
  [[gnu::flatten]] static void qk_rows(const typename B::Fp8Tables& tab, const bf16_t* q, int qld,
                                       const float* mul, const fp8e4m3_t* const* krows,
                                       const fp8e4m3_t* const* kf, std::int64_t off, int nk, int d,
                                       float* s) {
    constexpr int KB = L / R;
    const int dfull = d / kChunk * kChunk;
    alignas(64) float mv[L];  // lane r KB + kb: mul[r]
    for (int i = 0; i < L; ++i) mv[i] = mul[i / KB];
    const V mulv = B::load(mv);
    for (int k0 = 0; k0 < nk; k0 += KB) {
      V acc[L];
#pragma GCC unroll 16
      for (int i = 0; i < L; ++i) acc[i] = B::zero();
      // One 64-value chunk of every key of the block (n < 64: a masked load).
      const auto chunk = [&](int c, auto tail, int n) {
#pragma GCC unroll 16
        for (int kb = 0; kb < KB; ++kb) {
          prefetch_l2<kPrefetchBytes>(kf[k0 + kb] + c);
          typename B::Bytes x;
          if constexpr (decltype(tail)::value) {
            x = B::load_fp8_bytes(krows[k0 + kb] + off + c, n);
          } else {
            x = B::load_fp8_bytes(krows[k0 + kb] + off + c);
          }
          P ka, kb2;
          B::fp8_to_bf16(tab, x, ka, kb2);
#pragma GCC unroll 16
          for (int r = 0; r < R; ++r) {
            const P qa = B::load_pairs(q + r * qld + c);
            const P qb = B::load_pairs(q + r * qld + c + kChunk / 2);
            acc[r * KB + kb] = B::dot2(B::dot2(acc[r * KB + kb], qa, ka), qb, kb2);
          }
        }
      };
      for (int c = 0; c < dfull; c += kChunk) chunk(c, std::false_type{}, kChunk);
      if (dfull < d) chunk(dfull, std::true_type{}, d - dfull);
      B::template store_groups<KB>(s + k0, kDecodeRowStride,
                                   B::mul(B::reduce_add_lanes(acc), mulv));
    }
  }
  template <int R = L>
  static void qk_rows_pow2(int rows, int& r0, const typename B::Fp8Tables& tab, const bf16_t* q,
                           int qld, const bf16_t* q2, int q2ld, const float* mul,
                           const fp8e4m3_t* const* krows, const fp8e4m3_t* const* kf,
                           std::int64_t off, int nk, int d, float* s) {
    for (; rows - r0 >= R; r0 += R) {
      if constexpr (R == 4) {
        qk_rows4(tab, q2 + r0 * q2ld, q2ld, mul + r0, krows, kf, off, nk, d,
                 s + r0 * kDecodeRowStride);
      } else {
        qk_rows<R>(tab, q + r0 * qld, qld, mul + r0, krows, kf, off, nk, d,
                   s + r0 * kDecodeRowStride);
      }
    }
    if constexpr (R > 1)
      qk_rows_pow2<R / 2>(rows, r0, tab, q, qld, q2, q2ld, mul, krows, kf, off, nk, d, s);
  }

  // O[R rows][c0 .. c0 + NVv * L) = O * alpha + P V over key pairs: V rows
  // vrows[2i] + off, vrows[2i + 1] + off (n = min(64, d_v - c0) columns read), P pairs
  // pb[r * kTile / 2 + i]; the loads are paired with prefetches of vf[2i], vf[2i + 1].
  template <int R, int NVv, bool kTail>
  static void pv_chunk(const typename B::Fp8Tables& tab, const std::uint32_t* pb,
                       const fp8e4m3_t* const* vrows, const fp8e4m3_t* const* vf, std::int64_t off,
                       int npairs, int c0, int n, const float* alpha, float* o, int ldo) {
    V acc[R][NVv];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const V al = B::set1(alpha[r]);
#pragma GCC unroll 4
      for (int v = 0; v < NVv; ++v) acc[r][v] = B::mul(B::load(o + r * ldo + c0 + v * L), al);
    }
    for (int i = 0; i < npairs; ++i) {
      prefetch_l2<kPrefetchBytes>(vf[2 * i] + c0);
      prefetch_l2<kPrefetchBytes>(vf[2 * i + 1] + c0);
      typename B::Bytes x, y;
      if constexpr (kTail) {
        x = B::load_fp8_bytes(vrows[2 * i] + off + c0, n);
        y = B::load_fp8_bytes(vrows[2 * i + 1] + off + c0, n);
      } else {
        x = B::load_fp8_bytes(vrows[2 * i] + off + c0);
        y = B::load_fp8_bytes(vrows[2 * i + 1] + off + c0);
      }
      P vp[4];
      B::fp8_pairs(tab, x, y, vp);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const P pr = B::bcast_pair(pb + r * (kTile / 2) + i);
#pragma GCC unroll 4
        for (int v = 0; v < NVv; ++v) acc[r][v] = B::dot2(acc[r][v], pr, vp[v]);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NVv; ++v) B::store(o + r * ldo + c0 + v * L, acc[r][v]);
  }
  // All d_v columns for R (<= 4) rows: 64-column chunks, the last one narrower.
  template <int R>
  static void pv_rows(const typename B::Fp8Tables& tab, const std::uint32_t* pb,
                      const fp8e4m3_t* const* vrows, const fp8e4m3_t* const* vf, std::int64_t off,
                      int npairs, int dv, const float* alpha, float* o, int ldo) {
    int c0 = 0;
    for (; c0 + kChunk <= dv; c0 += kChunk)
      pv_chunk<R, 4, false>(tab, pb, vrows, vf, off, npairs, c0, kChunk, alpha, o, ldo);
    const int n = dv - c0;
    if (n > 3 * L) {
      pv_chunk<R, 4, true>(tab, pb, vrows, vf, off, npairs, c0, n, alpha, o, ldo);
    } else if (n > 2 * L) {
      pv_chunk<R, 3, true>(tab, pb, vrows, vf, off, npairs, c0, n, alpha, o, ldo);
    } else if (n > L) {
      pv_chunk<R, 2, true>(tab, pb, vrows, vf, off, npairs, c0, n, alpha, o, ldo);
    } else if (n > 0) {
      pv_chunk<R, 1, true>(tab, pb, vrows, vf, off, npairs, c0, n, alpha, o, ldo);
    }
  }

  // Row stride of FlashFwd's score tile sc.s (its NC).
  static constexpr int kDecodeRowStride = cpu::kKeyTile;

  // One decode key tile (keys [j0, j0 + nc), nc <= kTile) of all t.nh KV heads; rows of
  // head hh are r in [hh * mh, (hh + 1) * mh). Head-major as FlashFwd's
  // decode_tile_head_major: per head its K rows for the scores, FlashFwd's softmax over
  // all rows, P to bf16 pairs, per head its V rows for O += P V (accumulators in
  // registers across the tile's keys). Row pointers are resolved once per key (head 0 of
  // the task; head hh adds hh times the head stride).
  template <class F>
  static void decode_tile(const F& f, const SeqDesc& sd, const Task& t, typename F::Scratch& sc,
                          int M, int nq, std::int64_t j0, int nc, bool full) {
    static_assert(F::NC == kDecodeRowStride, "score tile row stride");
    const AttnProblem& p = f.p;
    const int mh = M / t.nh;
    const int ncv = static_cast<int>(round_up(nc, L));
    const std::int64_t khs = kv_head_stride(sd.k), vhs = kv_head_stride(sd.v);
    f.decode_tile_rows_of(sd, t, sc, j0, nc, ncv, F::kDecodePrefetchKeys);
    const typename B::Fp8Tables tab = B::fp8_tables();
    // Rows past nc (padding of the score block, masked; the odd key of the last V pair,
    // P = 0) repeat the last key's row; every head adds its stride to these pointers.
    const fp8e4m3_t** kb = sc.kbase.get();
    const fp8e4m3_t** vb = sc.vbase.get();
    for (int j = nc; j < ncv; ++j) kb[j] = kb[nc - 1], vb[j] = vb[nc - 1];
    // The rows kDecodePrefetchKeys keys ahead, prefetched in memory order: the heads of
    // a key side by side, then the next key. Step (head hh, key j) of the head-major
    // loops below asks for entry hh * ncv + j of this key-major list, so the prefetches
    // walk the next tile's block front to back. Asked for head by head (rows a key
    // stride apart), the same prefetches left fp8 decode 8-12 % slower from DRAM on 2
    // threads (docs/cpu-backend.md).
    const fp8e4m3_t** kpf = sc.kpf.get();
    const fp8e4m3_t** vpf = sc.vpf.get();
    for (int j = 0, i = 0; j < ncv; ++j)
      for (int hh = 0; hh < t.nh; ++hh, ++i) {
        kpf[i] = sc.kpf_base[j] + hh * khs;
        vpf[i] = sc.vpf_base[j] + hh * vhs;
      }
    const int qld = sc.mm.qld;
    for (int hh = 0; hh < t.nh; ++hh) {
      int r0 = 0;
      qk_rows_pow2(mh, r0, tab, sc.mm.q.get() + hh * mh * qld, qld,
                   sc.mm.q2.get() + hh * mh * sc.mm.q2ld, sc.mm.q2ld, sc.mm.mul.get() + hh * mh, kb,
                   kpf + hh * ncv, hh * khs, nc, p.d, sc.s.get() + hh * mh * kDecodeRowStride);
    }
    f.softmax_tile(sc, M, nq, j0, nc, ncv, full);
    // P (0 past nc) to bf16 pairs.
    std::uint32_t* const pb = sc.mm.p.get();
    for (int r = 0; r < M; ++r)
      for (int c = 0; c < ncv; c += L)
        B::store_bf16(reinterpret_cast<bf16_t*>(pb + r * (kTile / 2)) + c,
                      B::load(sc.s.get() + r * kDecodeRowStride + c));
    const int npairs = (nc + 1) / 2;
    for (int hh = 0; hh < t.nh; ++hh) {
      const std::int64_t off = hh * vhs;
      const fp8e4m3_t* const* vf = vpf + hh * ncv;
      for (int r0 = hh * mh; r0 < (hh + 1) * mh; r0 += 4) {
        const int rows = std::min(4, (hh + 1) * mh - r0);
        const std::uint32_t* pr = pb + r0 * (kTile / 2);
        const float* al = sc.alpha.get() + r0;
        float* orow = sc.o.get() + r0 * f.dvp;
        switch (rows) {
          case 4:
            pv_rows<4>(tab, pr, vb, vf, off, npairs, p.d_v, al, orow, f.dvp);
            break;
          case 3:
            pv_rows<3>(tab, pr, vb, vf, off, npairs, p.d_v, al, orow, f.dvp);
            break;
          case 2:
            pv_rows<2>(tab, pr, vb, vf, off, npairs, p.d_v, al, orow, f.dvp);
            break;
          default:
            pv_rows<1>(tab, pr, vb, vf, off, npairs, p.d_v, al, orow, f.dvp);
            break;
        }
      }
    }
  }
};

}  // namespace
}  // namespace ringattn::detail::cpu
