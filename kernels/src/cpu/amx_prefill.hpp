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
//   2. Fused online softmax per row, AVX-512 on the fp32 scores: x = S * scale (then
//      the soft cap), mask, row max, e = exp(x - m_new), row sum of the fp32 e, and e
//      rounded to bf16 into P (as FlashAttention-3 does before its P V); O's row is
//      rescaled by alpha = exp(m_old - m_new) when the max moved.
//   3. O += P V on tiles, O (fp32, FlashFwd's accumulator) loaded into and stored from
//      the accumulator tiles.
// Masked tiles: a 32-row block computes S and P V only over the 32-key column blocks
// up to the last key any of its rows sees (lim32), so causal tiles skip the hidden
// upper triangle at that granularity; the softmax masks per row exactly.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/amx_tiles.hpp"
#include "cpu/flash_fwd_tile.hpp"
#include "cpu/simd_avx512.hpp"

namespace ringattn::detail::cpu {
namespace {

struct AmxTiles {
  static constexpr bool kMatrix = true;
  static constexpr int NC = kKeyTile;
  static constexpr int B = amx::kBlockRows;
  static_assert(NC % B == 0 && NC <= 4 * SimdAvx512::kLanes, "key tile: 32-key blocks, 4 vectors");

  struct Scratch {
    AlignedBuf<std::uint16_t> q;   // [Mpad][dpad] bf16 rows of the task
    AlignedBuf<std::uint16_t> pm;  // [Mpad][NC] bf16 P of the tile
    AlignedBuf<std::uint16_t> kv;  // packed K and V of one tile (tasks without a pre-pack)
    AlignedFloats s;               // [Mpad][NC] fp32 scores
    AlignedBuf<int> lim;           // per 32-row block: key columns (multiple of 32) needed
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
  }

  // Q rows r = g * nq + ii of the task as bf16 [Mpad][dpad], zero padded; padding
  // rows of P and O zero (their results are never read, but stay finite).
  template <class F, class Sc>
  static void begin_task(const F& f, const Task& t, const SeqDesc& sd, Sc& sc, int M) {
    const AttnProblem& p = f.p;
    const int dp = dpad(f), gq = t.nh * f.group, nq = t.nq;
    const int mpad = static_cast<int>(round_up(M, B));
    std::uint16_t* q = sc.mm.q.get();
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
  }

  // Packs keys [j0, j0 + nc) of KV head hk into `dst` (tile_floats floats): K then V in
  // the layouts of amx_tiles.hpp.
  template <class F>
  static void pack_tile(const F& f, const SeqDesc& sd, int hk, std::int64_t j0, int nc,
                        float* dst) {
    pack_tile_bf16(f, sd, hk, j0, nc, reinterpret_cast<std::uint16_t*>(dst));
  }
  template <class F>
  static void pack_tile_bf16(const F& f, const SeqDesc& sd, int hk, std::int64_t j0, int nc,
                             std::uint16_t* kp) {
    const int d = f.p.d, dv = f.p.d_v, dp = dpad(f), dblocks = dp / amx::kDepth;
    const int ncolt = f.dvp / amx::kTileRows;
    std::uint16_t* vp = kp + static_cast<std::size_t>(NC) * dp;
    // K: the value pair (2 dd, 2 dd + 1) of key n goes to pair row dd of its tile.
    for (int n = 0; n < NC; ++n) {
      const auto* row =
          n < nc ? reinterpret_cast<const std::uint16_t*>(f.k_row(sd, j0 + n, hk)) : nullptr;
      std::uint16_t* tile = kp + static_cast<std::size_t>(n / 16) * dblocks * amx::kTileElems;
      const int nn = n % 16;
      for (int c = 0; c < dp; ++c) {
        const int db = c / amx::kDepth, dd = (c % amx::kDepth) / 2;
        tile[db * amx::kTileElems + dd * 32 + nn * 2 + (c & 1)] = row && c < d ? row[c] : 0;
      }
    }
    // V: keys 2 kk and 2 kk + 1 of a 32-key block side by side per column.
    for (int k = 0; k < NC; ++k) {
      const auto* row =
          k < nc ? reinterpret_cast<const std::uint16_t*>(f.v_row(sd, j0 + k, hk)) : nullptr;
      std::uint16_t* blk = vp + static_cast<std::size_t>(k / B) * ncolt * amx::kTileElems;
      const int kk = (k % B) / 2, i = k & 1;
      for (int c = 0; c < f.dvp; ++c)
        blk[(c / 16) * amx::kTileElems + kk * 32 + (c % 16) * 2 + i] = row && c < dv ? row[c] : 0;
    }
  }

  template <class F, class Sc>
  static void prefill_tile(const F& f, const SeqDesc& sd, const Task& t, Sc& sc, int M, int nq,
                           std::int64_t j0, int nc, bool full, const float* packed) {
    using S = SimdAvx512;
    using V = S::V;
    const AttnProblem& p = f.p;
    const std::uint16_t* kp = reinterpret_cast<const std::uint16_t*>(packed);
    if (!packed) {
      pack_tile_bf16(f, sd, t.hk, j0, nc, sc.mm.kv.get());
      kp = sc.mm.kv.get();
    }
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

    amx::configure();
    // 1. S = Q K^T per 32-row block over its needed column blocks.
    for (int bi = 0; bi < nblk; ++bi)
      if (lim[bi] > 0)
        amx::scores(sc.mm.q.get() + static_cast<std::size_t>(bi) * B * dp, dp, kp, dblocks,
                    lim[bi] / B, s + static_cast<std::size_t>(bi) * B * NC, NC);

    // 2. Fused softmax, row by row; P in bf16 over the block's lim columns.
    const float qmul = p.softcap > 0.0f ? p.scale / p.softcap : p.scale;
    const V vq = S::set1(qmul);
    const V cap = S::set1(p.softcap);
    constexpr int kV = NC / S::kLanes;
    for (int r = 0; r < M; ++r) {
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
      V x[kV];
      V vmax = S::set1(kNegInf);
#pragma GCC unroll 4
      for (int v = 0; v < kV; ++v) {
        if (v >= nv) break;
        V y = S::mul(S::load(srow + v * S::kLanes), vq);
        if (p.softcap > 0.0f) y = S::mul(cap, S::tanh(y));
        x[v] = amx::keep_or_neg_inf(amx::lanes_in(v * S::kLanes, a, b), y);
        vmax = S::max(vmax, x[v]);
      }
      SoftmaxState& st = sc.st[r];
      const float m_new = std::max(st.m, S::reduce_max(vmax));
      const V vm = S::set1(m_new);
      V vsum = S::zero();
#pragma GCC unroll 4
      for (int v = 0; v < kV; ++v) {
        if (v >= nv) break;
        const V e = S::exp(S::sub(x[v], vm));
        vsum = S::add(vsum, e);
        amx::store_bf16(prow + v * S::kLanes, e);
      }
      if (st.m != kNegInf && m_new != st.m) {  // rescale O's row onto the new max
        const V al = S::set1(std::exp(st.m - m_new));
        st.d *= std::exp(st.m - m_new);
        float* orow = o + static_cast<std::size_t>(r) * f.dvp;
        for (int c = 0; c < f.dvp; c += S::kLanes)
          S::store(orow + c, S::mul(al, S::load(orow + c)));
      }
      st.d += S::reduce_add(vsum);
      st.m = m_new;
    }

    // 3. O += P V per 32-row block over its needed key blocks.
    for (int bi = 0; bi < nblk; ++bi)
      if (lim[bi] > 0)
        amx::pv(pm + static_cast<std::size_t>(bi) * B * NC, NC, vp, lim[bi] / B, ncolt,
                o + static_cast<std::size_t>(bi) * B * f.dvp, f.dvp);
    amx::release();
  }
};

}  // namespace
}  // namespace ringattn::detail::cpu
