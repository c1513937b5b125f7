// The prefill tile of the cpu-amx tier for bf16 storage: the matrix engine E of
// FlashFwd<SimdAvx512, bf16_t, AmxTiles> (flash_fwd_tile.hpp). The task loop, masks,
// key splits, merges and the decode kernel are FlashFwd's; this engine replaces the
// K/V packing and the prefill key tile. Include only from *_amx.cpp.
//
// One key tile (nc <= kKeyTile keys) of a task with M rows (rows padded to 32, the
// accumulator block of amx_tiles.hpp):
//   1. S = Q K^T on tiles: Q is the task's bf16 rows as stored (unscaled, packed once
//      per task in begin_task), K the pair-layout pack of the tile; fp32 products are
//      exact and summed in fp32.
//   2. Fused online softmax per row, AVX-512 on the fp32 scores, in base 2 with a
//      lazily moved row max (softmax() below): mask, row max, P = 2^(x2 - m2) with
//      the scale folded into one FMA, row sum of the fp32 P, and P rounded to bf16
//      (as FlashAttention-3 does before its P V); O's row is rescaled only when the
//      max moves by more than 2^8.
//   3. O += P V on tiles, O (fp32, FlashFwd's accumulator) loaded into and stored from
//      the accumulator tiles.
// Masked tiles: a 32-row block computes S and P V only over the 32-key column blocks
// up to the last key any of its rows sees (lim32), so causal tiles skip the hidden
// upper triangle at that granularity; the softmax masks per row exactly.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#ifdef RINGATTN_AMX_PROFILE
#include <x86intrin.h>

#include <atomic>
#include <cstdio>
#endif

#include "cpu/amx_tiles.hpp"
#include "cpu/flash_fwd_tile.hpp"
#include "cpu/simd_avx512.hpp"

// Keys per prefill tile of the cpu-amx tier (FlashFwd's NC for this engine).
#ifndef RINGATTN_AMX_KEY_TILE
#define RINGATTN_AMX_KEY_TILE 128
#endif

namespace ringattn::detail::cpu {
namespace {

#ifdef RINGATTN_AMX_PROFILE
// Where the time of the prefill tiles goes (build with -DRINGATTN_AMX_PROFILE):
// TSC cycles summed over all threads and calls, printed to stderr at exit.
struct AmxProfile {
  static constexpr int kPhases = 5;
  std::atomic<std::uint64_t> cycles[kPhases] = {};
  ~AmxProfile() {
    static const char* const names[kPhases] = {"pack", "q-block", "S=QK^T", "softmax", "O+=PV"};
    std::uint64_t total = 0;
    for (const auto& c : cycles) total += c.load();
    for (int i = 0; i < kPhases; ++i)
      std::fprintf(stderr, "amx profile: %-8s %14llu cycles %5.1f %%\n", names[i],
                   static_cast<unsigned long long>(cycles[i].load()),
                   total ? 100.0 * static_cast<double>(cycles[i].load()) / total : 0.0);
  }
};
inline AmxProfile amx_profile;
inline std::uint64_t amx_clock() { return __rdtsc(); }
inline void amx_account(int phase, std::uint64_t& t) {
  const std::uint64_t now = __rdtsc();
  amx_profile.cycles[phase].fetch_add(now - t, std::memory_order_relaxed);
  t = now;
}
#else
inline std::uint64_t amx_clock() { return 0; }
inline void amx_account(int, std::uint64_t&) {}
#endif

struct AmxTiles {
  static constexpr bool kMatrix = true;
  static constexpr int kKeyTile = RINGATTN_AMX_KEY_TILE;
  static constexpr int NC = kKeyTile;
  static constexpr int B = amx::kBlockRows;
  static_assert(NC % B == 0 && NC <= 8 * SimdAvx512::kLanes, "key tile: 32-key blocks, 8 vectors");

  struct Scratch {
    AlignedBuf<std::uint16_t> q;   // [Mpad][dpad] bf16 rows of the task
    AlignedBuf<std::uint16_t> pm;  // [Mpad][NC] bf16 P of the tile
    AlignedBuf<std::uint16_t> kv;  // packed K and V of one tile (tasks without a pre-pack)
    AlignedFloats s;               // [Mpad][NC] fp32 scores
    AlignedBuf<int> lim;           // per 32-row block: key columns (multiple of 32) needed
    AlignedFloats m2;              // [Mpad] row max used by P, log2 units (softmax)
  };

  template <class F>
  static int dpad(const F& f) {
    return static_cast<int>(round_up(f.p.d, amx::kDepth));
  }
  // Packed K then V of one tile, in floats (the unit of FlashFwd's pack buffer).
  template <class F>
  static std::int64_t tile_floats(const F& f) {
    return (std::int64_t{NC} * dpad(f) + std::int64_t{NC} * f.dvp) / 2;
  }

  template <class F, class Sc>
  static void init_scratch(const F& f, Sc& sc) {
    const std::size_t mpad = static_cast<std::size_t>(round_up(f.max_rows, B));
    sc.o.reset(mpad * f.dvp);  // the accumulator tiles read and write whole 32-row blocks
    sc.mm.q.reset(mpad * dpad(f));
    sc.mm.pm.reset(mpad * NC);
    sc.mm.kv.reset(static_cast<std::size_t>(tile_floats(f)) * 2);
    sc.mm.s.reset(mpad * NC);
    sc.mm.lim.reset(mpad / B + 1);
    sc.mm.m2.reset(mpad);
  }

  // Q rows r = g * nq + ii of the task as bf16 [Mpad][dpad], zero padded; padding
  // rows of P and O zero (their results are never read, but stay finite).
  template <class F, class Sc>
  static void begin_task(const F& f, const Task& t, const SeqDesc& sd, Sc& sc, int M) {
    std::uint64_t clk = amx_clock();
    const AttnProblem& p = f.p;
    const int dp = dpad(f), gq = t.nh * f.group, nq = t.nq;
    const int mpad = static_cast<int>(round_up(M, B));
    std::uint16_t* q = sc.mm.q.get();
    std::fill(sc.mm.m2.get(), sc.mm.m2.get() + mpad, kNegInf);
    for (int g = 0; g < gq; ++g) {
      const int hq = t.hk * f.group + g;
      for (int ii = 0; ii < nq; ++ii) {
        const auto* src = static_cast<const std::uint16_t*>(p.q) + sd.q_off +
                          (t.q0 + ii) * p.q_row_stride + hq * p.q_head_stride;
        std::uint16_t* dst = q + static_cast<std::size_t>(g * nq + ii) * dp;
        std::memcpy(dst, src, sizeof(std::uint16_t) * static_cast<std::size_t>(p.d));
        std::fill(dst + p.d, dst + dp, std::uint16_t{0});
      }
    }
    std::fill(q + static_cast<std::size_t>(M) * dp, q + static_cast<std::size_t>(mpad) * dp,
              std::uint16_t{0});
    std::uint16_t* pm = sc.mm.pm.get();
    std::fill(pm + static_cast<std::size_t>(M) * NC, pm + static_cast<std::size_t>(mpad) * NC,
              std::uint16_t{0});
    float* o = sc.o.get();
    std::fill(o + static_cast<std::size_t>(M) * f.dvp, o + static_cast<std::size_t>(mpad) * f.dvp,
              0.0f);
    amx_account(1, clk);
  }

  // Packs keys [j0, j0 + nc) of KV head hk into `dst` (tile_floats floats): K then V in
  // the layouts of amx_tiles.hpp.
  template <class F>
  static void pack_tile(const F& f, const SeqDesc& sd, int hk, std::int64_t j0, int nc,
                        float* dst) {
    std::uint64_t clk = amx_clock();
    pack_tile_bf16(f, sd, hk, j0, nc, reinterpret_cast<std::uint16_t*>(dst));
    amx_account(0, clk);
  }
  // Value pairs as one 32-bit word: lo = first (even index), hi = second.
  static std::uint32_t pair(std::uint16_t lo, std::uint16_t hi) {
    return std::uint32_t{lo} | (std::uint32_t{hi} << 16);
  }
  // d and d_v are multiples of 8 (validate_params.cpp), so value pairs never straddle
  // the end of a row.
  template <class F>
  static void pack_tile_bf16(const F& f, const SeqDesc& sd, int hk, std::int64_t j0, int nc,
                             std::uint16_t* kp) {
    const int d = f.p.d, dv = f.p.d_v, dp = dpad(f), dblocks = dp / amx::kDepth;
    const int ncolt = f.dvp / amx::kTileRows;
    auto* const k32 = reinterpret_cast<std::uint32_t*>(kp);
    auto* const v32 = reinterpret_cast<std::uint32_t*>(kp + static_cast<std::size_t>(NC) * dp);
    // K: pair c2 = (2 c2, 2 c2 + 1) of key n sits at word (c2 / 16) * 256 + (c2 % 16) * 16
    // = 16 c2 of its 16-key group, lane n % 16.
    for (int n = 0; n < NC; ++n) {
      std::uint32_t* dst =
          k32 + static_cast<std::size_t>(n / 16) * dblocks * (amx::kTileElems / 2) + n % 16;
      int c2 = 0;
      if (n < nc) {
        const auto* row = reinterpret_cast<const std::uint16_t*>(f.k_row(sd, j0 + n, hk));
        for (; c2 < d / 2; ++c2) dst[16 * c2] = pair(row[2 * c2], row[2 * c2 + 1]);
      }
      for (; c2 < dp / 2; ++c2) dst[16 * c2] = 0;
    }
    // V: keys 2 kk and 2 kk + 1 of a 32-key block side by side, 16 columns per tile.
    for (int k2 = 0; k2 < NC / 2; ++k2) {
      std::uint32_t* dst =
          v32 + static_cast<std::size_t>(k2 / 16) * ncolt * (amx::kTileElems / 2) + (k2 % 16) * 16;
      const int k = 2 * k2;
      const auto* r0 =
          k < nc ? reinterpret_cast<const std::uint16_t*>(f.v_row(sd, j0 + k, hk)) : nullptr;
      const auto* r1 = k + 1 < nc
                           ? reinterpret_cast<const std::uint16_t*>(f.v_row(sd, j0 + k + 1, hk))
                           : nullptr;
      for (int cb = 0; cb < ncolt; ++cb) {
        std::uint32_t* t = dst + cb * (amx::kTileElems / 2);
        const int c0 = cb * 16, n = std::clamp(dv - c0, 0, 16);
        if (r0 && r1) {
          for (int i = 0; i < n; ++i) t[i] = pair(r0[c0 + i], r1[c0 + i]);
        } else if (r0) {
          for (int i = 0; i < n; ++i) t[i] = pair(r0[c0 + i], 0);
        } else {
          for (int i = 0; i < n; ++i) t[i] = 0;
        }
        for (int i = n; i < 16; ++i) t[i] = 0;
      }
    }
  }

  template <class F, class Sc>
  static void prefill_tile(const F& f, const SeqDesc& sd, const Task& t, Sc& sc, int M, int nq,
                           std::int64_t j0, int nc, bool full, const float* packed) {
    const std::uint16_t* kp = reinterpret_cast<const std::uint16_t*>(packed);
    if (!packed) {
      pack_tile(f, sd, t.hk, j0, nc, reinterpret_cast<float*>(sc.mm.kv.get()));
      kp = sc.mm.kv.get();
    }
    std::uint64_t clk = amx_clock();
    const int dp = dpad(f), dblocks = dp / amx::kDepth, ncolt = f.dvp / amx::kTileRows;
    const std::uint16_t* vp = kp + static_cast<std::size_t>(NC) * dp;
    const int nblk = static_cast<int>(round_up(M, B)) / B;
    int* lim = sc.mm.lim.get();
    for (int bi = 0; bi < nblk; ++bi) {
      std::int64_t hi = nc;
      if (!full) {
        hi = 0;
        for (int r = bi * B; r < std::min(M, (bi + 1) * B); ++r)
          hi = std::max(hi, sc.rows[r % nq].hi - j0);
      }
      lim[bi] = static_cast<int>(round_up(std::clamp<std::int64_t>(hi, 0, nc), B));
    }
    float* const s = sc.mm.s.get();
    std::uint16_t* const pm = sc.mm.pm.get();
    float* const o = sc.o.get();

    // The three steps run per 32-row block, so that the block's scores (16 KiB for
    // 128 keys) and P (8 KiB) stay in L1 between the tile stores and the softmax, and
    // between the softmax and the P V tile loads (whole-tile phases kept them in L2).
    amx::configure();
    for (int bi = 0; bi < nblk; ++bi) {
      if (lim[bi] == 0) continue;  // no row of the block sees a key of this tile
      const int r0 = bi * B, r1 = std::min(M, r0 + B);
      // 1. S = Q K^T over the block's needed column blocks.
      amx::scores(sc.mm.q.get() + static_cast<std::size_t>(r0) * dp, dp, kp, dblocks, lim[bi] / B,
                  s + static_cast<std::size_t>(r0) * NC, NC);
      amx_account(2, clk);
      // 2. Fused softmax, row by row; P in bf16 over the block's lim columns.
      if (f.p.softcap > 0.0f) {
        softmax<true>(f, sc, r0, r1, nq, j0, nc, full);
      } else {
        softmax<false>(f, sc, r0, r1, nq, j0, nc, full);
      }
      amx_account(3, clk);
      // 3. O += P V over the block's needed key blocks.
      amx::pv(pm + static_cast<std::size_t>(r0) * NC, NC, vp, lim[bi] / B, ncolt,
              o + static_cast<std::size_t>(r0) * f.dvp, f.dvp);
      amx_account(4, clk);
    }
    amx::release();
  }

  // Online softmax of the tile's score rows (s, fp32, unscaled) into P (bf16), the
  // row states and O's rows. Rows of a 32-row block use its lim columns (the P V
  // operand); lanes outside the row's visible keys [a, b) are -inf.
  //
  // Base 2: the row max m2 is kept in log2 units (mm.m2, exact; st.m = m2 ln 2 for the
  // merge and the LSE), x2 = S * scale * log2(e) (one FMA with -m2), P = 2^(x2 - m2)
  // by exp2_nonpositive. Without a soft cap the max is taken over the raw scores
  // (scale > 0 keeps the order), so the scaling is folded into that FMA.
  // Lazy rescale (as FlashAttention-4): m2 moves only when a score exceeds it by more
  // than kLazyLog2 (P stays <= 2^kLazyLog2, exact enough in fp32 and bf16), so O's row
  // is rescaled (and its alpha computed) only a few times per row, not whenever the
  // running max creeps up.
  static constexpr float kLazyLog2 = 8.0f;
  template <bool kCap, class F, class Sc>
  static void softmax(const F& f, Sc& sc, int r0, int r1, int nq, std::int64_t j0, int nc,
                      bool full) {
    using S = SimdAvx512;
    using V = S::V;
    constexpr float kLog2e = 1.44269504088896341f, kLn2 = 0.693147180559945309f;
    const AttnProblem& p = f.p;
    const float qmul = kCap ? p.scale / p.softcap : p.scale;
    const V vq = S::set1(qmul);
    const V cap2 = S::set1(p.softcap * kLog2e);
    const float c2 = kCap ? 1.0f : p.scale * kLog2e;  // multiplier of x into log2 units
    const V vc2 = S::set1(c2);
    constexpr int kV = NC / S::kLanes;
    const int* lim = sc.mm.lim.get();
    const float* const s = sc.mm.s.get();
    std::uint16_t* const pm = sc.mm.pm.get();
    float* const o = sc.o.get();
    float* const m2s = sc.mm.m2.get();
    for (int r = r0; r < r1; ++r) {
      const int ncols = lim[r / B];
      const int nv = ncols / S::kLanes;
      std::uint16_t* prow = pm + static_cast<std::size_t>(r) * NC;
      int a = 0, b = nc;
      if (!full) {
        const RowRange rr = sc.rows[r % nq];
        a = static_cast<int>(std::clamp<std::int64_t>(rr.lo - j0, 0, nc));
        b = static_cast<int>(std::clamp<std::int64_t>(rr.hi - j0, 0, nc));
      }
      if (a >= b) {  // row sees nothing in this tile: P = 0, state unchanged
        std::fill(prow, prow + ncols, std::uint16_t{0});
        continue;
      }
      const float* srow = s + static_cast<std::size_t>(r) * NC;
      // x: raw scores (no cap) or cap * tanh(S * scale / cap) * log2(e) (cap); mask
      // lanes outside [a, b): the row's window, and on the last tile the padding keys
      // past nc (their scores are 0, not -inf).
      const bool masked = a > 0 || b < ncols;
      V x[kV];
      V vmax = S::set1(kNegInf);
#pragma GCC unroll 8
      for (int v = 0; v < kV; ++v) {
        if (v >= nv) break;
        V y = S::load(srow + v * S::kLanes);
        if constexpr (kCap) y = S::mul(cap2, S::tanh(S::mul(y, vq)));
        if (masked) y = amx::keep_or_neg_inf(amx::lanes_in(v * S::kLanes, a, b), y);
        x[v] = y;
        vmax = S::max(vmax, y);
      }
      SoftmaxState& st = sc.st[r];
      float m2 = m2s[r];
      const float row_max2 = S::reduce_max(vmax) * c2;
      if (m2 == kNegInf || row_max2 > m2 + kLazyLog2) {
        if (m2 != kNegInf) {  // rescale O's row and the sum onto the new max
          const float alpha = std::exp2(m2 - row_max2);
          const V al = S::set1(alpha);
          st.d *= alpha;
          float* orow = o + static_cast<std::size_t>(r) * f.dvp;
          for (int c = 0; c < f.dvp; c += S::kLanes)
            S::store(orow + c, S::mul(al, S::load(orow + c)));
        }
        m2 = row_max2;
        m2s[r] = m2;
        st.m = m2 * kLn2;
      }
      const V vm = S::set1(-m2);
      V vsum = S::zero();
#pragma GCC unroll 8
      for (int v = 0; v < kV; ++v) {
        if (v >= nv) break;
        const V e = amx::exp2_nonpositive(S::fma(x[v], vc2, vm));
        vsum = S::add(vsum, e);
        amx::store_bf16(prow + v * S::kLanes, e);
      }
      st.d += S::reduce_add(vsum);
    }
  }
};

}  // namespace
}  // namespace ringattn::detail::cpu
