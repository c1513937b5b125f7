// The AMX matrix engine of the cpu-amx tier: tile configuration, the packed bf16
// layouts of K and V, and the two tile products of a prefill key tile,
//   S = Q K^T   (fp32 out, bf16 in)     and     O += P V   (fp32 accumulator in place),
// plus the few AVX-512 / AVX512-BF16 helpers the fused softmax of amx_prefill.hpp
// needs (masked scores, fp32 -> bf16 rows). Include only from translation units
// compiled with the amx flags (files named *_amx.cpp).
//
// Tiles. Every tile is configured as 16 rows x 64 bytes (16 fp32 or 32 bf16 per row):
// tmm0-3 accumulate a 32 x 32 fp32 block (2 x 2 tiles), tmm4-5 hold two 16-row A tiles,
// tmm6-7 two B tiles. tdpbf16ps C += A B takes A [16][32] bf16 row-major and B in the
// pair ("VNNI") layout B'[16 pairs][16 columns][2]: element (k, n) of the 32 x 16
// operand at B'[k / 2][n][k % 2].
//
// Packed K of one key tile of nc <= kKeyTile keys (kp, bf16): for S = Q K^T the B
// operand is K^T, whose pair layout is K[key][2 dp + i] gathered per 16 keys:
//   kp[((kb * dblocks + db) * 16 + dp) * 32 + n * 2 + i] = K[16 kb + n][32 db + 2 dp + i]
// i.e. one 1 KiB tile per (16 keys, 32 head dims); dblocks = dpad / 32, dpad = d
// rounded up to 32; keys past nc and dims past d are 0.
// Packed V (vp, bf16): B operand of P V, pairs of keys per column:
//   vp[((kb * ncolt + cb) * 16 + kk) * 32 + n * 2 + i] = V[32 kb + 2 kk + i][16 cb + n]
// one tile per (32 keys, 16 value columns); ncolt = dvp / 16; padding 0 (never NaN: P
// is 0 there and 0 * NaN would poison O).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace ringattn::detail::cpu::amx {

inline constexpr int kTileRows = 16;                   // rows of every tile
inline constexpr int kTileBytes = 64;                  // bytes of a tile row
inline constexpr int kBlockRows = 32;                  // rows of one accumulator block (2 tiles)
inline constexpr int kDepth = 32;                      // bf16 values reduced by one tdpbf16ps
inline constexpr int kTileElems = kTileRows * kDepth;  // bf16 values of one packed tile

// Loads the configuration above on the calling thread (palette 1). The tile state
// stays with the thread until release().
inline void configure() {
  struct alignas(64) Config {
    std::uint8_t palette;
    std::uint8_t start_row;
    std::uint8_t reserved[14];
    std::uint16_t colsb[16];
    std::uint8_t rows[16];
  } cfg{};
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = kTileBytes;
    cfg.rows[t] = kTileRows;
  }
  _tile_loadconfig(&cfg);
}

inline void release() { _tile_release(); }

// S[32 rows][32 * ncb cols] = Q[32 rows][dpad] K^T for column blocks [0, ncb):
// q rows ldq bf16 apart, kp the packed K of the tile (dblocks blocks of 32 dims),
// s rows lds floats apart. Per 32 x 32 block: dblocks steps of 2 A + 2 B loads and
// 4 tdpbf16ps, then 4 stores.
inline void scores(const std::uint16_t* q, int ldq, const std::uint16_t* kp, int dblocks, int ncb,
                   float* s, int lds) {
  const long qs = static_cast<long>(ldq) * 2, ss = static_cast<long>(lds) * 4;
  for (int cb = 0; cb < ncb; ++cb) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const std::uint16_t* k0 = kp + static_cast<long>(2 * cb) * dblocks * kTileElems;
    const std::uint16_t* k1 = k0 + static_cast<long>(dblocks) * kTileElems;
    for (int db = 0; db < dblocks; ++db) {
      _tile_loadd(4, q + db * kDepth, qs);
      _tile_loadd(5, q + kTileRows * ldq + db * kDepth, qs);
      _tile_loadd(6, k0 + db * kTileElems, kTileBytes);
      _tile_loadd(7, k1 + db * kTileElems, kTileBytes);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    float* sb = s + cb * kBlockRows;
    _tile_stored(0, sb, ss);
    _tile_stored(1, sb + kTileRows, ss);
    _tile_stored(2, sb + kTileRows * lds, ss);
    _tile_stored(3, sb + kTileRows * lds + kTileRows, ss);
  }
}

// O[32 rows][16 * ncolt cols] += P[32 rows][32 * nkb keys] V: pm rows ldp bf16 apart,
// vp the packed V of the tile (ncolt column tiles), o rows ldo floats apart (read and
// written by the tile loads / stores). Column tiles two at a time, a last odd one alone.
inline void pv(const std::uint16_t* pm, int ldp, const std::uint16_t* vp, int nkb, int ncolt,
               float* o, int ldo) {
  const long ps = static_cast<long>(ldp) * 2, os = static_cast<long>(ldo) * 4;
  int cb = 0;
  for (; cb + 2 <= ncolt; cb += 2) {
    float* ob = o + cb * kTileRows;
    _tile_loadd(0, ob, os);
    _tile_loadd(1, ob + kTileRows, os);
    _tile_loadd(2, ob + kTileRows * ldo, os);
    _tile_loadd(3, ob + kTileRows * ldo + kTileRows, os);
    for (int kb = 0; kb < nkb; ++kb) {
      const std::uint16_t* v0 = vp + (static_cast<long>(kb) * ncolt + cb) * kTileElems;
      _tile_loadd(4, pm + kb * kDepth, ps);
      _tile_loadd(5, pm + kTileRows * ldp + kb * kDepth, ps);
      _tile_loadd(6, v0, kTileBytes);
      _tile_loadd(7, v0 + kTileElems, kTileBytes);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, ob, os);
    _tile_stored(1, ob + kTileRows, os);
    _tile_stored(2, ob + kTileRows * ldo, os);
    _tile_stored(3, ob + kTileRows * ldo + kTileRows, os);
  }
  if (cb < ncolt) {
    float* ob = o + cb * kTileRows;
    _tile_loadd(0, ob, os);
    _tile_loadd(2, ob + kTileRows * ldo, os);
    for (int kb = 0; kb < nkb; ++kb) {
      _tile_loadd(4, pm + kb * kDepth, ps);
      _tile_loadd(5, pm + kTileRows * ldp + kb * kDepth, ps);
      _tile_loadd(6, vp + (static_cast<long>(kb) * ncolt + cb) * kTileElems, kTileBytes);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(2, 5, 6);
    }
    _tile_stored(0, ob, os);
    _tile_stored(2, ob + kTileRows * ldo, os);
  }
}

// ---- one 32 x 32 fp32 block on any row strides (MLA decode, mla_decode_amx.cpp) ----
// tmm0-3 hold C: tmm0 rows 0-15 x columns 0-15, tmm1 rows 0-15 x 16-31, tmm2 rows 16-31 x
// 0-15, tmm3 rows 16-31 x 16-31.

inline void zero_block() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}
// C <- c (fp32 rows ldc floats apart) / c <- C.
inline void load_block(const float* c, long ldc) {
  const long cs = ldc * 4;
  _tile_loadd(0, c, cs);
  _tile_loadd(1, c + kTileRows, cs);
  _tile_loadd(2, c + kTileRows * ldc, cs);
  _tile_loadd(3, c + kTileRows * ldc + kTileRows, cs);
}
inline void store_block(float* c, long ldc) {
  const long cs = ldc * 4;
  _tile_stored(0, c, cs);
  _tile_stored(1, c + kTileRows, cs);
  _tile_stored(2, c + kTileRows * ldc, cs);
  _tile_stored(3, c + kTileRows * ldc + kTileRows, cs);
}
// C += [A0; A1] [B0 B1] over 32 bf16 of depth: a0 / a1 16-row A tiles (32 bf16 per row,
// row-major, rows sa bytes apart), b0 / b1 B tiles in the pair layout (16 pairs x 16
// columns x 2, rows sb bytes apart).
inline void block_step(const void* a0, const void* a1, long sa, const void* b0, const void* b1,
                       long sb) {
  _tile_loadd(4, a0, sa);
  _tile_loadd(5, a1, sa);
  _tile_loadd(6, b0, sb);
  _tile_loadd(7, b1, sb);
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(1, 4, 7);
  _tile_dpbf16ps(2, 5, 6);
  _tile_dpbf16ps(3, 5, 7);
}

// ---- AVX-512 helpers of the fused softmax ----

// Lanes c .. c + 15 that lie in [a, b): bit i set when a <= c + i < b.
inline __mmask16 lanes_in(int c, int a, int b) {
  const int lo = a - c, hi = b - c;
  const unsigned full = 0xffffu;
  const unsigned below_hi = hi <= 0 ? 0u : hi >= 16 ? full : (1u << hi) - 1u;
  const unsigned below_lo = lo <= 0 ? 0u : lo >= 16 ? full : (1u << lo) - 1u;
  return static_cast<__mmask16>(below_hi & ~below_lo);
}

// x where the lane is in `keep`, -inf elsewhere.
inline __m512 keep_or_neg_inf(__mmask16 keep, __m512 x) {
  return _mm512_mask_blend_ps(keep, _mm512_set1_ps(-__builtin_inff()), x);
}

// 2^t for t <= 0 (scores minus the row max, in log2 units), -inf included. t is
// clamped at -200, where the result is exactly 0; 2^f on f = t - round(t) in
// [-1/2, 1/2] by a degree-5 polynomial (least squares on Chebyshev nodes, relative
// error 2.5e-7 evaluated in fp32), times 2^round(t) by vscalefps. 10 instructions
// against about 20 of simd_exp (whose range reduction and special cases the softmax
// does not need); P is rounded to bf16 (2^-8) afterwards anyway.
inline __m512 exp2_nonpositive(__m512 t) {
  t = _mm512_max_ps(t, _mm512_set1_ps(-200.0f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.3400432653725147e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.676037356257439e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550327152013779e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402210682630539e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471824645996e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000001192092896f));
  return _mm512_scalef_ps(p, n);
}

// 16 fp32 -> 16 bf16 (round to nearest even) stored at dst.
inline void store_bf16(std::uint16_t* dst, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(x));
}

}  // namespace ringattn::detail::cpu::amx
