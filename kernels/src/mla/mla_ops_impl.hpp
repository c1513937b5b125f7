// MLA tile operations written once over the kernels' vector API S (cpu/simd_*.hpp:
// cpu::SimdScalar, cpu::SimdAvx2) and instantiated per ISA by mla_ops_scalar.cpp /
// mla_ops_avx2.cpp.
#pragma once

#include <cstdint>
#include <cstring>

#include "mla/mla_internal.hpp"
#include "ringattn/dtype.hpp"
#include "ringattn/softmax_state.hpp"

namespace ringattn::detail::mla {

template <class S>
struct OpsImpl {
  using V = typename S::V;
  static constexpr int L = S::kLanes;
  static constexpr int D = kMlaHeadDim;
  static constexpr int DV = kMlaValueDim;

  // Decodes one token into 576 fp32 values.
  static void load_token(const TokenSource& src, const std::uint8_t* t, float* dst) {
    switch (src.kind) {
      case SourceKind::kF32:
        std::memcpy(dst, t, D * sizeof(float));
        break;
      case SourceKind::kBF16:
        for (int c = 0; c < D; c += L)
          S::store(dst + c, S::load(reinterpret_cast<const bf16_t*>(t) + c));
        break;
      case SourceKind::kFP8:
        for (int c = 0; c < D; c += L) S::store(dst + c, S::load_fp8(t + c));
        break;
      case SourceKind::kPacked656: {
        // 512 e4m3 | 4 fp32 tile scales | 64 bf16 rope values.
        for (int tile = 0; tile < 4; ++tile) {
          float sc;
          std::memcpy(&sc, t + kMlaValueDim + 4 * tile, 4);
          const V vs = S::set1(sc);
          for (int c = 128 * tile; c < 128 * (tile + 1); c += L)
            S::store(dst + c, S::mul(S::load_fp8(t + c), vs));
        }
        const std::uint8_t* rope = t + kMlaValueDim + 16;
        for (int c = 0; c < kMlaRopeDim; c += L)
          S::store(dst + kMlaValueDim + c, S::load(reinterpret_cast<const bf16_t*>(rope) + c));
        break;
      }
    }
  }

  static void load_tokens(const TokenSource& src, const std::int64_t* slots, int n, float* dst) {
    for (int i = 0; i < n; ++i) load_token(src, src.base + slots[i] * src.row_bytes, dst + i * D);
  }

  // RB query rows x TB keys of dot products over 576 values, RB*TB accumulators.
  template <int RB, int TB>
  static void scores_block(const float* q, const float* k, float* s, int lds) {
    V acc[RB][TB];
    for (int r = 0; r < RB; ++r)
      for (int t = 0; t < TB; ++t) acc[r][t] = S::zero();
    for (int c = 0; c < D; c += L) {
      V kv[TB];
      for (int t = 0; t < TB; ++t) kv[t] = S::load(k + t * D + c);
      for (int r = 0; r < RB; ++r) {
        const V qv = S::load(q + r * D + c);
        for (int t = 0; t < TB; ++t) acc[r][t] = S::fma(qv, kv[t], acc[r][t]);
      }
    }
    for (int r = 0; r < RB; ++r)
      for (int t = 0; t < TB; ++t) s[r * lds + t] = S::reduce_add(acc[r][t]);
  }

  template <int RB>
  static void scores_rows(const float* q, const float* k, int T, float* s, int lds) {
    int t = 0;
    for (; t + 3 <= T; t += 3) scores_block<RB, 3>(q, k + t * D, s + t, lds);
    if (T - t == 2) scores_block<RB, 2>(q, k + t * D, s + t, lds);
    if (T - t == 1) scores_block<RB, 1>(q, k + t * D, s + t, lds);
  }

  // Register blocking 4 rows x 3 keys (12 accumulators + 3 key vectors + 1 query).
  static void scores(const float* q, int R, const float* k, int T, float* s, int lds) {
    int r = 0;
    for (; r + 4 <= R; r += 4) scores_rows<4>(q + r * D, k, T, s + r * lds, lds);
    switch (R - r) {
      case 3:
        scores_rows<3>(q + r * D, k, T, s + r * lds, lds);
        break;
      case 2:
        scores_rows<2>(q + r * D, k, T, s + r * lds, lds);
        break;
      case 1:
        scores_rows<1>(q + r * D, k, T, s + r * lds, lds);
        break;
      default:
        break;
    }
  }

  static void softmax(float* s, int lds, int R, float sc, float* m, float* d, float* alpha) {
    static_assert(kTile % L == 0 && D % L == 0 && DV % (2 * L) == 0 && kMlaRopeDim % L == 0);
    const V vsc = S::set1(sc);
    for (int r = 0; r < R; ++r) {
      float* row = s + r * lds;
      V mx = S::set1(kNegInf);
      for (int t = 0; t < kTile; t += L) {
        const V x = S::mul(S::load(row + t), vsc);
        S::store(row + t, x);
        mx = S::max(mx, x);
      }
      const float tile_max = S::reduce_max(mx);
      const float m_new = tile_max > m[r] ? tile_max : m[r];
      if (m_new == kNegInf) {  // nothing visible yet: p = 0, accumulator untouched
        for (int t = 0; t < kTile; ++t) row[t] = 0.0f;
        alpha[r] = 1.0f;
        continue;
      }
      const V vm = S::set1(m_new);
      V sum = S::zero();
      for (int t = 0; t < kTile; t += L) {
        const V p = S::exp(S::sub(S::load(row + t), vm));
        S::store(row + t, p);
        sum = S::add(sum, p);
      }
      alpha[r] = m[r] == kNegInf ? 0.0f : std::exp(m[r] - m_new);
      d[r] = d[r] * alpha[r] + S::reduce_add(sum);
      m[r] = m_new;
    }
  }

  // RB rows x 2 vectors of output columns; one broadcast of p per row and key.
  template <int RB>
  static void pv_rows(const float* p, int lds, const float* v, int T, float* acc,
                      const float* alpha) {
    for (int c = 0; c < DV; c += 2 * L) {
      V a[RB][2];
      for (int r = 0; r < RB; ++r) {
        const V al = S::set1(alpha[r]);
        a[r][0] = S::mul(S::load(acc + r * DV + c), al);
        a[r][1] = S::mul(S::load(acc + r * DV + c + L), al);
      }
      for (int t = 0; t < T; ++t) {
        const V v0 = S::load(v + t * D + c);
        const V v1 = S::load(v + t * D + c + L);
        for (int r = 0; r < RB; ++r) {
          const V pr = S::set1(p[r * lds + t]);
          a[r][0] = S::fma(pr, v0, a[r][0]);
          a[r][1] = S::fma(pr, v1, a[r][1]);
        }
      }
      for (int r = 0; r < RB; ++r) {
        S::store(acc + r * DV + c, a[r][0]);
        S::store(acc + r * DV + c + L, a[r][1]);
      }
    }
  }

  // Register blocking 6 rows x 16 columns (12 accumulators + 2 value vectors + 1 p).
  static void pv(const float* p, int lds, int R, const float* v, int T, float* acc,
                 const float* alpha) {
    int r = 0;
    for (; r + 6 <= R; r += 6) pv_rows<6>(p + r * lds, lds, v, T, acc + r * DV, alpha + r);
    const float* pr = p + r * lds;
    float* ar = acc + r * DV;
    const float* al = alpha + r;
    switch (R - r) {
      case 5:
        pv_rows<5>(pr, lds, v, T, ar, al);
        break;
      case 4:
        pv_rows<4>(pr, lds, v, T, ar, al);
        break;
      case 3:
        pv_rows<3>(pr, lds, v, T, ar, al);
        break;
      case 2:
        pv_rows<2>(pr, lds, v, T, ar, al);
        break;
      case 1:
        pv_rows<1>(pr, lds, v, T, ar, al);
        break;
      default:
        break;
    }
  }

  static Ops table(const char* name) { return Ops{name, load_tokens, scores, softmax, pv}; }
};

}  // namespace ringattn::detail::mla
