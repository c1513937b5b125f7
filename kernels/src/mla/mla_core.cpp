// The one MLA tile loop (run_unit), shared by dense decode, sparse decode and the
// three sparse-prefill paths, plus small helpers.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "mla/mla_internal.hpp"
#include "ringattn/error.hpp"
#include "ringattn/softmax_state.hpp"

namespace ringattn::detail::mla {

std::int64_t RowMask::last(int t, std::int64_t n) const {
  if (kind == Kind::kNone || limit == nullptr) return n;
  return std::min<std::int64_t>(limit[t], n);
}

void convert_to_f32(const void* src, DType t, std::int64_t offset, std::int64_t n, float* dst) {
  if (t == DType::kF32) {
    std::memcpy(dst, static_cast<const float*>(src) + offset, n * sizeof(float));
    return;
  }
  for (std::int64_t i = 0; i < n; ++i) dst[i] = load_as_f32(src, offset + i, t);
}

TokenSource make_source(const MlaDecodeParams& p) {
  TokenSource s;
  s.base = static_cast<const std::uint8_t*>(p.kv_cache);
  if (p.cache_layout == MlaCacheLayout::kFlashMlaFp8Packed656) {
    s.kind = SourceKind::kPacked656;
    s.row_bytes = kMlaFp8PackedBytes;
    return s;
  }
  s.row_bytes = kMlaHeadDim * static_cast<std::int64_t>(dtype_size(p.kv_dtype));
  s.kind = p.kv_dtype == DType::kF32    ? SourceKind::kF32
           : p.kv_dtype == DType::kBF16 ? SourceKind::kBF16
                                        : SourceKind::kFP8;
  return s;
}

bool decode_uses_bf16_path(CpuIsa tier, const MlaDecodeParams& p) {
  // Query rows that share a key list (a unit has at most this many): the bf16 products
  // pad them to 16 (AMX: 32), which at twice the multiply-adds per instruction costs the
  // fp32 tiles' time at 8 rows; below that (h_q = 1 .. 4) the fp32 tiles are faster
  // (h_q = 1, s_q = 1 measured 1.5-2x slower on the bf16 path).
  constexpr int kMinRows = 8;
  const int rows = p.h_q * (p.is_sparse() ? 1 : p.s_q);
  return rows >= kMinRows && (tier == CpuIsa::kAvx512Bf16 || tier == CpuIsa::kAmx) &&
         p.cache_layout == MlaCacheLayout::kDense576 &&
         (p.kv_dtype == DType::kBF16 || p.kv_dtype == DType::kFP8E4M3) && p.q_dtype == DType::kBF16;
}

float decode_score_scale(const MlaDecodeParams& p) {
  if (p.bmm1_scale > 0.0f) return p.bmm1_scale;
  if (p.scale > 0.0f) return p.scale;
  return 1.0f / std::sqrt(static_cast<float>(kMlaHeadDim));
}

// Tile loop of one unit (R = ntok * h_q query rows, keys [key_begin, key_end)):
//
//   for each key tile [j0, j0 + kTile):                    (tiles past every row's
//     decode the tile's tokens to fp32 ONCE                  last visible key: skipped)
//     for each group of kRowGroup query rows:
//       S = Q_group . K_tile^T            [G, kTile]   (scores micro-kernel)
//       S = -inf where the row's token may not see the key
//       online softmax: m, d, alpha per row; S <- exp(sc * S - m)
//       acc_group = acc_group * alpha + S . V_tile      (V = first 512 values)
//
// So all heads of all query tokens of a unit share one read of every cache line,
// the point of MLA's single latent KV head.
void run_unit(const Ops& ops, const TokenSource& src, const KeyList& keys, const UnitSpec& u,
              Workspace& ws, float* o, float* lse, float* max_logit) {
  const int R = u.ntok * u.h_q;
  ws.m.assign(R, kNegInf);
  ws.d.assign(R, 0.0f);
  ws.acc.assign(static_cast<std::size_t>(R) * kMlaValueDim, 0.0f);
  ws.ktile.resize(static_cast<std::size_t>(kTile) * kMlaHeadDim);
  ws.s.resize(static_cast<std::size_t>(kRowGroup) * kTile);
  ws.alpha.resize(kRowGroup);
  ws.slots.resize(kTile);

  std::int64_t hi = u.key_begin;
  for (int t = 0; t < u.ntok; ++t) hi = std::max(hi, u.mask.last(t, u.key_end));

  for (std::int64_t j0 = u.key_begin; j0 < hi; j0 += kTile) {
    const int T = static_cast<int>(std::min<std::int64_t>(kTile, hi - j0));
    for (int t = 0; t < T; ++t) ws.slots[t] = keys.slot(j0 + t);
    ops.load_tokens(src, ws.slots.data(), T, ws.ktile.data());
    for (int g = 0; g < R; g += kRowGroup) {
      const int G = std::min(kRowGroup, R - g);
      const int tok0 = g / u.h_q, tok1 = (g + G - 1) / u.h_q;
      bool any = false;
      for (int t = tok0; t <= tok1 && !any; ++t) any = u.mask.last(t, u.key_end) > j0;
      if (!any) continue;
      float* s = ws.s.data();
      ops.scores(u.q + static_cast<std::int64_t>(g) * kMlaHeadDim, G, ws.ktile.data(), T, s, kTile);
      for (int r = 0; r < G; ++r) {
        float* row = s + r * kTile;
        for (int t = T; t < kTile; ++t) row[t] = kNegInf;
        const int tok = (g + r) / u.h_q;
        if (u.mask.kind == RowMask::Kind::kLimit) {
          const std::int64_t lim = u.mask.limit[tok];
          for (int t = 0; t < T; ++t)
            if (j0 + t >= lim) row[t] = kNegInf;
        } else if (u.mask.kind == RowMask::Kind::kBits) {
          const std::uint64_t* bits = u.mask.bits + tok * u.mask.words;
          for (int t = 0; t < T; ++t) {
            const std::int64_t j = j0 + t;
            if (!((bits[j >> 6] >> (j & 63)) & 1u)) row[t] = kNegInf;
          }
        }
      }
      ops.softmax(s, kTile, G, u.sc, ws.m.data() + g, ws.d.data() + g, ws.alpha.data());
      ops.pv(s, kTile, G, ws.ktile.data(), T,
             ws.acc.data() + static_cast<std::int64_t>(g) * kMlaValueDim, ws.alpha.data());
    }
  }

  finish_unit(ws, R, o, lse, max_logit);
}

void finish_unit(const Workspace& ws, int R, float* o, float* lse, float* max_logit) {
  for (int r = 0; r < R; ++r) {
    SoftmaxState st;
    st.m = ws.m[r];
    st.d = ws.d[r];
    const float inv = st.inv_sum();
    const float* a = ws.acc.data() + static_cast<std::int64_t>(r) * kMlaValueDim;
    float* dst = o + static_cast<std::int64_t>(r) * kMlaValueDim;
    for (int c = 0; c < kMlaValueDim; ++c) dst[c] = a[c] * inv;
    lse[r] = st.lse();
    // The online softmax's running max is exactly the largest scaled score seen.
    if (max_logit != nullptr) max_logit[r] = ws.m[r];
  }
}

}  // namespace ringattn::detail::mla
