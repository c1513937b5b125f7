// The unit loop of MLA decode on bf16 products, shared by the two matrix tiers: the
// vdpbf16ps micro-kernels (mla_decode_avx512_bf16.cpp) and the AMX tiles
// (mla_decode_amx.cpp) plug in as the policy Mm; layouts, masks and the online softmax
// are the same. Include only from translation units built with the avx512 and avx512bf16
// flags (the amx flags include them).
//
// Absorbed MLA decode is MQA with one KV head: the R = ntok * h_q query rows of a unit
// (128 .. 256) all meet the same cache row of 576 bf16 (512 latent + 64 rope), so a key
// tile is a small GEMM, S = Q K^T over 576 dims and O += P V over the tile's keys.
// At h_q = 128 that is 2 * 1088 * 128 flops per 1152-byte cache row (242 per byte):
// the decode is bound by the multiply-adds.
//
// Layouts (pairs = two bf16 in one 32-bit lane, the operand of dot2 and of tdpbf16ps's B):
//   Qp  [288][Rp][2]    the unit's queries pair-major: lane block (i, r .. r + 15) is the
//                       dims (2i, 2i + 1) of 16 query rows (Rp = R rounded up to
//                       Mm::kRowAlign, rows past R zero). Packed once per unit.
//   K   the cache rows themselves (krow[t] -> 576 bf16): the pair (k[2i], k[2i + 1]) of a
//       key is adjacent in its row, so S^T = K Qp^T needs no packed K (an fp8 row is
//       converted to bf16 once per tile, exactly: e4m3 values are bf16 values).
//   St  [kKeys][Rp] fp32 scores, query rows along the lanes: the online softmax runs
//       vertically, 16 query rows per vector.
//   Pp  [kKeys / 2][Rp][2] P rounded to bf16, pairs of keys (what P V reduces over).
//   Vp  [kKeys / 2][512][2] V of the tile, pairs of keys interleaved (two cache rows
//       merged by one permute per 32 columns).
// Keys past the tile's end point at a zero row, so every product runs on whole blocks,
// P is 0 there and NaN in unused cache slots is never read.
//
// Policy Mm: kKeys (keys per tile), kRowAlign (Rp granularity), kKeyAlign (keys of the
// last tile rounded up to it for Q K^T), begin(ws, rp) / end() around a unit,
// qk(ws, rp, nk, st) and pv(ws, rp, R) (acc [Rp][512] = acc * alpha + P V).
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/simd_avx512_bf16.hpp"
#include "mla/mla_internal.hpp"
#include "ringattn/softmax_state.hpp"

namespace ringattn::detail::mla {
namespace {

namespace bf16u {

using B = cpu::SimdAvx512Bf16;
using V = B::V;
constexpr int L = B::kLanes;  // fp32 lanes = pairs per vector
constexpr int D = kMlaHeadDim;
constexpr int DV = kMlaValueDim;
constexpr int kDimPairs = D / 2;

alignas(64) const bf16_t kZeroRow[D] = {};

// Online softmax of one key tile of nkeys keys, 16 query rows per vector (St rows are keys):
//   m_new = max(m, sc * max_t s[t]);  p[t] = exp(sc * s[t] - m_new)
//   alpha = exp(m - m_new);  d = d * alpha + sum_t p[t];  Pp <- bf16 pairs of p
// The update of mla_ops_impl.hpp's softmax, transposed. A row that has seen no visible
// key keeps m = -inf: it subtracts 0 instead (p = exp(-inf) = 0, alpha = 0, acc stays 0).
inline void softmax_tile(const float* st, int rp, int nrv, int nkeys, float sc, float* m, float* d,
                         float* alpha, bf16_t* pp) {
  const V vsc = B::set1(sc), ninf = B::set1(kNegInf), lowest = B::set1(-3.0e38f);
  for (int v = 0; v < nrv; ++v) {
    const float* col = st + L * v;
    V mx = ninf;
    for (int t = 0; t < nkeys; ++t) mx = B::max(mx, B::load(col + t * rp));
    const V m_old = B::load(m + L * v);
    const V m_new = B::max(m_old, B::mul(mx, vsc));
    const V m_use = B::select_lt(m_new, lowest, B::zero(), m_new);
    const V al = B::exp(B::sub(m_old, m_use));
    V sum = B::zero();
    for (int k = 0; k < nkeys / 2; ++k) {
      const V p0 = B::exp(B::sub(B::mul(B::load(col + 2 * k * rp), vsc), m_use));
      const V p1 = B::exp(B::sub(B::mul(B::load(col + (2 * k + 1) * rp), vsc), m_use));
      sum = B::add(sum, B::add(p0, p1));
      B::store_pairs(pp + 2 * (k * rp + L * v), B::pack_pairs(p0, p1));
    }
    B::store(d + L * v, B::fma(B::load(d + L * v), al, sum));
    B::store(m + L * v, m_new);
    B::store(alpha + L * v, al);
  }
}

}  // namespace bf16u

// Tile loop of one unit (run_unit's, on the layouts above):
//
//   pack Q of the unit's R rows to Qp (bf16 pairs)           once
//   for each key tile [j0, j0 + kKeys):                        (tiles past every row's
//     krow = the tile's cache rows (fp8: as bf16; past the end: zero)   last visible key:
//     Vp = pairs of the tile's V rows                                   skipped)
//     St = K_tile Qp^T                  [kKeys, Rp]  (Mm::qk; keys past the end rounded
//                                                     up to Mm::kKeyAlign only)
//     St = -inf where the row's token may not see the key, and past the tile's end
//     online softmax per 16 rows: m, d, alpha; Pp = bf16(exp(sc * St - m))
//     acc = acc * alpha + P V            [Rp, 512]   (Mm::pv)
template <class Mm>
void run_unit_bf16(const TokenSource& src, const KeyList& keys, const UnitSpec& u, Workspace& ws,
                   float* o, float* lse, float* max_logit) {
  using namespace bf16u;
  constexpr int kKeys = Mm::kKeys, kKeyPairs = kKeys / 2;
  static_assert(kKeys % Mm::kKeyAlign == 0 && Mm::kRowAlign % L == 0);
  const int R = u.ntok * u.h_q;
  const int rp = (R + Mm::kRowAlign - 1) / Mm::kRowAlign * Mm::kRowAlign, nrv = rp / L;
  ws.m.assign(rp, kNegInf);
  ws.d.assign(rp, 0.0f);
  ws.alpha.resize(rp);
  ws.acc.assign(static_cast<std::size_t>(rp) * DV, 0.0f);
  ws.s.resize(static_cast<std::size_t>(kKeys) * rp);
  ws.qpairs.assign(static_cast<std::size_t>(kDimPairs) * rp * 2, bf16_t{0});
  ws.ppairs.resize(static_cast<std::size_t>(kKeyPairs) * rp * 2);
  ws.vpairs.resize(static_cast<std::size_t>(kKeyPairs) * DV * 2);
  ws.krow.resize(kKeys);
  ws.kconv.resize(static_cast<std::size_t>(kKeys) * D);

  // Qp[i][r] = (q[r][2i], q[r][2i + 1]) rounded to bf16 (exact for bf16 q).
  for (int r = 0; r < R; ++r) {
    const float* q = u.q + static_cast<std::int64_t>(r) * D;
    for (int i = 0; i < kDimPairs; ++i) {
      bf16_t* dst = ws.qpairs.data() + 2 * (static_cast<std::int64_t>(i) * rp + r);
      dst[0].bits = f32_to_bf16(q[2 * i]);
      dst[1].bits = f32_to_bf16(q[2 * i + 1]);
    }
  }

  std::int64_t hi = u.key_begin;
  for (int t = 0; t < u.ntok; ++t) hi = std::max(hi, u.mask.last(t, u.key_end));

  Mm::begin(ws, rp);
  float* const st = ws.s.data();
  for (std::int64_t j0 = u.key_begin; j0 < hi; j0 += kKeys) {
    const int T = static_cast<int>(std::min<std::int64_t>(kKeys, hi - j0));
    for (int t = 0; t < kKeys; ++t) {
      const std::uint8_t* row = t < T ? src.base + keys.slot(j0 + t) * src.row_bytes : nullptr;
      if (row == nullptr) {
        ws.krow[t] = kZeroRow;
      } else if (src.kind == SourceKind::kBF16) {
        ws.krow[t] = reinterpret_cast<const bf16_t*>(row);
      } else {  // fp8 e4m3 -> bf16, exact (3 mantissa bits, exponents within bf16's)
        bf16_t* dst = ws.kconv.data() + static_cast<std::int64_t>(t) * D;
        for (int c = 0; c < D; c += L) B::store_bf16(dst + c, B::load_fp8(row + c));
        ws.krow[t] = dst;
      }
    }
    for (int k = 0; k < kKeyPairs; ++k)
      for (int c = 0; c < DV; c += 2 * L)
        B::interleave_rows(ws.krow[2 * k] + c, ws.krow[2 * k + 1] + c,
                           ws.vpairs.data() + 2 * (k * DV + c));

    const int nk = (T + Mm::kKeyAlign - 1) / Mm::kKeyAlign * Mm::kKeyAlign;
    Mm::qk(ws, rp, nk, st);
    std::fill(st + static_cast<std::int64_t>(T) * rp, st + static_cast<std::int64_t>(kKeys) * rp,
              kNegInf);
    // Masks, per query token (its h_q rows are consecutive).
    if (u.mask.kind == RowMask::Kind::kLimit) {
      for (int tok = 0; tok < u.ntok; ++tok) {
        const std::int64_t from = std::max<std::int64_t>(0, u.mask.limit[tok] - j0);
        for (std::int64_t t = from; t < T; ++t)
          std::fill_n(st + t * rp + tok * u.h_q, u.h_q, kNegInf);
      }
    } else if (u.mask.kind == RowMask::Kind::kBits) {
      for (int tok = 0; tok < u.ntok; ++tok) {
        const std::uint64_t* bits = u.mask.bits + tok * u.mask.words;
        for (int t = 0; t < T; ++t) {
          const std::int64_t j = j0 + t;
          if (!((bits[j >> 6] >> (j & 63)) & 1u))
            std::fill_n(st + static_cast<std::int64_t>(t) * rp + tok * u.h_q, u.h_q, kNegInf);
        }
      }
    }
    softmax_tile(st, rp, nrv, kKeys, u.sc, ws.m.data(), ws.d.data(), ws.alpha.data(),
                 ws.ppairs.data());
    Mm::pv(ws, rp, R);
  }
  Mm::end();

  finish_unit(ws, R, o, lse, max_logit);
}

}  // namespace
}  // namespace ringattn::detail::mla
