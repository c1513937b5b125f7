// MLA decode on the AMX tiles: the products of the cpu-amx tier for bf16 q with a bf16 or
// dense fp8 cache, the policy of the shared unit loop (mla_bf16_unit.hpp documents the
// loop and the layouts; the online softmax is the same vector code), written over the
// tile helpers of cpu/amx_tiles.hpp. Built with the amx flags; reached only through
// decode_uses_bf16_path() on the cpu-amx tier (cpu_supports(kAmx): the tile state and the
// process's permission to use it).
//
// Both products take the unit loop's layouts as tile operands, per 32 x 32 fp32 block
// (amx::block_step: two A tiles, two B tiles, four tdpbf16ps):
//   S^T = K Qp^T   A = 16 cache rows x 32 dims (row-major; rows 1152 bytes apart when 32
//                  consecutive keys are consecutive slots, else copied to one buffer),
//                  B = Qp (16 dim pairs x 16 query rows x 2, rows 4 Rp bytes apart), 18
//                  steps over 576 dims, C stored to St[keys][rows].
//   O += P V       A = P row-major (16 rows x 32 keys: Pp transposed by 16 x 16 blocks of
//                  pairs), B = Vp (16 key pairs x 16 columns x 2, rows 2048 bytes apart),
//                  C loaded from and stored to the accumulator [Rp][512], which is
//                  rescaled by alpha first (only rows whose alpha is not 1).
#include <cstdint>
#include <cstring>

#include "cpu/amx_tiles.hpp"
#include "cpu/simd_avx512_bf16.hpp"
#include "mla/mla_bf16_unit.hpp"
#include "mla/mla_internal.hpp"

namespace ringattn::detail::mla {

namespace {
namespace amx = cpu::amx;

struct AmxProducts {
  // Keys per tile: P V passes the accumulator through the tiles once per key tile.
  static constexpr int kKeys = 128, kRowAlign = amx::kBlockRows, kKeyAlign = amx::kBlockRows;
  static constexpr int D = kMlaHeadDim, DV = kMlaValueDim, kBlock = amx::kBlockRows;
  static constexpr int kHalf = amx::kTileRows;
  static_assert(D % amx::kDepth == 0 && DV % kBlock == 0 && kKeys % kBlock == 0);
  using B = bf16u::B;

  static void begin(Workspace& ws, int rp) {
    ws.prow.resize(static_cast<std::size_t>(rp) * kKeys);
    amx::configure();
  }
  static void end() { amx::release(); }

  // The 32 key rows of block kb at one stride (D bf16): the cache itself when they are
  // consecutive slots, else copied to ws.kconv (fp8 rows are there already).
  static const bf16_t* key_block(Workspace& ws, int kb) {
    const bf16_t* const* kr = ws.krow.data() + kb * kBlock;
    bool consecutive = true;
    for (int t = 1; t < kBlock && consecutive; ++t) consecutive = kr[t] == kr[0] + t * D;
    if (consecutive) return kr[0];
    bf16_t* dst = ws.kconv.data() + static_cast<std::int64_t>(kb) * kBlock * D;
    for (int t = 0; t < kBlock; ++t)
      if (kr[t] != dst + t * D) std::memcpy(dst + t * D, kr[t], sizeof(bf16_t) * D);
    return dst;
  }

  static void qk(Workspace& ws, int rp, int nk, float* st) {
    const bf16_t* const qp = ws.qpairs.data();
    const long sa = long{D} * 2, sb = long{rp} * 4;
    for (int kb = 0; kb < nk / kBlock; ++kb) {
      const bf16_t* const a = key_block(ws, kb);
      for (int r0 = 0; r0 < rp; r0 += kBlock) {
        amx::zero_block();
        for (int db = 0; db < D / amx::kDepth; ++db) {
          // dims [32 db, 32 db + 32) = pairs [16 db, 16 db + 16)
          const bf16_t* b = qp + 2 * (std::int64_t{kHalf} * db * rp + r0);
          amx::block_step(a + amx::kDepth * db, a + kHalf * D + amx::kDepth * db, sa, b,
                          b + 2 * kHalf, sb);
        }
        amx::store_block(st + static_cast<std::int64_t>(kb) * kBlock * rp + r0, rp);
      }
    }
  }

  static void pv(Workspace& ws, int rp, int) {
    float* const acc = ws.acc.data();
    // acc *= alpha per row (after the first tiles alpha is almost always exactly 1).
    for (int r = 0; r < rp; ++r) {
      const float al = ws.alpha[r];
      if (al == 1.0f) continue;
      const bf16u::V va = B::set1(al);
      float* row = acc + static_cast<std::int64_t>(r) * DV;
      for (int c = 0; c < DV; c += B::kLanes) B::store(row + c, B::mul(B::load(row + c), va));
    }
    // P row-major: prow[r][2k .. 2k + 1] = Pp[k][r], by 16 x 16 blocks of pairs.
    constexpr int kPairs = kKeys / 2;
    for (int r0 = 0; r0 < rp; r0 += kHalf)
      for (int k0 = 0; k0 < kPairs; k0 += kHalf)
        B::transpose_pairs16(ws.ppairs.data() + 2 * (std::int64_t{k0} * rp + r0), rp,
                             ws.prow.data() + 2 * (std::int64_t{r0} * kPairs + k0), kPairs);
    const bf16_t* const pm = ws.prow.data();
    const bf16_t* const vp = ws.vpairs.data();
    const long sa = long{kKeys} * 2, sb = long{DV} * 4;
    for (int r0 = 0; r0 < rp; r0 += kBlock)
      for (int c0 = 0; c0 < DV; c0 += kBlock) {
        float* const o = acc + static_cast<std::int64_t>(r0) * DV + c0;
        amx::load_block(o, DV);
        for (int kb = 0; kb < kKeys / kBlock; ++kb) {
          // keys [32 kb, 32 kb + 32) = key pairs [16 kb, 16 kb + 16)
          const bf16_t* a = pm + static_cast<std::int64_t>(r0) * kKeys + kBlock * kb;
          const bf16_t* b = vp + 2 * (static_cast<std::int64_t>(kHalf) * kb * DV + c0);
          amx::block_step(a, a + kHalf * kKeys, sa, b, b + 2 * kHalf, sb);
        }
        amx::store_block(o, DV);
      }
  }
};

}  // namespace

void run_unit_amx(const TokenSource& src, const KeyList& keys, const UnitSpec& u, Workspace& ws,
                  float* o, float* lse, float* max_logit) {
  run_unit_bf16<AmxProducts>(src, keys, u, ws, o, lse, max_logit);
}

}  // namespace ringattn::detail::mla
