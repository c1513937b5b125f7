// MLA decode on the bf16 dot-product instruction (vdpbf16ps, AVX512-BF16): the products
// of the cpu-avx512-bf16 tier for bf16 q with a bf16 or dense fp8 cache, the policy of the
// shared unit loop (mla_bf16_unit.hpp documents the loop and the layouts), written over the
// pair-vector vocabulary B (cpu/simd_avx512_bf16.hpp). Built with the avx512 and
// avx512bf16 flags; reached only through decode_uses_bf16_path() after run-time detection.
//
//   S^T = K Qp^T: per pair of dims, a key's pair is broadcast from its cache row and meets
//                 16 query rows of Qp per vector (register block 4 keys x 64 rows).
//   P V:          per pair of keys, a row's P pair is broadcast and meets 16 columns of Vp
//                 per vector (register block 6 rows x 64 columns).
#include <algorithm>
#include <cstdint>
#include <limits>

#include "cpu/simd_avx512_bf16.hpp"
#include "mla/mla_bf16_unit.hpp"
#include "mla/mla_internal.hpp"

namespace ringattn::detail::mla {

namespace {
namespace dpbf16 {

using bf16u::B;
using bf16u::D;
using bf16u::DV;
using bf16u::kDimPairs;
using bf16u::L;
using V = B::V;
using P = B::P;
// Keys per tile: the P V products reduce over kKeys / 2 pairs between two passes over
// the accumulator (64 measured 6 % faster than 32, 128 the same as 64).
constexpr int kKeys = 64;
constexpr int kKeyPairs = kKeys / 2;
// Register blocks: Q K^T kQkKeys keys x kQkVecs row vectors (16 accumulators, per pair of
// dims kQkVecs loads + kQkKeys broadcasts); P V kPvRows rows x kPvVecs column vectors
// (24 accumulators, per pair of keys kPvVecs loads + kPvRows broadcasts).
constexpr int kQkKeys = 4, kQkVecs = 4;
constexpr int kPvRows = 6, kPvVecs = 4;
static_assert(kKeys % kQkKeys == 0 && DV % (kPvVecs * L) == 0);

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

}  // namespace dpbf16

struct DpBf16Products {
  static constexpr int kKeys = dpbf16::kKeys, kRowAlign = bf16u::L, kKeyAlign = dpbf16::kQkKeys;
  static void begin(Workspace&, int) {}
  static void end() {}
  static void qk(const Workspace& ws, int rp, int nk, float* st) {
    dpbf16::qk_rows(ws.qpairs.data(), rp, rp / bf16u::L, ws.krow.data(), nk, st);
  }
  static void pv(Workspace& ws, int rp, int R) {
    dpbf16::pv_rows(ws.ppairs.data(), rp, R, ws.vpairs.data(), ws.alpha.data(), ws.acc.data());
  }
};

}  // namespace

void run_unit_dpbf16(const TokenSource& src, const KeyList& keys, const UnitSpec& u, Workspace& ws,
                     float* o, float* lse, float* max_logit) {
  run_unit_bf16<DpBf16Products>(src, keys, u, ws, o, lse, max_logit);
}

}  // namespace ringattn::detail::mla
