// MLA decode on the bf16 dot-product instruction (vdpbf16ps, AVX512-BF16): the unit loop
// of the cpu-avx512-bf16 tier (and of cpu-amx) for bf16 q with a bf16 or dense fp8 cache
// (fp8 rows converted to bf16 per tile, exactly), written over
// the pair-vector vocabulary B (cpu/simd_avx512_bf16.hpp). Built with the avx512 and
// avx512bf16 flags; reached only through decode_uses_dpbf16() after run-time detection.
//
// Absorbed MLA decode is MQA with one KV head: the R = ntok * h_q query rows of a unit
// (128 .. 256) all meet the same cache row of 576 bf16 (512 latent + 64 rope), so a key
// tile is a small GEMM, S = Q K^T over 576 dims and O += P V over the tile's keys.
// At h_q = 128 that is 2 * 1088 * 128 flops per 1152-byte cache row (242 per byte):
// the decode is bound by the multiply-adds, and vdpbf16ps does 32 of them per
// instruction against 16 for an fp32 FMA.
//
// Layouts (pairs = two bf16 in one 32-bit lane, the operand of dot2):
//   Qp  [288][Rp][2]    the unit's queries pair-major: lane block (i, r .. r + 15) is the
//                       dims (2i, 2i + 1) of 16 query rows (Rp = R rounded up to 16,
//                       rows past R zero). Packed once per unit.
//   K   the cache rows themselves: the pair (k[2i], k[2i + 1]) of a key is adjacent in
//       its row and is broadcast to all lanes, so a bf16 K is never packed or decoded
//       (an fp8 row is converted to bf16 once per tile).
//   St  [kKeys][Rp] fp32 scores, rows (query heads) along the lanes: the online softmax
//       runs vertically, 16 query rows per vector.
//   Pp  [kKeys / 2][Rp][2] P rounded to bf16, pairs of keys (what P V reduces over).
//   Vp  [kKeys / 2][512][2] V of the tile, pairs of keys interleaved (two cache rows
//       merged by one permute per 32 columns).
// Keys past the tile's end point at a zero row, so every product runs on whole blocks,
// P is 0 there and NaN in unused cache slots is never read.
#include <algorithm>
#include <cstdint>
#include <limits>

#include "cpu/simd_avx512_bf16.hpp"
#include "mla/mla_internal.hpp"
#include "ringattn/softmax_state.hpp"

namespace ringattn::detail::mla {

namespace {

using B = cpu::SimdAvx512Bf16;
using V = B::V;
using P = B::P;
constexpr int L = B::kLanes;  // fp32 lanes = pairs per vector
constexpr int D = kMlaHeadDim;
constexpr int DV = kMlaValueDim;
constexpr int kDimPairs = D / 2;
// Keys per tile: the P V products reduce over kKeys / 2 pairs between two passes over
// the accumulator.
constexpr int kKeys = 64;
constexpr int kKeyPairs = kKeys / 2;
// Register blocks: Q K^T kQkKeys keys x kQkVecs row vectors (16 accumulators, per pair of
// dims kQkVecs loads + kQkKeys broadcasts); P V kPvRows rows x kPvVecs column vectors
// (24 accumulators, per pair of keys kPvVecs loads + kPvRows broadcasts).
constexpr int kQkKeys = 4, kQkVecs = 4;
constexpr int kPvRows = 6, kPvVecs = 4;
static_assert(kKeys % kQkKeys == 0 && DV % (kPvVecs * L) == 0 && D % 2 == 0);

alignas(64) const bf16_t kZeroRow[D] = {};

// St[t][r] = q[r] . k[t] for TB keys (rows krow[t]) and RV row vectors starting at the
// row vector of qp / st.
template <int TB, int RV>
void qk_block(const bf16_t* qp, int rp, const bf16_t* const* krow, float* st) {
  V acc[TB][RV];
#pragma GCC unroll 8
  for (int t = 0; t < TB; ++t)
#pragma GCC unroll 8
    for (int v = 0; v < RV; ++v) acc[t][v] = B::zero();
  const bf16_t* q = qp;
  for (int i = 0; i < kDimPairs; ++i, q += 2 * rp) {
    P a[RV];
#pragma GCC unroll 8
    for (int v = 0; v < RV; ++v) a[v] = B::load_pairs(q + 2 * L * v);
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) {
      const P k = B::bcast_pair(krow[t] + 2 * i);
#pragma GCC unroll 8
      for (int v = 0; v < RV; ++v) acc[t][v] = B::dot2(acc[t][v], k, a[v]);
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < TB; ++t)
#pragma GCC unroll 8
    for (int v = 0; v < RV; ++v) B::store(st + t * rp + L * v, acc[t][v]);
}

// All nrv row vectors for keys [0, nk) (nk a multiple of kQkKeys).
template <int RV = kQkVecs>
void qk_rows(const bf16_t* qp, int rp, int nrv, const bf16_t* const* krow, int nk, float* st) {
  int v0 = 0;
  for (; v0 + RV <= nrv; v0 += RV)
    for (int t = 0; t < nk; t += kQkKeys)
      qk_block<kQkKeys, RV>(qp + 2 * L * v0, rp, krow + t, st + t * rp + L * v0);
  if constexpr (RV > 1)
    if (v0 < nrv) qk_rows<RV - 1>(qp + 2 * L * v0, rp, nrv - v0, krow, nk, st + L * v0);
}

// O[r][c0 ..) = O[r] * alpha[r] + sum over key pairs k of Pp[k][r] . Vp[k][c0 ..) for RB
// rows and CV column vectors.
template <int RB, int CV>
void pv_block(const bf16_t* pp, int rp, const bf16_t* vp, const float* alpha, float* o, int c0) {
  V acc[RB][CV];
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r) {
    const V al = B::set1(alpha[r]);
#pragma GCC unroll 8
    for (int v = 0; v < CV; ++v) acc[r][v] = B::mul(B::load(o + r * DV + c0 + L * v), al);
  }
  for (int k = 0; k < kKeyPairs; ++k) {
    P b[CV];
#pragma GCC unroll 8
    for (int v = 0; v < CV; ++v) b[v] = B::load_pairs(vp + 2 * (k * DV + c0 + L * v));
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      const P a = B::bcast_pair(pp + 2 * (k * rp + r));
#pragma GCC unroll 8
      for (int v = 0; v < CV; ++v) acc[r][v] = B::dot2(acc[r][v], a, b[v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < CV; ++v) B::store(o + r * DV + c0 + L * v, acc[r][v]);
}

template <int RB>
void pv_cols(const bf16_t* pp, int rp, const bf16_t* vp, const float* alpha, float* o) {
  for (int c0 = 0; c0 < DV; c0 += kPvVecs * L) pv_block<RB, kPvVecs>(pp, rp, vp, alpha, o, c0);
}

// All R rows: blocks of kPvRows, then one smaller block.
template <int RB = kPvRows>
void pv_rows(const bf16_t* pp, int rp, int R, const bf16_t* vp, const float* alpha, float* o) {
  int r = 0;
  if constexpr (RB == kPvRows)
    for (; r + RB <= R; r += RB)
      pv_cols<RB>(pp + 2 * r, rp, vp, alpha + r, o + static_cast<std::int64_t>(r) * DV);
  if (R - r == RB) return pv_cols<RB>(pp + 2 * r, rp, vp, alpha + r, o + std::int64_t{r} * DV);
  if constexpr (RB > 1)
    pv_rows<RB - 1>(pp + 2 * r, rp, R - r, vp, alpha + r, o + std::int64_t{r} * DV);
}

// Online softmax of one key tile, 16 query rows per vector (St rows are keys):
//   m_new = max(m, sc * max_t s[t]);  p[t] = exp(sc * s[t] - m_new)
//   alpha = exp(m - m_new);  d = d * alpha + sum_t p[t];  Pp <- bf16 pairs of p
// The update of mla_ops_impl.hpp's softmax, transposed. A row that has seen no visible
// key keeps m = -inf: it subtracts 0 instead (p = exp(-inf) = 0, alpha = 0, acc stays 0).
void softmax_tile(float* st, int rp, int nrv, float sc, float* m, float* d, float* alpha,
                  bf16_t* pp) {
  const V vsc = B::set1(sc), ninf = B::set1(kNegInf), lowest = B::set1(-3.0e38f);
  for (int v = 0; v < nrv; ++v) {
    float* col = st + L * v;
    V mx = ninf;
    for (int t = 0; t < kKeys; ++t) mx = B::max(mx, B::load(col + t * rp));
    const V m_old = B::load(m + L * v);
    const V m_new = B::max(m_old, B::mul(mx, vsc));
    const V m_use = B::select_lt(m_new, lowest, B::zero(), m_new);
    const V al = B::exp(B::sub(m_old, m_use));
    V sum = B::zero();
    for (int k = 0; k < kKeyPairs; ++k) {
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

}  // namespace

// Tile loop of one unit (run_unit's, on the layouts above):
//
//   pack Q of the unit's R rows to Qp (bf16 pairs)           once
//   for each key tile [j0, j0 + kKeys):                        (tiles past every row's
//     Vp = pairs of the tile's V rows (keys past the end: 0)    last visible key: skipped)
//     St = K_tile Qp^T                  [kKeys, Rp]  (keys past the end not computed)
//     St = -inf where the row's token may not see the key, and past the tile's end
//     online softmax per 16 rows: m, d, alpha; Pp = bf16(exp(sc * St - m))
//     acc = acc * alpha + Pp^T Vp        [R, 512]
void run_unit_dpbf16(const TokenSource& src, const KeyList& keys, const UnitSpec& u, Workspace& ws,
                     float* o, float* lse, float* max_logit) {
  const int R = u.ntok * u.h_q;
  const int rp = (R + L - 1) / L * L, nrv = rp / L;
  ws.m.assign(rp, kNegInf);
  ws.d.assign(rp, 0.0f);
  ws.alpha.resize(rp);
  ws.acc.assign(static_cast<std::size_t>(R) * DV, 0.0f);
  ws.s.resize(static_cast<std::size_t>(kKeys) * rp);
  ws.qpairs.assign(static_cast<std::size_t>(kDimPairs) * rp * 2, bf16_t{0});
  ws.ppairs.resize(static_cast<std::size_t>(kKeyPairs) * rp * 2);
  ws.vpairs.resize(static_cast<std::size_t>(kKeyPairs) * DV * 2);
  ws.krow.resize(kKeys);
  if (src.kind == SourceKind::kFP8) ws.kconv.resize(static_cast<std::size_t>(kKeys) * D);

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

    const int nk = (T + kQkKeys - 1) / kQkKeys * kQkKeys;
    qk_rows(ws.qpairs.data(), rp, nrv, ws.krow.data(), nk, st);
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
    softmax_tile(st, rp, nrv, u.sc, ws.m.data(), ws.d.data(), ws.alpha.data(), ws.ppairs.data());
    pv_rows(ws.ppairs.data(), rp, R, ws.vpairs.data(), ws.alpha.data(), ws.acc.data());
  }

  finish_unit(ws, R, o, lse, max_logit);
}

}  // namespace ringattn::detail::mla
